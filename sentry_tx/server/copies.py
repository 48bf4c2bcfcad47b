# -*- test-case-name: tests.test_copies -*-
"""
The twistd process's serving copies: N - 1 more processes, each a whole
sentry started through sentry_tx's own entry point (C{python -m sentry_tx
serve} with the same flags, L{sentry_tx.serve}), sharing the port with
SO_REUSEPORT.  Nothing but a copy's life and its log lines crosses a pipe.

L{ServingCopies} supervises them, one way: it starts them once this process
serves, starts again with backoff one that ends, and every
L{LIVENESS_INTERVAL_SECONDS} asks each for a round trip through its gRPC
loop (L{sentry_tx.server.liveness}); one that fails
L{LIVENESS_FAILURES_BEFORE_KILL} checks in a row is killed and replaced.
A copy's stdin is a pipe from this process (its end of file says stop);
its stdout and stderr are this process's own, so its log lines keep their
level and JSON shape (L{sentry_tx.stderr_capture} passes them through).

Not C{twisted.runner.procmon.ProcessMonitor}: it re-wraps each output line
of a child in a log event of its own, spawns with no choice of file
descriptors, and has no hook for a liveness check or the restart metrics.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, cast

from twisted.application.service import Service
from twisted.internet import error
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IDelayedCall, IProcessTransport
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from sentry_tx.server.liveness import probe
from sentry_tx.server.service import SHUTDOWN_GRACE_SECONDS, listen_target

if TYPE_CHECKING:
    from sentry_tx.interfaces import IServingReactor
    from sentry_tx.metrics import SentryMetrics
    from sentry_tx.rundir import PrivateDirectory
    from sentry_tx.server.service import CertificateAuthorityService

ProcessEnd = error.ProcessDone | error.ProcessTerminated
"""
Why a copy's process ended: Twisted ends every process with one of these.
"""

SERVE_COMMAND = "serve"
LIVENESS_SOCKET_VARIABLE = "SENTRY_TX_LIVENESS_SOCKET"

LIVENESS_INTERVAL_SECONDS = 1.0
LIVENESS_TIMEOUT_SECONDS = 2.0
STARTING_CHECK_INTERVAL_SECONDS = 0.1
"""
How often a copy that has not served yet is asked: it counts as serving
soon after it is.
"""

LIVENESS_FAILURES_BEFORE_KILL = 2
"""
Failed checks in a row (each L{LIVENESS_TIMEOUT_SECONDS} at most, one every
L{LIVENESS_INTERVAL_SECONDS}) after which a serving copy is killed: a stuck
one is caught within about 5 s.
"""

START_TIMEOUT_SECONDS = 60.0
"""
How long a new copy may take to answer its first check (imports, loading
the bundle, binding) before it is killed and replaced.
"""

RESPAWN_INITIAL_DELAY_SECONDS = 1.0
"""
The wait before a copy that ended is started again; doubled each time the
same copy ends again before it has served L{RESPAWN_MAX_DELAY_SECONDS}.
"""

RESPAWN_MAX_DELAY_SECONDS = 30.0
STOP_MARGIN_SECONDS = 2.0
"""
How long past the drain grace a stopping copy may take before it is killed.
"""


class _Copy(ProcessProtocol):
    """
    One copy's process, seen from the twistd process.
    """

    def __init__(
        self,
        index: int,
        socket_path: str,
        started_at: float,
        on_ended: Callable[[_Copy, ProcessEnd], object],
    ) -> None:
        self.index = index
        self.socket_path = socket_path
        self.started_at = started_at
        self.serving_since: float | None = None
        self.failures = 0
        self.checking = False
        self.checked_at: float | None = None
        self.pid: int | None = None
        self.ended: Deferred[ProcessEnd] = Deferred()
        self._on_ended = on_ended

    def process(self) -> IProcessTransport:
        """
        The copy's process, once spawned.
        """
        if self.transport is None:
            raise RuntimeError(f"serving process {self.index} was not spawned")
        return self.transport

    def connectionMade(self) -> None:
        self.pid = self.process().pid

    def processEnded(self, reason: Failure) -> None:
        ended = cast(ProcessEnd, reason.value)
        self._on_ended(self, ended)
        self.ended.callback(ended)

    def kill(self) -> None:
        try:
            self.process().signalProcess("KILL")
        except error.ProcessExitedAlready:
            pass


class ServingCopies(Service):
    """
    Starts and supervises the serving copies.

    @param authority: this process's L{CertificateAuthorityService}: the
        copies start once it serves, on the port it bound.
    @param reactor: spawns the copies, and is the clock.
    @param directory: the L{sentry_tx.rundir.PrivateDirectory} (metrics and
        liveness sockets).
    @param arguments: the flags sentry_tx was started with.
    @param count: how many copies.
    @param metrics: the L{SentryMetrics}: serving processes and restarts.
    @param environ: the copies' environment, besides the two variables set
        here; L{os.environ} by default.
    @param check: L{probe}'s signature: C{(reactor, socket path, timeout)}
        to a Deferred of a boolean.
    """

    _log = Logger()

    def __init__(
        self,
        authority: CertificateAuthorityService,
        reactor: IServingReactor,
        directory: PrivateDirectory,
        arguments: Iterable[str],
        count: int,
        metrics: SentryMetrics,
        environ: Mapping[str, str] | None = None,
        executable: str = sys.executable,
        check: Callable[[IServingReactor, str, float], Deferred[bool]] = probe,
        respawn_initial_delay_seconds: float = RESPAWN_INITIAL_DELAY_SECONDS,
    ) -> None:
        self._authority = authority
        self._reactor = reactor
        self._directory = directory
        self._arguments = list(arguments)
        self.count = count
        self._metrics = metrics
        self._environ = environ
        self._executable = executable
        self._check = check
        self._respawn_initial_delay_seconds = respawn_initial_delay_seconds
        self._copies: dict[int, _Copy] = {}
        self._delays: dict[int, float] = {}
        self._respawns: dict[int, IDelayedCall] = {}
        self._liveness: LoopingCall | None = None
        self._stopping = False
        self._all_serving_logged = False

    @property
    def serving(self) -> int:
        """
        How many copies answer their liveness checks now.
        """
        return sum(1 for c in self._copies.values() if c.serving_since is not None)

    def describe(self) -> str:
        """
        The serving processes, in words, for healthz's body.
        """
        return f"serving processes: {1 + self.serving} of {1 + self.count}\n"

    def startService(self) -> None:
        super().startService()
        self._stopping = False
        self._authority.when_serving().addCallback(self._start_copies)

    def _start_copies(self, _: object) -> None:
        if self._stopping:
            return
        self._publish()
        if not self.count:
            return
        for index in range(self.count):
            self._spawn(index)
        self._liveness = LoopingCall(self._check_all)
        self._liveness.clock = self._reactor
        self._liveness.start(STARTING_CHECK_INTERVAL_SECONDS, now=False)

    def _spawn(self, index: int) -> None:
        self._respawns.pop(index, None)
        socket_path = self._directory.socket_path(f"copy-{index}.sock")
        if os.path.exists(socket_path):
            os.unlink(socket_path)
        environ = dict(os.environ if self._environ is None else self._environ)
        environ["PROMETHEUS_MULTIPROC_DIR"] = self._directory.metrics_path
        environ[LIVENESS_SOCKET_VARIABLE] = socket_path
        argv = [self._executable, "-m", "sentry_tx", SERVE_COMMAND]
        # The port this process bound (it may have been 0); the copy shares it.
        argv += self._arguments + ["--port", str(self._authority.port)]
        copy = _Copy(index, socket_path, self._reactor.seconds(), self._ended)
        try:
            self._reactor.spawnProcess(
                copy, self._executable, argv, env=environ, childFDs={0: "w", 1: 1, 2: 2}
            )
        except OSError as e:
            # No process (no fork, no fds): nothing to supervise; try again
            # with the same backoff as for a copy that ended.
            delay = self._respawn_later(index, served=False)
            self._log.error(
                "could not start serving process {index}: {error}; trying again"
                " in {delay} s",
                index=index,
                error=e,
                delay=delay,
            )
            return
        self._copies[index] = copy
        self._log.info(
            "started serving process {index} (pid {pid})", index=index, pid=copy.pid
        )

    def _check_all(self) -> None:
        now = self._reactor.seconds()
        for copy in list(self._copies.values()):
            # A copy is checked before it can serve: checked_at is set then.
            due = (
                copy.serving_since is None
                or copy.checked_at is None
                or now - copy.checked_at >= LIVENESS_INTERVAL_SECONDS
            )
            if due and not copy.checking:
                copy.checking = True
                copy.checked_at = now
                d = self._check(
                    self._reactor, copy.socket_path, LIVENESS_TIMEOUT_SECONDS
                )
                d.addCallback(self._checked, copy)

    def _checked(self, live: bool, copy: _Copy) -> None:
        copy.checking = False
        if self._copies.get(copy.index) is not copy or self._stopping:
            return
        now = self._reactor.seconds()
        if live:
            copy.failures = 0
            if copy.serving_since is None:
                copy.serving_since = now
                self._log.info(
                    "serving process {index} (pid {pid}) serves",
                    index=copy.index,
                    pid=copy.pid,
                )
                self._publish()
            return
        copy.failures += 1
        if copy.serving_since is not None:
            if copy.failures < LIVENESS_FAILURES_BEFORE_KILL:
                return
            why = f"failed {copy.failures} liveness checks in a row"
        elif now - copy.started_at >= START_TIMEOUT_SECONDS:
            why = (
                "did not answer its liveness check within"
                f" {START_TIMEOUT_SECONDS} s"
            )
        else:
            return
        self._log.error(
            "serving process {index} (pid {pid}) {why}; killing it",
            index=copy.index,
            pid=copy.pid,
            why=why,
        )
        copy.kill()

    def _ended(self, copy: _Copy, reason: ProcessEnd) -> None:
        if self._copies.get(copy.index) is copy:
            del self._copies[copy.index]
        if copy.pid is not None:
            self._metrics.forget_process(copy.pid)
        self._publish()
        if self._stopping:
            return
        served = copy.serving_since is not None and (
            self._reactor.seconds() - copy.serving_since >= RESPAWN_MAX_DELAY_SECONDS
        )
        delay = self._respawn_later(copy.index, served)
        self._metrics.serving_process_restarts.inc()
        self._log.error(
            "serving process {index} (pid {pid}) ended ({how}); starting it again"
            " in {delay} s",
            index=copy.index,
            pid=copy.pid,
            how=f"signal {reason.signal}" if reason.signal is not None
            else f"exit status {reason.exitCode}",
            delay=delay,
        )

    def _respawn_later(self, index: int, served: bool) -> float:
        """
        Start copy C{index} again after a delay that doubles (up to
        L{RESPAWN_MAX_DELAY_SECONDS}) each time, and starts over once a copy
        has C{served} that long.

        @return: the delay, in seconds.
        """
        delay = self._delays.get(index, self._respawn_initial_delay_seconds)
        if served:
            delay = self._respawn_initial_delay_seconds
        self._delays[index] = min(delay * 2, RESPAWN_MAX_DELAY_SECONDS)
        self._respawns[index] = self._reactor.callLater(delay, self._spawn, index)
        return delay

    def _publish(self) -> None:
        serving = self.serving
        self._metrics.serving_processes.set(1 + serving)
        if serving == self.count and not self._all_serving_logged:
            self._all_serving_logged = True
            if not self.count:
                return
            self._log.info(
                "gRPC server listening on {target} in {processes} serving processes",
                target=listen_target(
                    self._authority.config.listen_address, self._authority.port
                ),
                processes=1 + self.count,
            )

    def stopService(self) -> Deferred[None] | None:
        """
        Close each copy's stdin (it drains and exits), and kill one that
        is still there after the drain grace and a margin.
        """
        super().stopService()
        self._stopping = True
        if self._liveness is not None and self._liveness.running:
            self._liveness.stop()
        for call in self._respawns.values():
            if call.active():
                call.cancel()
        self._respawns.clear()
        copies = list(self._copies.values())
        for copy in copies:
            try:
                copy.process().closeStdin()
            except Exception:
                copy.kill()
        if not copies:
            return None
        def kill_all() -> None:
            for copy in copies:
                copy.kill()

        kill_later = self._reactor.callLater(
            SHUTDOWN_GRACE_SECONDS + STOP_MARGIN_SECONDS, kill_all
        )

        def done(result: object) -> None:
            if kill_later.active():
                kill_later.cancel()
            return None

        return DeferredList([copy.ended for copy in copies]).addBoth(done)
