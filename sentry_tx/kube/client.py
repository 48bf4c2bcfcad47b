# -*- test-case-name: tests.test_kube_client,tests.test_modes -*-
"""
The Kubernetes API client: L{KubernetesClient} talks JSON to the API server
with treq over one persistent L{HTTPConnectionPool}, and never blocks the
reactor.

Its L{ClusterConnection} is read when the client is first used (never while
twistd builds the service tree).  Every call has a deadline
(L{KUBERNETES_REQUEST_TIMEOUT_SECONDS}) and a bounded body; a 401 makes it
re-read the token file and retry once; redirects are never followed (the
bearer token must not travel).  L{KubernetesClientService} closes its
connections when the service tree stops.
"""

import json
from collections.abc import Callable, Generator
from typing import TYPE_CHECKING, Any, cast

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import (
    IConsumer,
    IDelayedCall,
    IProtocol,
    IProtocolFactory,
    IPushProducer,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import (
    URI,
    Agent,
    HTTPConnectionPool,
    RequestNotSent,
    ResponseDone,
    ResponseNeverReceived,
)
from twisted.web.error import SchemeNotSupported
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import IAgentEndpointFactory, IBodyProducer, IResponse
from zope.interface import implementer

import sentry_tx
from sentry_tx.errors import ConfigError
from sentry_tx.kube.errors import (
    KubernetesError,
    KubernetesUnavailableError,
    api_error,
    json_answer,
)
from sentry_tx.kube.tls import ClusterTLSPolicy

if TYPE_CHECKING:
    import treq.client

    from sentry_tx.kube.connection import ClusterConnection


KUBERNETES_REQUEST_TIMEOUT_SECONDS = 5.0
"""
The deadline of one API call, from sending to the last byte of the answer
(a retry included).  Validation as a whole is also bounded by the
servicer's own timeout.
"""

KUBERNETES_CONNECT_TIMEOUT_SECONDS = 5.0
"""
The deadline of one TCP connection attempt to the API server.
"""

KUBERNETES_MAX_PERSISTENT_CONNECTIONS = 128
"""
How many idle connections to the API server the pool keeps.

Sized by Little's law: at 1000 validations/s, with two API calls each and
20 ms per call, about 2000 x 0.020 = 40 calls are in flight at any time,
each on its own HTTP/1.1 connection.  128 leaves three times that for bursts
and slower API servers before connections would be opened and closed per
call.  The pool does not cap concurrency: calls beyond it open extra
connections that are closed after use.
"""

KUBERNETES_IDLE_CONNECTION_SECONDS = 60
"""
How long an idle pooled connection is kept before it is closed.
"""

CLIENT_SHUTDOWN_GRACE_SECONDS = 5.0
"""
How long API calls in flight may go on when sentry_tx stops (as long as the
certificate authority's own grace period for calls in flight).
"""

MAX_KUBERNETES_RESPONSE_BYTES = 4 * 1024 * 1024
"""
The largest response body read; a bigger one is refused (no object sentry_tx
reads comes close).
"""

_USER_AGENT = f"sentry_tx/{sentry_tx.__version__}".encode("ascii")


class _BoundedBody(Protocol):
    """
    Collects a response body into C{finished}; a body larger than C{limit}
    bytes is read to its end but not kept, and fails the call.
    """

    def __init__(self, finished: "Deferred[bytes]", limit: int) -> None:
        self._finished: Deferred[bytes] | None = finished
        self._limit = limit
        self._size = 0
        self._chunks: list[bytes] = []

    def dataReceived(self, data: bytes) -> None:
        self._size += len(data)
        if self._size > self._limit:
            self._chunks = []
        else:
            self._chunks.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        # Fired after the pool has taken the connection back (Twisted returns
        # a quiescent connection to its pool before ending the body).
        finished, self._finished = self._finished, None
        if finished is None:
            return
        if self._size > self._limit:
            finished.errback(
                KubernetesUnavailableError(
                    f"the response is larger than {self._limit} bytes"
                )
            )
        elif reason.check(ResponseDone, PotentialDataLoss):
            finished.callback(b"".join(self._chunks))
        else:
            finished.errback(reason)

    def abort(self) -> None:
        """
        Give up on the body (the call was cancelled): the connection is
        closed, never reused.
        """
        self._finished = None
        if self.transport is not None:
            # A response body's transport is a producer (IResponse.deliverBody).
            cast(IPushProducer, self.transport).stopProducing()


def _read_body(response: IResponse, limit: int) -> "Deferred[bytes]":
    """
    The body of C{response}; cancelling the Deferred closes the connection.
    """
    finished: Deferred[bytes] = Deferred(lambda d: protocol.abort())
    protocol = _BoundedBody(finished, limit)
    response.deliverBody(protocol)
    return finished


class _CallState:
    """
    What one call's retries must know: whether its deadline has passed.
    """

    expired = False
    timeout_seconds = 0.0
    max_response_bytes = 0


def _describe_failure(failure: Failure) -> str:
    """
    A transport failure in a few words (the first reason of Twisted's
    wrapper exceptions, which carry a list of them).
    """
    value = failure.value
    reasons = getattr(value, "reasons", None)
    if reasons:
        inner = reasons[0]
        detail = inner.getErrorMessage() or type(inner.value).__name__
        return f"{type(value).__name__}: {detail}"
    return f"{type(value).__name__}: {failure.getErrorMessage()}".rstrip(": ")


@implementer(IBodyProducer)
class _BytesProducer:
    """
    A request body already in memory, written at once (treq's default
    producer would schedule the write through the global cooperator).
    """

    def __init__(self, data: bytes) -> None:
        self._data = data
        self.length = len(data)

    def startProducing(self, consumer: IConsumer) -> "Deferred[None]":
        consumer.write(self._data)
        return defer.succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


@implementer(IAgentEndpointFactory)
class _ClusterEndpointFactory:
    """
    The endpoints to the API server, made once per scheme, host and port
    rather than for every request (Twisted's default factory re-encodes the
    host name each time).

    @param reactor: the reactor to connect with.
    @param policy: the L{IPolicyForHTTPS} of C{https} endpoints.
    @param connect_timeout_seconds: the deadline of one connection attempt.
    """

    def __init__(
        self,
        reactor: IReactorTime,
        policy: ClusterTLSPolicy,
        connect_timeout_seconds: float,
    ) -> None:
        self._reactor = reactor
        self._policy = policy
        self._connect_timeout_seconds = connect_timeout_seconds
        self._endpoints: dict[tuple[bytes, bytes, int], IStreamClientEndpoint] = {}

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        """
        The (cached) endpoint for C{uri}: TCP for C{http}, TLS over TCP for
        C{https}.
        """
        key = (uri.scheme, uri.host, uri.port)
        endpoint = self._endpoints.get(key)
        if endpoint is None:
            if uri.scheme not in (b"http", b"https"):
                raise SchemeNotSupported(f"unsupported scheme: {uri.scheme!r}")
            endpoint = HostnameEndpoint(
                self._reactor, uri.host, uri.port, timeout=self._connect_timeout_seconds
            )
            if uri.scheme == b"https":
                endpoint = wrapClientTLS(
                    self._policy.creatorForNetloc(uri.host, uri.port), endpoint
                )
            endpoint = _QuietEndpoint(endpoint)
            self._endpoints[key] = endpoint
        return endpoint


@implementer(IStreamClientEndpoint)
class _QuietEndpoint:
    """
    An endpoint that connects the pool's connection factories quietly,
    without Twisted's "Starting factory" log line for every new connection
    (dozens under load): it clears the factory's public C{noisy} flag, so no
    private class of Twisted is subclassed.
    """

    def __init__(self, inner: IStreamClientEndpoint) -> None:
        self._inner = inner

    def connect(self, protocolFactory: IProtocolFactory) -> "Deferred[IProtocol]":
        if isinstance(protocolFactory, Factory):
            protocolFactory.noisy = False
        return self._inner.connect(protocolFactory)


class KubernetesClient:
    """
    A JSON client of the Kubernetes API, on treq and one persistent
    connection pool.  Use it on the reactor thread only.

    Nothing is opened when it is built: the connection settings are read,
    and the pool made, on first use (after twistd has forked).

    @param reactor: the reactor (connections, deadlines, the token clock).
    @param connection_loader: a callable of no arguments returning the
        L{ClusterConnection}; it may raise L{ConfigError}, which every call
        then fails with.
    @param request_timeout_seconds: the deadline of one call.
    @param max_persistent_connections: the pool's idle connections.
    @param max_response_bytes: the largest response read.
    """

    _log = Logger()

    def __init__(
        self,
        reactor: IReactorTime,
        connection_loader: "Callable[[], ClusterConnection]",
        request_timeout_seconds: float = KUBERNETES_REQUEST_TIMEOUT_SECONDS,
        max_persistent_connections: int = KUBERNETES_MAX_PERSISTENT_CONNECTIONS,
        max_response_bytes: int = MAX_KUBERNETES_RESPONSE_BYTES,
    ) -> None:
        self._reactor = reactor
        self._connection_loader = connection_loader
        self._request_timeout_seconds = request_timeout_seconds
        self._max_persistent_connections = max_persistent_connections
        self._max_response_bytes = max_response_bytes
        self._connection: ClusterConnection | None = None
        self._pool: HTTPConnectionPool | None = None
        self._http: treq.client.HTTPClient | None = None
        self._in_flight: set[Deferred[Any]] = set()
        self._draining: list[Deferred[None]] = []
        self._grace_timer: IDelayedCall | None = None
        self._closed = False

    @property
    def reactor(self) -> IReactorTime:
        """
        The reactor the client runs on (also the clock of its deadlines).
        """
        return self._reactor

    @property
    def connection(self) -> "ClusterConnection":
        """
        The L{ClusterConnection} in use, reading it on first use.

        @raise ConfigError: when the settings are missing or wrong.
        """
        if self._connection is None:
            self._connection = self._connection_loader()
            self._log.info(
                "Kubernetes API server {server} ({description})",
                server=self._connection.server,
                description=self._connection.description,
            )
        return self._connection

    def _client(self) -> "treq.client.HTTPClient":
        if self._http is None:
            import treq.client

            connection = self.connection
            pool = HTTPConnectionPool(self._reactor, persistent=True)
            pool.maxPersistentPerHost = self._max_persistent_connections
            pool.cachedConnectionTimeout = KUBERNETES_IDLE_CONNECTION_SECONDS
            pool.retryAutomatically = True
            agent = Agent.usingEndpointFactory(
                self._reactor,
                _ClusterEndpointFactory(
                    self._reactor,
                    ClusterTLSPolicy(connection),
                    KUBERNETES_CONNECT_TIMEOUT_SECONDS,
                ),
                pool=pool,
            )
            self._pool = pool
            self._http = treq.client.HTTPClient(
                agent, data_to_body_producer=_BytesProducer
            )
        return self._http

    # The calls.

    def get(
        self,
        path: str,
        timeout_seconds: float | None = None,
        max_response_bytes: int | None = None,
    ) -> "Deferred[Any]":
        """
        C{GET path}.

        @param timeout_seconds: this call's deadline, when not the client's.
        @param max_response_bytes: the largest answer read for this call (a
            list page), when not the client's.
        @return: Deferred firing with the decoded JSON object.
        """
        return self.request(
            "GET",
            path,
            timeout_seconds=timeout_seconds,
            max_response_bytes=max_response_bytes,
        )

    def create(
        self,
        path: str,
        body: object,
        retry_lost_response: bool = False,
        timeout_seconds: float | None = None,
    ) -> "Deferred[Any]":
        """
        C{POST path} with the JSON C{body}.

        @param retry_lost_response: resend once when the connection was cut
            before an answer came (for calls without side effects, like a
            TokenReview; a pooled connection the server had just closed).
        @param timeout_seconds: this call's deadline, when not the client's.
        """
        return self.request(
            "POST", path, body, retry_lost_response, timeout_seconds=timeout_seconds
        )

    def replace(self, path: str, body: object) -> "Deferred[Any]":
        """
        C{PUT path} with the JSON C{body} (a conditional update when it
        carries C{metadata.resourceVersion}).
        """
        return self.request("PUT", path, body)

    def request(
        self,
        method: str,
        path: str,
        body: object = None,
        retry_lost_response: bool = False,
        timeout_seconds: float | None = None,
        max_response_bytes: int | None = None,
    ) -> "Deferred[Any]":
        """
        Make one API call.

        @param method: C{"GET"}, C{"POST"}, C{"PUT"}.
        @param path: the API path, from C{/api} or C{/apis}.
        @param body: a JSON-serialisable object, or None.
        @param timeout_seconds: the deadline of this call (a validation
            passes what is left of its own); the client's by default.
        @return: Deferred firing with the decoded JSON object of a 2xx
            answer, or failing with L{KubernetesAPIError},
            L{KubernetesUnavailableError} or L{ConfigError}.
        """
        if self._closed:
            return defer.fail(
                KubernetesUnavailableError(f"{method} {path}: the client is closed")
            )
        try:
            self._client()
        except ConfigError:
            return defer.fail()
        data = None if body is None else json.dumps(body).encode("utf-8")
        state = _CallState()
        if timeout_seconds is None:
            timeout_seconds = self._request_timeout_seconds
        state.timeout_seconds = timeout_seconds
        state.max_response_bytes = max_response_bytes or self._max_response_bytes
        d = self._request(method, path, data, retry_lost_response, state)
        self._in_flight.add(d)

        def expire() -> None:
            state.expired = True
            d.cancel()

        deadline = self._reactor.callLater(max(0.0, timeout_seconds), expire)

        def finish(result: object) -> object:
            self._in_flight.discard(d)
            if deadline.active():
                deadline.cancel()
            if self._draining and not self._in_flight and not self._closed:
                # Let the callbacks of this call start the caller's next
                # call before deciding that nothing is in flight.
                self._reactor.callLater(0, self._drained)
            return result

        d.addBoth(finish)
        d.addErrback(self._translate_failure, method, path, state)
        return d

    @inlineCallbacks
    def _request(
        self,
        method: str,
        path: str,
        data: bytes | None,
        retry_lost_response: bool,
        state: _CallState,
    ) -> Generator["Deferred[Any]", Any, Any]:
        lost_response_retries = 1 if retry_lost_response else 0
        token_retries = 1
        while True:
            try:
                response = yield self._send(method, path, data)
            except (ResponseNeverReceived, RequestNotSent):
                if lost_response_retries and not (state.expired or self._closed):
                    lost_response_retries -= 1
                    continue
                raise
            body = yield _read_body(response, state.max_response_bytes)
            token = self.connection.token
            if response.code == 401 and token_retries and token is not None:
                # The token may have rotated since the last check: re-read
                # it, and try once more if it changed.  Nothing was done
                # with a request the server did not authenticate.
                token_retries -= 1
                if token.refresh():
                    continue
            return json_answer(response.code, response.phrase, body, method, path)

    def _send(
        self, method: str, path: str, data: bytes | None
    ) -> "Deferred[IResponse]":
        connection = self.connection
        headers: dict[bytes | str, list[bytes | str]] = {
            b"Accept": [b"application/json"],
            b"User-Agent": [_USER_AGENT],
        }
        if data is not None:
            headers[b"Content-Type"] = [b"application/json"]
        if connection.token is not None:
            headers[b"Authorization"] = [
                b"Bearer " + connection.token.current().encode("ascii")
            ]
        response = self._client().request(
            method,
            connection.url(path),
            data=data,
            headers=headers,
            allow_redirects=False,
            unbuffered=True,
            # treq types this as its private _ITreqReactor; it only reads the
            # reactor for a timeout, which is never passed (ours is above).
            reactor=self._reactor,  # type: ignore[arg-type]
        )
        # treq's response provides IResponse (it wraps Twisted's).
        return cast("Deferred[IResponse]", response)

    def open_stream(
        self, path: str, timeout_seconds: float | None = None
    ) -> "Deferred[IResponse]":
        """
        C{GET path} for a streamed answer (a watch): fires with the treq
        response once its headers have come, for the caller to read with
        C{deliverBody} under its own bounds; an answer that is not 2xx is
        read (bounded) and fails the Deferred as L{request} does.

        @param timeout_seconds: how long the headers may take; the client's
            request timeout by default.
        @return: Deferred firing with the response; cancelling it closes the
            connection.
        """
        if self._closed:
            return defer.fail(
                KubernetesUnavailableError(f"GET {path}: the client is closed")
            )
        try:
            self._client()
        except ConfigError:
            return defer.fail()
        state = _CallState()
        state.timeout_seconds = (
            self._request_timeout_seconds
            if timeout_seconds is None
            else timeout_seconds
        )

        @inlineCallbacks
        def opened() -> Generator["Deferred[Any]", Any, IResponse]:
            response: IResponse = yield self._send("GET", path, None)
            if not 200 <= response.code < 300:
                body = yield _read_body(response, self._max_response_bytes)
                raise api_error(response.code, response.phrase, body, "GET", path)
            return response

        d = opened()

        def expire() -> None:
            state.expired = True
            d.cancel()

        deadline = self._reactor.callLater(max(0.0, state.timeout_seconds), expire)

        def finish(result: object) -> object:
            if deadline.active():
                deadline.cancel()
            return result

        d.addBoth(finish)
        d.addErrback(self._translate_failure, "GET", path, state)
        return d

    def _translate_failure(
        self, failure: Failure, method: str, path: str, state: _CallState
    ) -> Failure:
        if state.expired:
            raise KubernetesUnavailableError(
                f"{method} {path}: no answer within {state.timeout_seconds:g} s"
            )
        if failure.check(KubernetesError, ConfigError):
            return failure
        if self._closed:
            raise KubernetesUnavailableError(f"{method} {path}: the client was closed")
        raise KubernetesUnavailableError(
            f"{method} {path}: {_describe_failure(failure)}"
        )

    def close(self, grace_seconds: float = 0.0) -> "Deferred[None]":
        """
        Close the client: calls in flight get up to C{grace_seconds} to
        finish (new calls are still made meanwhile, so that a validation in
        flight can make its next call), then the rest are cancelled, later
        calls refused, and the pooled connections closed.

        @param grace_seconds: how long calls in flight may go on.
        @return: Deferred firing when the connections are closed.
        """
        closed: Deferred[None] = Deferred()
        if self._closed and not self._draining:
            closed.callback(None)
            return closed
        first = not self._draining
        self._draining.append(closed)
        if first:
            if self._in_flight and grace_seconds > 0:
                self._grace_timer = self._reactor.callLater(
                    grace_seconds, self._drained, True
                )
            else:
                self._drained(True)
        return closed

    def _drained(self, give_up: bool = False) -> None:
        """
        Finish closing once nothing is in flight, or when C{give_up}.
        """
        if self._closed or (self._in_flight and not give_up):
            return
        if self._grace_timer is not None and self._grace_timer.active():
            self._grace_timer.cancel()
        self._closed = True
        for d in list(self._in_flight):
            d.cancel()
        closing = (
            self._pool.closeCachedConnections() if self._pool else defer.succeed(None)
        )

        def notify(_: object) -> None:
            waiters, self._draining = self._draining, []
            for waiter in waiters:
                waiter.callback(None)

        closing.addCallback(notify)


class KubernetesClientService(Service):
    """
    Closes the L{KubernetesClient} when sentry_tx stops, once the calls in
    flight have finished (within L{CLIENT_SHUTDOWN_GRACE_SECONDS}): the
    certificate authority stops at the same time and lets the validations in
    flight finish, which may still need the API.

    @param client: the L{KubernetesClient}.
    """

    name = "kubernetes-client"

    def __init__(self, client: KubernetesClient) -> None:
        self.client = client

    def stopService(self) -> "Deferred[None]":
        super().stopService()
        return self.client.close(grace_seconds=CLIENT_SHUTDOWN_GRACE_SECONDS)
