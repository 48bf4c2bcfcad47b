"""
Tests of the transport limits of the gRPC server (the limits block of
L{sentry_tx.server.service}): message size, streams per connection, client
pings, idle connections, silent sockets and the bound on queued calls.

Each runs a real CA on 127.0.0.1 port 0; limits that are minutes long in
production are made small through the service's keyword arguments.  Clients
that misbehave on purpose (L{RawHTTP2Client}) and the real grpcio client
block, so they run in threads.
"""

import threading
import time
from datetime import UTC, datetime, timedelta

import grpc
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from sentry_tx._proto import sentry_pb2
from sentry_tx.ca.bundle import TrustBundle, generate_bundle
from sentry_tx.config import SentryConfig
from sentry_tx.identity.caller import VALIDATOR_INSECURE, CallerIdentity
from sentry_tx.identity.insecure import InsecureValidator
from sentry_tx.metrics import SentryMetrics
from sentry_tx.server import service, servicer
from sentry_tx.server.service import CertificateAuthorityService, grpc_server_options
from sentry_tx.testing.authority import FakeTrustStore, FakeValidator
from sentry_tx.testing.certificates import (
    make_certificate,
    make_chain,
    make_csr,
    make_private_key,
)
from sentry_tx.testing.grpc_client import GrpcTestClient
from sentry_tx.testing.http2 import (
    HTTP2_CANCEL,
    HTTP2_ENHANCE_YOUR_CALM,
    HTTP2_FLAG_ACK,
    HTTP2_FLAG_END_STREAM,
    HTTP2_GOAWAY,
    HTTP2_HEADERS,
    HTTP2_PING,
    HTTP2_REFUSED_STREAM,
    HTTP2_RST_STREAM,
    HTTP2_SETTINGS,
    HTTP2_SETTINGS_MAX_CONCURRENT_STREAMS,
    RawHTTP2Client,
    grpc_request_headers,
    http2_frame,
    open_silent_connections,
)

SERVER_NAME = "dapr-sentry.default.svc"
SIGN_PATH = b"/dapr.proto.sentry.v1.CA/SignCertificate"

IDLE_CONNECTIONS = 200
SERVED_WITHIN_SECONDS = 1.0
SMALL_LIMIT_MILLISECONDS = 200
FLOOD_CALLS = 20
REFUSED_WITHIN_SECONDS = 1.0
LARGE_BUNDLE_EXTRA_ROOTS = 120
HOLD_TIMEOUT_SECONDS = 5.0
SILENT_STREAMS = 200
SILENT_STREAM_CONNECTIONS = 4
SMALL_ARRIVAL_TIMEOUT_SECONDS = 0.3
RAPID_RESETS = 2000


def valid_request(**fields):
    """
    A request the INSECURE validator and the CSR checks accept.
    """
    values = dict(
        id="myapp",
        namespace="default",
        certificate_signing_request=make_csr()[1],
        token_validator=sentry_pb2.SignCertificateRequest.INSECURE,
    )
    values.update(fields)
    return sentry_pb2.SignCertificateRequest(**values)


def request_of_size(size):
    """
    A request whose serialised size is exactly C{size} bytes (its CSR is
    filler, so it passes validation and fails CSR parsing).
    """
    request = valid_request(certificate_signing_request=b"")
    filler = size - request.ByteSize()
    for length in range(filler, max(filler - 8, -1), -1):
        request.certificate_signing_request = b"x" * length
        if request.ByteSize() == size:
            return request
    raise ValueError(f"no request of exactly {size} bytes")


class HoldingValidator(FakeValidator):
    """
    An INSECURE validator that holds every call until L{release}, and fires
    C{all_held} once C{count} calls are held.
    """

    def __init__(self, count):
        super().__init__(VALIDATOR_INSECURE, pending=True)
        self.all_held = Deferred()
        self._count = count

    def validate(self, request, deadline=None):
        d = super().validate(request, deadline)
        if len(self.pending) == self._count:
            self.all_held.callback(None)
        return d

    def release(self):
        """
        Let every held call through as the identity it asked for.
        """
        held, self.pending = self.pending, []
        for d, request in zip(held, self.requests, strict=False):
            if not d.called:
                d.callback(
                    CallerIdentity(
                        trust_domain=request.trust_domain or "public",
                        namespace=request.namespace,
                        app_id=request.id,
                    )
                )


