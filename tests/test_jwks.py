"""
Tests for the JWKS validator (L{sentry_tx.identity.jwks}).

Tokens are made with PyJWT (the code verifies with joserfc), and the hostile
ones (C{alg: none}, HMAC keyed with the RSA public key) are put together by
hand here, as an attacker would.
"""

import base64
import hashlib
import hmac
import json
import os
import warnings as warnings_module

import grpc
import jwt as pyjwt
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from treq.testing import RequestTraversalAgent
from twisted.internet import defer, reactor, ssl
from twisted.logger import LogLevel
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent
from twisted.web.resource import Resource
from twisted.web.server import Site
from zope.interface.verify import verifyObject

from sentry_tx.config import MTLSConfig, SentryConfig, TokenValidatorConfig
from sentry_tx.errors import ValidationError
from sentry_tx.healthz import healthz_root
from sentry_tx.identity.caller import VALIDATOR_JWKS
from sentry_tx.identity.jwks import (
    JWKS_FILE_CHECK_INTERVAL_SECONDS,
    PERIODIC_REFRESH_SECONDS,
    JWKSOptions,
    JWKSValidator,
)
from sentry_tx.identity.jwks_fetch import (
    MAX_LOGGED_LOCATION_CHARACTERS,
    JWKSFetcher,
    JWKSFetchError,
)
from sentry_tx.identity.jwks_keys import (
    MAX_TOKEN_LIFETIME_SECONDS,
    MIN_RSA_KEY_BITS,
    TOKEN_LEEWAY_SECONDS,
    key_set_from_json,
)
from sentry_tx.interfaces import IIdentityValidator
from sentry_tx.metrics import SentryMetrics
from sentry_tx.modes import build_validators
from sentry_tx.server.servicer import VALIDATION_TIMEOUT_SECONDS, CAServicer, Refusal
from sentry_tx.testing.authority import FakeCertificateAuthority
from sentry_tx.testing.certificates import (
    certificate_pem,
    private_key_pem,
    sign_request,
)
from sentry_tx.testing.clocks import ImmediateReactor, inline_file_work
from sentry_tx.testing.grpc_client import run_now
from sentry_tx.testing.jwk import jwk_member, rsa_key
from sentry_tx.testing.jwks_server import KeySetServer
from sentry_tx.testing.kubeconfig import make_self_signed_server_certificate
from sentry_tx.testing.logs import capture_logs, log_messages
from sentry_tx.testing.rendering import render

NOW = 1_800_000_000
SENTRY_ID = "spiffe://example.org/ns/dapr-system/dapr-sentry"
SUBJECT = "spiffe://public/ns/default/myapp"


def jwks(*members):
    return json.dumps({"keys": list(members)})


def token(key=None, kid="k1", algorithm="RS256", **claims):
    """
    A token signed by PyJWT for myapp in default, audience Sentry.
    """
    values = {"sub": SUBJECT, "aud": [SENTRY_ID], "iat": NOW, "exp": NOW + 600}
    values.update(claims)
    values = {k: v for k, v in values.items() if v is not None}
    headers = {"kid": kid} if kid is not None else {}
    return pyjwt.encode(values, key or rsa_key(), algorithm=algorithm, headers=headers)


def _b64(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def forged(header, claims, signature=b""):
    """
    A compact JWS put together by hand.
    """
    signing_input = (
        f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    )
    if callable(signature):
        signature = signature(signing_input.encode("ascii"))
    return f"{signing_input}.{_b64(signature)}"


GOOD_CLAIMS = {"sub": SUBJECT, "aud": [SENTRY_ID], "iat": NOW, "exp": NOW + 600}


def signed_raw(header, payload, key=None):
    """
    A compact JWS of C{payload} (bytes, any JSON text), RS256-signed by hand
    with C{key}, as an attacker holding a key of the set would make one.
    """
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(payload)}".encode()
    signature = (key or rsa_key()).sign(
        signing_input, padding.PKCS1v15(), hashes.SHA256()
    )
    return f"{signing_input.decode()}.{_b64(signature)}"


