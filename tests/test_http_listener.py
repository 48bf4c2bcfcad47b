"""
Tests for L{sentry_tx.http_listener}: the request deadline, the request size
bound and the connection cap of sentry_tx's HTTP listeners, the refusal of
two Host headers and the refusal log.
"""

from twisted.internet.task import Clock
from twisted.logger import LogLevel
from twisted.trial.unittest import SynchronousTestCase, TestCase

from sentry_tx.healthz import healthz_root
from sentry_tx.http_listener import (
    LISTEN_BACKLOG,
    MAX_ACCEPTS_PER_READ,
    MAX_CONNECTIONS_PER_LISTENER,
    MAX_REQUEST_BYTES,
    REQUEST_DEADLINE_SECONDS,
    GuardedSite,
    http_listener,
)
from sentry_tx.logs import MAX_QUOTED_CHARACTERS
from sentry_tx.service import WebService
from sentry_tx.testing.authority import FakeCertificateAuthority
from sentry_tx.testing.logs import capture_logs, log_messages
from sentry_tx.testing.web import connect

PROBE = b"GET /healthz HTTP/1.1\r\nHost: sentry\r\nConnection: close\r\n\r\n"
KEEP_ALIVE_PROBE = b"GET /healthz HTTP/1.1\r\nHost: sentry\r\n\r\n"


