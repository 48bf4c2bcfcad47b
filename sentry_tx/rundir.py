# -*- test-case-name: tests.test_copies -*-
"""
The twistd process's private directory: the metrics every serving process
counts in (C{prometheus_client}'s multiprocess mode) and the Unix sockets
of the copies' liveness checks.

It is made in C{startService} (never at build: twistd forks after it),
mode 0700, under C{$TMPDIR} when set, else under C{/dev/shm}: Dapr's chart
runs the pod with a read-only root file system, where C{/dev/shm} is the
writable place.  It is removed, with everything in it, when the service
stops; one that a killed twistd process left (its pid, in the name, no
longer runs) is removed at the next start.
"""

import os
import re
import shutil
import tempfile
from collections.abc import Mapping

from twisted.application.service import Service
from twisted.logger import Logger

from sentry_tx.errors import ConfigError

DEFAULT_BASE_DIRECTORY = "/dev/shm"
PREFIX = "sentry-tx-"
METRICS_SUBDIRECTORY = "metrics"
_OWN_NAME = re.compile(re.escape(PREFIX) + r"(\d+)-[A-Za-z0-9_]+")


def base_directory(environ: Mapping[str, str]) -> str:
    """
    Where the private directory is made: C{$TMPDIR}, else C{/dev/shm}.
    """
    return environ.get("TMPDIR") or DEFAULT_BASE_DIRECTORY


class PrivateDirectory(Service):
    """
    The private directory, from start to stop.

    @ivar path: its path while the service runs, else None.
    @ivar metrics_path: the metrics directory in it.
    """

    _log = Logger()

    def __init__(self, environ: Mapping[str, str] = os.environ) -> None:
        self._environ = environ
        self.path: str | None = None

    def _made(self) -> str:
        if self.path is None:
            raise RuntimeError("the private directory is made at startService")
        return self.path

    @property
    def metrics_path(self) -> str:
        return os.path.join(self._made(), METRICS_SUBDIRECTORY)

    def socket_path(self, name: str) -> str:
        """
        The path of a Unix socket called C{name} in the directory.
        """
        return os.path.join(self._made(), name)

    def startService(self) -> None:
        base = base_directory(self._environ)
        try:
            self._wipe_stale(base)
            self.path = tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=base)
            os.mkdir(self.metrics_path, 0o700)
        except OSError as e:
            raise ConfigError(
                "TMPDIR",
                f"cannot make a private directory in {base}: {e.strerror}"
                " (set TMPDIR to a writable directory)",
            ) from None
        super().startService()

    def _wipe_stale(self, base: str) -> None:
        """
        Remove the private directories that twistd processes of this user
        left in C{base} when they were killed (their pid is in the name and
        no longer runs).
        """
        for name in os.listdir(base):
            match = _OWN_NAME.fullmatch(name)
            path = os.path.join(base, name)
            if match is None or os.lstat(path).st_uid != os.geteuid():
                continue
            try:
                os.kill(int(match.group(1)), 0)
            except ProcessLookupError:
                self._log.info(
                    "removing {path}, left by a process that ended", path=path
                )
                shutil.rmtree(path, ignore_errors=True)
            except OSError:
                pass

    def stopService(self) -> None:
        super().stopService()
        path, self.path = self.path, None
        if path is not None:
            shutil.rmtree(path, ignore_errors=True)