class ValidationTests(SynchronousTestCase):
    """
    Every refusal and the acceptance, with an inline key set.
    """

    def setUp(self):
        self.reactor = ImmediateReactor(NOW)
        self.validator = self.make(
            jwks(
                jwk_member(rsa_key(), kid="k1", alg="RS256"),
                jwk_member(rsa_key(1), kid="k2"),
            )
        )
        self.validator.startService()
        self.addCleanup(self.validator.stopService)

    def make(self, source):
        return JWKSValidator(
            self.reactor,
            JWKSOptions(source=source),
            SENTRY_ID,
            file_work=inline_file_work(self.reactor),
        )

    def identity(self, **fields):
        return self.successResultOf(self.validator.validate(sign_request(**fields)))

    def refused(self, **fields):
        failure = self.failureResultOf(
            self.validator.validate(sign_request(**fields)), ValidationError
        )
        return failure.getErrorMessage()

    def test_interface(self):
        """
        It is an IIdentityValidator answering to JWKS; an inline source
        needs no reactor.
        """
        verifyObject(IIdentityValidator, self.validator)
        self.assertEqual(self.validator.name, VALIDATOR_JWKS)
        self.assertFalse(self.validator.needs_reactor)

    def test_accepts(self):
        """
        A token signed by a key of the set, for Sentry, naming the caller,
        is accepted as the requested identity; any key of the set will do.
        """
        identity = self.identity(token=token())
        self.assertEqual(identity.spiffe_id, SUBJECT)
        identity = self.identity(token=token(rsa_key(1), kid="k2", algorithm="PS256"))
        self.assertEqual(identity.spiffe_id, SUBJECT)

    def test_trust_domain(self):
        """
        sub must use the requested trust domain.
        """
        identity = self.identity(
            token=token(sub="spiffe://td1/ns/default/myapp"), trust_domain="td1"
        )
        self.assertEqual(identity.trust_domain, "td1")
        self.assertIn(
            "token validation failed", self.refused(token=token(), trust_domain="td1")
        )

    def test_no_token(self):
        """
        No token comes first.
        """
        self.assertEqual(
            self.refused(token="", id=""), "the request does not contain a token"
        )

    def test_not_ready(self):
        """
        Before the key set loads: "jwks validator not ready", before the
        common rules.
        """
        validator = self.make(jwks(jwk_member(rsa_key(), kid="k1")))
        self.assertFalse(validator.ready)
        failure = self.failureResultOf(
            validator.validate(sign_request(token=token(), id="")), ValidationError
        )
        self.assertEqual(failure.getErrorMessage(), "jwks validator not ready")

    def test_common_rules(self):
        """
        The common rules come before the token.
        """
        self.assertIn(
            "parameter app-id cannot be empty", self.refused(token="x", id="")
        )

    def test_refusals(self):
        """
        Tokens that do not verify, are for another audience or subject, are
        out of time, lack exp or a kid, or name an unknown kid are refused
        with "token validation failed: ...".
        """
        other = rsa_key(2)
        cases = {
            "wrong key": token(other),
            "wrong audience": token(aud=["spiffe://example.org/ns/x/other"]),
            "no audience": token(aud=None),
            "wrong subject": token(sub="spiffe://public/ns/default/other"),
            "no subject": token(sub=None),
            "expired": token(exp=NOW - 301),
            "not yet valid": token(nbf=NOW + 301),
            "issued in the future": token(iat=NOW + 301),
            "no exp": token(exp=None),
            "no kid": token(kid=None),
            "unknown kid": token(kid="k9"),
            "algorithm not the key's": token(algorithm="PS256"),
            "not a JWT": "a.b.c",
            "garbage": "x" * 40,
        }
        for why, value in cases.items():
            message = self.refused(token=value)
            self.assertTrue(
                message.startswith("token validation failed: "), f"{why}: {message}"
            )

    def test_leeway(self):
        """
        exp, nbf and iat have five minutes of leeway.
        """
        self.identity(token=token(exp=NOW - 299, nbf=NOW + 299, iat=NOW + 299))

    def test_alg_none_refused(self):
        """
        An unsigned token (alg none) naming a known kid is refused.
        """
        value = forged({"alg": "none", "kid": "k1", "typ": "JWT"}, GOOD_CLAIMS)
        self.assertIn("token validation failed", self.refused(token=value))
        value = pyjwt.encode(GOOD_CLAIMS, None, algorithm="none", headers={"kid": "k1"})
        self.assertIn("token validation failed", self.refused(token=value))

    def test_hmac_with_public_key_refused(self):
        """
        An HS256 token keyed with the RSA public key (PEM, or the JWK's n) is
        refused: the algorithm comes from the key, never from the token.
        """
        public_pem = rsa_key().public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        for secret in (public_pem, jwk_member(rsa_key())["n"].encode()):
            value = forged(
                {"alg": "HS256", "kid": "k1", "typ": "JWT"},
                GOOD_CLAIMS,
                lambda data, secret=secret: hmac.new(
                    secret, data, hashlib.sha256
                ).digest(),
            )
            self.assertIn("token validation failed", self.refused(token=value))

    def test_base64_source(self):
        """
        The JWKS may be given base64-encoded.
        """
        source = base64.b64encode(
            jwks(jwk_member(rsa_key(), kid="k1")).encode()
        ).decode()
        validator = self.make(source)
        validator.startService()
        self.addCleanup(validator.stopService)
        self.assertTrue(validator.ready)
        self.successResultOf(validator.validate(sign_request(token=token())))

    def test_nested_token_refused_without_traceback(self):
        """
        A signed token whose claims nest 5,000 levels deep (the JSON parser
        raises RecursionError) is PERMISSION_DENIED "token validation
        failed: ..." through the servicer, and no traceback is logged.
        """
        nested = "[" * 5000 + "]" * 5000
        payload = json.dumps(GOOD_CLAIMS)[:-1] + f', "x": {nested}}}'
        value = signed_raw(
            {"alg": "RS256", "kid": "k1", "typ": "JWT"}, payload.encode()
        )
        events = capture_logs(self)
        servicer = CAServicer(
            self.reactor,
            FakeCertificateAuthority(),
            {VALIDATOR_JWKS: self.validator},
            None,
            SentryMetrics(),
        )
        request = sign_request(token=value, token_validator=VALIDATOR_JWKS)
        deadline = self.reactor.seconds() + VALIDATION_TIMEOUT_SECONDS
        refusal = self.assertRaises(Refusal, run_now, servicer.sign(request, deadline))
        self.assertEqual(refusal.code, grpc.StatusCode.PERMISSION_DENIED)
        self.assertEqual(
            refusal.message, "token validation failed: malformed token (RecursionError)"
        )
        self.assertEqual([e for e in events if "log_failure" in e], [])
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_lifetime_bound(self):
        """
        A token living longer than MAX_TOKEN_LIFETIME_SECONDS (exp - iat,
        or exp - now beyond the leeway when it has no iat) is refused; one
        living exactly that long is accepted.
        """
        bound = MAX_TOKEN_LIFETIME_SECONDS
        self.identity(token=token(iat=NOW - 60, exp=NOW - 60 + bound))
        self.identity(token=token(iat=None, exp=NOW + bound + TOKEN_LEEWAY_SECONDS))
        year = 365 * 24 * 3600
        cases = {
            "exp - iat one second over": token(iat=NOW - 60, exp=NOW - 59 + bound),
            "iat a year old": token(iat=NOW - year, exp=NOW + 600),
            "exp in the year 3000": token(exp=32503680000),
            "no iat, exp - now over": token(
                iat=None, exp=NOW + bound + TOKEN_LEEWAY_SECONDS + 1
            ),
        }
        for why, value in cases.items():
            message = self.refused(token=value)
            self.assertTrue(
                message.startswith("token validation failed: the token's lifetime"),
                f"{why}: {message}",
            )
            self.assertIn(f"longer than the {bound} s allowed", message)

    def test_weak_rsa_key_left_out(self):
        """
        An RSA key under MIN_RSA_KEY_BITS is left out of the key set with one
        warning naming its kid; the rest of the set stays usable.
        """
        weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
        events = capture_logs(self)
        validator = self.make(
            jwks(jwk_member(weak, kid="weak"), jwk_member(rsa_key(), kid="k1"))
        )
        validator.startService()
        self.addCleanup(validator.stopService)
        self.assertEqual(self.flushWarnings(), [])
        warnings = log_messages(events, level=LogLevel.warn)
        self.assertEqual(len(warnings), 1, warnings)
        self.assertIn(f"RSA keys under {MIN_RSA_KEY_BITS} bits", warnings[0])
        self.assertIn("'weak'", warnings[0])
        self.assertEqual(list(validator.key_set.keys), ["k1"])
        self.successResultOf(validator.validate(sign_request(token=token())))
        with warnings_module.catch_warnings():
            warnings_module.simplefilter("ignore")  # PyJWT's, on signing with it
            weak_token = token(weak, kid="weak")
        failure = self.failureResultOf(
            validator.validate(sign_request(token=weak_token)), ValidationError
        )
        self.assertIn("no key with kid 'weak'", failure.getErrorMessage())

    def test_ec_key(self):
        """
        An ES256 key of the set verifies ES256 tokens, and only those.
        """
        key = ec.generate_private_key(ec.SECP256R1())
        validator = self.make(jwks(jwk_member(key, kid="e")))
        validator.startService()
        self.addCleanup(validator.stopService)
        self.successResultOf(
            validator.validate(
                sign_request(token=token(key, kid="e", algorithm="ES256"))
            )
        )
        self.failureResultOf(
            validator.validate(sign_request(token=token(kid="e"))), ValidationError
        )