class LimitConstantsTests(SynchronousTestCase):
    """
    The limits block of L{sentry_tx.server.service}.
    """

    def test_values(self):
        """The limits keep their reviewed values (those SECURITY.md's table gives)."""
        self.assertEqual(
            (
                service.MAX_REQUEST_BYTES,
                service.MAX_RESPONSE_BYTES,
                servicer.REQUEST_ARRIVAL_TIMEOUT_SECONDS,
                service.MAX_CONCURRENT_RPCS,
                service.MAX_CONCURRENT_STREAMS_PER_CONNECTION,
                service.MAX_CONNECTION_IDLE_MILLISECONDS,
                service.SERVER_HANDSHAKE_TIMEOUT_MILLISECONDS,
                service.KEEPALIVE_TIME_MILLISECONDS,
                service.KEEPALIVE_TIMEOUT_MILLISECONDS,
                service.MIN_CLIENT_PING_INTERVAL_MILLISECONDS,
                service.PERMIT_CLIENT_PINGS_WITHOUT_CALLS,
                service.MAX_PING_STRIKES,
            ),
            (
                64 * 1024,
                4 * 1024 * 1024,
                10.0,
                1024,
                100,
                5 * 60 * 1000,
                20 * 1000,
                2 * 60 * 60 * 1000,
                20 * 1000,
                5 * 60 * 1000,
                False,
                2,
            ),
        )

    def test_options(self):
        """The server's channel arguments carry every transport limit."""
        options = dict(grpc_server_options())
        self.assertEqual(
            {
                name: options[name]
                for name in (
                    "grpc.max_receive_message_length",
                    "grpc.max_send_message_length",
                    "grpc.max_concurrent_streams",
                    "grpc.max_connection_idle_ms",
                    "grpc.server_handshake_timeout_ms",
                    "grpc.keepalive_time_ms",
                    "grpc.keepalive_timeout_ms",
                    "grpc.http2.min_recv_ping_interval_without_data_ms",
                    "grpc.keepalive_permit_without_calls",
                    "grpc.http2.max_ping_strikes",
                    "grpc.so_reuseport",
                )
            },
            {
                "grpc.max_receive_message_length": service.MAX_REQUEST_BYTES,
                "grpc.max_send_message_length": service.MAX_RESPONSE_BYTES,
                "grpc.max_concurrent_streams": (
                    service.MAX_CONCURRENT_STREAMS_PER_CONNECTION
                ),
                "grpc.max_connection_idle_ms": service.MAX_CONNECTION_IDLE_MILLISECONDS,
                "grpc.server_handshake_timeout_ms": (
                    service.SERVER_HANDSHAKE_TIMEOUT_MILLISECONDS
                ),
                "grpc.keepalive_time_ms": service.KEEPALIVE_TIME_MILLISECONDS,
                "grpc.keepalive_timeout_ms": service.KEEPALIVE_TIMEOUT_MILLISECONDS,
                "grpc.http2.min_recv_ping_interval_without_data_ms": (
                    service.MIN_CLIENT_PING_INTERVAL_MILLISECONDS
                ),
                "grpc.keepalive_permit_without_calls": 0,
                "grpc.http2.max_ping_strikes": service.MAX_PING_STRIKES,
                "grpc.so_reuseport": 0,
            },
        )

    def test_request_of_size(self):
        """The boundary requests are exactly the size asked for."""
        for size in (service.MAX_REQUEST_BYTES, service.MAX_REQUEST_BYTES + 1):
            self.assertEqual(request_of_size(size).ByteSize(), size)


