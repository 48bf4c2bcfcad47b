"""
Tests for the SignCertificate pipeline (L{sentry_tx.server.servicer}) with a
fake authority, fake validators and a clock.
"""

import asyncio
from datetime import timedelta

import grpc
from cryptography import x509
from twisted.trial.unittest import SynchronousTestCase

from sentry_tx._proto import sentry_pb2
from sentry_tx.config import MTLSConfig, SentryConfig
from sentry_tx.errors import (
    CSRError,
    IssuerExpiredError,
    ValidationError,
    ValidatorOverloadedError,
    ValidatorUnavailableError,
)
from sentry_tx.logs import MAX_QUOTED_CHARACTERS
from sentry_tx.metrics import SentryMetrics
from sentry_tx.server.servicer import (
    VALIDATION_TIMEOUT_SECONDS,
    CAServicer,
    Refusal,
    refusal_for,
)
from sentry_tx.testing.authority import FakeCertificateAuthority, FakeValidator
from sentry_tx.testing.certificates import (
    FIXED_NOW,
    make_bundle,
    make_csr,
    sign_request,
)
from sentry_tx.testing.clocks import ImmediateReactor
from sentry_tx.testing.grpc_client import AbortingContext, run_now
from sentry_tx.testing.logs import capture_logs, log_messages

INSECURE, KUBERNETES, JWKS = 1, 2, 3


def loop_for(test_case):
    """
    A new asyncio loop standing for the gRPC loop, closed at cleanup.
    """
    loop = asyncio.new_event_loop()
    test_case.addCleanup(loop.close)
    return loop


