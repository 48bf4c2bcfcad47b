"""
Tests for the request-shape check (L{sentry_tx.identity.rules}): its rules,
and that the SignCertificate pipeline applies it before anything else, with
recording fakes of the validator, the authority and the JWT minter.
"""

import asyncio
from datetime import timedelta

import grpc
from twisted.trial.unittest import SynchronousTestCase

from sentry_tx._proto import sentry_pb2
from sentry_tx.config import MTLSConfig, SentryConfig
from sentry_tx.errors import ValidationError
from sentry_tx.identity.rules import (
    MAX_JWT_AUDIENCE_BYTES,
    MAX_JWT_AUDIENCES,
    MAX_REQUESTED_JWT_AUDIENCES,
    request_shape_problem,
)
from sentry_tx.jwt.material import generate_jwt_material, load_jwt_material
from sentry_tx.jwt.minting import JWTAudienceError, JWTMinter, audiences_for
from sentry_tx.metrics import SentryMetrics
from sentry_tx.server.servicer import CAServicer, Refusal
from sentry_tx.testing.authority import (
    FakeCertificateAuthority,
    FakeValidator,
    RecordingMinter,
)
from sentry_tx.testing.certificates import (
    FIXED_NOW,
    make_bundle,
    make_csr,
    sign_request,
)
from sentry_tx.testing.clocks import ImmediateReactor
from sentry_tx.testing.grpc_client import AbortingContext, run_now

INSECURE = 1

UNPRINTABLE = (
    "line\nbreak",
    "nul\x00",
    "tab\there",
    "del\x7f",
    "\u202eoverride",
    "\u2066isolate\u2069",
    "zero\u200bwidth",
    "line\u2028separator",
    "private\ue000use",
)
"""
Audiences that are not printable: control characters (newline, NUL, tab,
DEL), bidi overrides and isolates, a zero-width space, a line separator and
a private-use code point.
"""

PRINTABLE = (
    "api://AzureADTokenExchange",
    "sts.amazonaws.com",
    "spiffe://example.org/ns/default/app",
    "h\u00e9llo w\u00f6rld",
    "\u65e5\u672c",
)

_MATERIAL = []


def jwt_material():
    """
    One generated RSA JWT key for the whole module (generating one costs).
    """
    if not _MATERIAL:
        key_pem, jwks_json = generate_jwt_material()
        _MATERIAL.append(
            load_jwt_material(key_pem, jwks_json, "RS256", None, ("k", "j"))
        )
    return _MATERIAL[0]


def request_with(audiences, **fields):
    """
    A well-formed INSECURE request for C{myapp} in C{default} asking for
    C{audiences}.
    """
    fields.setdefault("token_validator", INSECURE)
    return sign_request(jwt_audiences=tuple(audiences), **fields)


class CountingAudience(str):
    """
    An audience that counts the equality comparisons made with it.
    """

    comparisons = 0

    def __eq__(self, other):
        CountingAudience.comparisons += 1
        return str.__eq__(self, other)

    __hash__ = str.__hash__


