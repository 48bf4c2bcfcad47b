# -*- test-case-name: tests.test_copies -*-
"""
The liveness check of a serving copy: a real round trip through its gRPC
loop.

A copy answers C{GET /live} on a Unix socket in the twistd process's
private directory (L{liveness_site}); the answer is 200 only after one
coroutine has run on the copy's gRPC loop
(L{CertificateAuthorityService.loop_round_trip}), so a copy whose loop or
reactor is stuck (or that is stopped, SIGSTOP) never answers.  The twistd
process asks (L{probe}) with a time bound.
"""

from typing import Protocol as TypingProtocol
from typing import cast

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.interfaces import IReactorTime, IReactorUNIX, ITCPTransport
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from sentry_tx.service import QuietSite

LIVE_PATH = b"live"


class LoopProbe(TypingProtocol):
    """
    What C{/live} asks of the authority: a round trip through its gRPC loop.
    """

    def loop_round_trip(self) -> Deferred[None]:
        """
        Fire once a coroutine has run on the gRPC loop; fail when not serving.
        """


class LivenessResource(Resource):
    """
    C{/live}: 200 once a coroutine has run on the authority's gRPC loop,
    503 when the authority does not serve.
    """

    isLeaf = True

    def __init__(self, authority: LoopProbe) -> None:
        super().__init__()
        self._authority = authority

    def render_GET(self, request: Request) -> int:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        # The asker may give up first (its time bound): then nothing is
        # written.
        gone: list[Failure] = []
        request.notifyFinish().addErrback(gone.append)

        def answer(code: int, body: bytes) -> None:
            if not gone:
                request.setResponseCode(code)
                request.write(body)
                request.finish()

        self._authority.loop_round_trip().addCallbacks(
            lambda _: answer(200, b"live\n"),
            lambda _: answer(503, b"not serving\n"),
        )
        return NOT_DONE_YET


def liveness_site(authority: LoopProbe, reactor: IReactorTime) -> QuietSite:
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

    def __init__(self) -> None:
        self.answer = b""
        # Cancelled (the time bound passed): drop the connection.
        self.done: Deferred[bool] = Deferred(lambda _: self._abort())

    def _abort(self) -> None:
        # A UNIX socket's transport aborts as a TCP one does; ITransport
        # does not say so.
        cast(ITCPTransport, self.transport).abortConnection()

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(b"GET /" + LIVE_PATH + b" HTTP/1.0\r\n\r\n")

    def dataReceived(self, data: bytes) -> None:
        self.answer += data
        if len(self.answer) > MAX_ANSWER_BYTES:
            self._abort()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self.done.called:
            self.done.callback(self.answer.split(b" ", 2)[1:2] == [b"200"])


class _AskFactory(Factory):
    noisy = False
    protocol = _Ask


def probe(
    reactor: IReactorUNIX, path: str, timeout_seconds: float
) -> Deferred[bool]:
    """
    Ask the copy listening on C{path} whether it is live.

    @return: a Deferred firing with True when it answered 200 within
        C{timeout_seconds}, else False (never failing).
    """
    endpoint = UNIXClientEndpoint(reactor, path, timeout=timeout_seconds)
    connected: Deferred[_Ask] = endpoint.connect(_AskFactory())
    d: Deferred[bool] = connected.addCallback(lambda ask: ask.done)
    # Every reactor that connects UNIX sockets also has timers.
    d.addTimeout(timeout_seconds, cast(IReactorTime, reactor))
    return d.addErrback(lambda failure: False)