class ServicerTests(SynchronousTestCase):
    """
    Tests for L{CAServicer.sign}.
    """

    def setUp(self):
        self.loop = loop_for(self)
        self.reactor = ImmediateReactor(FIXED_NOW.timestamp())
        self.bundle = make_bundle()
        self.config = SentryConfig(
            mtls=MTLSConfig(workload_cert_ttl=timedelta(hours=1))
        )
        self.authority = FakeCertificateAuthority(self.bundle, self.config)
        self.metrics = SentryMetrics()
        self.validator = FakeValidator(INSECURE)

    def servicer(self, validators=None, default=INSECURE, **kw):
        """
        A servicer over the fake authority.
        """
        if validators is None:
            validators = {INSECURE: self.validator}
        return CAServicer(
            self.reactor, self.authority, validators, default, self.metrics, **kw
        )

    def sign(self, servicer, request):
        """
        Run C{request} through C{servicer} on the loop, with the default
        deadline.
        """
        return self.loop.run_until_complete(
            servicer.sign(request, self.reactor.seconds() + VALIDATION_TIMEOUT_SECONDS)
        )

    def refusal(self, servicer, request):
        """
        The L{Refusal} C{servicer} ends C{request} with.
        """
        return self.assertRaises(Refusal, self.sign, servicer, request)

    def counts(self):
        """
        The sign counters, as a dict.
        """
        failure = self.metrics.sign_failure
        return {
            "received": self.metrics.sign_request_received._value.get(),
            "success": self.metrics.sign_success._value.get(),
            "validator": failure.labels(reason="validator")._value.get(),
            "cert_parse": failure.labels(reason="cert_parse")._value.get(),
            "cert_sign": failure.labels(reason="cert_sign")._value.get(),
        }

    def test_success(self):
        """
        A valid request gets the leaf followed by the issuer chain, the
        anchors as one element, and valid_until equal to the leaf's NotAfter;
        it counts as received and successful.
        """
        response = self.sign(self.servicer(), sign_request())
        chain = x509.load_pem_x509_certificates(response.workload_certificate)
        self.assertEqual(chain[1:], list(self.bundle.issuer_chain))
        self.assertEqual(
            list(response.trust_chain_certificates), [self.bundle.anchors_pem]
        )
        self.assertEqual(
            response.valid_until.ToDatetime().replace(tzinfo=FIXED_NOW.tzinfo),
            chain[0].not_valid_after_utc,
        )
        self.assertEqual(chain[0].not_valid_after_utc, FIXED_NOW + timedelta(hours=1))
        self.assertEqual(
            self.counts(),
            dict(received=1, success=1, validator=0, cert_parse=0, cert_sign=0),
        )

    def test_default_validator(self):
        """
        UNKNOWN selects the mode's default validator.
        """
        self.sign(self.servicer(), sign_request(token_validator=0))
        self.assertEqual(len(self.validator.requests), 1)

    def test_no_default_validator(self):
        """
        UNKNOWN where there is no default is INVALID_ARGUMENT with Dapr's
        text, counted as a validator failure.
        """
        refusal = self.refusal(self.servicer(default=None), sign_request())
        self.assertEqual(refusal.code, grpc.StatusCode.INVALID_ARGUMENT)
        self.assertEqual(
            refusal.message, "a validator name must be specified in this environment"
        )
        self.assertEqual(self.counts()["validator"], 1)
        self.assertEqual(self.counts()["received"], 1)

    def test_reactor_validator_crosses(self):
        """
        A validator that needs the reactor is called through
        C{callFromThread}, with the deadline of the call.
        """
        crossings = []
        call_from_thread = self.reactor.callFromThread
        self.reactor.callFromThread = lambda f, *a, **kw: (
            crossings.append(f),
            call_from_thread(f, *a, **kw),
        )
        self.sign(self.servicer(), sign_request())
        self.assertEqual(len(crossings), 1)
        self.assertEqual(
            self.validator.deadlines,
            [self.reactor.seconds() + VALIDATION_TIMEOUT_SECONDS],
        )

    def test_loop_validator_awaited_on_loop(self):
        """
        A validator that runs on the loop is awaited there, with the
        deadline of the call, without crossing to the reactor.
        """
        def refuse(f, *a, **kw):
            raise AssertionError("crossed to the reactor")

        self.reactor.callFromThread = refuse
        validator = FakeValidator(INSECURE, runs_on_loop=True)
        response = self.loop.run_until_complete(
            self.servicer({INSECURE: validator}).sign(sign_request(), 12345.0)
        )
        self.assertTrue(response.workload_certificate)
        self.assertEqual(validator.deadlines, [12345.0])

    def test_loop_validator_timeout(self):
        """
        A validator on the loop that has not answered by the deadline makes
        the call UNAVAILABLE "timed out validating the caller", and its wait
        is cancelled.
        """
        validator = FakeValidator(INSECURE, pending=True, runs_on_loop=True)
        refusal = self.assertRaises(
            Refusal,
            self.loop.run_until_complete,
            self.servicer({INSECURE: validator}).sign(
                sign_request(), self.reactor.seconds() + 0.05
            ),
        )
        self.assertEqual(refusal.code, grpc.StatusCode.UNAVAILABLE)
        self.assertEqual(refusal.message, "timed out validating the caller")
        self.assertTrue(validator.pending[0].cancelled())

    def test_computing_validator_stays_on_loop(self):
        """
        A validator that needs no reactor runs inline: the pipeline finishes
        without waiting once, and the reactor is not asked to run anything.
        """
        def refuse(f, *a, **kw):
            raise AssertionError("crossed to the reactor")

        self.reactor.callFromThread = refuse
        validator = FakeValidator(INSECURE, needs_reactor=False)
        response = run_now(
            self.servicer({INSECURE: validator}).sign(sign_request(), 12345.0)
        )
        self.assertTrue(response.workload_certificate)
        self.assertEqual(len(validator.requests), 1)
        self.assertEqual(validator.deadlines, [12345.0])

    def test_computing_validator_refusal(self):
        """
        A refusal from a validator that needs no reactor is still
        PERMISSION_DENIED with its message.
        """
        validator = FakeValidator(
            INSECURE, error=ValidationError("nope"), needs_reactor=False
        )
        refusal = self.refusal(self.servicer({INSECURE: validator}), sign_request())
        self.assertEqual(refusal.code, grpc.StatusCode.PERMISSION_DENIED)
        self.assertEqual(refusal.message, "nope")

    def test_validator_not_enabled(self):
        """
        KUBERNETES, JWKS and enum numbers that do not exist are
        INVALID_ARGUMENT "the requested validator is not enabled".
        """
        servicer = self.servicer()
        for number in (KUBERNETES, JWKS, 4, 99):
            refusal = self.refusal(servicer, sign_request(token_validator=number))
            self.assertEqual(refusal.code, grpc.StatusCode.INVALID_ARGUMENT)
            self.assertEqual(refusal.message, "the requested validator is not enabled")
        self.assertEqual(self.validator.requests, [])
        self.assertEqual(self.counts()["validator"], 4)

    def test_permission_denied(self):
        """
        A validator's refusal is PERMISSION_DENIED with its message.
        """
        self.validator.error = ValidationError("invalid request: CSR is required")
        refusal = self.refusal(self.servicer(), sign_request())
        self.assertEqual(refusal.code, grpc.StatusCode.PERMISSION_DENIED)
        self.assertEqual(refusal.message, "invalid request: CSR is required")
        self.assertEqual(self.counts()["validator"], 1)

    def test_validator_unavailable(self):
        """
        A validator that cannot reach what it checks against makes the call
        UNAVAILABLE, so the caller retries.
        """
        self.validator.error = ValidatorUnavailableError("API server unreachable")
        refusal = self.refusal(self.servicer(), sign_request())
        self.assertEqual(refusal.code, grpc.StatusCode.UNAVAILABLE)
        self.assertEqual(refusal.message, "API server unreachable")

    def test_validator_bug(self):
        """
        An unexpected exception in a validator is INTERNAL with a fixed text;
        its detail is logged, not sent.
        """
        self.validator.error = KeyError("secret detail")
        refusal = self.refusal(self.servicer(), sign_request())
        self.assertEqual(refusal.code, grpc.StatusCode.INTERNAL)
        self.assertEqual(refusal.message, "failed to validate the caller")
        self.assertEqual(len(self.flushLoggedErrors(KeyError)), 1)

    def test_csr_refused_after_validation(self):
        """
        An unusable CSR is INVALID_ARGUMENT with the parser's text, counted
        as cert_parse, and only after the caller was validated.
        """
        refusal = self.refusal(self.servicer(), sign_request(csr=b"not a csr"))
        self.assertEqual(refusal.code, grpc.StatusCode.INVALID_ARGUMENT)
        self.assertEqual(refusal.message, "invalid certificate signing request")
        self.assertEqual(len(self.validator.requests), 1)
        self.assertEqual(self.counts()["cert_parse"], 1)

    def test_bad_signature(self):
        """
        A CSR whose signature does not verify is "invalid signature".
        """
        _, csr = make_csr(corrupt_signature=True)
        refusal = self.refusal(self.servicer(), sign_request(csr=csr))
        self.assertEqual(refusal.code, grpc.StatusCode.INVALID_ARGUMENT)
        self.assertEqual(refusal.message, "invalid signature")

    def test_unsupported_key(self):
        """
        A CSR for an RSA key under 2048 bits is "unsupported public key".
        """
        _, csr = make_csr("rsa-1024")
        refusal = self.refusal(self.servicer(), sign_request(csr=csr))
        self.assertEqual(refusal.code, grpc.StatusCode.INVALID_ARGUMENT)
        self.assertEqual(refusal.message, "unsupported public key")

    def test_issuer_expired(self):
        """
        Once the issuer has expired, signing is FAILED_PRECONDITION
        "issuer certificate has expired", counted as cert_sign.
        """
        self.reactor.advance(
            (self.bundle.chain_not_after - FIXED_NOW).total_seconds()
        )
        refusal = self.refusal(self.servicer(), sign_request())
        self.assertEqual(refusal.code, grpc.StatusCode.FAILED_PRECONDITION)
        self.assertEqual(refusal.message, "issuer certificate has expired")
        self.assertEqual(self.counts()["cert_sign"], 1)

    def test_not_after_capped(self):
        """
        A leaf never outlives the issuer: NotAfter is capped at the chain's
        NotAfter.
        """
        self.reactor.advance(
            (self.bundle.chain_not_after - FIXED_NOW).total_seconds() - 60
        )
        response = self.sign(self.servicer(), sign_request())
        leaf = x509.load_pem_x509_certificates(response.workload_certificate)[0]
        self.assertEqual(leaf.not_valid_after_utc, self.bundle.chain_not_after)

    def test_signing_failure_internal(self):
        """
        Any other signing failure is INTERNAL "failed to sign certificate";
        the cause is logged and not sent.
        """
        self.authority.bundle = object()
        refusal = self.refusal(self.servicer(), sign_request())
        self.assertEqual(refusal.code, grpc.StatusCode.INTERNAL)
        self.assertEqual(refusal.message, "failed to sign certificate")
        self.assertEqual(len(self.flushLoggedErrors(AttributeError)), 1)
        self.assertEqual(self.counts()["cert_sign"], 1)

    def test_bundle_read_per_call(self):
        """
        Each call signs with the bundle in service when it starts: after a
        swap, the new issuer signs.
        """
        servicer = self.servicer()
        self.authority.bundle = make_bundle()
        response = self.sign(servicer, sign_request())
        leaf = x509.load_pem_x509_certificates(response.workload_certificate)[0]
        aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier)
        self.assertEqual(aki.value, self.authority.bundle.authority_key_identifier)
        self.assertNotEqual(aki.value, self.bundle.authority_key_identifier)

    def test_control_plane_names(self):
        """
        A control-plane caller in sentry_tx's own namespace gets Dapr's DNS
        names beside its SPIFFE ID.
        """
        response = self.sign(
            self.servicer(),
            sign_request(id="dapr-injector", trust_domain="cluster.local"),
        )
        leaf = x509.load_pem_x509_certificates(response.workload_certificate)[0]
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        self.assertEqual(
            san.value.get_values_for_type(x509.DNSName),
            ["dapr-sidecar-injector.default.svc"],
        )

    def call(self, data, context):
        """
        Run the gRPC method on C{data} (bytes) with C{context}, on the loop.
        """
        context.message = data
        return self.loop.run_until_complete(
            self.servicer().SignCertificateStream(None, context)
        )

    def test_grpc_method_aborts(self):
        """
        The gRPC method turns a refusal into C{context.abort} with its code
        and text.
        """
        context = AbortingContext()
        request = sentry_pb2.SignCertificateRequest(id="", namespace="default")
        self.assertRaises(
            AbortingContext.Aborted, self.call, request.SerializeToString(), context
        )
        self.assertEqual(context.code, grpc.StatusCode.INVALID_ARGUMENT)
        self.assertEqual(context.details, "invalid certificate signing request")

    def test_malformed_message(self):
        """
        Bytes that are not a C{SignCertificateRequest} are INVALID_ARGUMENT
        (a caller's mistake, never INTERNAL), counted as received and as a
        validator failure.
        """
        for data in (b"\x0a\x01\xff", b"\xff", b"\x0a\x05ab"):
            context = AbortingContext()
            self.assertRaises(AbortingContext.Aborted, self.call, data, context)
            self.assertEqual(context.code, grpc.StatusCode.INVALID_ARGUMENT)
            self.assertTrue(context.details.startswith("failed to parse request: "))
        self.assertEqual(self.counts()["received"], 3)
        self.assertEqual(self.counts()["validator"], 3)

    def test_no_message(self):
        """
        A call that ends its stream without a message is INVALID_ARGUMENT,
        not counted (nothing was asked).
        """
        context = AbortingContext()
        self.assertRaises(AbortingContext.Aborted, self.call, None, context)
        self.assertEqual(
            (context.code, context.details),
            (
                grpc.StatusCode.INVALID_ARGUMENT,
                "failed to parse request: no request message",
            ),
        )
        self.assertEqual(self.counts()["received"], 0)

    def test_message_answers(self):
        """
        A well-formed message is parsed and signed.
        """
        request = sentry_pb2.SignCertificateRequest(
            id="myapp", namespace="default", certificate_signing_request=make_csr()[1]
        )
        response = self.call(request.SerializeToString(), AbortingContext())
        self.assertTrue(response.workload_certificate.startswith(b"-----BEGIN"))

    def test_client_deadline_shortens_validation(self):
        """
        The validator's deadline is the client's when that comes before
        VALIDATION_TIMEOUT_SECONDS, else arrival plus that timeout.
        """
        request = sentry_pb2.SignCertificateRequest(
            id="myapp", namespace="default", certificate_signing_request=make_csr()[1]
        )
        now = self.reactor.seconds()
        for remaining, expected in (
            (2.5, now + 2.5),
            (None, now + VALIDATION_TIMEOUT_SECONDS),
            (60.0, now + VALIDATION_TIMEOUT_SECONDS),
        ):
            self.call(request.SerializeToString(), AbortingContext(remaining=remaining))
            self.assertEqual(self.validator.deadlines[-1], expected)

    def test_overloaded_validator(self):
        """
        A validator that is overloaded makes the call RESOURCE_EXHAUSTED with
        its message and the grpc-retry-pushback-ms trailer, counted as a
        validator failure.
        """
        self.validator.error = ValidatorOverloadedError("too many reviews", 250)
        request = sentry_pb2.SignCertificateRequest(
            id="myapp", namespace="default", certificate_signing_request=make_csr()[1]
        )
        context = AbortingContext()
        self.assertRaises(
            AbortingContext.Aborted, self.call, request.SerializeToString(), context
        )
        self.assertEqual(
            (context.code, context.details, tuple(context.trailing_metadata)),
            (
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "too many reviews",
                (("grpc-retry-pushback-ms", "250"),),
            ),
        )
        self.assertEqual(self.counts()["validator"], 1)

    def test_denials_logged_one_line_each(self):
        """
        Each denied call is logged in its own line (never rate-limited), the
        caller's namespace/id and the reason cut to 256 characters each;
        a refusal for load is not logged.
        """
        events = capture_logs(self)
        self.validator.error = ValidationError("bad token " + "t" * 5000 + "\nforged")
        request = sentry_pb2.SignCertificateRequest(
            id="a" * 5000,
            namespace="default",
            certificate_signing_request=make_csr()[1],
        )
        for _ in range(3):
            context = AbortingContext()
            self.assertRaises(
                AbortingContext.Aborted, self.call, request.SerializeToString(), context
            )
            self.assertEqual(context.code, grpc.StatusCode.PERMISSION_DENIED)
        self.assertRaises(
            AbortingContext.Aborted, self.call, b"\xff", AbortingContext()
        )
        self.validator.error = ValidatorOverloadedError("too many reviews", 250)
        self.assertRaises(
            AbortingContext.Aborted,
            self.call,
            request.SerializeToString(),
            AbortingContext(),
        )
        lines = log_messages(events, namespace=CAServicer._log.namespace)
        self.assertEqual(len(lines), 4)
        denied = (
            "denied SignCertificate from 'ipv4:127.0.0.1:40000' for 'default/aaa"
        )
        for line in lines[:3]:
            self.assertTrue(line.startswith(denied), line)
            self.assertIn("(5008 characters): PERMISSION_DENIED 'bad token ttt", line)
            self.assertTrue(line.endswith("... (5017 characters)"), line)
            self.assertNotIn("\n", line)
            self.assertLess(len(line), 100 + 3 * MAX_QUOTED_CHARACTERS)
        self.assertIn("for '-': INVALID_ARGUMENT", lines[3])
        self.assertIn("failed to parse request: ", lines[3])