class FileSourceTests(SynchronousTestCase):
    """
    A file source is read through the credential reader and watched.
    """

    def setUp(self):
        self.reactor = ImmediateReactor(NOW)
        directory = self.mktemp()
        os.mkdir(directory)
        self.path = os.path.abspath(os.path.join(directory, "jwks.json"))
        self.validator = JWKSValidator(
            self.reactor,
            JWKSOptions(source=self.path),
            SENTRY_ID,
            file_work=inline_file_work(self.reactor),
        )
        self.addCleanup(self.validator.stopService)

    def write(self, text):
        with open(self.path + ".new", "w") as f:
            f.write(text)
        os.replace(self.path + ".new", self.path)

    def accepts(self, value):
        return self.validator.validate(sign_request(token=value))

    def test_missing_then_present(self):
        """
        Not ready while the file is missing; ready once it appears.
        """
        self.validator.startService()
        self.assertFalse(self.validator.ready)
        self.flushLoggedErrors()
        self.write(jwks(jwk_member(rsa_key(), kid="k1")))
        self.reactor.advance(JWKS_FILE_CHECK_INTERVAL_SECONDS)
        self.assertTrue(self.validator.ready)
        self.successResultOf(self.accepts(token()))

    def test_rotation(self):
        """
        A changed file is used without a restart; a broken one is refused
        and the previous key set stays in service.
        """
        self.write(jwks(jwk_member(rsa_key(), kid="k1")))
        self.validator.startService()
        self.successResultOf(self.accepts(token()))
        self.write(jwks(jwk_member(rsa_key(1), kid="k2")))
        self.reactor.advance(JWKS_FILE_CHECK_INTERVAL_SECONDS)
        self.failureResultOf(self.accepts(token()), ValidationError)
        self.successResultOf(self.accepts(token(rsa_key(1), kid="k2")))
        self.write("{broken")
        self.reactor.advance(JWKS_FILE_CHECK_INTERVAL_SECONDS)
        self.successResultOf(self.accepts(token(rsa_key(1), kid="k2")))
        self.assertEqual(self.validator.loads, 2)

    def test_unknown_kid_no_refetch(self):
        """
        With a file source an unknown kid is refused at once, without a read.
        """
        self.write(jwks(jwk_member(rsa_key(), kid="k1")))
        self.validator.startService()
        self.assertFalse(self.validator.needs_reactor)
        failure = self.failureResultOf(self.accepts(token(kid="k9")), ValidationError)
        self.assertIn("no key with kid 'k9'", failure.getErrorMessage())
        self.assertEqual(self.validator.loads, 1)

    def test_healthz(self):
        """
        healthz is 503 until the key set has loaded.
        """
        from treq.testing import StubTreq

        authority = FakeCertificateAuthority()
        authority.ready = True
        client = StubTreq(healthz_root(authority, self.validator))
        self.validator.startService()
        self.flushLoggedErrors()
        response = self.successResultOf(client.get("http://h/healthz"))
        self.assertEqual(response.code, 503)
        self.write(jwks(jwk_member(rsa_key(), kid="k1")))
        self.reactor.advance(JWKS_FILE_CHECK_INTERVAL_SECONDS)
        response = self.successResultOf(client.get("http://h/healthz"))
        self.assertEqual(response.code, 200)