class TransportLimitTests(TestCase):
    """
    A real CA with its limits, against real and misbehaving clients.
    """

    @inlineCallbacks
    def start_ca(self, validator=None, bundle=None, **limits):
        """
        Start a CA on 127.0.0.1 port 0 with C{limits} (keyword arguments of
        L{CertificateAuthorityService}) and a real client of it.

        @param bundle: the bundle to serve; a generated one by default.
        """
        from twisted.internet import reactor

        if bundle is None:
            bundle = generate_bundle(
                "cluster.local",
                "default",
                datetime.now(UTC),
                timedelta(minutes=15),
            ).bundle
        self.anchors_pem = bundle.anchors_pem
        config = SentryConfig(
            trust_domain="cluster.local", listen_address="127.0.0.1", port=0
        )
        self.metrics = SentryMetrics()
        self.ca = CertificateAuthorityService(
            config,
            reactor,
            FakeTrustStore(bundle),
            {VALIDATOR_INSECURE: validator or InsecureValidator()},
            VALIDATOR_INSECURE,
            self.metrics,
            **limits,
        )
        yield self.ca.start(config)
        self.addCleanup(self.ca.stop)
        self.client = GrpcTestClient(
            f"127.0.0.1:{self.ca.port}", self.anchors_pem, SERVER_NAME
        )
        self.addCleanup(self.client.close)

    @inlineCallbacks
    def raw_client(self):
        """
        A L{RawHTTP2Client} of the CA, closed at cleanup (before the CA
        stops, so that the streams it holds open end first).
        """
        client = yield deferToThread(
            RawHTTP2Client,
            "127.0.0.1",
            self.ca.port,
            self.anchors_pem,
            SERVER_NAME,
        )
        self.addCleanup(client.close)
        return client

    def received(self):
        """
        How many calls reached the servicer.
        """
        return self.metrics.sign_request_received._value.get()

    @inlineCallbacks
    def test_request_at_limit_passes(self):
        """
        A request of exactly MAX_REQUEST_BYTES passes the transport to the servicer.
        """
        yield self.start_ca()
        error = yield self.assertFailure(
            deferToThread(
                self.client.sign, request_of_size(service.MAX_REQUEST_BYTES)
            ),
            grpc.RpcError,
        )
        self.assertEqual(error.code(), grpc.StatusCode.INVALID_ARGUMENT)
        self.assertEqual(error.details(), "invalid certificate signing request")
        self.assertEqual(self.received(), 1)

    @inlineCallbacks
    def test_request_over_limit_refused(self):
        """
        One byte over MAX_REQUEST_BYTES is RESOURCE_EXHAUSTED, before the servicer.
        """
        yield self.start_ca()
        error = yield self.assertFailure(
            deferToThread(
                self.client.sign, request_of_size(service.MAX_REQUEST_BYTES + 1)
            ),
            grpc.RpcError,
        )
        self.assertEqual(error.code(), grpc.StatusCode.RESOURCE_EXHAUSTED)
        self.assertEqual(self.received(), 0)

    @inlineCallbacks
    def test_large_bundle_answered(self):
        """
        A bundle larger than the request limit is still answered (MAX_RESPONSE_BYTES).
        """
        now = datetime.now(UTC)
        chain = make_chain(
            not_before=now - timedelta(days=1), not_after=now + timedelta(days=30)
        )
        others = [
            make_certificate(
                make_private_key(),
                f"another root {index}",
                not_before=now - timedelta(days=1),
                not_after=now + timedelta(days=30),
            )
            for index in range(LARGE_BUNDLE_EXTRA_ROOTS)
        ]
        bundle = TrustBundle.from_certificates(
            [chain.root, *others], [chain.issuer], chain.issuer_key
        )
        self.assertGreater(len(bundle.anchors_pem), service.MAX_REQUEST_BYTES)
        yield self.start_ca(bundle=bundle)
        response = yield deferToThread(self.client.sign, valid_request())
        self.assertEqual(list(response.trust_chain_certificates), [bundle.anchors_pem])

    @inlineCallbacks
    def test_streams_per_connection_advertised(self):
        """SETTINGS announce MAX_CONCURRENT_STREAMS_PER_CONNECTION."""
        yield self.start_ca()
        client = yield self.raw_client()
        settings = yield deferToThread(client.read_until, HTTP2_SETTINGS)
        self.assertEqual(
            settings.settings()[HTTP2_SETTINGS_MAX_CONCURRENT_STREAMS],
            service.MAX_CONCURRENT_STREAMS_PER_CONNECTION,
        )

    @inlineCallbacks
    def test_stream_past_limit_refused(self):
        """A stream past the per-connection limit is reset with REFUSED_STREAM."""
        yield self.start_ca(max_concurrent_streams_per_connection=2)
        client = yield self.raw_client()

        def open_three_streams():
            client.read_until(HTTP2_SETTINGS)
            client.send(
                http2_frame(HTTP2_SETTINGS, HTTP2_FLAG_ACK),
                grpc_request_headers(1, SIGN_PATH),
                grpc_request_headers(3, SIGN_PATH),
                grpc_request_headers(5, SIGN_PATH),
            )
            return client.read_until(HTTP2_RST_STREAM)

        reset = yield deferToThread(open_three_streams)
        self.assertEqual((reset.stream_id, reset.error_code), (5, HTTP2_REFUSED_STREAM))

    @inlineCallbacks
    def test_ping_flood_goaway(self):
        """Pinging past MAX_PING_STRIKES gets GOAWAY "too_many_pings", then closed."""
        yield self.start_ca()
        client = yield self.raw_client()

        def flood():
            pings = [
                http2_frame(HTTP2_PING, 0, 0, index.to_bytes(8, "big"))
                for index in range(service.MAX_PING_STRIKES + 2)
            ]
            client.send(*pings)
            goaway = client.read_until(HTTP2_GOAWAY)
            return goaway, client.read_frame()

        goaway, after = yield deferToThread(flood)
        self.assertEqual(
            (goaway.error_code, goaway.debug_data),
            (HTTP2_ENHANCE_YOUR_CALM, b"too_many_pings"),
        )
        self.assertIsNone(after)

    @inlineCallbacks
    def test_idle_connection_closed(self):
        """A connection idle for max_connection_idle gets GOAWAY and is closed."""
        yield self.start_ca(max_connection_idle_milliseconds=SMALL_LIMIT_MILLISECONDS)
        client = yield self.raw_client()

        def wait_for_goaway():
            started = time.monotonic()
            goaway = client.read_until(HTTP2_GOAWAY)
            return goaway, time.monotonic() - started, client.read_frame()

        goaway, elapsed, after = yield deferToThread(wait_for_goaway)
        self.assertIn(b"idle", goaway.debug_data)
        self.assertGreaterEqual(elapsed, SMALL_LIMIT_MILLISECONDS / 2000)
        self.assertIsNone(after)

    @inlineCallbacks
    def test_silent_connection_closed(self):
        """
        A TCP connection that never starts TLS is closed after the handshake timeout.
        """
        yield self.start_ca(
            server_handshake_timeout_milliseconds=SMALL_LIMIT_MILLISECONDS
        )
        (sock,) = yield deferToThread(
            open_silent_connections, "127.0.0.1", self.ca.port, 1
        )
        self.addCleanup(sock.close)

        def wait_for_close():
            started = time.monotonic()
            data = sock.recv(1)
            return data, time.monotonic() - started

        data, elapsed = yield deferToThread(wait_for_close)
        self.assertEqual(data, b"")
        self.assertGreaterEqual(elapsed, SMALL_LIMIT_MILLISECONDS / 2000)

    @inlineCallbacks
    def test_idle_tcp_connections_do_not_block(self):
        """
        200 silent TCP connections do not stop a real client being signed within 1 s.
        """
        yield self.start_ca()
        sockets = yield deferToThread(
            open_silent_connections, "127.0.0.1", self.ca.port, IDLE_CONNECTIONS
        )
        for sock in sockets:
            self.addCleanup(sock.close)

        def timed_sign():
            started = time.monotonic()
            response = self.client.sign(valid_request(), timeout=5)
            return response, time.monotonic() - started

        response, elapsed = yield deferToThread(timed_sign)
        self.assertTrue(response.workload_certificate)
        self.assertLess(elapsed, SERVED_WITHIN_SECONDS)

    @inlineCallbacks
    def test_flood_refused_fast(self):
        """
        Past MAX_CONCURRENT_RPCS held calls, every call is RESOURCE_EXHAUSTED at once.
        """
        from twisted.internet import reactor

        bound = 2
        validator = HoldingValidator(bound)
        yield self.start_ca(validator, max_concurrent_rpcs=bound)
        # Whatever happens, nothing stays held past the test.
        self.addCleanup(validator.release)
        held = [deferToThread(self.client.sign, valid_request()) for _ in range(bound)]
        yield validator.all_held.addTimeout(HOLD_TIMEOUT_SECONDS, reactor)

        def flood():
            outcomes = []
            for _ in range(FLOOD_CALLS):
                started = time.monotonic()
                try:
                    self.client.sign(valid_request(), timeout=HOLD_TIMEOUT_SECONDS)
                    code = grpc.StatusCode.OK
                except grpc.RpcError as error:
                    code = error.code()
                outcomes.append((code, time.monotonic() - started))
            return outcomes

        outcomes = yield deferToThread(flood)
        self.assertEqual(
            {code for code, _ in outcomes}, {grpc.StatusCode.RESOURCE_EXHAUSTED}
        )
        self.assertLess(max(elapsed for _, elapsed in outcomes), REFUSED_WITHIN_SECONDS)
        self.assertEqual(self.received(), bound)
        validator.release()
        responses = yield Deferred.fromCoroutine(_gather(held))
        self.assertEqual(len([r for r in responses if r.workload_certificate]), bound)


    def open_silent_streams(self, connections, streams_per_connection):
        """
        Open C{connections} raw connections, each with
        C{streams_per_connection} calls that send their headers and never a
        message (in a thread; the connections close at cleanup).

        @return: a Deferred firing with the L{RawHTTP2Client}s.
        """

        def open_all():
            clients = []
            for _ in range(connections):
                client = RawHTTP2Client(
                    "127.0.0.1", self.ca.port, self.anchors_pem, SERVER_NAME
                )
                clients.append(client)
                client.read_until(HTTP2_SETTINGS)
                client.send(
                    http2_frame(HTTP2_SETTINGS, HTTP2_FLAG_ACK),
                    *(
                        grpc_request_headers(1 + 2 * index, SIGN_PATH)
                        for index in range(streams_per_connection)
                    ),
                )
            return clients

        d = deferToThread(open_all)

        def close_later(clients):
            for client in clients:
                self.addCleanup(client.close)
            return clients

        return d.addCallback(close_later)

    def timed_sign(self):
        """
        Sign a valid request with the real client (in a thread).

        @return: a Deferred firing with C{(status code, seconds taken)}.
        """

        def sign():
            started = time.monotonic()
            try:
                self.client.sign(valid_request(), timeout=HOLD_TIMEOUT_SECONDS)
                code = grpc.StatusCode.OK
            except grpc.RpcError as error:
                code = error.code()
            return code, time.monotonic() - started

        return deferToThread(sign)

    @inlineCallbacks
    def test_silent_streams_do_not_delay(self):
        """
        200 streams that never send their message, over 4 connections, do not delay an
        honest call past 1 s.
        """
        yield self.start_ca()
        yield self.open_silent_streams(
            SILENT_STREAM_CONNECTIONS, SILENT_STREAMS // SILENT_STREAM_CONNECTIONS
        )
        code, elapsed = yield self.timed_sign()
        self.assertEqual(code, grpc.StatusCode.OK)
        self.assertLess(elapsed, SERVED_WITHIN_SECONDS)

    @inlineCallbacks
    def test_request_arrival_timeout(self):
        """
        A call whose message has not arrived within the arrival bound ends with
        DEADLINE_EXCEEDED, uncounted.
        """
        yield self.start_ca(
            request_arrival_timeout_seconds=SMALL_ARRIVAL_TIMEOUT_SECONDS
        )
        release = threading.Event()
        self.addCleanup(release.set)

        def never_sends():
            # A client stream that sends no message until released.
            release.wait(HOLD_TIMEOUT_SECONDS)
            return
            yield

        def call():
            channel_call = self.client._channel.stream_unary(
                SIGN_PATH.decode("ascii"),
                request_serializer=None,
                response_deserializer=sentry_pb2.SignCertificateResponse.FromString,
            )
            started = time.monotonic()
            try:
                channel_call(never_sends(), timeout=HOLD_TIMEOUT_SECONDS)
            except grpc.RpcError as error:
                return error.code(), error.details(), time.monotonic() - started
            return grpc.StatusCode.OK, "", time.monotonic() - started

        code, details, elapsed = yield deferToThread(call)
        release.set()
        self.assertEqual(
            (code, details),
            (
                grpc.StatusCode.DEADLINE_EXCEEDED,
                "the request message did not arrive in time",
            ),
        )
        self.assertGreaterEqual(elapsed, SMALL_ARRIVAL_TIMEOUT_SECONDS)
        self.assertLess(elapsed, HOLD_TIMEOUT_SECONDS)
        self.assertEqual(self.received(), 0)

    @inlineCallbacks
    def test_silent_stream_freed(self):
        """
        Silent streams hold call slots only until the arrival bound: then they end and
        honest calls get the slots.
        """
        bound = 2
        yield self.start_ca(
            max_concurrent_rpcs=bound,
            request_arrival_timeout_seconds=SMALL_ARRIVAL_TIMEOUT_SECONDS,
        )
        (client,) = yield self.open_silent_streams(1, bound)
        code, _ = yield self.timed_sign()
        self.assertEqual(code, grpc.StatusCode.RESOURCE_EXHAUSTED)

        def read_stream_ends():
            ended = set()
            while ended != {1, 3}:
                frame = client.read_frame()
                if frame is None:
                    break
                if frame.type in (HTTP2_HEADERS, HTTP2_RST_STREAM) and (
                    frame.type == HTTP2_RST_STREAM
                    or frame.flags & HTTP2_FLAG_END_STREAM
                ):
                    ended.add(frame.stream_id)
            return ended

        ended = yield deferToThread(read_stream_ends)
        self.assertEqual(ended, {1, 3})
        code, _ = yield self.timed_sign()
        self.assertEqual(code, grpc.StatusCode.OK)

    @inlineCallbacks
    def test_rapid_reset(self):
        """
        Thousands of streams opened and reset at once (HEADERS then RST_STREAM) leave
        the CA answering.
        """
        yield self.start_ca()
        client = yield self.raw_client()

        def reset_flood():
            client.read_until(HTTP2_SETTINGS)
            client.send(http2_frame(HTTP2_SETTINGS, HTTP2_FLAG_ACK))
            batch = []
            for index in range(RAPID_RESETS):
                stream_id = 1 + 2 * index
                batch.append(grpc_request_headers(stream_id, SIGN_PATH))
                batch.append(
                    http2_frame(
                        HTTP2_RST_STREAM, 0, stream_id, HTTP2_CANCEL.to_bytes(4, "big")
                    )
                )
                if len(batch) >= 200:
                    try:
                        client.send(*batch)
                    except OSError:
                        return
                    batch = []

        yield deferToThread(reset_flood)
        code, elapsed = yield self.timed_sign()
        self.assertEqual(code, grpc.StatusCode.OK)
        self.assertLess(elapsed, SERVED_WITHIN_SECONDS)
        self.assertEqual(self.received(), 1)

    @inlineCallbacks
    def test_port_in_use(self):
        """
        A gRPC port in use fails the start with one line naming --port and the port.
        """
        import socket

        from sentry_tx.errors import ListenError

        taken = socket.socket()
        self.addCleanup(taken.close)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        from twisted.internet import reactor

        bundle = generate_bundle(
            "cluster.local", "default", datetime.now(UTC), timedelta(minutes=15)
        ).bundle
        config = SentryConfig(listen_address="127.0.0.1", port=port)
        ca = CertificateAuthorityService(
            config,
            reactor,
            FakeTrustStore(bundle),
            {VALIDATOR_INSECURE: InsecureValidator()},
            VALIDATOR_INSECURE,
            SentryMetrics(),
        )
        error = yield self.assertFailure(ca.start(config), ListenError)
        self.assertEqual((error.flag, error.port), ("--port", port))
        self.assertIn(f"port {port}: address already in use", str(error))
        self.assertNotIn("\n", str(error))
        self.assertFalse(ca.ready)


async def _gather(deferreds):
    return [await d for d in deferreds]
