# -*- test-case-name: tests.test_jwks -*-
"""
One fetch of a JWKS validator's URL source (SPEC section 6), hardened
against the key server (issue 17):

  - a redirect is never followed: any 3xx is a refused fetch that names the
    status and the C{Location} (cut to L{MAX_LOGGED_LOCATION_CHARACTERS}),
    so neither another host nor plain HTTP can hand over a key set;
  - the fetch ends within its timeout and reads at most C{max_bytes};
  - whatever ends it (its body read, a timeout, the size cap, a cancel, a
    refused status, a broken connection), the connections it opened are
    aborted then: an abandoned fetch never keeps a socket;
  - a failure is a L{JWKSFetchError} whose text says what happened in
    words ("timed out after 5.0 s", "refused: HTTP 302 to ...").

Each fetch has its own L{Agent} (non-persistent pool) over a
L{_TrackingEndpointFactory} that records the connections it makes.
"""

import re
from collections.abc import Callable
from typing import TypeVar, cast

from twisted.internet import defer, error
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import (
    IProtocol,
    IProtocolFactory,
    IPushProducer,
    IReactorTime,
    IStreamClientEndpoint,
    ITCPTransport,
)
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import (
    URI,
    Agent,
    BrowserLikePolicyForHTTPS,
    HTTPConnectionPool,
    ResponseDone,
)
from twisted.web.error import SchemeNotSupported
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IAgentEndpointFactory, IPolicyForHTTPS, IResponse
from zope.interface import implementer

from sentry_tx.logs import MAX_QUOTED_CHARACTERS, printable_cut

MAX_LOGGED_LOCATION_CHARACTERS = MAX_QUOTED_CHARACTERS
"""
A refused redirect's C{Location} is logged cut to this many characters: it
comes from the key server, and may be anything.
"""

_T = TypeVar("_T")

FETCH_FAILED = "failed"
FETCH_REFUSED = "refused"
FETCH_CANCELLED = "cancelled"


class JWKSFetchError(Exception):
    """
    A fetch of the key set did not give a body to parse.

    C{str()} is C{"<outcome>: <why>"}, e.g. C{"failed: timed out after
    5.0 s"} or C{"refused: HTTP 302 to https://elsewhere/"}.

    @ivar outcome: L{FETCH_FAILED} or L{FETCH_REFUSED} (the server answered,
        and the answer is not used).
    @ivar why: what happened, in words.
    """

    def __init__(self, why: str, outcome: str = FETCH_FAILED) -> None:
        super().__init__(f"{outcome}: {why}")
        self.outcome = outcome
        self.why = why


def tls_policy_for(ca_pem: bytes | None) -> BrowserLikePolicyForHTTPS:
    """
    The HTTPS policy trusting the certificates in C{ca_pem} only, or the
    system's roots when C{ca_pem} is None.

    @raise ValueError: when C{ca_pem} holds no PEM certificate.
    """
    from twisted.internet import ssl

    if ca_pem is None:
        return BrowserLikePolicyForHTTPS()
    blocks = re.findall(
        rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", ca_pem, re.S
    )
    if not blocks:
        raise ValueError("caCertificate holds no PEM certificate")
    trust = ssl.trustRootFromCertificates(
        [ssl.Certificate.loadPEM(block) for block in blocks]
    )
    return BrowserLikePolicyForHTTPS(trust)


@implementer(IStreamClientEndpoint)
class _TrackedEndpoint:
    """
    An endpoint that hands the transport of each connection it makes to
    C{record}.
    """

    def __init__(
        self,
        inner: IStreamClientEndpoint,
        record: Callable[[ITCPTransport], object],
    ) -> None:
        self._inner = inner
        self._record = record

    def connect(self, factory: IProtocolFactory) -> "defer.Deferred[IProtocol]":
        def made(protocol: IProtocol) -> IProtocol:
            # Every connection an endpoint makes has a TCP (or TLS) transport.
            self._record(cast(ITCPTransport, cast(Protocol, protocol).transport))
            return protocol

        return self._inner.connect(factory).addCallback(made)


@implementer(IAgentEndpointFactory)
class _TrackingEndpointFactory:
    """
    Endpoints for one fetch: TCP for C{http}, TLS over TCP under
    C{tls_policy} for C{https}; L{abort_all} aborts every connection they
    made.
    """

    def __init__(self, reactor: IReactorTime, tls_policy: IPolicyForHTTPS) -> None:
        self._reactor = reactor
        self._tls_policy = tls_policy
        self._transports: list[ITCPTransport] = []

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        endpoint: IStreamClientEndpoint = HostnameEndpoint(
            self._reactor, uri.host, uri.port
        )
        if uri.scheme == b"https":
            creator = self._tls_policy.creatorForNetloc(uri.host, uri.port)
            endpoint = wrapClientTLS(creator, endpoint)
        elif uri.scheme != b"http":
            raise SchemeNotSupported(f"unsupported scheme: {uri.scheme!r}")
        return _TrackedEndpoint(endpoint, self._transports.append)

    def abort_all(self) -> None:
        """
        Abort every connection made so far (one already closed is left as
        it is).
        """
        transports, self._transports = self._transports, []
        for transport in transports:
            transport.abortConnection()