class ErrorStatusTests(SynchronousTestCase):
    """
    Tests for L{refusal_for}, the one table from pipeline errors to
    statuses.
    """

    def test_table(self):
        """
        Each expected error maps to its status, reason and message; a
        subclass maps as its base; anything else maps to None.
        """

        class SpecificValidationError(ValidationError):
            pass

        cases = [
            (ValidationError("no"), grpc.StatusCode.PERMISSION_DENIED, "validator"),
            (
                SpecificValidationError("sub"),
                grpc.StatusCode.PERMISSION_DENIED,
                "validator",
            ),
            (
                ValidatorUnavailableError("down"),
                grpc.StatusCode.UNAVAILABLE,
                "validator",
            ),
            (
                ValidatorOverloadedError("busy", 100),
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "validator",
            ),
            (CSRError("bad csr"), grpc.StatusCode.INVALID_ARGUMENT, "cert_parse"),
            (IssuerExpiredError(), grpc.StatusCode.FAILED_PRECONDITION, "cert_sign"),
        ]
        for error, code, reason in cases:
            refusal = refusal_for(error)
            self.assertEqual(
                (refusal.code, refusal.reason, refusal.message),
                (code, reason, str(error)),
            )
        self.assertEqual(
            refusal_for(ValidatorOverloadedError("busy", 100)).trailing_metadata,
            (("grpc-retry-pushback-ms", "100"),),
        )
        self.assertEqual(refusal_for(ValidationError("no")).trailing_metadata, ())
        self.assertIsNone(refusal_for(KeyError("x")))