class ShapeRuleTests(SynchronousTestCase):
    """
    L{request_shape_problem} and the deduplication after it.
    """

    def problem(self, audiences):
        return request_shape_problem(request_with(audiences))

    def test_count_limit(self):
        """
        Up to MAX_REQUESTED_JWT_AUDIENCES entries pass, one more is refused
        with the count, duplicates counted.
        """
        self.assertEqual(MAX_REQUESTED_JWT_AUDIENCES, MAX_JWT_AUDIENCES - 1)
        self.assertIsNone(self.problem(["a"] * MAX_REQUESTED_JWT_AUDIENCES))
        problem = self.problem(["a"] * (MAX_REQUESTED_JWT_AUDIENCES + 1))
        self.assertEqual(
            problem,
            f"too many JWT audiences ({MAX_REQUESTED_JWT_AUDIENCES + 1}; at most"
            f" {MAX_REQUESTED_JWT_AUDIENCES}, the trust domain is added to them)",
        )

    def test_count_before_each_audience(self):
        """
        Too many entries are refused for their count, without looking at any
        one of them.
        """
        audiences = [""] * 10_000
        self.assertIn("too many JWT audiences (10000;", self.problem(audiences))

    def test_empty_and_long(self):
        """
        An empty audience is refused; one longer than MAX_JWT_AUDIENCE_BYTES
        in UTF-8 is refused even when it has fewer characters.
        """
        self.assertEqual(self.problem([""]), "a JWT audience must not be empty")
        self.assertIsNone(self.problem(["a" * MAX_JWT_AUDIENCE_BYTES]))
        too_long = f"a JWT audience is longer than {MAX_JWT_AUDIENCE_BYTES} bytes"
        self.assertEqual(self.problem(["a" * (MAX_JWT_AUDIENCE_BYTES + 1)]), too_long)
        two_byte = "\u00e9" * (MAX_JWT_AUDIENCE_BYTES // 2 + 1)
        self.assertEqual(self.problem([two_byte]), too_long)

    def test_unprintable_refused(self):
        """
        Control characters (newline, NUL), bidi overrides and other
        non-printable code points are refused, without quoting them.
        """
        for audience in UNPRINTABLE:
            self.assertEqual(
                self.problem(["ok", audience]),
                "a JWT audience must be printable text",
                repr(audience),
            )

    def test_printable_accepted(self):
        """
        URIs, hostnames, spaces and non-ASCII letters are printable.
        """
        self.assertIsNone(self.problem(PRINTABLE))

    def test_deduplication_keeps_order(self):
        """
        The trust domain comes first, then each requested audience once, in
        the order first asked.
        """
        self.assertEqual(
            audiences_for("public", ("b", "public", "a", "b", "a")),
            ["public", "b", "a"],
        )

    def test_deduplication_compares_nothing(self):
        """
        Distinct audiences are deduplicated by hash: no two are compared (a
        scan of a list would compare each with all before it).
        """
        audiences = [
            CountingAudience(f"audience-{n}")
            for n in range(MAX_REQUESTED_JWT_AUDIENCES)
        ]
        CountingAudience.comparisons = 0
        self.assertEqual(len(audiences_for("public", audiences)), MAX_JWT_AUDIENCES)
        self.assertEqual(CountingAudience.comparisons, 0)

    def test_minter_refuses_what_the_shape_check_refuses(self):
        """
        The minter, called directly, refuses the same audiences with the same
        message, before deduplicating them.
        """
        for audiences in (["a"] * MAX_JWT_AUDIENCES, [""], [UNPRINTABLE[0]]):
            error = self.assertRaises(JWTAudienceError, audiences_for, "td", audiences)
            self.assertEqual(str(error), self.problem(audiences))


class PipelineOrderTests(SynchronousTestCase):
    """
    The servicer checks the request's shape before it validates,
    deduplicates or signs anything, and counts the refusal as a bad request
    (reason validator), never as a signing failure.
    """

    def setUp(self):
        self.reactor = ImmediateReactor(FIXED_NOW.timestamp())
        config = SentryConfig(mtls=MTLSConfig(allowed_clock_skew=timedelta(minutes=1)))
        self.authority = FakeCertificateAuthority(make_bundle(), config)
        self.validator = FakeValidator(INSECURE, needs_reactor=False)
        minter = JWTMinter(None, 600)
        minter.install(jwt_material())
        self.minter = RecordingMinter(minter)
        self.metrics = SentryMetrics()

    def servicer(self, minter=None):
        return CAServicer(
            self.reactor,
            self.authority,
            {INSECURE: self.validator},
            INSECURE,
            self.metrics,
            jwt_minter=minter or self.minter,
        )

    def sign(self, request):
        """
        Run C{request} through the pipeline (INSECURE-like: nothing waits).
        """
        return run_now(self.servicer().sign(request, self.reactor.seconds() + 10))

    def failures(self):
        """
        The failure counter, by reason.
        """
        return {
            reason: self.metrics.sign_failure.labels(reason=reason)._value.get()
            for reason in ("validator", "cert_parse", "cert_sign")
        }

    def assertNothingDone(self):
        """
        Nothing was validated, signed (the bundle in service was never read)
        or deduplicated (the minter was never asked).
        """
        self.assertEqual(self.validator.requests, [])
        self.assertEqual(self.authority.in_service_reads, 0)
        self.assertEqual(self.minter.filled, [])

    def test_well_formed_request_goes_through_every_step(self):
        """
        The fakes record each step for a well-formed request: validated
        once, signed once, audiences filled once, deduplicated.
        """
        audiences = ["a", "b", "a", "public"] + ["c"] * 11
        response = self.sign(request_with(audiences))
        self.assertEqual(len(self.validator.requests), 1)
        self.assertEqual(self.authority.in_service_reads, 1)
        self.assertEqual(self.minter.filled, [tuple(audiences)])
        self.assertEqual(sorted(response.per_audience_jwts), ["a", "b", "c", "public"])

    def test_bad_shape_refused_before_everything(self):
        """
        Each kind of bad shape is INVALID_ARGUMENT with nothing validated,
        signed or deduplicated, and counted as validator.
        """
        cases = (
            ["a"] * 10_000,
            [f"{n:x}" for n in range(MAX_JWT_AUDIENCES)],
            [""],
            ["a" * (MAX_JWT_AUDIENCE_BYTES + 1)],
        ) + tuple(["ok", audience] for audience in UNPRINTABLE)
        for audiences in cases:
            refusal = self.assertRaises(Refusal, self.sign, request_with(audiences))
            self.assertEqual(refusal.code, grpc.StatusCode.INVALID_ARGUMENT)
            self.assertEqual(
                refusal.message, request_shape_problem(request_with(audiences))
            )
        self.assertNothingDone()
        self.assertEqual(
            self.failures(), {"validator": len(cases), "cert_parse": 0, "cert_sign": 0}
        )

    def test_bad_token_and_too_many_audiences(self):
        """
        A request with both a token the validator refuses and too many
        audiences is INVALID_ARGUMENT (the shape), not PERMISSION_DENIED.
        """
        self.validator.error = ValidationError("bad token")
        refusal = self.assertRaises(
            Refusal, self.sign, request_with(["x"] * 10_000, token="forged")
        )
        self.assertEqual(refusal.code, grpc.StatusCode.INVALID_ARGUMENT)
        self.assertIn("too many JWT audiences", refusal.message)
        self.assertNothingDone()

    def test_shape_before_validator_choice(self):
        """
        A bad shape is refused even for a validator that is not enabled.
        """
        refusal = self.assertRaises(
            Refusal, self.sign, request_with([""], token_validator=3)
        )
        self.assertEqual(refusal.message, "a JWT audience must not be empty")

    def test_minter_refusal_counted_as_validator(self):
        """
        Audiences the minter itself refuses (after signing) are
        INVALID_ARGUMENT counted as validator, never cert_sign.
        """

        class RefusingMinter:
            def fill(self, *args):
                raise JWTAudienceError("refused")

        servicer = self.servicer(minter=RefusingMinter())
        refusal = self.assertRaises(
            Refusal,
            run_now,
            servicer.sign(request_with(["a"]), self.reactor.seconds() + 10),
        )
        self.assertEqual(refusal.code, grpc.StatusCode.INVALID_ARGUMENT)
        self.assertEqual(
            self.failures(), {"validator": 1, "cert_parse": 0, "cert_sign": 0}
        )

    def test_message_with_many_audiences(self):
        """
        Through the gRPC method, a message with 10,000 audiences is
        INVALID_ARGUMENT with its count, counted as received and validator.
        """
        message = sentry_pb2.SignCertificateRequest(
            id="myapp",
            namespace="default",
            certificate_signing_request=make_csr()[1],
            jwt_audiences=[f"{n:x}" for n in range(10_000)],
        )
        context = AbortingContext(message.SerializeToString())
        loop = asyncio.new_event_loop()
        self.addCleanup(loop.close)
        self.assertRaises(
            AbortingContext.Aborted,
            loop.run_until_complete,
            self.servicer().SignCertificateStream(None, context),
        )
        self.assertEqual(context.code, grpc.StatusCode.INVALID_ARGUMENT)
        self.assertTrue(context.details.startswith("too many JWT audiences (10000;"))
        self.assertEqual(self.metrics.sign_request_received._value.get(), 1)
        self.assertEqual(
            self.failures(), {"validator": 1, "cert_parse": 0, "cert_sign": 0}
        )
        self.assertNothingDone()