class _JWKSResource(Resource):
    isLeaf = True

    def __init__(self, body):
        super().__init__()
        self.body = body
        self.code = 200
        self.requests = 0

    def render_GET(self, request):
        self.requests += 1
        request.setResponseCode(self.code)
        return self.body.encode()


class URLSourceTests(SynchronousTestCase):
    """
    A URL source is fetched with a treq client, refreshed on an unknown kid
    at most every minRefreshInterval.
    """

    def setUp(self):
        self.reactor = ImmediateReactor(NOW)
        self.server = _JWKSResource(jwks(jwk_member(rsa_key(), kid="k1")))
        self.validator = JWKSValidator(
            self.reactor,
            JWKSOptions(
                source="https://idp.example.org/jwks", min_refresh_interval_seconds=60
            ),
            SENTRY_ID,
            http_agent=RequestTraversalAgent(self.server),
        )
        self.addCleanup(self.validator.stopService)

    def validate(self, value):
        return self.validator.validate(sign_request(token=value))

    def test_fetched_at_start(self):
        """
        It needs the reactor, fetches at start and is then ready.
        """
        self.assertTrue(self.validator.needs_reactor)
        self.validator.startService()
        self.assertTrue(self.validator.ready)
        self.successResultOf(self.validate(token()))

    def test_retry_until_loaded(self):
        """
        A failed first fetch is retried (backing off) until it succeeds;
        meanwhile it is not ready.
        """
        self.server.code = 500
        self.validator.startService()
        self.assertFalse(self.validator.ready)
        self.reactor.advance(1)
        self.reactor.advance(2)
        self.assertEqual(self.server.requests, 3)
        self.server.code = 200
        self.reactor.advance(4)
        self.assertTrue(self.validator.ready)
        self.flushLoggedErrors()

    def test_unknown_kid_refresh_bounded(self):
        """
        An unknown kid refetches the set and is accepted when the new set
        has it, but at most once per minRefreshInterval; without tokens the
        set is refetched every PERIODIC_REFRESH_SECONDS.
        """
        self.validator.startService()
        self.server.body = jwks(
            jwk_member(rsa_key(), kid="k1"), jwk_member(rsa_key(1), kid="k2")
        )
        failure = self.failureResultOf(
            self.validate(token(rsa_key(1), kid="k2")), ValidationError
        )
        self.assertIn("no key with kid 'k2'", failure.getErrorMessage())
        self.assertEqual(self.server.requests, 1)
        self.reactor.advance(60)
        self.assertEqual(self.server.requests, 1)
        self.successResultOf(self.validate(token(rsa_key(1), kid="k2")))
        self.assertEqual(self.server.requests, 2)
        self.failureResultOf(self.validate(token(kid="k3")), ValidationError)
        self.assertEqual(self.server.requests, 2)
        self.reactor.advance(PERIODIC_REFRESH_SECONDS - 60)
        self.assertEqual(self.server.requests, 3)

    def test_refresh_wait_bounded_by_deadline(self):
        """
        A refetch that hangs makes the call wait only until its deadline,
        then the unknown kid is refused; the fetch itself ends at
        requestTimeout.
        """
        hanging = _HangingAgent()
        validator = JWKSValidator(
            self.reactor,
            JWKSOptions(source="https://idp/jwks", request_timeout_seconds=30),
            SENTRY_ID,
            http_agent=hanging,
        )
        validator.key_set = self.validator_key_set()
        validator.startService()
        self.addCleanup(validator.stopService)
        self.reactor.advance(30)  # the first fetch times out
        self.flushLoggedErrors()
        self.reactor.advance(600)
        d = validator.validate(sign_request(token=token(kid="k9")), NOW + 632)
        self.assertNoResult(d)
        self.reactor.advance(2)
        failure = self.failureResultOf(d, ValidationError)
        self.assertIn("no key with kid 'k9'", failure.getErrorMessage())
        self.assertEqual(len(hanging.calls), 2)
        self.reactor.advance(28)
        self.flushLoggedErrors()

    def validator_key_set(self):
        return key_set_from_json(jwks(jwk_member(rsa_key(), kid="k1")).encode())