class ValidationTimeoutTests(SynchronousTestCase):
    """
    A validator that does not answer is bounded by the call's deadline.
    """

    def test_timeout(self):
        """
        When the validator has not answered by the deadline, the call is
        UNAVAILABLE "timed out validating the caller", and the validator's
        Deferred is cancelled.
        """
        loop = loop_for(self)
        reactor = ImmediateReactor(FIXED_NOW.timestamp())
        validator = FakeValidator(INSECURE, pending=True)
        servicer = CAServicer(
            reactor,
            FakeCertificateAuthority(make_bundle()),
            {INSECURE: validator},
            INSECURE,
            SentryMetrics(),
        )
        task = loop.create_task(servicer.sign(sign_request(), reactor.seconds() + 5.0))
        # Let the call reach the validator (the loop runs until idle).
        loop.run_until_complete(asyncio.sleep(0))
        self.assertEqual(len(validator.pending), 1)
        reactor.advance(4.9)
        loop.run_until_complete(asyncio.sleep(0))
        self.assertFalse(task.done())
        reactor.advance(0.2)
        refusal = self.assertRaises(Refusal, loop.run_until_complete, task)
        self.assertEqual(refusal.code, grpc.StatusCode.UNAVAILABLE)
        self.assertEqual(refusal.message, "timed out validating the caller")
        self.assertTrue(validator.pending[0].called)


