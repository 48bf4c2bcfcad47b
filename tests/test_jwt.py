"""
Tests for JWT-SVIDs: the key material and its start checks
(L{sentry_tx.jwt.material}), minting (L{sentry_tx.jwt.minting}), the file
store and its rotation (L{sentry_tx.jwt.store}) and the servicer's hook.

Tokens are verified with PyJWT, not with joserfc (which the code uses), and
thumbprints are computed here from RFC 7638 directly, so that no test only
checks the code against itself.
"""

import base64
import json
import os
import stat
from datetime import timedelta

import grpc
import jwt as pyjwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from twisted.trial.unittest import SynchronousTestCase

from sentry_tx._proto import sentry_pb2
from sentry_tx.ca.store import FileTrustStore
from sentry_tx.config import MTLSConfig, SentryConfig
from sentry_tx.errors import BundleError
from sentry_tx.identity.caller import CallerIdentity
from sentry_tx.identity.rules import MAX_JWT_AUDIENCES
from sentry_tx.jwt.material import generate_jwt_material, load_jwt_material
from sentry_tx.jwt.minting import JWTAudienceError, JWTMinter, JWTMintingError
from sentry_tx.jwt.store import FileJWTStore
from sentry_tx.metrics import SentryMetrics
from sentry_tx.server.service import CertificateAuthorityService
from sentry_tx.server.servicer import CAServicer, Refusal
from sentry_tx.testing.authority import FakeCertificateAuthority, FakeValidator
from sentry_tx.testing.certificates import (
    FIXED_NOW,
    make_bundle,
    make_chain,
    sign_request,
)
from sentry_tx.testing.clocks import ImmediateReactor, inline_file_work
from sentry_tx.testing.grpc_client import SynchronousGrpcLoop, run_now
from sentry_tx.testing.jwk import jwk_member, rfc7638_kid, rsa_key

SOURCES = ("jwt.key", "jwks.json")
NOW = 1_800_000_000


def pem(key):
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def jwks_of(*members):
    return json.dumps({"keys": list(members)}).encode("ascii")


class GenerateTests(SynchronousTestCase):
    """
    L{generate_jwt_material} makes what Dapr makes.
    """

    def test_generated_pair(self):
        """
        A generated pair is an RSA-2048 PKCS#8 key and a JWKS with one key:
        kty, n, e, kid (the RFC 7638 thumbprint, standard base64), alg RS256,
        use sig; it passes the start checks with that kid.
        """
        key_pem, jwks_json = generate_jwt_material()
        key = serialization.load_pem_private_key(key_pem, None)
        self.assertIsInstance(key, rsa.RSAPrivateKey)
        self.assertEqual(key.key_size, 2048)
        self.assertIn(b"BEGIN PRIVATE KEY", key_pem)
        (member,) = json.loads(jwks_json)["keys"]
        self.assertEqual(sorted(member), ["alg", "e", "kid", "kty", "n", "use"])
        self.assertEqual(
            (member["kty"], member["alg"], member["use"]), ("RSA", "RS256", "sig")
        )
        self.assertEqual(member["kid"], rfc7638_kid(key.public_key()))
        material = load_jwt_material(key_pem, jwks_json, "RS256", None, SOURCES)
        self.assertEqual(material.key_id, member["kid"])

    def test_generated_with_key_id(self):
        """
        With --jwt-key-id, the generated JWKS carries that kid.
        """
        key_pem, jwks_json = generate_jwt_material("RS256", "mine")
        self.assertEqual(json.loads(jwks_json)["keys"][0]["kid"], "mine")
        material = load_jwt_material(key_pem, jwks_json, "RS256", "mine", SOURCES)
        self.assertEqual(material.key_id, "mine")

    def test_material_repr_hides_key(self):
        """
        The material's repr shows neither the private key nor its PEM.
        """
        key_pem, jwks_json = generate_jwt_material()
        material = load_jwt_material(key_pem, jwks_json, "RS256", None, SOURCES)
        self.assertNotIn("PRIVATE", repr(material))
        self.assertNotIn("signing_key", repr(material))