class GuardedSiteTests(SynchronousTestCase):
    """
    L{GuardedSite} closes connections that do not send a request in time,
    and makes room for new connections under its cap.
    """

    def setUp(self):
        self.clock = Clock()
        authority = FakeCertificateAuthority()
        authority.ready = True
        self.site = GuardedSite(
            healthz_root(authority), self.clock, request_deadline_seconds=10.0,
            max_connections=3,
        )

    def connect(self):
        return connect(self.site)

    def test_whole_request_answered(self):
        """A request sent at once is answered 200."""
        protocol, transport = self.connect()
        protocol.dataReceived(PROBE)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 200 "))

    def test_deadline_not_reset_by_bytes(self):
        """A request trickled one byte at a time is cut at the deadline from connect."""
        protocol, transport = self.connect()
        for byte in PROBE[:-2]:
            self.clock.advance(1.0)
            protocol.dataReceived(bytes([byte]))
            if transport.lost:
                break
        self.assertTrue(transport.lost)
        self.assertEqual(self.clock.seconds(), 10.0)
        self.assertEqual(transport.value(), b"")
        self.assertEqual(self.site.closed_for_deadline, 1)
        self.assertEqual(self.site.open_connections, 0)

    def test_deadline_cancelled_once_request_arrives(self):
        """A request that arrived whole is not cut by the deadline."""
        protocol, transport = self.connect()
        protocol.dataReceived(KEEP_ALIVE_PROBE)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 200 "))
        self.assertFalse(transport.lost)

    def test_keep_alive_deadline_restarts(self):
        """
        After a response, a kept-alive connection has the deadline again for the next
        request.
        """
        protocol, transport = self.connect()
        self.clock.advance(9.0)
        protocol.dataReceived(KEEP_ALIVE_PROBE)
        self.clock.advance(9.0)
        self.assertFalse(transport.lost)
        self.clock.advance(1.0)
        self.assertTrue(transport.lost)

    def test_oldest_waiting_closed_for_room(self):
        """Past the cap, the oldest connection without a whole request is closed."""
        connections = [self.connect() for _ in range(3)]
        connections[0][0].dataReceived(b"GET /healthz HTTP/1.1\r\n")
        protocol, transport = self.connect()
        self.assertEqual(
            [t.lost for _, t in connections], [True, False, False]
        )
        self.assertEqual(self.site.closed_for_room, 1)
        protocol.dataReceived(PROBE)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 200 "))

    def test_answered_connections_kept(self):
        """
        A connection whose request is being answered is not the one closed for room.
        """
        self.site.resource.putChild(b"slow", _Pending())
        busy, busy_transport = self.connect()
        busy.dataReceived(b"GET /slow HTTP/1.1\r\nHost: sentry\r\n\r\n")
        waiting = [self.connect() for _ in range(2)]
        self.connect()
        self.assertFalse(busy_transport.lost)
        self.assertEqual([t.lost for _, t in waiting], [True, False])

    def test_newcomer_refused_when_all_busy(self):
        """When every connection is being answered, the new one is closed instead."""
        self.site.resource.putChild(b"slow", _Pending())
        busy = [self.connect() for _ in range(3)]
        for protocol, _ in busy:
            protocol.dataReceived(b"GET /slow HTTP/1.1\r\nHost: sentry\r\n\r\n")
        _, transport = self.connect()
        self.assertTrue(transport.lost)
        self.assertEqual([t.lost for _, t in busy], [False, False, False])

    def test_request_too_large(self):
        """A request larger than MAX_REQUEST_BYTES closes the connection unanswered."""
        protocol, transport = self.connect()
        protocol.dataReceived(
            b"POST /healthz HTTP/1.1\r\nHost: s\r\nContent-Length: 999999\r\n\r\n"
        )
        for _ in range(MAX_REQUEST_BYTES // 4096 + 1):
            if transport.lost:
                break
            protocol.dataReceived(b"x" * 4096)
        self.assertTrue(transport.lost)
        self.assertEqual(transport.value(), b"")

    def test_pipelined_request_counted_once(self):
        """
        A request sent while the previous one is answered counts once towards the size
        bound.
        """
        held = _Pending()
        self.site.resource.putChild(b"slow", held)
        protocol, transport = self.connect()
        protocol.dataReceived(b"GET /slow HTTP/1.1\r\nHost: sentry\r\n\r\n")
        # The next request, three fifths of the bound: over it if counted
        # both on arrival and when HTTPChannel plays it back.
        body = b"x" * (MAX_REQUEST_BYTES * 3 // 5)
        protocol.dataReceived(
            b"POST /healthz HTTP/1.1\r\nHost: sentry\r\nContent-Length: %d\r\n\r\n"
            % len(body)
            + body
        )
        [request] = held.requests
        request.finish()
        self.assertFalse(transport.lost)
        self.assertEqual(transport.value().count(b"HTTP/1.1 "), 2)
        # Once answered, the bound counts again.
        protocol.dataReceived(b"x" * (MAX_REQUEST_BYTES + 1))
        self.assertTrue(transport.lost)

    def test_defaults(self):
        """The defaults: 10 s to send a request, a cap well above the backlog of 50."""
        self.assertEqual(REQUEST_DEADLINE_SECONDS, 10.0)
        self.assertGreaterEqual(MAX_CONNECTIONS_PER_LISTENER, 2 * 50)


class RefusalLogTests(SynchronousTestCase):
    """
    L{GuardedSite} logs refused requests, cut and at a bounded rate, and
    refuses a request with two Host headers.
    """

    def setUp(self):
        self.clock = Clock()
        self.authority = FakeCertificateAuthority()
        self.authority.ready = True
        self.site = GuardedSite(
            healthz_root(self.authority), self.clock, label="healthz",
            refusal_log_interval_seconds=10.0,
        )
        self.events = capture_logs(self)

    def request(self, data):
        protocol, transport = connect(self.site)
        protocol.dataReceived(data)
        return transport.value()

    def refusals(self):
        return log_messages(self.events, namespace=GuardedSite._log.namespace)

    def test_refusal_logged_with_dropped_count(self):
        """A 404 is logged once per interval; the next line counts the ones dropped."""
        for _ in range(3):
            self.assertTrue(
                self.request(b"GET /nope HTTP/1.1\r\nHost: h\r\n\r\n").startswith(
                    b"HTTP/1.1 404 "
                )
            )
        self.clock.advance(10.0)
        self.request(b"GET /other HTTP/1.1\r\nHost: h\r\n\r\n")
        self.assertEqual(
            self.refusals(),
            [
                "healthz server refused 'GET' '/nope' from 127.0.0.1 for Host 'h': 404",
                "healthz server refused 'GET' '/other' from 127.0.0.1 for Host 'h': 404"
                " (2 similar refusals dropped)",
            ],
        )
        self.assertEqual(self.events[-1]["log_level"], LogLevel.info)

    def test_kinds_by_status(self):
        """A 405 is a kind of its own: a flood of 404s does not hide it."""
        self.request(b"GET /nope HTTP/1.1\r\nHost: h\r\n\r\n")
        self.assertTrue(
            self.request(b"POST /healthz HTTP/1.1\r\nHost: h\r\n\r\n").startswith(
                b"HTTP/1.1 405 "
            )
        )
        self.assertEqual(len(self.refusals()), 2)
        self.assertTrue(self.refusals()[1].endswith(": 405"))

    def test_answers_not_logged(self):
        """200 and 503 are answers, not refusals: nothing is logged."""
        self.request(PROBE)
        self.authority.ready = False
        self.assertTrue(self.request(PROBE).startswith(b"HTTP/1.1 503 "))
        self.assertEqual(self.refusals(), [])

    def test_caller_input_cut(self):
        """
        The path and the Host a caller sent are cut to 256 characters each in the line.
        """
        path = b"/" + b"p" * 8000
        host = b"h" * 8000
        self.request(b"GET " + path + b" HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
        [line] = self.refusals()
        self.assertLess(len(line), 3 * MAX_QUOTED_CHARACTERS)
        self.assertIn("(8001 characters)", line)
        self.assertIn("(8000 characters)", line)

    def test_two_host_headers_refused(self):
        """
        A request with two Host headers is 400 (RFC 9112 section 3.2), both logged.
        """
        response = self.request(b"GET /healthz HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")
        self.assertTrue(response.startswith(b"HTTP/1.1 400 "))
        self.assertIn(b"more than one Host header", response)
        self.assertIn("for Host 'a, b': 400", self.refusals()[0])


class _Pending:
    """
    A resource that never finishes its response by itself; the test may
    finish the requests it holds.
    """

    isLeaf = True

    def __init__(self):
        self.requests = []

    def render(self, request):
        from twisted.web.server import NOT_DONE_YET

        self.requests.append(request)
        return NOT_DONE_YET

    def getChildWithDefault(self, name, request):
        return self


class HTTPListenerTests(SynchronousTestCase):
    """
    L{http_listener} builds the listener service around a L{GuardedSite}.
    """

    def test_builds_guarded_web_service(self):
        """
        The service is a WebService on the port with a GuardedSite, not yet listening.
        """
        clock = Clock()
        service = http_listener(
            "healthz", 0, healthz_root(FakeCertificateAuthority()), clock, "127.0.0.1"
        )
        self.assertIsInstance(service, WebService)
        self.assertEqual(service.label, "healthz")
        site = service.args[1]
        self.assertIsInstance(site, GuardedSite)
        self.assertIs(site.reactor, clock)
        self.assertEqual(
            service.kwargs, {"interface": "127.0.0.1", "backlog": LISTEN_BACKLOG}
        )
        self.assertFalse(service.running)


class _RecordingReactor:
    """
    The real reactor, recording the readers added through it: the
    listening port first, then each connection it accepts.
    """

    def __init__(self, reactor):
        self._reactor = reactor
        self.readers = []

    def addReader(self, reader):
        self.readers.append(reader)
        self._reactor.addReader(reader)

    def __getattr__(self, name):
        return getattr(self._reactor, name)


class GuardedPortTests(TestCase):
    """
    The listening port: opened through the injected reactor, with a deep
    backlog and bounded accept batches.
    """

    def listen(self):
        """
        Start a healthz listener on 127.0.0.1 through a L{_RecordingReactor};
        return the reactor, the listening port and the service.
        """
        from twisted.internet import reactor

        recording = _RecordingReactor(reactor)
        service = http_listener(
            "healthz", 0, healthz_root(FakeCertificateAuthority()), recording,
            "127.0.0.1",
        )
        service.startService()
        self.addCleanup(service.stopService)
        return recording, recording.readers[0], service

    def test_listens_through_injected_reactor(self):
        """
        The port is opened by the reactor given, on the interface given, with
        LISTEN_BACKLOG.
        """
        recording, port, service = self.listen()
        self.assertIs(port.reactor, recording)
        self.assertEqual(port.backlog, LISTEN_BACKLOG)
        self.assertEqual(port.getHost().host, "127.0.0.1")
        self.assertEqual(port.getHost().port, service.port)

    def test_accept_batch_bounded(self):
        """
        Each read of the port accepts MAX_ACCEPTS_PER_READ of the connections waiting,
        read after read.
        """
        import socket

        from twisted.internet import reactor
        from twisted.internet.task import deferLater

        recording, port, service = self.listen()
        site = service.args[1]
        clients = []
        self.addCleanup(lambda: [c.close() for c in clients])
        waiting = 3 * MAX_ACCEPTS_PER_READ
        for _ in range(waiting):
            # Blocking connects: each handshake completes in the kernel's
            # accept queue, and the reactor does not run meanwhile.
            clients.append(socket.create_connection(("127.0.0.1", service.port)))

        def abort_accepted():
            for transport in recording.readers[1:]:
                transport.abortConnection()
            return deferLater(reactor, 0, lambda: None)

        self.addCleanup(abort_accepted)
        port.doRead()
        self.assertEqual(site.open_connections, MAX_ACCEPTS_PER_READ)
        port.doRead()
        self.assertEqual(site.open_connections, 2 * MAX_ACCEPTS_PER_READ)
        self.assertLess(2 * MAX_ACCEPTS_PER_READ, MAX_CONNECTIONS_PER_LISTENER)