class DrainTests(SynchronousTestCase):
    """
    Stopping: calls that start after it are refused, calls in flight end.
    """

    def test_drain_refuses_new_calls_and_waits_for_calls_in_flight(self):
        """
        Once C{drain} has begun, a call that starts is UNAVAILABLE at once
        (not left to grpc core's shutdown, which cancels it); C{drain}
        returns when the call in flight has been answered.
        """
        from sentry_tx.identity.caller import CallerIdentity
        from sentry_tx.server.servicer import STOPPING

        loop = loop_for(self)
        reactor = ImmediateReactor(FIXED_NOW.timestamp())
        validator = FakeValidator(INSECURE, pending=True)
        servicer = CAServicer(
            reactor,
            FakeCertificateAuthority(make_bundle()),
            {INSECURE: validator},
            INSECURE,
            SentryMetrics(),
        )
        message = sentry_pb2.SignCertificateRequest(
            id="myapp", namespace="default", certificate_signing_request=make_csr()[1]
        ).SerializeToString()
        in_flight = loop.create_task(
            servicer.SignCertificateStream(None, AbortingContext(message))
        )
        loop.run_until_complete(asyncio.sleep(0))
        self.assertEqual((servicer.in_flight, len(validator.pending)), (1, 1))
        drained = loop.create_task(servicer.drain(5.0))
        loop.run_until_complete(asyncio.sleep(0))
        self.assertFalse(drained.done())
        late = AbortingContext(message)
        refused = loop.create_task(servicer.SignCertificateStream(None, late))
        loop.run_until_complete(asyncio.sleep(0))
        # Refused at once: it never reached the validator.
        self.assertTrue(refused.done())
        self.assertIsInstance(refused.exception(), AbortingContext.Aborted)
        self.assertEqual(
            (late.code, late.details), (grpc.StatusCode.UNAVAILABLE, STOPPING)
        )
        self.assertEqual(len(validator.pending), 1)
        validator.pending[0].callback(
            CallerIdentity(trust_domain="public", namespace="default", app_id="myapp")
        )
        response = loop.run_until_complete(in_flight)
        self.assertTrue(response.workload_certificate.startswith(b"-----BEGIN"))
        loop.run_until_complete(drained)
        self.assertEqual(servicer.in_flight, 0)

    def test_drain_with_nothing_in_flight(self):
        """
        With no call in flight C{drain} returns at once.
        """
        loop = loop_for(self)
        servicer = CAServicer(
            ImmediateReactor(FIXED_NOW.timestamp()),
            FakeCertificateAuthority(make_bundle()),
            {INSECURE: FakeValidator(INSECURE)},
            INSECURE,
            SentryMetrics(),
        )
        loop.run_until_complete(servicer.drain(5.0))
        self.assertTrue(servicer.stopping)