class StartCheckTests(SynchronousTestCase):
    """
    L{load_jwt_material} refuses what Dapr refuses, naming the source.
    """

    def assertRefused(self, key_pem, jwks, algorithm, key_id, source, *fragments):
        error = self.assertRaises(
            BundleError, load_jwt_material, key_pem, jwks, algorithm, key_id, SOURCES
        )
        self.assertEqual(error.source, source)
        for fragment in fragments:
            self.assertIn(fragment, error.problem)
        self.assertNotIn("PRIVATE KEY", str(error))
        return error

    def test_key_not_pem(self):
        """
        A key that is not PEM is refused naming jwt.key.
        """
        self.assertRefused(
            b"nope", jwks_of(jwk_member(rsa_key())), "RS256", None, "jwt.key",
            "failed to decode JWT signing key",
        )

    def test_jwks_not_json(self):
        """
        A JWKS that is not JSON, or not an object with keys, is refused.
        """
        for jwks in (b"{", b"[]", b'{"keys": 3}'):
            self.assertRefused(
                pem(rsa_key()), jwks, "RS256", None, "jwks.json", "failed to parse JWKS"
            )

    def test_jwks_empty(self):
        """
        A JWKS without keys is refused with Dapr's message.
        """
        self.assertRefused(
            pem(rsa_key()), jwks_of(), "RS256", None, "jwks.json",
            "JWKS doesn't contain any keys",
        )

    def test_jwks_without_the_key(self):
        """
        A JWKS that does not hold the key's public half is refused.
        """
        self.assertRefused(
            pem(rsa_key()), jwks_of(jwk_member(rsa_key(1), kid="x")), "RS256", None,
            "jwks.json",
            "JWKS doesn't contain a matching public key for the JWT signing key",
        )

    def test_key_id_not_found(self):
        """
        With --jwt-key-id, a JWKS without that kid is refused naming it.
        """
        self.assertRefused(
            pem(rsa_key()), jwks_of(jwk_member(rsa_key(), kid="other")), "RS256",
            "mine", "jwks.json",
            "JWKS doesn't contain a key with user-provided key ID 'mine'",
        )

    def test_key_id_other_content(self):
        """
        With --jwt-key-id, a JWKS whose key of that kid is another key is
        refused.
        """
        self.assertRefused(
            pem(rsa_key()), jwks_of(jwk_member(rsa_key(1), kid="mine")), "RS256",
            "mine", "jwks.json",
            "contains a key with user-provided key ID 'mine' but the key"
            " content doesn't match",
        )

    def test_key_id_found(self):
        """
        With --jwt-key-id and a JWKS holding the key under it, the signing
        kid is that one.
        """
        material = load_jwt_material(
            pem(rsa_key()),
            jwks_of(jwk_member(rsa_key(1), kid="a"), jwk_member(rsa_key(), kid="mine")),
            "RS256",
            "mine",
            SOURCES,
        )
        self.assertEqual(material.key_id, "mine")

    def test_found_by_content(self):
        """
        Without --jwt-key-id the key is found by content, whatever kid the
        JWKS gives it, and tokens are signed with that kid, so that relying
        parties find the key.
        """
        material = load_jwt_material(
            pem(rsa_key()),
            jwks_of(
                jwk_member(rsa_key(1), kid="a"), jwk_member(rsa_key(), kid="whatever")
            ),
            "PS256",
            None,
            SOURCES,
        )
        self.assertEqual(material.key_id, "whatever")

    def test_thumbprint_kid(self):
        """
        When the matching JWKS key has no kid, tokens are signed with the
        thumbprint kid.
        """
        material = load_jwt_material(
            pem(rsa_key()), jwks_of(jwk_member(rsa_key())), "RS256", None, SOURCES
        )
        self.assertEqual(material.key_id, rfc7638_kid(rsa_key().public_key()))

    def test_encryption_keys_do_not_count(self):
        """
        A key whose use is not sig does not count.
        """
        self.assertRefused(
            pem(rsa_key()), jwks_of(jwk_member(rsa_key(), kid="k", use="enc")),
            "RS256", None, "jwks.json", "doesn't contain a matching public key",
        )

    def test_private_material_in_jwks_refused(self):
        """
        A JWKS holding a private key part is refused: it is published.
        """
        member = json.loads(
            pyjwt.algorithms.RSAAlgorithm.to_jwk(rsa_key())
        )
        self.assertRefused(
            pem(rsa_key()), jwks_of(member), "RS256", None, "jwks.json",
            "private or secret key material",
        )

    def test_algorithm_must_fit_key(self):
        """
        The algorithm must fit the key: RS/PS need RSA, ES256/384/512 their
        curve, EdDSA Ed25519; the message is Dapr's.
        """
        p256 = ec.generate_private_key(ec.SECP256R1())
        ed = ed25519.Ed25519PrivateKey.generate()
        cases = [
            (rsa_key(), "ES256", "ECDSA algorithm ES256 requires an ECDSA key"),
            (rsa_key(), "EdDSA", "EdDSA algorithm requires an Ed25519 key"),
            (p256, "RS256", "RSA algorithm RS256 requires an RSA key"),
            (p256, "ES384", "ES384 requires a secp384r1 curve, got secp256r1"),
            (ed, "PS512", "RSA algorithm PS512 requires an RSA key"),
        ]
        for key, algorithm, message in cases:
            self.assertRefused(
                pem(key), jwks_of(jwk_member(key, kid="k")), algorithm, None,
                "jwt.key",
                f"JWT signing key is incompatible with algorithm {algorithm}",
                message,
            )

    def test_ec_and_ed25519_keys(self):
        """
        An ES256 P-256 key and an EdDSA Ed25519 key pass.
        """
        for key, algorithm in (
            (ec.generate_private_key(ec.SECP256R1()), "ES256"),
            (ed25519.Ed25519PrivateKey.generate(), "EdDSA"),
        ):
            material = load_jwt_material(
                pem(key), jwks_of(jwk_member(key, kid="k")), algorithm, None, SOURCES
            )
            self.assertEqual(material.algorithm, algorithm)


