# -*- test-case-name: tests.test_http_listener,tests.test_oidc -*-
"""
The one constructor of sentry_tx's HTTP listeners (healthz, metrics, and any
later one such as OIDC discovery): L{http_listener}.

A healthz port must answer the kubelet's probe every second, whatever else
connects to it.  Twisted's own HTTP channel only has an idle timer that
every byte restarts, so a client that sends one byte every 20 s holds its
connection (and a file descriptor) for ever, and enough of them use every
descriptor the process has.  L{GuardedSite} adds two bounds:

  - a request deadline: a request must arrive whole (request line, headers
    and body) within L{REQUEST_DEADLINE_SECONDS} of the connection, or of
    the end of the previous response on a kept-alive connection; bytes
    arriving meanwhile do not extend it;
  - a request size bound: a request (line, headers and body) larger than
    L{MAX_REQUEST_BYTES} closes the connection, so that no body is spooled
    to disk;
  - a connection cap: at most L{MAX_CONNECTIONS_PER_LISTENER} connections
    at once; one more makes room by closing the oldest connection that has
    not sent a whole request yet (or, when every connection is being
    answered, is itself closed), so a probe that sends its request at once
    always gets through.

Connections that are closed and reconnect at once (a slowloris client
does) make the listener accept and close connections as fast as it can.
A probe must still get in and be read before it is the oldest:

  - the listening backlog is L{LISTEN_BACKLOG} (Twisted's default is 50),
    so a probe's SYN waits in the accept queue instead of being dropped
    (a dropped SYN is retried after 1 s, past the kubelet's 1 s timeout);
  - one read of the listening socket accepts at most
    L{MAX_ACCEPTS_PER_READ} connections (Twisted's own batch grows without
    bound under load), far below the cap, so a probe accepted in one batch
    has its request read in the next turn of the reactor, long before
    enough newer connections arrive to make it the oldest.

The one name of Twisted's that is not public API here: C{numberAccepts}.
Twisted offers no public way to bound an accept batch: C{listenTCP} and
C{TCP4ServerEndpoint} take a backlog and an interface but build a
L{tcp.Port} whose batch (its C{numberAccepts} attribute) starts at 100 and
grows by 20 each time it is used up, and a factory cannot stop the loop
that calls it (returning L{None} closes the connection; raising kills the
port).  Re-implementing the accept loop over C{IReactorFDSet.addReader} and
C{IReactorSocket.adoptStreamConnection} would use public names only, but
would duplicate each accepted descriptor (an fd more per connection under
the very file limit this defends) and lose Twisted's handling of
C{EMFILE} (its reserved descriptor that drains the queue).  So
L{_BoundedAcceptPort} caps that one attribute, and
C{tests.test_http_listener.GuardedPortTests} pins the bound by its effect
(one read accepts L{MAX_ACCEPTS_PER_READ} of many waiting connections), so
that a Twisted release that renames it fails there.  Everything else is
public: the port is opened by C{TCPServer}'s own start, with the injected
reactor (L{BoundedAcceptTCP}), and the channel's hooks are C{HTTPChannel}'s
public ones.

A request with more than one C{Host} header is refused with 400, as RFC
9112 section 3.2 requires (which one would count is otherwise up to each
reader).

A refused request (a 4xx answer) is logged through a L{RefusalLog}: one
line per status per L{REFUSAL_LOG_INTERVAL_SECONDS} and listener, its
method, path and C{Host} cut by L{quote_input}; the refusals in between are
counted and the count written with the next line.  Successful requests are
not logged (see L{QuietSite}).
"""

from typing import cast

from twisted.internet import tcp
from twisted.internet.interfaces import (
    IDelayedCall,
    IProtocolFactory,
    IReactorTCP,
    IReactorTime,
    ITCPTransport,
)
from twisted.internet.protocol import ServerFactory, connectionDone
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel, Request
from twisted.web.resource import IResource, Resource

from sentry_tx.logs import REFUSAL_LOG_INTERVAL_SECONDS, RefusalLog, quote_input
from sentry_tx.service import QuietSite, WebService

REQUEST_DEADLINE_SECONDS = 10.0
"""
How long a connection has to send one whole request (from its connection,
or from the end of the previous response).
"""

MAX_CONNECTIONS_PER_LISTENER = 128
"""
Connections one HTTP listener holds at once.
"""

LISTEN_BACKLOG = 1024
"""
The listening backlog of an HTTP listener (the kernel caps it at
C{net.core.somaxconn}).
"""

MAX_ACCEPTS_PER_READ = 16
"""
Connections accepted in one read of an HTTP listener's socket.
"""

MAX_REQUEST_BYTES = 64 * 1024
"""
The largest request (request line, headers and body) a listener reads;
healthz and metrics take no body at all.
"""


