"""
A JSON Web Key Set server on 127.0.0.1 port 0 for tests of the JWKS
fetcher (L{sentry_tx.identity.jwks_fetch}), as a hostile key server would
be: it serves a key set, redirects, answers another status, or trickles
its answer a byte a second; it counts requests and the connections open
on it.
"""

from typing import TYPE_CHECKING, Any, cast

from twisted.internet import defer, task
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IListeningPort, IOpenSSLContextFactory
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

if TYPE_CHECKING:
    from twisted.internet.protocol import ServerFactory

    from sentry_tx.testing.web import IServingReactor

TRICKLE_INTERVAL_SECONDS = 1.0


class _CountingFactory(WrappingFactory):
    """
    A L{WrappingFactory} (which keeps the open connections in C{protocols})
    that counts every connection and tells waiters when none is open.
    """

    def __init__(self, wrapped: Site) -> None:
        super().__init__(wrapped)
        self.connections_made = 0
        self._when_none_open: list[defer.Deferred[None]] = []

    def registerProtocol(self, p: ProtocolWrapper) -> None:
        self.connections_made += 1
        super().registerProtocol(p)

    def unregisterProtocol(self, p: ProtocolWrapper) -> None:
        super().unregisterProtocol(p)
        if not self.protocols:
            waiting, self._when_none_open = self._when_none_open, []
            for d in waiting:
                d.callback(None)

    def when_none_open(self) -> defer.Deferred[None]:
        if not self.protocols:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._when_none_open.append(d)
        return d


class KeySetServer(Resource):
    """
    Serves C{body} at every path.

    @ivar code: the status answered (200 unless told).
    @ivar location: when set, the C{Location} header (with a 3xx C{code}).
    @ivar trickle: when True, the headers (announcing the whole body) and
        the first byte go at once, then one byte every
        L{TRICKLE_INTERVAL_SECONDS} of the reactor's clock.
    @ivar chunked: when True, no Content-Length (the body goes chunked).
    @ivar requests: how many requests arrived.
    """

    isLeaf = True

    def __init__(self, reactor: "IServingReactor", body: bytes | str) -> None:
        super().__init__()
        self._reactor = reactor
        self.body = body
        self.code = 200
        self.location: str | None = None
        self.trickle = False
        self.chunked = False
        self.requests = 0
        self._trickling: set[task.LoopingCall] = set()
        self._when_request: list[defer.Deferred[None]] = []
        self._factory: _CountingFactory | None = None
        self._port: IListeningPort | None = None

    def _listening(self) -> tuple[_CountingFactory, IListeningPort]:
        """
        The factory and port of a started server.

        @raise RuntimeError: before L{start}.
        """
        if self._factory is None or self._port is None:
            raise RuntimeError("the key set server is not started")
        return self._factory, self._port

    def start(
        self, test: TestCase, tls_options: IOpenSSLContextFactory | None = None
    ) -> None:
        """
        Listen on 127.0.0.1 port 0 (TLS with C{tls_options} when given)
        until the end of C{test}.
        """
        self._factory = _CountingFactory(Site(self))
        # WrappingFactory derives from ClientFactory, while listenTCP and
        # listenSSL are typed to take a ServerFactory; any factory serves.
        factory = cast("ServerFactory[Any]", self._factory)
        if tls_options is None:
            self._port = self._reactor.listenTCP(0, factory, interface="127.0.0.1")
        else:
            self._port = self._reactor.listenSSL(
                0, factory, tls_options, interface="127.0.0.1"
            )
        test.addCleanup(self._stop)

    def url(self, path: str = "/jwks.json", scheme: str = "http") -> str:
        """
        The URL of C{path} on this server.
        """
        address = self._listening()[1].getHost()
        if not isinstance(address, IPv4Address):
            raise TypeError(f"listening on {address!r}, not IPv4")
        return f"{scheme}://127.0.0.1:{address.port}{path}"

    @property
    def open_connections(self) -> int:
        """
        How many connections are open on the server now.
        """
        return len(self._listening()[0].protocols)

    @property
    def connections_made(self) -> int:
        """
        How many connections were ever made to the server.
        """
        return self._listening()[0].connections_made

    def when_none_open(self) -> defer.Deferred[None]:
        """
        @return: a Deferred that fires once no connection is open.
        """
        return self._listening()[0].when_none_open()

    def when_request(self) -> defer.Deferred[None]:
        """
        @return: a Deferred that fires once the next request has arrived
            (and its answer has begun).
        """
        d: defer.Deferred[None] = defer.Deferred()
        self._when_request.append(d)
        return d

    def render_GET(self, request: Request) -> bytes | int:
        self.requests += 1
        waiting, self._when_request = self._when_request, []
        for d in waiting:
            self._reactor.callLater(0, d.callback, None)
        request.setResponseCode(self.code)
        request.setHeader(b"content-type", b"application/json")
        if self.location is not None:
            request.setHeader(b"location", self.location.encode("latin-1"))
        body = self.body.encode() if isinstance(self.body, str) else self.body
        if not self.trickle:
            if self.chunked:
                request.write(body)
                request.finish()
                return NOT_DONE_YET
            return body
        request.setHeader(b"content-length", str(len(body)).encode())
        remaining = [body]

        def one_byte() -> None:
            request.write(remaining[0][:1])
            remaining[0] = remaining[0][1:]
            if not remaining[0]:
                request.finish()

        loop = task.LoopingCall(one_byte)
        loop.clock = self._reactor
        self._trickling.add(loop)

        def ended(_: object) -> None:
            self._trickling.discard(loop)
            if loop.running:
                loop.stop()

        request.notifyFinish().addBoth(ended)
        loop.start(TRICKLE_INTERVAL_SECONDS, now=True)
        return NOT_DONE_YET

    def _stop(self) -> defer.Deferred[list[Any]]:
        for loop in list(self._trickling):
            if loop.running:
                loop.stop()
        self._trickling.clear()
        factory, port = self._listening()
        for protocol in list(factory.protocols):
            protocol.transport.abortConnection()
        waits: list[defer.Deferred[Any]] = [
            defer.maybeDeferred(port.stopListening),
            self.when_none_open(),
        ]
        return defer.gatherResults(waits)