def material(algorithm="RS256", key=None, key_id=None):
    key = key or rsa_key()
    return load_jwt_material(
        pem(key),
        jwks_of(jwk_member(key, kid=key_id or "k")),
        algorithm,
        key_id,
        SOURCES,
    )


def verify(token, key, audience, algorithm="RS256"):
    """
    The claims of C{token}, verified by PyJWT with C{key}'s public half.
    """
    return pyjwt.decode(
        token,
        key.public_key(),
        algorithms=[algorithm],
        audience=audience,
        options={"verify_exp": False, "verify_iat": False, "verify_nbf": False},
    )


class MintingTests(SynchronousTestCase):
    """
    L{JWTMinter.fill} fills the response as Dapr's server does.
    """

    def setUp(self):
        self.minter = JWTMinter(None, 3600)
        self.minter.install(material())
        self.identity = CallerIdentity("public", "ns1", "app1")

    def fill(self, audiences=("a", "b"), skew=timedelta(minutes=15)):
        response = sentry_pb2.SignCertificateResponse()
        self.minter.fill(response, self.identity, audiences, NOW + 0.7, skew)
        return response

    def test_claims(self):
        """
        jwt holds every audience (trust domain first) and Dapr's claims;
        verified by PyJWT; no iss without --jwt-issuer.
        """
        response = self.fill()
        self.assertTrue(response.HasField("jwt"))
        claims = verify(response.jwt.value, rsa_key(), "public")
        self.assertEqual(claims["sub"], "spiffe://public/ns/ns1/app1")
        self.assertEqual(claims["aud"], ["public", "a", "b"])
        self.assertEqual(claims["iat"], NOW)
        self.assertEqual(claims["nbf"], NOW - 900)
        self.assertEqual(claims["exp"], NOW + 3600)
        self.assertEqual(claims["use"], "sig")
        self.assertEqual(len(claims["jti"]), 32)
        self.assertNotIn("iss", claims)
        header = pyjwt.get_unverified_header(response.jwt.value)
        self.assertEqual((header["alg"], header["kid"]), ("RS256", "k"))

    def test_typ_jwt(self):
        """
        Every token's protected header says C{typ: JWT}: Dapr's #10374 made
        the JWS typ configurable, and its SignCertificate path keeps the
        default, JWT, which sidecars and verifiers expect.
        """
        response = self.fill()
        tokens = [response.jwt.value] + [
            token.value for token in response.per_audience_jwts.values()
        ]
        for token in tokens:
            encoded = token.split(".")[0]
            padded = encoded + "=" * (-len(encoded) % 4)
            header = json.loads(base64.urlsafe_b64decode(padded))
            self.assertEqual(header["typ"], "JWT")

    def test_per_audience(self):
        """
        per_audience_jwts holds one token per audience, keyed by it, whose
        aud is that audience alone.
        """
        response = self.fill()
        self.assertEqual(sorted(response.per_audience_jwts), ["a", "b", "public"])
        for audience, token in response.per_audience_jwts.items():
            claims = verify(token.value, rsa_key(), audience)
            self.assertEqual(claims["aud"], [audience])
            self.assertEqual(claims["sub"], "spiffe://public/ns/ns1/app1")

    def test_jti_random(self):
        """
        Every token has its own jti.
        """
        response = self.fill()
        tokens = [response.jwt.value] + [
            t.value for t in response.per_audience_jwts.values()
        ]
        jtis = {
            pyjwt.decode(t, options={"verify_signature": False})["jti"] for t in tokens
        }
        self.assertEqual(len(jtis), len(tokens))

    def test_issuer(self):
        """
        With --jwt-issuer, iss is set.
        """
        self.minter.issuer = "https://oidc.example.org"
        claims = verify(self.fill().jwt.value, rsa_key(), "public")
        self.assertEqual(claims["iss"], "https://oidc.example.org")

    def test_duplicates_once(self):
        """
        An audience asked twice, or equal to the trust domain, appears once.
        """
        response = self.fill(("public", "a", "a"))
        claims = verify(response.jwt.value, rsa_key(), "a")
        self.assertEqual(claims["aud"], ["public", "a"])

    def test_ec_key(self):
        """
        An ES256 key signs ES256 tokens that PyJWT verifies.
        """
        key = ec.generate_private_key(ec.SECP256R1())
        self.minter.install(material("ES256", key))
        claims = verify(self.fill(()).jwt.value, key, "public", "ES256")
        self.assertEqual(claims["aud"], ["public"])

    def test_too_many_audiences(self):
        """
        More audiences than MAX_JWT_AUDIENCES, or an empty one, is the
        caller's mistake.
        """
        many = tuple(str(n) for n in range(MAX_JWT_AUDIENCES))
        self.assertRaises(JWTAudienceError, self.fill, many)
        self.assertRaises(JWTAudienceError, self.fill, ("",))

    def test_no_material(self):
        """
        Without material, minting fails.
        """
        self.minter.material = None
        self.assertRaises(JWTMintingError, self.fill)


