"""
Tests of the gRPC server's TLS policy (SPEC section 8): TLS 1.2 or later
only, no plaintext, and a certificate chain that verifies against the trust
anchors alone for every server name sidecars dial.

grpcio 1.85 has no server option or credential argument for the minimum TLS
version; gRPC core's SSL server credentials default to TLS 1.2, and these
tests pin that default so that an upgrade that changed it would fail.
"""

import socket
import ssl
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import grpc
from OpenSSL import SSL
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from sentry_tx._proto import sentry_pb2, sentry_pb2_grpc
from sentry_tx.ca.bundle import generate_bundle
from sentry_tx.config import SentryConfig
from sentry_tx.identity.caller import VALIDATOR_INSECURE
from sentry_tx.identity.insecure import InsecureValidator
from sentry_tx.metrics import SentryMetrics
from sentry_tx.server.service import CertificateAuthorityService
from sentry_tx.testing.authority import FakeTrustStore

SERVER_NAME = "dapr-sentry.default.svc"
SERVER_NAMES = (
    "dapr-sentry",
    "dapr-sentry.default.svc",
    "dapr-sentry.default.svc.cluster.local",
    "cluster.local",
)
HANDSHAKE_TIMEOUT_SECONDS = 10.0

# The ClientHello's legacy_version field: record header (5 bytes), handshake
# type and length (4 bytes), then the version.
_CLIENT_HELLO_VERSION = slice(9, 11)
_TLS_1_1_WIRE_VERSION = b"\x03\x02"


@dataclass(frozen=True)
class Handshake:
    """
    How a pyOpenSSL client's handshake went.

    @ivar client_hello: the client's first flight, as sent.
    @ivar version: the negotiated version (C{"TLSv1.2"}), or None.
    @ivar alpn: the negotiated protocol, or None.
    @ivar error: why it failed, or None.
    """

    client_hello: bytes
    version: object
    alpn: object
    error: object


def _pending_output(connection):
    out = b""
    while True:
        try:
            out += connection.bio_read(65536)
        except SSL.WantReadError:
            return out


def openssl_handshake(port, min_version, max_version):
    """
    A TLS handshake with the server by a pyOpenSSL client limited to
    C{min_version}..C{max_version}, over a memory BIO so that the test sees
    what the client sent.  The client's security level is 0, so that a
    refusal of an old version is the server's, not the client's.
    """
    context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    context.set_min_proto_version(min_version)
    context.set_max_proto_version(max_version)
    context.set_cipher_list(b"DEFAULT:@SECLEVEL=0")
    context.set_alpn_protos([b"h2"])
    connection = SSL.Connection(context, None)
    connection.set_tlsext_host_name(SERVER_NAME.encode("ascii"))
    connection.set_connect_state()
    client_hello = None
    with socket.create_connection(
        ("127.0.0.1", port), timeout=HANDSHAKE_TIMEOUT_SECONDS
    ) as sock:
        while True:
            try:
                connection.do_handshake()
            except SSL.WantReadError:
                pass
            except SSL.Error as e:
                return Handshake(client_hello, None, None, repr(e))
            else:
                sock.sendall(_pending_output(connection))
                return Handshake(
                    client_hello,
                    connection.get_protocol_version_name(),
                    connection.get_alpn_proto_negotiated(),
                    None,
                )
            out = _pending_output(connection)
            if client_hello is None:
                client_hello = out
            sock.sendall(out)
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                data = b""
            if not data:
                return Handshake(client_hello, None, None, "closed by the server")
            connection.bio_write(data)


def stdlib_handshake(port, anchors_pem, server_name):
    """
    A TLS handshake by Python's C{ssl} module trusting only C{anchors_pem},
    checking the host name, asking for h2.

    @return: C{(version, alpn, peer certificate dict)}.
    """
    context = ssl.create_default_context(cadata=anchors_pem.decode("ascii"))
    assert context.check_hostname and context.verify_mode == ssl.CERT_REQUIRED
    context.set_alpn_protocols(["h2"])
    with socket.create_connection(
        ("127.0.0.1", port), timeout=HANDSHAKE_TIMEOUT_SECONDS
    ) as raw:
        with context.wrap_socket(raw, server_hostname=server_name) as tls:
            return tls.version(), tls.selected_alpn_protocol(), tls.getpeercert()


