"""
Tests of the CA service over real gRPC: a server on 127.0.0.1 port 0 with
TLS, and a real grpcio client in a thread of the test.
"""

from datetime import UTC, timedelta

import grpc
from cryptography import x509
from cryptography.x509.verification import PolicyBuilder, Store
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from sentry_tx._proto import sentry_pb2
from sentry_tx.ca.bundle import generate_bundle
from sentry_tx.config import SentryConfig
from sentry_tx.identity.caller import VALIDATOR_INSECURE
from sentry_tx.identity.insecure import InsecureValidator
from sentry_tx.metrics import SentryMetrics
from sentry_tx.server.service import AlreadyRunningError, CertificateAuthorityService
from sentry_tx.testing.authority import FakeTrustStore
from sentry_tx.testing.certificates import make_csr
from sentry_tx.testing.clocks import utc_now
from sentry_tx.testing.grpc_client import GrpcTestClient


class CertificateAuthorityOverGrpcTests(TestCase):
    """
    L{CertificateAuthorityService} serving real gRPC clients.
    """

    @inlineCallbacks
    def setUp(self):
        self.generated = generate_bundle(
            "cluster.local", "default", utc_now(), timedelta(minutes=15)
        )
        self.config = SentryConfig(
            trust_domain="cluster.local", listen_address="127.0.0.1", port=0
        )
        self.metrics = SentryMetrics()
        self.ca = CertificateAuthorityService(
            self.config,
            reactor,
            FakeTrustStore(self.generated.bundle),
            {VALIDATOR_INSECURE: InsecureValidator()},
            VALIDATOR_INSECURE,
            self.metrics,
        )
        yield self.ca.start(self.config)
        self.addCleanup(self.ca.stop)
        self.client = GrpcTestClient(
            f"127.0.0.1:{self.ca.port}", self.generated.anchors_pem
        )
        self.addCleanup(self.client.close)

    @inlineCallbacks
    def test_signs(self):
        """
        A real client gets a leaf for its SPIFFE ID whose chain verifies up
        to the anchors with cryptography's verifier.
        """
        key, csr = make_csr()
        response = yield deferToThread(
            self.client.sign,
            sentry_pb2.SignCertificateRequest(
                id="myapp",
                namespace="prod",
                trust_domain="example.org",
                certificate_signing_request=csr,
                token_validator=sentry_pb2.SignCertificateRequest.INSECURE,
            ),
        )
        chain = x509.load_pem_x509_certificates(response.workload_certificate)
        leaf, intermediates = chain[0], chain[1:]
        anchors = x509.load_pem_x509_certificates(response.trust_chain_certificates[0])
        self.assertEqual(len(response.trust_chain_certificates), 1)
        self.assertEqual(leaf.public_key(), key.public_key())
        verifier = (
            PolicyBuilder()
            .store(Store(anchors))
            .time(utc_now())
            .build_client_verifier()
        )
        verified = verifier.verify(leaf, intermediates)
        self.assertEqual(
            [san.value for san in verified.subjects],
            ["spiffe://example.org/ns/prod/myapp"],
        )
        self.assertEqual(
            response.valid_until.ToDatetime(tzinfo=UTC),
            leaf.not_valid_after_utc,
        )
        self.assertFalse(response.HasField("jwt"))
        self.assertEqual(dict(response.per_audience_jwts), {})

    @inlineCallbacks
    def test_server_certificate(self):
        """
        The server presents a certificate from the current issuer with
        sentry_tx's SPIFFE ID and DNS names, and the chain verifies against
        the anchors alone.
        """
        chain = yield deferToThread(self.client.server_chain)
        leaf = chain[0]
        sans = leaf.extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        ).value
        self.assertEqual(
            sans.get_values_for_type(x509.UniformResourceIdentifier),
            ["spiffe://cluster.local/ns/default/dapr-sentry"],
        )
        self.assertEqual(
            sans.get_values_for_type(x509.DNSName),
            [
                "dapr-sentry",
                "dapr-sentry.default.svc",
                "dapr-sentry.default.svc.cluster.local",
                "cluster.local",
            ],
        )
        self.assertEqual(leaf.issuer, self.generated.bundle.issuer.subject)
        verifier = (
            PolicyBuilder()
            .store(Store(list(self.generated.bundle.anchors)))
            .time(utc_now())
            .build_server_verifier(x509.DNSName("dapr-sentry.default.svc"))
        )
        verifier.verify(leaf, chain[1:])

    @inlineCallbacks
    def test_refusal_status(self):
        """
        A caller's mistake reaches the client as its gRPC status and text.
        """
        error = yield self.assertFailure(
            deferToThread(
                self.client.sign,
                sentry_pb2.SignCertificateRequest(id="", namespace="default"),
            ),
            grpc.RpcError,
        )
        self.assertEqual(error.code(), grpc.StatusCode.PERMISSION_DENIED)
        self.assertEqual(
            error.details(),
            "invalid request: parameter app-id cannot be empty\nCSR is required",
        )

    @inlineCallbacks
    def test_oversized_request(self):
        """
        A request over 64 KiB is refused by the transport with
        RESOURCE_EXHAUSTED, and is never counted as received.
        """
        error = yield self.assertFailure(
            deferToThread(
                self.client.sign,
                sentry_pb2.SignCertificateRequest(
                    id="myapp",
                    namespace="default",
                    certificate_signing_request=b"x" * (64 * 1024 + 1),
                ),
            ),
            grpc.RpcError,
        )
        self.assertEqual(error.code(), grpc.StatusCode.RESOURCE_EXHAUSTED)
        self.assertEqual(self.metrics.sign_request_received._value.get(), 0)

    @inlineCallbacks
    def test_stop_drains_calls_in_flight(self):
        """
        C{stop} lets a call in flight finish (here: its validator answers
        during the grace period), refuses calls that start after it, and
        then releases the port.
        """
        import socket

        from sentry_tx.identity.caller import CallerIdentity
        from sentry_tx.testing.authority import FakeValidator

        validator = FakeValidator(VALIDATOR_INSECURE, pending=True)
        ca = CertificateAuthorityService(
            self.config,
            reactor,
            FakeTrustStore(self.generated.bundle),
            {VALIDATOR_INSECURE: validator},
            VALIDATOR_INSECURE,
            SentryMetrics(),
        )
        yield ca.start(self.config)
        client = GrpcTestClient(f"127.0.0.1:{ca.port}", self.generated.anchors_pem)
        self.addCleanup(client.close)
        _, csr = make_csr()
        request = sentry_pb2.SignCertificateRequest(
            id="myapp", namespace="default", certificate_signing_request=csr
        )
        asked = Deferred()
        validate = validator.validate

        def validate_and_tell(request, deadline):
            d = validate(request, deadline)
            if not asked.called:
                asked.callback(None)
            return d

        validator.validate = validate_and_tell
        in_flight = deferToThread(client.sign, request)
        yield asked
        port = ca.port
        stopped = ca.stop()
        self.assertFalse(ca.ready)
        late = yield self.assertFailure(
            deferToThread(client.sign, request, 5.0), grpc.RpcError
        )
        self.assertEqual(late.code(), grpc.StatusCode.UNAVAILABLE)
        validator.pending[0].callback(
            CallerIdentity(trust_domain="public", namespace="default", app_id="myapp")
        )
        response = yield in_flight
        self.assertTrue(response.workload_certificate.startswith(b"-----BEGIN"))
        yield stopped
        # The listener is gone: a new one can bind the port (SO_REUSEADDR,
        # as every server sets, ignores connections left in TIME_WAIT but
        # not a listening socket).
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))
            s.listen()

    def test_start_twice(self):
        """
        C{start} on a running authority fails with L{AlreadyRunningError}.
        """
        return self.assertFailure(self.ca.start(self.config), AlreadyRunningError)