class ServicerHookTests(SynchronousTestCase):
    """
    The servicer's one call to the minter after signing.
    """

    def setUp(self):
        self.reactor = ImmediateReactor(FIXED_NOW.timestamp())
        config = SentryConfig(mtls=MTLSConfig(allowed_clock_skew=timedelta(minutes=1)))
        self.authority = FakeCertificateAuthority(make_bundle(), config)
        self.minter = JWTMinter(None, 600)
        self.minter.install(material())
        self.servicer = CAServicer(
            self.reactor,
            self.authority,
            {1: FakeValidator(1, needs_reactor=False)},
            1,
            SentryMetrics(),
            jwt_minter=self.minter,
        )

    def sign(self, request, servicer=None):
        """
        Run the pipeline (INSECURE-like: it never waits) to its end.
        """
        servicer = servicer or self.servicer
        return run_now(servicer.sign(request, self.reactor.seconds() + 10))

    def test_response_has_tokens(self):
        """
        The response carries jwt and per_audience_jwts for the signed
        identity, nbf at now minus the configured skew.
        """
        response = self.sign(sign_request(jwt_audiences=("x",)))
        claims = verify(response.jwt.value, rsa_key(), "x")
        self.assertEqual(claims["sub"], "spiffe://public/ns/default/myapp")
        self.assertEqual(claims["nbf"], int(FIXED_NOW.timestamp()) - 60)
        self.assertEqual(sorted(response.per_audience_jwts), ["public", "x"])
        self.assertTrue(response.workload_certificate)

    def test_no_minter_no_tokens(self):
        """
        Without a minter (JWTs off), the response has no jwt.
        """
        servicer = CAServicer(
            self.reactor,
            self.authority,
            {1: FakeValidator(1, needs_reactor=False)},
            1,
            SentryMetrics(),
        )
        response = self.sign(sign_request(jwt_audiences=("x",)), servicer)
        self.assertFalse(response.HasField("jwt"))
        self.assertEqual(len(response.per_audience_jwts), 0)

    def test_minting_failure_internal(self):
        """
        A minting failure is INTERNAL "failed to generate JWT".
        """
        self.minter.material = None
        refusal = self.assertRaises(Refusal, self.sign, sign_request())
        self.assertEqual(refusal.code, grpc.StatusCode.INTERNAL)
        self.assertEqual(refusal.message, "failed to generate JWT")
        self.flushLoggedErrors()

    def test_bad_audiences_invalid_argument(self):
        """
        Too many audiences are INVALID_ARGUMENT, never INTERNAL.
        """
        audiences = tuple(f"a{n}" for n in range(MAX_JWT_AUDIENCES + 1))
        refusal = self.assertRaises(
            Refusal, self.sign, sign_request(jwt_audiences=audiences)
        )
        self.assertEqual(refusal.code, grpc.StatusCode.INVALID_ARGUMENT)
        self.assertIn("too many JWT audiences", refusal.message)


