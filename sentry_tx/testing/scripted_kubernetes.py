"""
An in-memory stand-in for the Kubernetes client: each call recorded and
answered when the test says, for the informer's and validator's tests.
"""

import json

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure


class ScriptedResponse:
    """
    A streamed answer of L{ScriptedKubernetesClient.open_stream}: the test
    drives the body with C{send}, C{end} and C{cut}.

    @ivar protocol: the protocol given to C{deliverBody}, once it is.
    @ivar stopped: whether the reader closed the connection.
    """

    code = 200

    def __init__(self):
        self.protocol = None
        self.stopped = False

    def deliverBody(self, protocol):
        self.protocol = protocol
        protocol.makeConnection(self)

    def stopProducing(self):
        from twisted.internet.error import ConnectionLost

        if not self.stopped:
            self.stopped = True
            self.protocol.connectionLost(Failure(ConnectionLost("closed by reader")))

    def send(self, *events):
        """
        Send watch events (dicts) as JSON lines.
        """
        for event in events:
            self.protocol.dataReceived(json.dumps(event).encode("utf-8") + b"\n")

    def end(self):
        """
        End the body normally (the server's C{timeoutSeconds}).
        """
        from twisted.web.client import ResponseDone

        self.stopped = True
        self.protocol.connectionLost(Failure(ResponseDone()))

    def cut(self):
        """
        Break the connection.
        """
        from twisted.internet.error import ConnectionLost

        self.stopped = True
        self.protocol.connectionLost(Failure(ConnectionLost("cut")))


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

    def __init__(self, reactor):
        self.reactor = reactor
        self.calls = []
        self.response_caps = []

    def _call(self, method, path, body=None, timeout_seconds=None):
        from sentry_tx.kube.errors import KubernetesUnavailableError

        timer = []

        def cancel(d):
            if timer and timer[0].active():
                timer[0].cancel()

        d = Deferred(cancel)
        if timeout_seconds is not None:

            def expire():
                if not d.called:
                    d.errback(
                        KubernetesUnavailableError(
                            f"{method} {path}: no answer within {timeout_seconds:g} s"
                        )
                    )

            timer.append(self.reactor.callLater(timeout_seconds, expire))

            def stop_timer(result):
                if timer[0].active():
                    timer[0].cancel()
                return result

            d.addBoth(stop_timer)
        self.calls.append((method, path, body, timeout_seconds, d))
        return d

    def get(self, path, timeout_seconds=None, max_response_bytes=None):
        self.response_caps.append(max_response_bytes)
        return self._call("GET", path, timeout_seconds=timeout_seconds)

    def create(self, path, body, retry_lost_response=False, timeout_seconds=None):
        return self._call("POST", path, body, timeout_seconds)

    def open_stream(self, path, timeout_seconds=None):
        return self._call("WATCH", path, timeout_seconds=timeout_seconds)

    def pending(self, method=None):
        """
        The calls (as in C{calls}) whose Deferred has not fired, of
        C{method} if given.
        """
        return [
            call
            for call in self.calls
            if not call[4].called and (method is None or call[0] == method)
        ]