class _HangingAgent:
    """
    An IAgent whose requests never answer.
    """

    def __init__(self):
        self.calls = []

    def request(self, method, uri, headers=None, bodyProducer=None):
        self.calls.append(uri)
        return defer.Deferred()


class HTTPSTests(TestCase):
    """
    A real HTTPS fetch on 127.0.0.1, verified against caCertificate.
    """

    timeout = 30

    @defer.inlineCallbacks
    def test_https_with_ca(self):
        """
        With caCertificate as PEM text, the key set is fetched from a server
        whose certificate that CA vouches for.
        """
        yield self.fetch_with_ca(as_path=False)

    @defer.inlineCallbacks
    def test_https_with_ca_path(self):
        """
        caCertificate may be a path to the PEM file.
        """
        yield self.fetch_with_ca(as_path=True)

    @defer.inlineCallbacks
    def fetch_with_ca(self, as_path):
        from twisted.web.server import Site

        certificate, key = make_self_signed_server_certificate()
        options = ssl.PrivateCertificate.loadPEM(
            certificate_pem(certificate) + private_key_pem(key)
        ).options()
        resource = _JWKSResource(jwks(jwk_member(rsa_key(), kid="k1")))
        port = reactor.listenSSL(0, Site(resource), options, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        validator = JWKSValidator(
            reactor,
            JWKSOptions(
                source=f"https://127.0.0.1:{port.getHost().port}/jwks.json",
                ca_certificate=self.ca_option(certificate_pem(certificate), as_path),
                request_timeout_seconds=5,
            ),
            SENTRY_ID,
        )
        validator.startService()
        self.addCleanup(validator.stopService)
        loaded = yield validator.refresh()
        self.assertTrue(loaded)
        self.assertTrue(validator.ready)

    def ca_option(self, pem, as_path):
        if not as_path:
            return pem.decode()
        path = os.path.abspath(self.mktemp())
        with open(path, "wb") as f:
            f.write(pem)
        return path

    @defer.inlineCallbacks
    def test_untrusted_server(self):
        """
        Without the CA, a self-signed server is not trusted: nothing loads,
        and the log says why in words.
        """
        from twisted.web.server import Site

        certificate, key = make_self_signed_server_certificate()
        options = ssl.PrivateCertificate.loadPEM(
            certificate_pem(certificate) + private_key_pem(key)
        ).options()
        port = reactor.listenSSL(
            0, Site(_JWKSResource(jwks(jwk_member(rsa_key(), kid="k1")))), options,
            interface="127.0.0.1",
        )
        self.addCleanup(port.stopListening)
        validator = JWKSValidator(
            reactor,
            JWKSOptions(
                source=f"https://127.0.0.1:{port.getHost().port}/jwks.json",
                request_timeout_seconds=5,
            ),
            SENTRY_ID,
        )
        events = capture_logs(self)
        validator.startService()
        self.addCleanup(validator.stopService)
        loaded = yield validator.refresh()
        self.assertFalse(loaded)
        self.assertFalse(validator.ready)
        self.assertEqual(
            log_messages(events, level=LogLevel.error),
            [
                f"JWKS fetch from {validator.options.source} failed:"
                " TLS: certificate verify failed; not ready"
            ],
        )


class BuildValidatorsTests(SynchronousTestCase):
    """
    Standalone with jwks configured: JWKS only, no default validator.
    """

    def test_jwks_only(self):
        """
        The JWKS validator replaces INSECURE and there is no default.
        """
        config = SentryConfig(
            trust_domain="example.org",
            namespace="dapr-system",
            mtls=MTLSConfig(
                token_validators=(
                    TokenValidatorConfig("jwks", (("source", "https://x/jwks"),)),
                )
            ),
        )
        chosen = build_validators(config, ImmediateReactor(), {})
        validators, default = chosen.validators, chosen.default_validator
        self.assertEqual(list(validators), [VALIDATOR_JWKS])
        self.assertIsNone(default)
        self.assertEqual(validators[VALIDATOR_JWKS]._sentry_audience, SENTRY_ID)

    def test_insecure_default(self):
        """
        Without jwks, INSECURE is the default.
        """
        chosen = build_validators(SentryConfig(), ImmediateReactor(), {})
        validators, default = chosen.validators, chosen.default_validator
        self.assertEqual(default, 1)
        self.assertEqual(list(validators), [1])


class KubernetesModeTests(SynchronousTestCase):
    """
    In kubernetes mode the Configuration is read as the authority starts:
    L{JWKSFromConfiguration} adds the JWKS validator it names then.
    """

    def source(self, resolved, validators, validator_for=None):
        from zope.interface import implementer

        from sentry_tx.identity.jwks import JWKSFromConfiguration
        from sentry_tx.interfaces import IConfigurationSource

        @implementer(IConfigurationSource)
        class Fixed:
            def resolve(self, config):
                return defer.succeed(resolved)

        reactor = ImmediateReactor(NOW)
        kwargs = {} if validator_for is None else {"validator_for": validator_for}
        source = JWKSFromConfiguration(Fixed(), reactor, validators, **kwargs)
        source.startService()
        self.addCleanup(source.stopService)
        return source

    def with_jwks(self, source):
        return SentryConfig(
            mode="kubernetes",
            trust_domain="example.org",
            namespace="dapr-system",
            mtls=MTLSConfig(
                token_validators=(TokenValidatorConfig("jwks", (("source", source),)),)
            ),
        )

    def test_adds_jwks_beside_kubernetes(self):
        """
        A Configuration naming jwks adds a running JWKS validator (Sentry's
        own audience) to the shared validators, beside KUBERNETES; the
        resolved config passes through.
        """
        from sentry_tx.interfaces import IConfigurationSource

        resolved = self.with_jwks(
            json.dumps({"keys": [jwk_member(rsa_key(), kid="k1")]})
        )
        kubernetes = object()
        validators = {2: kubernetes}
        source = self.source(resolved, validators)
        verifyObject(IConfigurationSource, source)
        self.assertIs(self.successResultOf(source.resolve(SentryConfig())), resolved)
        self.assertIs(validators[2], kubernetes)
        self.assertIs(validators[VALIDATOR_JWKS], source.validator)
        self.assertTrue(source.validator.running)
        self.assertEqual(source.validator._sentry_audience, SENTRY_ID)
        self.assertTrue(source.ready)

    def test_without_jwks(self):
        """
        A Configuration without jwks adds nothing, and is ready.
        """
        validators = {2: object()}
        source = self.source(SentryConfig(mode="kubernetes"), validators)
        self.successResultOf(source.resolve(SentryConfig()))
        self.assertEqual(list(validators), [2])
        self.assertIsNone(source.validator)
        self.assertTrue(source.ready)

    def test_healthz_waits_for_key_set(self):
        """
        healthz is 503 while the added validator's key set has not loaded
        (its file is missing), and 200 once it has.
        """
        from sentry_tx.identity.jwks import parse_jwks_options

        directory = self.mktemp()
        os.mkdir(directory)
        path = os.path.abspath(os.path.join(directory, "jwks.json"))

        def validator_for(config, reactor):
            return JWKSValidator(
                reactor,
                parse_jwks_options((("source", path),), "test"),
                SENTRY_ID,
                file_work=inline_file_work(reactor),
            )

        validators = {}
        source = self.source(self.with_jwks(path), validators, validator_for)
        self.successResultOf(source.resolve(SentryConfig()))
        authority = FakeCertificateAuthority()
        authority.ready = True
        root = healthz_root(authority, source)
        self.assertEqual(render(root, b"/healthz")[0], 503)
        with open(path, "w") as f:
            json.dump({"keys": [jwk_member(rsa_key(), kid="k1")]}, f)
        source.validator._reactor.advance(JWKS_FILE_CHECK_INTERVAL_SECONDS)
        self.assertEqual(render(root, b"/healthz")[0], 200)


class WorkerValidatorsTests(SynchronousTestCase):
    """
    Worker processes build the JWKS validator and start it as a service.
    """

    def test_worker_service(self):
        """
        The worker's ValidatorSet has the JWKS validator, no default, and
        the validator as the service the worker starts and stops.
        """
        config = SentryConfig(
            mtls=MTLSConfig(
                token_validators=(
                    TokenValidatorConfig("jwks", (("source", "/etc/jwks.json"),)),
                )
            ),
        )
        chosen = build_validators(config, ImmediateReactor(), {})
        self.assertIsNone(chosen.default_validator)
        self.assertIs(chosen.service, chosen.validators[VALIDATOR_JWKS])


def _cert_and_tls_options():
    """
    A self-signed server certificate for 127.0.0.1 and its server TLS
    options.
    """
    certificate, key = make_self_signed_server_certificate()
    options = ssl.PrivateCertificate.loadPEM(
        certificate_pem(certificate) + private_key_pem(key)
    ).options()
    return certificate, options


class KeySetParsingTests(SynchronousTestCase):
    """
    What L{key_set_from_json} keeps of a key server's set.
    """

    def test_curve_not_a_string_left_out(self):
        """
        A key whose C{crv} is not a string is left out; the rest is kept.
        """
        odd = {"kty": "EC", "kid": "k2", "crv": ["P-256"], "x": "AA", "y": "AA"}
        key_set = key_set_from_json(jwks(jwk_member(rsa_key(), kid="k1"), odd).encode())
        self.assertEqual(sorted(key_set.keys), ["k1"])


class FetchFailureWordsTests(SynchronousTestCase):
    """
    A failed fetch is logged in words, naming the URL and what happened;
    the key server's Location is cut before it is logged.
    """

    url = "https://idp.example.org/jwks"

    def setUp(self):
        self.reactor = ImmediateReactor(NOW)
        self.server = KeySetServer(self.reactor, jwks(jwk_member(rsa_key(), kid="k1")))
        self.events = capture_logs(self)

    def validator(self, agent, timeout=30.0):
        validator = JWKSValidator(
            self.reactor,
            JWKSOptions(source=self.url, request_timeout_seconds=timeout),
            SENTRY_ID,
            http_agent=agent,
        )
        self.addCleanup(validator.stopService)
        return validator

    def errors(self):
        return log_messages(self.events, level=LogLevel.error)

    def test_redirect_in_words_location_cut(self):
        """
        A 302 is "JWKS fetch from <url> refused: HTTP 302 to <location>",
        the Location cut to 256 characters with control characters escaped.
        """
        self.server.code = 302
        self.server.location = "https://evil.example/" + "a" * 10_000 + "\x1b[31m"
        validator = self.validator(RequestTraversalAgent(self.server))
        self.assertFalse(self.successResultOf(validator.refresh()))
        (message,) = self.errors()
        prefix = f"JWKS fetch from {self.url} refused: HTTP 302 to "
        self.assertTrue(message.startswith(prefix), message)
        location = message[len(prefix):].split(" (redirects are never followed)")[0]
        self.assertEqual(len(location), MAX_LOGGED_LOCATION_CHARACTERS)
        self.assertTrue(location.startswith("https://evil.example/aaa"), location)
        self.assertNotIn("\x1b", message)

    def test_timeout_in_words(self):
        """
        A fetch that never answers is "failed: timed out after 5.0 s" at
        requestTimeout.
        """
        validator = self.validator(_HangingAgent(), timeout=5.0)
        d = validator.refresh()
        self.reactor.advance(4.9)
        self.assertNoResult(d)
        self.reactor.advance(0.1)
        self.assertFalse(self.successResultOf(d))
        self.assertEqual(
            self.errors(),
            [f"JWKS fetch from {self.url} failed: timed out after 5.0 s; not ready"],
        )

    def test_status_in_words(self):
        """
        Another status than 200 is "refused: HTTP status <code>", and the
        key set already loaded is kept.
        """
        validator = self.validator(RequestTraversalAgent(self.server))
        self.assertTrue(self.successResultOf(validator.refresh()))
        self.server.code = 500
        self.assertFalse(self.successResultOf(validator.refresh()))
        self.assertEqual(
            self.errors(),
            [
                f"JWKS fetch from {self.url} refused: HTTP status 500;"
                " keeping the previous key set"
            ],
        )

    def test_not_a_key_set_in_words(self):
        """
        A 200 whose body is not a usable JWKS is "refused: <why>", and the
        key set already loaded is kept.
        """
        validator = self.validator(RequestTraversalAgent(self.server))
        self.assertTrue(self.successResultOf(validator.refresh()))
        self.server.body = '{"keys": []}'
        self.assertFalse(self.successResultOf(validator.refresh()))
        self.assertEqual(
            self.errors(),
            [
                f"JWKS fetch from {self.url} refused: the JWKS holds no usable"
                " signing key; keeping the previous key set"
            ],
        )
        self.assertTrue(validator.ready)

    def test_stop_cancels_quietly(self):
        """
        stopService cancels a fetch under way without logging a failure.
        """
        validator = self.validator(_HangingAgent())
        validator.startService()
        validator.stopService()
        self.assertEqual(self.errors(), [])


class RedirectTests(TestCase):
    """
    Real key servers on 127.0.0.1: a redirect is never followed, whatever
    it points to.
    """

    timeout = 30

    def server(self, body, tls_options=None):
        server = KeySetServer(reactor, body)
        server.start(self, tls_options)
        return server

    def validator(self, url, **options):
        validator = JWKSValidator(
            reactor,
            JWKSOptions(source=url, request_timeout_seconds=5, **options),
            SENTRY_ID,
        )
        self.addCleanup(validator.stopService)
        return validator

    @defer.inlineCallbacks
    def test_redirect_to_other_server_not_installed(self):
        """
        A 302 to another loopback server holding the attacker's key set is
        not followed: the old set is kept, the attacker's server gets no
        request and tokens of the attacker's key are refused.
        """
        events = capture_logs(self)
        honest = self.server(jwks(jwk_member(rsa_key(), kid="k1")))
        attacker_key = rsa_key(2)
        attacker = self.server(jwks(jwk_member(attacker_key, kid="k1")))
        validator = self.validator(honest.url())
        self.assertTrue((yield validator.refresh()))
        honest.code = 302
        honest.location = attacker.url()
        self.assertFalse((yield validator.refresh()))
        self.assertEqual(attacker.requests, 0)
        self.assertEqual(honest.requests, 2)
        now = int(reactor.seconds())
        times = dict(iat=now, exp=now + 600)
        yield validator.validate(sign_request(token=token(**times)))
        with self.assertRaises(ValidationError):
            yield validator.validate(sign_request(token=token(attacker_key, **times)))
        self.assertEqual(
            log_messages(events, level=LogLevel.error),
            [
                f"JWKS fetch from {honest.url()} refused: HTTP 302 to {attacker.url()}"
                " (redirects are never followed); keeping the previous key set"
            ],
        )

    @defer.inlineCallbacks
    def test_https_redirect_to_http_installs_nothing(self):
        """
        An https source pinned with caCertificate that answers 302 to an
        http:// URL installs nothing: not ready, the http server unasked.
        """
        certificate, tls_options = _cert_and_tls_options()
        plain = self.server(jwks(jwk_member(rsa_key(2), kid="k1")))
        pinned = self.server(jwks(jwk_member(rsa_key(), kid="k1")), tls_options)
        pinned.code = 302
        pinned.location = plain.url()
        validator = self.validator(
            pinned.url(scheme="https"),
            ca_certificate=certificate_pem(certificate).decode(),
        )
        self.assertFalse((yield validator.refresh()))
        self.assertFalse(validator.ready)
        self.assertEqual((pinned.requests, plain.requests), (1, 0))

    @defer.inlineCallbacks
    def test_redirect_loop_one_request_per_fetch(self):
        """
        A server redirecting to itself costs exactly one request per fetch.
        """
        looping = self.server(jwks(jwk_member(rsa_key(), kid="k1")))
        looping.code = 302
        looping.location = looping.url()
        validator = self.validator(looping.url())
        for expected in (1, 2, 3):
            self.assertFalse((yield validator.refresh()))
            self.assertEqual(looping.requests, expected)


class _ResponseSignallingAgent:
    """
    An IAgent wrapper whose C{responded} Deferred fires (on a later reactor
    turn) once its first response has arrived.
    """

    def __init__(self, agent):
        self._agent = agent
        self.responded = defer.Deferred()

    def request(self, method, uri, headers=None, bodyProducer=None):
        def arrived(response):
            reactor.callLater(0, self.responded.callback, None)
            return response

        return self._agent.request(method, uri, headers, bodyProducer).addCallback(
            arrived
        )


class ConnectionTests(TestCase):
    """
    Real key servers on 127.0.0.1: whatever ends a fetch, its connection
    is closed.
    """

    timeout = 60

    def server(self, body):
        server = KeySetServer(reactor, body)
        server.start(self)
        return server

    def none_open(self, server):
        """
        Wait (at most 5 s of the reactor's clock) until no connection is
        open on C{server}.
        """
        return server.when_none_open().addTimeout(5, reactor)

    @defer.inlineCallbacks
    def test_abandoned_fetches_close_connections(self):
        """
        16 fetches from a key server that trickles a byte a second each end
        at requestTimeout, logged in words, and leave 0 connections open.
        """
        events = capture_logs(self)
        trickling = self.server(jwks(jwk_member(rsa_key(), kid="k1")))
        trickling.trickle = True
        validator = JWKSValidator(
            reactor,
            JWKSOptions(source=trickling.url(), request_timeout_seconds=0.5),
            SENTRY_ID,
        )
        for _ in range(16):
            self.assertFalse((yield validator.refresh()))
        self.assertEqual((trickling.requests, trickling.connections_made), (16, 16))
        yield self.none_open(trickling)
        self.assertEqual(trickling.open_connections, 0)
        self.assertEqual(
            log_messages(events, level=LogLevel.error),
            [
                f"JWKS fetch from {trickling.url()} failed: timed out after 0.5 s; not "
                "ready"
            ]
            * 16,
        )

    @defer.inlineCallbacks
    def test_every_end_closes_connection(self):
        """
        A fetch that succeeds, is refused (a status, a redirect, a status
        whose body trickles on), passes the size cap or is cancelled as its
        request arrives leaves no connection open.
        """
        body = jwks(jwk_member(rsa_key(), kid="k1"))
        server = self.server(body)
        fetcher = JWKSFetcher(reactor, server.url(), 5.0, len(body))
        self.assertEqual((yield fetcher.fetch()), body.encode())
        yield self.none_open(server)
        ends = {
            "status": dict(code=500),
            "redirect": dict(code=302, location=server.url("/elsewhere")),
            "status, trickling": dict(code=500, trickle=True),
            "size cap": dict(body=body + " " * 100, chunked=True),
        }
        for why, changes in ends.items():
            server.code, server.location, server.body = 200, None, body
            server.chunked = server.trickle = False
            for name, value in changes.items():
                setattr(server, name, value)
            with self.assertRaises(JWKSFetchError, msg=why):
                yield fetcher.fetch()
            yield self.none_open(server)
        server.code, server.trickle = 200, True
        arrived = server.when_request()
        d = fetcher.fetch()
        yield arrived
        d.cancel()
        failure = yield self.assertFailure(d, JWKSFetchError)
        self.assertEqual(str(failure), "failed: cancelled")
        yield self.none_open(server)
        self.assertEqual(server.connections_made, 6)

    @defer.inlineCallbacks
    def test_cancel_mid_body_stops_reading(self):
        """
        Cancelled once its response has arrived, the fetch's body reader
        itself closes the connection (with an agent of the caller's, whose
        connections the fetch does not track).
        """
        server = self.server(jwks(jwk_member(rsa_key(), kid="k1")))
        server.trickle = True
        agent = _ResponseSignallingAgent(Agent(reactor))
        fetcher = JWKSFetcher(reactor, server.url(), 5.0, 1024 * 1024, agent=agent)
        d = fetcher.fetch()
        yield agent.responded
        d.cancel()
        failure = yield self.assertFailure(d, JWKSFetchError)
        self.assertEqual(str(failure), "failed: cancelled")
        yield self.none_open(server)

    @defer.inlineCallbacks
    def test_connection_refused_in_words(self):
        """
        A port nobody listens on is "failed: connection refused".
        """
        port = reactor.listenTCP(0, Site(Resource()), interface="127.0.0.1")
        number = port.getHost().port
        yield port.stopListening()
        fetcher = JWKSFetcher(
            reactor, f"http://127.0.0.1:{number}/jwks.json", 5.0, 1024
        )
        failure = yield self.assertFailure(fetcher.fetch(), JWKSFetchError)
        self.assertEqual(str(failure), "failed: connection refused")