class FileJWTStoreTests(SynchronousTestCase):
    """
    L{FileJWTStore}: generate when absent, refuse when partial, never
    overwrite.
    """

    def setUp(self):
        self.directory = self.mktemp()
        os.mkdir(self.directory)
        self.key_path = os.path.join(self.directory, "jwt.key")
        self.jwks_path = os.path.join(self.directory, "jwks.json")

    def store(self, algorithm="RS256", key_id=None):
        return FileJWTStore(
            ImmediateReactor(), self.key_path, self.jwks_path, algorithm, key_id
        )

    def test_generates_when_absent(self):
        """
        Neither file: a pair is generated and written, the key mode 0600;
        loading it again gives the same kid.
        """
        generated = self.store().load_or_generate_sync()
        self.assertEqual(stat.S_IMODE(os.stat(self.key_path).st_mode), 0o600)
        with open(self.jwks_path, "rb") as f:
            self.assertEqual(f.read(), generated.jwks_json)
        self.assertEqual(self.store().load_sync().key_id, generated.key_id)

    def test_partial_refused(self):
        """
        One file without the other is refused, naming the missing one, and
        nothing is written.
        """
        self.store().load_or_generate_sync()
        for present, missing in (
            (self.key_path, self.jwks_path),
            (self.jwks_path, self.key_path),
        ):
            with open(present, "rb") as f:
                kept = f.read()
            os.rename(missing, missing + ".away")
            error = self.assertRaises(BundleError, self.store().load_or_generate_sync)
            self.assertEqual(error.source, missing)
            self.assertIn("refusing to generate a new JWT key pair", error.problem)
            self.assertFalse(os.path.exists(missing))
            with open(present, "rb") as f:
                self.assertEqual(f.read(), kept)
            os.rename(missing + ".away", missing)

    def test_broken_pair_refused_not_overwritten(self):
        """
        An existing pair that fails the checks is refused, never replaced.
        """
        with open(self.key_path, "wb") as f:
            f.write(pem(rsa_key()))
        with open(self.jwks_path, "wb") as f:
            f.write(jwks_of(jwk_member(rsa_key(1), kid="x")))
        self.assertRaises(BundleError, self.store().load_or_generate_sync)
        with open(self.key_path, "rb") as f:
            self.assertEqual(f.read(), pem(rsa_key()))

    def test_no_generation_for_ec_algorithm(self):
        """
        sentry_tx generates RSA keys only: with ES256 and no files, it
        refuses and writes nothing.
        """
        error = self.assertRaises(
            BundleError, self.store("ES256").load_or_generate_sync
        )
        self.assertIn("ES256", error.problem)
        self.assertEqual(os.listdir(self.directory), [])