class ServerTLSTests(TestCase):
    """
    The TLS the CA's gRPC port speaks.
    """

    @inlineCallbacks
    def setUp(self):
        from twisted.internet import reactor

        now = datetime.now(UTC)
        self.generated = generate_bundle(
            "cluster.local", "default", now, timedelta(minutes=15)
        )
        config = SentryConfig(
            trust_domain="cluster.local", listen_address="127.0.0.1", port=0
        )
        self.metrics = SentryMetrics()
        self.ca = CertificateAuthorityService(
            config,
            reactor,
            FakeTrustStore(self.generated.bundle),
            {VALIDATOR_INSECURE: InsecureValidator()},
            VALIDATOR_INSECURE,
            self.metrics,
        )
        yield self.ca.start(config)
        self.addCleanup(self.ca.stop)

    @inlineCallbacks
    def test_tls_1_1_refused(self):
        """A client offering at most TLS 1.1 is refused by the server."""
        handshake = yield deferToThread(
            openssl_handshake, self.ca.port, SSL.TLS1_VERSION, SSL.TLS1_1_VERSION
        )
        self.assertEqual(
            handshake.client_hello[_CLIENT_HELLO_VERSION], _TLS_1_1_WIRE_VERSION
        )
        self.assertIsNone(handshake.version)
        self.assertIsNotNone(handshake.error)

    @inlineCallbacks
    def test_tls_1_2_accepted(self):
        """A TLS 1.2-only client completes the handshake and gets h2."""
        handshake = yield deferToThread(
            openssl_handshake, self.ca.port, SSL.TLS1_2_VERSION, SSL.TLS1_2_VERSION
        )
        self.assertIsNone(handshake.error)
        self.assertEqual((handshake.version, handshake.alpn), ("TLSv1.2", b"h2"))

    @inlineCallbacks
    def test_tls_1_3_accepted(self):
        """A TLS 1.3-only client completes the handshake and gets h2."""
        handshake = yield deferToThread(
            openssl_handshake, self.ca.port, SSL.TLS1_3_VERSION, SSL.TLS1_3_VERSION
        )
        self.assertIsNone(handshake.error)
        self.assertEqual((handshake.version, handshake.alpn), ("TLSv1.3", b"h2"))

    @inlineCallbacks
    def test_no_plaintext(self):
        """A plaintext gRPC client gets UNAVAILABLE and reaches nothing."""
        channel = grpc.insecure_channel(f"127.0.0.1:{self.ca.port}")
        self.addCleanup(channel.close)
        stub = sentry_pb2_grpc.CAStub(channel)
        error = yield self.assertFailure(
            deferToThread(
                stub.SignCertificate,
                sentry_pb2.SignCertificateRequest(id="myapp", namespace="default"),
                timeout=HANDSHAKE_TIMEOUT_SECONDS,
            ),
            grpc.RpcError,
        )
        self.assertEqual(error.code(), grpc.StatusCode.UNAVAILABLE)
        self.assertEqual(self.metrics.sign_request_received._value.get(), 0)

    @inlineCallbacks
    def test_stdlib_client_verifies(self):
        """
        Python's ssl, trusting only the anchors, verifies every name sidecars dial.
        """
        for name in SERVER_NAMES:
            version, alpn, certificate = yield deferToThread(
                stdlib_handshake, self.ca.port, self.generated.anchors_pem, name
            )
            self.assertIn(version, ("TLSv1.2", "TLSv1.3"))
            self.assertEqual(alpn, "h2")
            self.assertIn(
                ("URI", "spiffe://cluster.local/ns/default/dapr-sentry"),
                certificate["subjectAltName"],
            )

    @inlineCallbacks
    def test_stdlib_client_refuses_other_name(self):
        """The server's certificate does not verify for another name."""
        yield self.assertFailure(
            deferToThread(
                stdlib_handshake,
                self.ca.port,
                self.generated.anchors_pem,
                "dapr-sentry.other.svc",
            ),
            ssl.SSLCertVerificationError,
        )

    @inlineCallbacks
    def test_stdlib_client_refuses_other_anchors(self):
        """A client trusting other anchors refuses the server."""
        other = generate_bundle(
            "cluster.local",
            "default",
            datetime.now(UTC),
            timedelta(minutes=15),
        )
        yield self.assertFailure(
            deferToThread(
                stdlib_handshake, self.ca.port, other.anchors_pem, SERVER_NAME
            ),
            ssl.SSLCertVerificationError,
        )
