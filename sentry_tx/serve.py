# -*- test-case-name: tests.test_copies -*-
"""
C{python -m sentry_tx serve [flags]}: one serving copy, the composition
root of a process the twistd process starts beside itself
(L{sentry_tx.server.copies}).

It takes the flags sentry_tx was started with, and builds the same sentry
(L{sentry_tx.tap.build_service}) in the serving-only role: it loads and
watches the bundle and the JWT pair itself (never generates them), builds
its own validators, serves the shared port with SO_REUSEPORT, counts in
the shared metrics directory (C{PROMETHEUS_MULTIPROC_DIR}) and answers its
liveness checks on the Unix socket C{SENTRY_TX_LIVENESS_SOCKET}.  Its log
lines go to its stderr, one line each, as the twistd process writes them.

It ends when its stdin (a pipe from the twistd process) reaches end of file
(the twistd process stopped it, or died): it stops taking calls, lets
calls in flight finish for up to the drain grace, and exits.  It takes
SIGTERM the same way, and ignores SIGINT, which a terminal sends to the
whole process group (the twistd process stops it).
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from types import FrameType
from typing import TYPE_CHECKING, cast

from twisted.internet.error import ConnectionDone
from twisted.internet.fdesc import setNonBlocking
from twisted.internet.interfaces import IReadDescriptor
from twisted.python.failure import Failure
from zope.interface import implementer

if TYPE_CHECKING:
    from sentry_tx.interfaces import IServingReactor
    from sentry_tx.logs import LineStream

PARENT_PIPE_FD = 0


@implementer(IReadDescriptor)
class ParentPipe:
    """
    The read end of the pipe from the twistd process: C{on_lost} is called
    once it reaches end of file.
    """

    def __init__(self, on_lost: Callable[[], object], fd: int = PARENT_PIPE_FD) -> None:
        self._on_lost = on_lost
        self._fd = fd
        setNonBlocking(fd)

    def fileno(self) -> int:
        return self._fd

    def logPrefix(self) -> str:
        return "parent-pipe"

    # The reactor takes an exception as the reason, as Twisted's own
    # descriptors return CONNECTION_DONE; the interface's stub says Failure.
    def doRead(self) -> ConnectionDone | None:  # type: ignore[override]
        try:
            data = os.read(self._fd, 4096)
        except BlockingIOError:
            return None
        except OSError:
            data = b""
        if not data:
            return ConnectionDone()
        return None

    def connectionLost(self, reason: Failure) -> None:
        self._on_lost()


def main(
    argv: Sequence[str],
    environ: Mapping[str, str] = os.environ,
    stderr: LineStream | None = None,
) -> int:
    """
    Serve as a copy until told to stop; exit 0 (1 when it cannot start, 2
    when it was not started by the twistd process).
    """
    from twisted.internet import reactor as global_reactor
    from twisted.logger import Logger, globalLogBeginner

    from sentry_tx import logs
    from sentry_tx.options import Options
    from sentry_tx.server.copies import LIVENESS_SOCKET_VARIABLE
    from sentry_tx.tap import CopyRole, build_service

    missing = [
        name
        for name in (LIVENESS_SOCKET_VARIABLE, "PROMETHEUS_MULTIPROC_DIR")
        if not environ.get(name)
    ]
    if missing:
        (stderr or sys.stderr).write(
            f"sentry: serve is started by twistd sentry itself ({missing[0]} is not"
            " set); run twistd -n sentry [flags]\n"
        )
        return 2
    # Twisted types its global reactor as the few interfaces every platform
    # has; the reactors a serving copy runs on Linux provide these.
    reactor = cast("IServingReactor", global_reactor)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    options = Options()
    options.parseOptions(argv)
    config = options.sentry_config
    if config is None:
        raise ValueError("Options.parseOptions left no sentry_config")
    globalLogBeginner.beginLoggingTo(
        [logs.make_observer(config.log_level, config.log_as_json, sys.stderr)],
        redirectStandardIO=False,
    )
    role = CopyRole(
        liveness_socket=environ[LIVENESS_SOCKET_VARIABLE],
        metrics_directory=environ["PROMETHEUS_MULTIPROC_DIR"],
    )
    root = build_service(config, reactor, copy=role)
    stopping: list[bool] = []

    def stop() -> None:
        if stopping:
            return
        stopping.append(True)
        d = root.stopService() if root.running else None
        if d is None:
            reactor.stop()
        else:
            d.addBoth(lambda _: reactor.stop())

    reactor.addReader(ParentPipe(stop))
    def on_sigterm(number: int, frame: FrameType | None) -> None:
        reactor.callFromThread(stop)

    signal.signal(signal.SIGTERM, on_sigterm)
    reactor.callWhenRunning(root.startService)
    # Every Twisted reactor's run takes installSignalHandlers; IReactorCore
    # leaves the argument out.
    reactor.run(installSignalHandlers=False)  # type: ignore[call-arg]
    Logger().debug("serving copy {pid} exits", pid=os.getpid())
    sys.stdout.flush()
    sys.stderr.flush()
    # grpcio's and the thread pools' threads are done or abandoned: do not
    # let the interpreter wait for them.
    os._exit(root.exit_status or 0)