class ReloadTests(SynchronousTestCase):
    """
    The authority loads the JWT pair with the X.509 bundle, at start and at
    every reload, as one function without side effects: a reload that fails
    any check (the bundle, the server certificate, the JWT pair) leaves the
    bundle, the server certificate and the JWT pair in service unchanged.
    """

    def setUp(self):
        self.directory = self.mktemp()
        os.mkdir(self.directory)
        self.chain = make_chain()
        self.chain.write(self.directory)
        reactor = ImmediateReactor(FIXED_NOW.timestamp())
        self.inner = FileTrustStore(
            reactor,
            *(
                os.path.join(self.directory, n)
                for n in ("ca.crt", "issuer.crt", "issuer.key")
            ),
            "example.org",
            "default",
            timedelta(minutes=15),
            file_work=inline_file_work(reactor),
        )
        self.files = FileJWTStore(
            reactor,
            os.path.join(self.directory, "jwt.key"),
            os.path.join(self.directory, "jwks.json"),
            "RS256",
            None,
            file_work=inline_file_work(reactor),
        )
        self.minter = JWTMinter(None, 60)
        self.metrics = SentryMetrics()
        self.config = SentryConfig(listen_address="127.0.0.1", port=0)
        self.ca = CertificateAuthorityService(
            self.config,
            reactor,
            self.inner,
            {},
            None,
            self.metrics,
            jwt_minter=self.minter,
            jwt_store=self.files,
            grpc_loop_factory=SynchronousGrpcLoop,
        )
        self.successResultOf(self.ca.start(self.config))
        self.addCleanup(lambda: self.successResultOf(self.ca.stop()))

    def write_pair(self, key, jwks):
        for name, data in (("jwt.key", pem(key)), ("jwks.json", jwks)):
            path = os.path.join(self.directory, name)
            with open(path + ".new", "wb") as f:
                f.write(data)
            os.replace(path + ".new", path)

    def in_service(self):
        """
        What the authority serves: bundle, pending server certificate (None
        when none replaced the current one), JWT pair.
        """
        return (self.ca.bundle, self.ca._credentials._fetch(), self.minter.material)

    def test_jwt_pair_alone_reloaded(self):
        """
        A change of the JWT pair alone is a reload: the new pair is put in
        service with the (unchanged) bundle.
        """
        self.assertIsNotNone(self.minter.material)
        self.write_pair(rsa_key(1), jwks_of(jwk_member(rsa_key(1), kid="new")))
        self.successResultOf(self.ca.restart(self.config))
        self.assertEqual(self.minter.material.key_id, "new")

    def test_broken_jwt_pair_changes_nothing(self):
        """
        A new bundle with a JWT key that its JWKS does not publish is
        refused whole: the previous bundle, server certificate and pair stay.
        """
        before = self.in_service()
        from sentry_tx.testing.rotation import reissue_chain, replace_bundle_files

        replace_bundle_files(reissue_chain(self.chain), self.directory)
        self.write_pair(rsa_key(0), jwks_of(jwk_member(rsa_key(1), kid="new")))
        self.failureResultOf(self.ca.restart(self.config), BundleError)
        self.assertEqual(self.in_service(), before)
        self.assertEqual(self.metrics.issuercert_reload_failed._value.get(), 1)

    def test_broken_bundle_changes_nothing(self):
        """
        A good new JWT pair beside a refused bundle (issuer.key gone) is not
        put in service: bundle, server certificate and pair stay.
        """
        before = self.in_service()
        os.unlink(os.path.join(self.directory, "issuer.key"))
        self.write_pair(rsa_key(1), jwks_of(jwk_member(rsa_key(1), kid="new")))
        self.failureResultOf(self.ca.restart(self.config), BundleError)
        self.assertEqual(self.in_service(), before)

    def test_failed_server_certificate_changes_nothing(self):
        """
        When the server certificate cannot be issued from a new bundle, the
        reload is refused: the new bundle and the new pair stay out.
        """
        before = self.in_service()
        from sentry_tx.testing.rotation import reissue_chain, replace_bundle_files

        replace_bundle_files(reissue_chain(self.chain), self.directory)
        self.write_pair(rsa_key(1), jwks_of(jwk_member(rsa_key(1), kid="new")))

        def cannot_issue(bundle, config):
            raise ValueError("no server certificate")

        self.ca._issue_server_certificate = cannot_issue
        self.failureResultOf(self.ca.restart(self.config), ValueError)
        self.assertEqual(self.in_service(), before)