class _BoundedBody(Protocol):
    """
    Collects a response body of at most C{limit} bytes into L{done}; past
    the limit, or when L{done} is cancelled, it stops the transport.
    """

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._chunks: list[bytes] = []
        self._size = 0
        self.done: defer.Deferred[bytes] = defer.Deferred(self._cancel)

    def _stop(self) -> None:
        # A response body's transport is a producer (IResponse.deliverBody).
        if self.transport is not None:
            cast(IPushProducer, self.transport).stopProducing()

    def _cancel(self, _: object) -> None:
        self._stop()

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        self._size += len(data)
        if self._size > self._limit:
            self._stop()
            self.done.errback(
                JWKSFetchError(f"the response is larger than {self._limit} bytes")
            )
            return
        self._chunks.append(data)

    def connectionLost(self, reason: Failure | None = None) -> None:
        if self.done.called:
            return
        if reason is None or reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self._chunks))
        else:
            self.done.errback(reason)


class JWKSFetcher:
    """
    Fetches a key set URL, one GET per L{fetch} (see the module's
    docstring).

    @param reactor: the reactor (clock and connections).
    @param url: the C{https://} or C{http://} URL.
    @param timeout_seconds: each fetch ends after this long.
    @param max_bytes: the largest body read.
    @param tls_policy: the L{IPolicyForHTTPS} for C{https} (see
        L{tls_policy_for}).
    @param agent: an L{IAgent} to use instead of a fresh one per fetch (for
        tests with an in-memory server; then closing connections is that
        agent's business).
    """

    def __init__(
        self,
        reactor: IReactorTime,
        url: str,
        timeout_seconds: float,
        max_bytes: int,
        tls_policy: IPolicyForHTTPS | None = None,
        agent: IAgent | None = None,
    ) -> None:
        self._reactor = reactor
        self._url = url
        self._timeout_seconds = timeout_seconds
        self._max_bytes = max_bytes
        self._tls_policy: IPolicyForHTTPS = (
            tls_policy if tls_policy is not None else BrowserLikePolicyForHTTPS()
        )
        self._agent = agent

    def fetch(self) -> "defer.Deferred[bytes]":
        """
        GET the URL once.

        @return: a Deferred firing with the body (bytes), or failing with
            L{JWKSFetchError}; cancelling it ends the fetch.  By the time it
            fires, every connection the fetch opened has been aborted.
        """
        endpoints = _TrackingEndpointFactory(self._reactor, self._tls_policy)
        agent: IAgent | None = self._agent
        if agent is None:
            agent = Agent.usingEndpointFactory(
                self._reactor,
                endpoints,
                pool=HTTPConnectionPool(self._reactor, persistent=False),
            )
        try:
            url = self._url.encode("ascii")
        except UnicodeEncodeError:
            return defer.fail(JWKSFetchError("the URL is not ASCII"))
        d = agent.request(b"GET", url, Headers({b"accept": [b"application/json"]}))
        body = d.addCallback(self._read)
        body.addTimeout(
            self._timeout_seconds, self._reactor, onTimeoutCancel=self._timed_out
        )
        body.addErrback(self._in_words)

        def closed(result: _T) -> _T:
            endpoints.abort_all()
            return result

        return body.addBoth(closed)

    def _read(self, response: IResponse) -> "defer.Deferred[bytes]":
        code = response.code
        if 300 <= code < 400:
            locations = response.headers.getRawHeaders(b"location") or [b""]
            location = printable_cut(
                locations[0].decode("latin-1"), MAX_LOGGED_LOCATION_CHARACTERS
            )
            raise JWKSFetchError(
                f"HTTP {code} to {location or '(no Location)'}"
                " (redirects are never followed)",
                FETCH_REFUSED,
            )
        if code != 200:
            raise JWKSFetchError(f"HTTP status {code}", FETCH_REFUSED)
        length = response.length
        if isinstance(length, int) and length > self._max_bytes:
            raise JWKSFetchError(
                f"the response is larger than {self._max_bytes} bytes ({length})",
                FETCH_REFUSED,
            )
        body = _BoundedBody(self._max_bytes)
        response.deliverBody(body)
        return body.done

    def _timed_out(self, result: object, timeout: float) -> bytes:
        raise JWKSFetchError(f"timed out after {float(timeout)} s")

    def _in_words(self, failure: Failure) -> Failure:
        if failure.check(JWKSFetchError):
            return failure
        raise JWKSFetchError(describe_failure(failure.value))


def describe_failure(value: object) -> str:
    """
    What an exception from a fetch means, in words: the first reason of
    wrapper exceptions of Twisted's HTTP client (C{ResponseFailed} and its
    kin carry a list of reasons), TLS errors by their reasons, a
    cancel as "cancelled".
    """
    if isinstance(value, defer.CancelledError):
        return FETCH_CANCELLED
    reasons = getattr(value, "reasons", None)
    if isinstance(reasons, list) and reasons:
        return describe_failure(getattr(reasons[0], "value", reasons[0]))
    if isinstance(value, error.ConnectionRefusedError):
        return "connection refused"
    if isinstance(value, error.ConnectError):
        return str(value).strip().rstrip(".") or type(value).__name__
    tls_reasons = _tls_reasons(value)
    if tls_reasons:
        return f"TLS: {tls_reasons}"
    text = str(value).strip()
    return f"{type(value).__name__}: {text}" if text else type(value).__name__


def _tls_reasons(value: object) -> str:
    try:
        from OpenSSL import SSL
    except ImportError:  # pragma: no cover (pyOpenSSL comes with Twisted's TLS)
        return ""
    if not isinstance(value, SSL.Error) or not value.args:
        return ""
    details = value.args[0]
    if isinstance(details, list):
        return ", ".join(
            str(entry[-1]) for entry in details if isinstance(entry, tuple) and entry
        )
    return str(details)