class _GuardedChannel(HTTPChannel):
    """
    An HTTP channel that tells its L{GuardedSite} when a request has arrived
    whole and when it waits for the next one.
    """

    _request_bytes = 0

    # True from a request's arrival (allContentReceived) to its end
    # (requestDone): the bytes that arrive meanwhile belong to the next
    # request, and HTTPChannel holds them and plays them back through
    # dataReceived once the answer is done, where they are counted.
    _answering = False

    site: "GuardedSite"

    def connectionMade(self) -> None:
        super().connectionMade()
        self.site._connection_made(self)

    def dataReceived(self, data: bytes) -> None:
        if not self._answering:
            self._request_bytes += len(data)
            if self._request_bytes > MAX_REQUEST_BYTES:
                self.site._too_large(self)
                return
        super().dataReceived(data)

    def allContentReceived(self) -> None:
        self._request_bytes = 0
        self._answering = True
        self.site._request_arrived(self)
        super().allContentReceived()

    def requestDone(self, request: Request) -> None:
        if self.persistent:
            self._answering = False
        super().requestDone(request)
        if self.persistent and self.site._tracks(self):
            self.site._awaiting_request(self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.site._connection_lost(self)
        super().connectionLost(reason)

    def abort(self) -> None:
        """
        Close the connection at once, whatever it was sending.
        """
        # A TCP (or TLS over TCP) transport: ITransport lacks abortConnection.
        cast(ITCPTransport, self.transport).abortConnection()


class _TwoHostsRefused(Resource):
    """
    The answer to a request with more than one C{Host} header: 400.
    """

    isLeaf = True

    def render(self, request: Request) -> bytes:
        request.setResponseCode(400)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"Bad Request: more than one Host header\n"


_TWO_HOSTS_REFUSED = _TwoHostsRefused()

# The level a refusal is logged at, by status; others are info.  A 403
# (a Host not allowed) is usually a proxy or allow-list set up wrong.
_REFUSAL_LEVELS = {403: LogLevel.warn}


class GuardedSite(QuietSite):
    """
    A L{QuietSite} with a request deadline and a connection cap, that
    refuses a request with two C{Host} headers and logs refusals at a
    bounded rate.

    @param resource: the root resource.
    @param reactor: the L{IReactorTime} that times the deadlines and the
        refusal log's intervals.
    @param request_deadline_seconds: see L{REQUEST_DEADLINE_SECONDS}.
    @param max_connections: see L{MAX_CONNECTIONS_PER_LISTENER}.
    @param label: the listener's name in the log (C{healthz}, C{oidc}).
    @param refusal_log_interval_seconds: see
        L{REFUSAL_LOG_INTERVAL_SECONDS}.

    @ivar closed_for_deadline: connections closed because their request
        did not arrive in time.
    @ivar closed_for_room: connections closed to make room under the cap.
    """

    _log = Logger()

    def __init__(
        self,
        resource: IResource,
        reactor: IReactorTime,
        request_deadline_seconds: float = REQUEST_DEADLINE_SECONDS,
        max_connections: int = MAX_CONNECTIONS_PER_LISTENER,
        label: str = "http",
        refusal_log_interval_seconds: float = REFUSAL_LOG_INTERVAL_SECONDS,
    ) -> None:
        super().__init__(resource, reactor=reactor)
        self.label = label
        self.refusals = RefusalLog(self._log, reactor, refusal_log_interval_seconds)
        self._request_deadline_seconds = request_deadline_seconds
        self._max_connections = max_connections
        # Every open channel, oldest first, with its deadline call while it
        # waits for a whole request (None while a request is answered).
        self._channels: dict[_GuardedChannel, IDelayedCall | None] = {}
        self.closed_for_deadline = 0
        self.closed_for_room = 0

    # HTTPFactory declares protocol as making its HTTP/1.1-or-2 wrapper; a
    # plain HTTP/1.1 channel is what these listeners serve.
    def protocol(self) -> _GuardedChannel:  # type: ignore[override]
        return _GuardedChannel()

    def getResourceFor(self, request: Request) -> IResource:
        if len(request.requestHeaders.getRawHeaders(b"host", ())) > 1:
            return _TWO_HOSTS_REFUSED
        resource: IResource = super().getResourceFor(request)
        return resource

    def log(self, request: Request) -> None:
        """
        Log a refused request (4xx), at most one line per status per
        interval (twisted.web calls this as each response finishes).
        """
        code = request.code
        if not 400 <= code < 500:
            return
        hosts = request.requestHeaders.getRawHeaders(b"host", ())
        peer = request.getClientAddress()
        self.refusals.refused(
            code,
            _REFUSAL_LEVELS.get(code, LogLevel.info),
            "{listener} server refused {method} {path} from {peer} for Host"
            " {host}: {code}",
            listener=self.label,
            method=quote_input(request.method),
            path=quote_input(request.uri),
            peer=getattr(peer, "host", "-"),
            host=quote_input(b", ".join(hosts)),
            code=code,
        )

    @property
    def open_connections(self) -> int:
        """
        How many connections are open now.
        """
        return len(self._channels)

    def _tracks(self, channel: _GuardedChannel) -> bool:
        return channel in self._channels

    def _connection_made(self, channel: _GuardedChannel) -> None:
        if len(self._channels) >= self._max_connections:
            victim = next(
                (c for c, deadline in self._channels.items() if deadline is not None),
                None,
            )
            self.closed_for_room += 1
            if victim is None:
                # Every connection has a request being answered: refuse the
                # newcomer instead.
                channel.abort()
                return
            self._close(victim)
        self._channels[channel] = None
        self._awaiting_request(channel)

    def _awaiting_request(self, channel: _GuardedChannel) -> None:
        self._cancel_deadline(channel)
        self._channels[channel] = self.reactor.callLater(
            self._request_deadline_seconds, self._deadline_passed, channel
        )

    def _request_arrived(self, channel: _GuardedChannel) -> None:
        if channel in self._channels:
            self._cancel_deadline(channel)
            self._channels[channel] = None

    def _too_large(self, channel: _GuardedChannel) -> None:
        if channel in self._channels:
            self._close(channel)
        else:
            channel.abort()

    def _deadline_passed(self, channel: _GuardedChannel) -> None:
        if self._channels.get(channel) is None:
            return
        self._channels[channel] = None
        self.closed_for_deadline += 1
        self._close(channel)

    def _close(self, channel: _GuardedChannel) -> None:
        self._cancel_deadline(channel)
        del self._channels[channel]
        channel.abort()

    def _cancel_deadline(self, channel: _GuardedChannel) -> None:
        deadline = self._channels.get(channel)
        if deadline is not None and deadline.active():
            deadline.cancel()

    def _connection_lost(self, channel: _GuardedChannel) -> None:
        if channel in self._channels:
            self._cancel_deadline(channel)
            del self._channels[channel]


class _BoundedAcceptPort(tcp.Port):
    """
    A TCP port that accepts at most L{MAX_ACCEPTS_PER_READ} connections per
    read (Twisted's L{tcp.Port} adds 20 to its batch each time it is used
    up).
    """

    _number_accepts = MAX_ACCEPTS_PER_READ

    @property
    def numberAccepts(self) -> int:
        return self._number_accepts

    @numberAccepts.setter
    def numberAccepts(self, value: int) -> None:
        self._number_accepts = max(1, min(value, MAX_ACCEPTS_PER_READ))


class BoundedAcceptTCP:
    """
    The C{listenTCP} of L{IReactorTCP} over C{reactor}, listening with a
    L{_BoundedAcceptPort} (as the reactor's own C{listenTCP} does with a
    L{tcp.Port}): what L{GuardedWebService} gives its
    L{twisted.application.internet.TCPServer} as its reactor, so that
    Twisted's own service start listens through it.
    """

    def __init__(self, reactor: IReactorTCP) -> None:
        self.reactor = reactor

    def listenTCP(
        self,
        port: int,
        factory: ServerFactory,
        backlog: int = LISTEN_BACKLOG,
        interface: str = "",
    ) -> _BoundedAcceptPort:
        """
        Listen on C{interface}:C{port} with C{backlog}, now.
        """
        listening = _BoundedAcceptPort(
            port, factory, backlog=backlog, interface=interface, reactor=self.reactor
        )
        listening.startListening()
        return listening


class GuardedWebService(WebService):
    """
    A L{WebService} listening, through C{reactor}, with L{LISTEN_BACKLOG}
    and bounded accept batches.

    @param reactor: the L{IReactorTCP} that listens.
    """

    def __init__(
        self,
        label: str,
        port: int,
        factory: IProtocolFactory,
        reactor: IReactorTCP,
        interface: str = "",
        flag: str | None = None,
    ) -> None:
        super().__init__(label, port, factory, interface=interface, flag=flag)
        # TCPServer's documented ivars: what its start passes to
        # reactor.listenTCP.
        self.kwargs["backlog"] = LISTEN_BACKLOG
        self.reactor = BoundedAcceptTCP(reactor)


def http_listener(
    label: str,
    port: int,
    resource: IResource,
    reactor: IReactorTime,
    interface: str = "",
    request_deadline_seconds: float = REQUEST_DEADLINE_SECONDS,
    max_connections: int = MAX_CONNECTIONS_PER_LISTENER,
) -> GuardedWebService:
    """
    The service of one HTTP listener: C{resource} on C{interface}:C{port},
    with the request deadline and the connection cap of L{GuardedSite}.
    Builds objects only; the port opens when the service starts.

    @param label: its name in the log (C{healthz}, C{metrics}).
    @param reactor: times the deadlines and, once started, listens: every
        reactor twistd runs provides both L{IReactorTime} and
        L{IReactorTCP} (an interface type cannot say "both" in a signature).
    @return: a L{GuardedWebService}.
    """
    site = GuardedSite(
        resource,
        reactor,
        request_deadline_seconds=request_deadline_seconds,
        max_connections=max_connections,
        label=label,
    )
    return GuardedWebService(
        label, port, site, cast(IReactorTCP, reactor), interface=interface
    )


__all__ = [
    "BoundedAcceptTCP",
    "GuardedSite",
    "GuardedWebService",
    "LISTEN_BACKLOG",
    "MAX_ACCEPTS_PER_READ",
    "MAX_CONNECTIONS_PER_LISTENER",
    "MAX_REQUEST_BYTES",
    "REQUEST_DEADLINE_SECONDS",
    "http_listener",
]
