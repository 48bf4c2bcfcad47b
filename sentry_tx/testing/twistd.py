# -*- test-case-name: tests.test_process -*-
"""
C{twistd -n sentry} as a child process of a test: L{spawn_twistd} starts
it on free loopback ports (L{LOOPBACK_FREE_PORTS}), and its
L{TwistdProtocol} reads the ports it bound from its log.

Moved here from C{tests.test_process} so that the tests that start twistd
share it without importing one another.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from twisted.internet import error
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

from sentry_tx.testing.source_tree import child_environment

if TYPE_CHECKING:
    from twisted.trial.unittest import TestCase

# The image's ENTRYPOINT runs the console script `twistd`; use the one of
# the running Python (a venv's bin/), else the same code through -c.
_TWISTD_SCRIPT = os.path.join(os.path.dirname(sys.executable), "twistd")
TWISTD: list[str]
if os.path.exists(_TWISTD_SCRIPT):
    TWISTD = [sys.executable, _TWISTD_SCRIPT]
else:
    TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


class TwistdProtocol(ProcessProtocol):
    """
    Collects the output of twistd; C{wait_ready()} fires with the ports once
    the gRPC server listens (or fails if twistd ends first), and C{ended}
    with the exit reason.
    """

    _LISTENING = re.compile(
        rb"(?P<name>healthz|metrics) server listening on port (?P<port>\d+)"
        rb"|gRPC server listening on \S+:(?P<grpc>\d+)"
        rb"(?P<pool> in \d+ serving processes)?"
    )
    _PROCESSES = re.compile(rb"serving gRPC from (?P<count>\d+) process")

    def __init__(self, workers: bool = False) -> None:
        # With serving copies, each copy logs its own listening line
        # first: only the pool's line means the parent is ready.
        self._workers = workers
        self._output_waiters: list[tuple[bytes, Deferred[None]]] = []
        self.output = b""
        self.ports: dict[str, int] = {}
        self._ready_waiters: list[Deferred[dict[str, int]]] = []
        self._ready = False
        self._end_reason: Failure | None = None
        self.ended: Deferred[BaseException | None] = Deferred()

    def wait_ready(self) -> Deferred[dict[str, int]]:
        """
        A Deferred that fires with the ports (by listener name: C{grpc},
        C{healthz}, C{metrics}) once gRPC listens, or fails with the exit
        reason if twistd ends first.
        """
        d: Deferred[dict[str, int]] = Deferred()
        if self._ready:
            d.callback(self.ports)
        elif self._end_reason is not None:
            d.errback(self._end_reason)
        else:
            self._ready_waiters.append(d)
        return d

    def when_output(self, text: bytes) -> Deferred[None]:
        """
        A Deferred that fires once C{text} has appeared in the output.
        """
        d: Deferred[None] = Deferred()
        self._output_waiters.append((text, d))
        self._check_output_waiters()
        return d

    def _check_output_waiters(self) -> None:
        # Take the fired ones off the list before firing them: a callback
        # may wait for more output, which checks the list again.
        fired = [(t, d) for t, d in self._output_waiters if t in self.output]
        self._output_waiters = [
            (t, d) for t, d in self._output_waiters if t not in self.output
        ]
        for _, d in fired:
            d.callback(None)

    def outReceived(self, data: bytes) -> None:
        self.output += data
        self._check_output_waiters()
        processes = self._PROCESSES.search(self.output)
        if processes is not None:
            # Logged before anything listens: with several serving
            # processes, only the pool's line means every one serves.
            self._workers = int(processes.group("count")) > 1
        for match in self._LISTENING.finditer(self.output):
            if match.group("grpc"):
                if self._workers and not match.group("pool"):
                    continue
                self.ports["grpc"] = int(match.group("grpc"))
            else:
                self.ports[match.group("name").decode()] = int(match.group("port"))
        if "grpc" in self.ports and not self._ready:
            self._ready = True
            waiters, self._ready_waiters = self._ready_waiters, []
            for d in waiters:
                d.callback(self.ports)

    def errReceived(self, data: bytes) -> None:
        self.outReceived(data)

    def processEnded(self, reason: Failure) -> None:
        self._end_reason = reason
        for _, d in self._output_waiters:
            d.errback(reason)
        self._output_waiters = []
        waiters, self._ready_waiters = self._ready_waiters, []
        for ready in waiters:
            ready.errback(reason)
        # The exception (ProcessDone or ProcessTerminated), not the Failure:
        # tests read its exitCode and signal.
        self.ended.callback(reason.value)


LOOPBACK_FREE_PORTS = [
    "--listen-address",
    "127.0.0.1",
    "--port",
    "0",
    "--healthz-listen-address",
    "127.0.0.1",
    "--healthz-port",
    "0",
    "--metrics-listen-address",
    "127.0.0.1",
    "--metrics-port",
    "0",
]
"""
Flags that put every listener of a spawned twistd on 127.0.0.1, on ports
the kernel picks (the test reads them from the log).
"""


def spawn_twistd(
    test: TestCase,
    arguments: list[str],
    env: dict[str, str] | None = None,
    open_files_limit: int | None = None,
) -> TwistdProtocol:
    """
    Start C{twistd -n --pidfile= sentry ARGUMENTS}, killed at cleanup if it
    is still running.

    @param open_files_limit: when given, twistd runs with this soft and hard
        C{RLIMIT_NOFILE}, as under a container's limit.
    """
    command = TWISTD
    if open_files_limit is not None:
        command = [
            sys.executable,
            "-c",
            "import resource; resource.setrlimit(resource.RLIMIT_NOFILE,"
            f" ({open_files_limit}, {open_files_limit}));"
            " from twisted.scripts.twistd import run; run()",
        ]
    protocol = TwistdProtocol(workers="--workers" in arguments)
    environment = child_environment()
    environment.update(env or {})
    return spawn_killed_at_cleanup(
        test,
        protocol,
        sys.executable,
        command + ["-n", "--pidfile=", "sentry"] + arguments,
        environment,
    )


def spawn_killed_at_cleanup(
    test: TestCase,
    protocol: TwistdProtocol,
    executable: str,
    argv: Sequence[str],
    environment: dict[str, str],
) -> TwistdProtocol:
    """
    Spawn C{executable} with C{argv} for C{protocol}, SIGKILLed at
    C{test}'s cleanup if it is still running.

    @return: C{protocol}.
    """
    from twisted.internet import reactor

    transport = reactor.spawnProcess(protocol, executable, argv, env=environment)

    def kill() -> Deferred[BaseException | None] | None:
        try:
            transport.signalProcess("KILL")
        except error.ProcessExitedAlready:
            return None
        return protocol.ended

    test.addCleanup(kill)
    return protocol


def standalone_arguments(test: TestCase, credentials: str, *extra: str) -> list[str]:
    """
    twistd's arguments for standalone mode with a Configuration path that
    does not exist, the bundle in C{credentials} and every port free on
    loopback, then C{extra}.
    """
    return (
        [
            "--config",
            os.path.abspath(test.mktemp()),
            "--issuer-credentials",
            credentials,
        ]
        + LOOPBACK_FREE_PORTS
        + list(extra)
    )
