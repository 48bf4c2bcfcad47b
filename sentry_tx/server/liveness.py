# -*- test-case-name: tests.test_copies -*-
"""
The liveness check of a serving copy: a real round trip through its gRPC
loop.

A copy answers C{GET /live} on a Unix socket in the twistd process's
private directory (L{liveness_site}); the answer is 200 only after one
coroutine has run on the copy's gRPC loop (L{CertificateAuthorityService.loop_round_trip}),
so a copy whose loop or reactor is stuck (or that is stopped, SIGSTOP)
never answers.  The twistd process asks (L{probe}) with a time bound.
"""

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from sentry_tx.service import QuietSite

LIVE_PATH = b"live"


class LivenessResource(Resource):
    """
    C{/live}: 200 once a coroutine has run on the authority's gRPC loop,
    503 when the authority does not serve.
    """

    isLeaf = True

    def __init__(self, authority):
        super().__init__()
        self._authority = authority

    def render_GET(self, request):
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        # The asker may give up first (its time bound): then nothing is
        # written.
        gone = []
        request.notifyFinish().addErrback(gone.append)

        def answer(code, body):
            if not gone:
                request.setResponseCode(code)
                request.write(body)
                request.finish()

        self._authority.loop_round_trip().addCallbacks(
            lambda _: answer(200, b"live\n"),
            lambda _: answer(503, b"not serving\n"),
        )
        return NOT_DONE_YET


def liveness_site(authority, reactor):
    """
    The site a copy serves on its liveness socket: C{/live} only.
    """
    root = Resource()
    root.putChild(LIVE_PATH, LivenessResource(authority))
    site = QuietSite(root)
    site.reactor = reactor
    return site


MAX_ANSWER_BYTES = 1024


class _Ask(Protocol):
    """
    One liveness question: C{GET /live} over HTTP/1.0, the answer read to
    its end (at most L{MAX_ANSWER_BYTES}).
    """

    def __init__(self):
        self.answer = b""
        # Cancelled (the time bound passed): drop the connection.
        self.done = Deferred(lambda _: self.transport.abortConnection())

    def connectionMade(self):
        self.transport.write(b"GET /" + LIVE_PATH + b" HTTP/1.0\r\n\r\n")

    def dataReceived(self, data):
        self.answer += data
        if len(self.answer) > MAX_ANSWER_BYTES:
            self.transport.abortConnection()

    def connectionLost(self, reason):
        if not self.done.called:
            self.done.callback(self.answer.split(b" ", 2)[1:2] == [b"200"])


class _AskFactory(Factory):
    noisy = False
    protocol = _Ask


def probe(reactor, path, timeout_seconds):
    """
    Ask the copy listening on C{path} whether it is live.

    @return: a Deferred firing with True when it answered 200 within
        C{timeout_seconds}, else False (never failing).
    """
    endpoint = UNIXClientEndpoint(reactor, path, timeout=timeout_seconds)
    d = endpoint.connect(_AskFactory())
    d.addCallback(lambda ask: ask.done)
    d.addTimeout(timeout_seconds, reactor)
    d.addErrback(lambda failure: False)
    return d
