"""
Tests for the SignCertificate pipeline (L{sentry_tx.server.servicer}) with a
fake authority, fake validators and a clock.
"""

from datetime import timedelta

import grpc
from cryptography import x509
from twisted.trial.unittest import SynchronousTestCase

from sentry_tx._proto import sentry_pb2
from sentry_tx.config import MTLSConfig, SentryConfig
from sentry_tx.errors import ValidationError, ValidatorUnavailableError
from sentry_tx.identity import SignRequest
from sentry_tx.metrics import SentryMetrics
from sentry_tx.server.servicer import CAServicer, Refusal
from sentry_tx.testing import (
    FIXED_NOW,
    AbortingContext,
    FakeCertificateAuthority,
    FakeValidator,
    ImmediateReactor,
    make_bundle,
    make_csr,
)

INSECURE, KUBERNETES, JWKS = 1, 2, 3


def sign_request(**fields):
    """
    A well-formed request for C{myapp} in C{default}, with C{fields}
    replaced.
    """
    values = dict(
        id="myapp",
        token="",
        trust_domain="",
        namespace="default",
        csr=make_csr()[1],
        token_validator=0,
    )
    values.update(fields)
    return SignRequest(**values)


class ServicerTests(SynchronousTestCase):
    """
    Tests for L{CAServicer.sign}.
    """

    def setUp(self):
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

    def refusal(self, servicer, request):
        """
        The L{Refusal} C{servicer} ends C{request} with.
        """
        return self.assertRaises(Refusal, servicer.sign, request)

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
        response = self.servicer().sign(sign_request())
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
        self.servicer().sign(sign_request(token_validator=0))
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
        C{callFromThread}.
        """
        crossings = []
        call_from_thread = self.reactor.callFromThread
        self.reactor.callFromThread = lambda f, *a, **kw: (
            crossings.append(f),
            call_from_thread(f, *a, **kw),
        )
        self.servicer().sign(sign_request())
        self.assertEqual(len(crossings), 1)

    def test_computing_validator_stays_in_thread(self):
        """
        A validator that needs no reactor runs in the calling thread: the
        reactor is not asked to run anything.
        """
        def refuse(f, *a, **kw):
            raise AssertionError("crossed to the reactor")

        self.reactor.callFromThread = refuse
        validator = FakeValidator(INSECURE, needs_reactor=False)
        response = self.servicer({INSECURE: validator}).sign(sign_request())
        self.assertTrue(response.workload_certificate)
        self.assertEqual(len(validator.requests), 1)

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
        response = self.servicer().sign(sign_request())
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
        response = servicer.sign(sign_request())
        leaf = x509.load_pem_x509_certificates(response.workload_certificate)[0]
        aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier)
        self.assertEqual(aki.value, self.authority.bundle.authority_key_identifier)
        self.assertNotEqual(aki.value, self.bundle.authority_key_identifier)

    def test_control_plane_names(self):
        """
        A control-plane caller in sentry_tx's own namespace gets Dapr's DNS
        names beside its SPIFFE ID.
        """
        response = self.servicer().sign(
            sign_request(id="dapr-injector", trust_domain="cluster.local")
        )
        leaf = x509.load_pem_x509_certificates(response.workload_certificate)[0]
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        self.assertEqual(
            san.value.get_values_for_type(x509.DNSName),
            ["dapr-sidecar-injector.default.svc"],
        )

    def test_grpc_method_aborts(self):
        """
        The gRPC method turns a refusal into C{context.abort} with its code
        and text.
        """
        context = AbortingContext()
        request = sentry_pb2.SignCertificateRequest(id="", namespace="default")
        self.assertRaises(
            AbortingContext.Aborted,
            self.servicer().SignCertificate,
            request,
            context,
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
            self.assertRaises(
                AbortingContext.Aborted,
                self.servicer().SignCertificateMessage,
                data,
                context,
            )
            self.assertEqual(context.code, grpc.StatusCode.INVALID_ARGUMENT)
            self.assertTrue(context.details.startswith("failed to parse request: "))
        self.assertEqual(self.counts()["received"], 3)
        self.assertEqual(self.counts()["validator"], 3)

    def test_message_answers(self):
        """
        A well-formed message is parsed and signed.
        """
        request = sentry_pb2.SignCertificateRequest(
            id="myapp", namespace="default", certificate_signing_request=make_csr()[1]
        )
        response = self.servicer().SignCertificateMessage(
            request.SerializeToString(), AbortingContext()
        )
        self.assertTrue(response.workload_certificate.startswith(b"-----BEGIN"))

    def test_grpc_method_answers(self):
        """
        The gRPC method returns the response of a successful sign.
        """
        request = sentry_pb2.SignCertificateRequest(
            id="myapp", namespace="default", certificate_signing_request=make_csr()[1]
        )
        response = self.servicer().SignCertificate(request, AbortingContext())
        self.assertTrue(response.workload_certificate.startswith(b"-----BEGIN"))


class ValidationTimeoutTests(SynchronousTestCase):
    """
    A validator that does not answer is bounded by the servicer's timeout.
    """

    def test_timeout(self):
        """
        When the validator has not answered within the timeout, the call is
        UNAVAILABLE "timed out validating the caller".
        """
        import threading

        reactor = ImmediateReactor(FIXED_NOW.timestamp())
        validator = FakeValidator(INSECURE, pending=True)
        servicer = CAServicer(
            reactor,
            FakeCertificateAuthority(make_bundle()),
            {INSECURE: validator},
            INSECURE,
            SentryMetrics(),
            validation_timeout_seconds=5.0,
        )
        outcome = []
        asked = threading.Event()
        validate = validator.validate

        def validate_and_signal(request, deadline=None):
            d = validate(request, deadline)
            asked.set()
            return d

        validator.validate = validate_and_signal

        def call():
            try:
                servicer.sign(sign_request())
            except Refusal as refusal:
                outcome.append(refusal)

        worker = threading.Thread(target=call)
        worker.start()
        # The worker blocks until the validator answers; pass time on the
        # clock (from this thread, standing for the reactor) until it has
        # asked, then past the timeout.
        self.assertTrue(asked.wait(5))
        reactor.advance(4.9)
        self.assertTrue(worker.is_alive())
        reactor.advance(0.2)
        worker.join(5)
        self.assertFalse(worker.is_alive())
        self.assertEqual(outcome[0].code, grpc.StatusCode.UNAVAILABLE)
        self.assertEqual(outcome[0].message, "timed out validating the caller")
