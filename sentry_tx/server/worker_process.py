# -*- test-case-name: tests.test_workers -*-
"""
The parent's end of one worker process: L{WorkerProcess} speaks AMP over the
worker's stdin and stdout, and kills it when it will not stop; and the check
a bundle passes in the parent before any worker is sent it.
"""

from twisted.internet import error
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol
from twisted.protocols import amp
from twisted.python.failure import Failure

from sentry_tx.server.ipc import bundle_from_pems, bundle_to_pems
from sentry_tx.server.tls import issue_server_certificate


KILL_WAIT_SECONDS = 2.0
"""
How long the parent waits for a killed worker to be reaped before it stops
waiting (so that stopping never hangs).
"""


class WorkerError(Exception):
    """
    A worker process could not start, or ended before it answered.
    """


class WorkerProcess(ProcessProtocol):
    """
    The parent's end of one worker process: AMP over the worker's stdin
    (written) and stdout (read).

    @ivar index: the worker's place in the pool, from 0.
    @ivar pid: the process id.
    @ivar port: the port the worker bound, once it answered L{Start}.
    @ivar serving: whether the worker answered L{Start} and was not told to
        stop since.
    @ivar started_at: the reactor time of its L{Start} answer, or None.
    @ivar retiring: whether the parent told it to stop (or killed it), so
        that its end is expected.
    @ivar exit_reason: the exception (C{ProcessDone} or
        C{ProcessTerminated}) it ended with, or None while it runs.
    """

    def __init__(self, index):
        self.index = index
        self.pid = None
        self.port = None
        self.serving = False
        self.started_at = None
        self.retiring = False
        self.exit_reason = None
        self._dispatcher = amp.BoxDispatcher(amp.CommandLocator())
        self._wire = amp.BinaryBoxProtocol(self._dispatcher)
        self._wire_lost = False
        self._end_waiters = []

    # ProcessProtocol

    def connectionMade(self):
        self.pid = self.transport.pid
        self._wire.makeConnection(self.transport)

    def childDataReceived(self, childFD, data):
        if childFD == 1:
            self._wire.dataReceived(data)

    def childConnectionLost(self, childFD):
        if childFD == 1:
            self._lose_wire(
                Failure(error.ConnectionDone("the worker closed its stdout"))
            )

    def processEnded(self, reason):
        self._lose_wire(reason)
        self.serving = False
        self.exit_reason = reason.value
        waiters, self._end_waiters = self._end_waiters, None
        for waiter in waiters:
            waiter.callback(reason.value)

    def _lose_wire(self, reason):
        if not self._wire_lost:
            self._wire_lost = True
            self._wire.connectionLost(reason)

    # The parent's use

    def call(self, command, **arguments):
        """
        Send C{command} to the worker.

        @return: the Deferred of its answer; it fails if the worker refuses,
            or ends before it answers.
        """
        return self._dispatcher.callRemote(command, **arguments)

    def wait_ended(self):
        """
        @return: a Deferred that fires with the exit reason (the
            C{ProcessDone} or C{ProcessTerminated} exception, as a result)
            once the process has ended.
        """
        if self._end_waiters is None:
            d = Deferred()
            d.callback(self.exit_reason)
            return d
        waiter = Deferred()
        self._end_waiters.append(waiter)
        return waiter

    @property
    def ended(self):
        """
        Whether the process has ended.
        """
        return self.exit_reason is not None

    def close_stdin(self):
        """
        Close the worker's stdin: it stops serving and exits.
        """
        if not self.ended:
            self.transport.closeStdin()

    def kill(self):
        """
        SIGKILL the worker, if it still runs.
        """
        try:
            self.transport.signalProcess("KILL")
        except error.ProcessExitedAlready:
            pass


def describe_exit(reason):
    """
    How a process ended, in words: C{"exit status 3"}, C{"signal 9"}.

    @param reason: the exception (C{ProcessDone} or C{ProcessTerminated})
        the process ended with.
    """
    value = reason
    if getattr(value, "signal", None) is not None:
        return f"signal {value.signal}"
    if getattr(value, "exitCode", None) is not None:
        return f"exit status {value.exitCode}"
    return str(value)


def check_bundle_for_workers(bundle, config, now):
    """
    Do with C{bundle} what every worker will do with it before it takes it:
    rebuild it from its PEM documents and issue the server certificate.  A
    bundle that fails here is refused in the parent, before any worker sees
    it, instead of making every worker refuse it.

    @raise Exception: whatever rebuilding or issuing raises.
    """
    rebuilt = bundle_from_pems(*bundle_to_pems(bundle))
    issue_server_certificate(
        rebuilt, config.trust_domain, config.namespace, now, config.mtls
    )
