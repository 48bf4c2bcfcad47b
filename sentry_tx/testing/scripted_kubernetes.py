"""
An in-memory stand-in for the Kubernetes client: each call recorded and
answered when the test says, for the informer's and validator's tests.
"""

import json
from typing import Any, cast

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IDelayedCall,
    IProtocol,
    IReactorTime,
    ITransport,
)
from twisted.python.failure import Failure


class ScriptedResponse:
    """
    A streamed answer of L{ScriptedKubernetesClient.open_stream}: the test
    drives the body with C{send}, C{end} and C{cut}.

    @ivar protocol: the protocol given to C{deliverBody}, once it is.
    @ivar stopped: whether the reader closed the connection.
    """

    code = 200

    def __init__(self) -> None:
        self.protocol: IProtocol | None = None
        self.stopped = False

    def _delivered(self) -> IProtocol:
        """
        The protocol the body goes to.

        @raise RuntimeError: before C{deliverBody}.
        """
        if self.protocol is None:
            raise RuntimeError("the body has no reader yet (deliverBody)")
        return self.protocol

    def deliverBody(self, protocol: IProtocol) -> None:
        self.protocol = protocol
        # A body's reader gets a producer it can stop, not a full transport
        # (Twisted's Response hands it a _TransportProxyProducer likewise).
        protocol.makeConnection(cast(ITransport, self))

    def stopProducing(self) -> None:
        from twisted.internet.error import ConnectionLost

        if not self.stopped:
            self.stopped = True
            self._delivered().connectionLost(
                Failure(ConnectionLost("closed by reader"))
            )

    def send(self, *events: dict[str, Any]) -> None:
        """
        Send watch events (dicts) as JSON lines.
        """
        for event in events:
            self._delivered().dataReceived(json.dumps(event).encode("utf-8") + b"\n")

    def end(self) -> None:
        """
        End the body normally (the server's C{timeoutSeconds}).
        """
        from twisted.web.client import ResponseDone

        self.stopped = True
        self._delivered().connectionLost(Failure(ResponseDone()))

    def cut(self) -> None:
        """
        Break the connection.
        """
        from twisted.internet.error import ConnectionLost

        self.stopped = True
        self._delivered().connectionLost(Failure(ConnectionLost("cut")))


ScriptedCall = tuple[str, str, object, float | None, Deferred[Any]]
"""
One recorded call: C{(method, path, body, timeout_seconds, Deferred)}.
"""


class ScriptedKubernetesClient:
    """
    An in-memory stand-in for L{sentry_tx.kube.client.KubernetesClient}'s calls
    (C{get}, C{create}, C{open_stream}, C{reactor}): each call is recorded
    with a Deferred the test fires, and, as the real client, fails with
    L{sentry_tx.kube.errors.KubernetesUnavailableError} when its C{timeout_seconds}
    pass on C{reactor} (a L{Clock}).  The real client's timeouts are pinned
    in C{tests/test_kube_client.py}; the informer and validator against the real
    client and L{FakeKubernetesAPI} in C{tests/test_kube_informer.py}.

    @ivar calls: C{(method, path, body, timeout_seconds, Deferred)} of every
        call, in order.
    @ivar response_caps: the C{max_response_bytes} of every GET, in order.
    """

    def __init__(self, reactor: IReactorTime) -> None:
        self.reactor = reactor
        self.calls: list[ScriptedCall] = []
        self.response_caps: list[int | None] = []

    def _call(
        self,
        method: str,
        path: str,
        body: object = None,
        timeout_seconds: float | None = None,
    ) -> Deferred[Any]:
        from sentry_tx.kube.errors import KubernetesUnavailableError

        timer: list[IDelayedCall] = []

        def cancel(d: Deferred[Any]) -> None:
            if timer and timer[0].active():
                timer[0].cancel()

        d: Deferred[Any] = Deferred(cancel)
        if timeout_seconds is not None:

            def expire() -> None:
                if not d.called:
                    d.errback(
                        KubernetesUnavailableError(
                            f"{method} {path}: no answer within {timeout_seconds:g} s"
                        )
                    )

            timer.append(self.reactor.callLater(timeout_seconds, expire))

            def stop_timer(result: object) -> object:
                if timer[0].active():
                    timer[0].cancel()
                return result

            d.addBoth(stop_timer)
        self.calls.append((method, path, body, timeout_seconds, d))
        return d

    def get(
        self,
        path: str,
        timeout_seconds: float | None = None,
        max_response_bytes: int | None = None,
    ) -> Deferred[Any]:
        self.response_caps.append(max_response_bytes)
        return self._call("GET", path, timeout_seconds=timeout_seconds)

    def create(
        self,
        path: str,
        body: object,
        retry_lost_response: bool = False,
        timeout_seconds: float | None = None,
    ) -> Deferred[Any]:
        return self._call("POST", path, body, timeout_seconds)

    def open_stream(
        self, path: str, timeout_seconds: float | None = None
    ) -> Deferred[Any]:
        return self._call("WATCH", path, timeout_seconds=timeout_seconds)

    def pending(self, method: str | None = None) -> list["ScriptedCall"]:
        """
        The calls (as in C{calls}) whose Deferred has not fired, of
        C{method} if given.
        """
        return [
            call
            for call in self.calls
            if not call[4].called and (method is None or call[0] == method)
        ]
