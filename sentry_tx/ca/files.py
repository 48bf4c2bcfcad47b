# -*- test-case-name: tests.test_files -*-
"""
Reading credential files without trusting what sits at their paths.

Every read of a credential file (the trust anchors, the issuer chain and
key, and any later key or key-set file) goes through L{read_credential_file}:

  - it opens with C{O_NONBLOCK}, so a FIFO with no writer does not block the
    open (and C{O_NOCTTY}, so a terminal device never becomes the process's
    controlling terminal);
  - it checks with C{fstat} that what it opened is a regular file, and
    refuses a FIFO, a socket, a device or a directory with a L{BundleError}
    naming the file, as it refuses a corrupt one;
  - it reads at most the size limit it is given (one byte more, to tell a
    file that is too large).

A read can still block in the kernel, on a hung network mount for example,
where no flag helps.  So the reads never run on the reactor thread, on the
gRPC loop or in the reactor's thread pool (whose threads the reactor joins
when it stops: one stuck thread there would keep SIGTERM from stopping the
process).  L{BoundedFileWork} runs the file work in a daemon thread of its
own and gives up waiting after a time bound: the Deferred fails with a
L{BundleError} naming the file the thread was stuck on, and the thread is
abandoned (a daemon thread does not keep the process from exiting).  While
L{MAX_STUCK_FILE_THREADS} abandoned threads are still stuck, new work is
refused at once rather than given one more thread, so stuck reads cannot
pile up threads without bound.
"""

import errno
import os
import stat
import threading
from collections.abc import Callable
from typing import Any, Protocol, TypeVar, TypeVarTuple

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from sentry_tx.errors import BundleError

CREDENTIAL_READ_TIMEOUT_SECONDS = 5.0
"""
How long loading the credential files (reading and verifying them) may take
before it is given up and counted as a failed load.
"""

CREDENTIAL_GENERATION_TIMEOUT_SECONDS = 30.0
"""
How long generating a bundle and writing its files (each flushed to disk)
may take before the start fails.
"""

MAX_STUCK_FILE_THREADS = 4
"""
Abandoned file threads (past their time bound and still blocked) allowed at
once per L{BoundedFileWork}; past it, new work is refused without a thread.
"""

_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC

_READ_CHUNK_BYTES = 64 * 1024

_T = TypeVar("_T")
_Arguments = TypeVarTuple("_Arguments")

_KINDS = (
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISLNK, "a symbolic link"),
)

_progress = threading.local()


def describe_os_error(error: OSError) -> str:
    """
    An L{OSError} in words, without the file name (the caller names the
    file itself).
    """
    if error.errno is not None:
        name = errno.errorcode.get(error.errno, str(error.errno))
        return f"{error.strerror or os.strerror(error.errno)} ({name})"
    return str(error)


def file_kind(mode: int) -> str:
    """
    What a file of C{mode} (an C{st_mode}) is, in words.
    """
    for check, kind in _KINDS:
        if check(mode):
            return kind
    return "not a regular file"


def read_credential_file(
    path: str,
    max_bytes: int,
    inspect: Callable[[os.stat_result], object] | None = None,
    _open: Callable[[str, int], int] = os.open,
) -> bytes:
    """
    The bytes of the credential file at C{path}: the one function that reads
    credential files.  It blocks, so call it only off the reactor thread and
    the gRPC loop (in L{BoundedFileWork}).

    @param path: the file (symbolic links are followed: Kubernetes projects
        Secrets through them).
    @param max_bytes: the largest file accepted.
    @param inspect: called with the C{fstat} result of the open file before
        it is read (to warn about its mode, say), or None.
    @param _open: L{os.open}, or a test's stand-in.
    @return: the contents, at most C{max_bytes} bytes.
    @raise BundleError: naming C{path}, when it cannot be opened or read, is
        not a regular file, or is larger than C{max_bytes}.
    """
    task = getattr(_progress, "task", None)
    if task is not None:
        task.path = path
    try:
        fd = _open(path, _OPEN_FLAGS)
    except OSError as e:
        raise BundleError(path, f"cannot be read: {describe_os_error(e)}") from None
    try:
        status = os.fstat(fd)
        if not stat.S_ISREG(status.st_mode):
            raise BundleError(
                path,
                f"is {file_kind(status.st_mode)}, not a regular file; refused",
            )
        if inspect is not None:
            inspect(status)
        chunks = []
        remaining = max_bytes + 1
        while remaining > 0:
            chunk = os.read(fd, min(remaining, _READ_CHUNK_BYTES))
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
    except OSError as e:
        raise BundleError(path, f"cannot be read: {describe_os_error(e)}") from None
    finally:
        os.close(fd)
        if task is not None:
            task.path = None
    data = b"".join(chunks)
    if len(data) > max_bytes:
        raise BundleError(path, f"is larger than {max_bytes} bytes; refused")
    return data


def _start_daemon_thread(target: Callable[[], object], name: str) -> None:
    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()


class FileWorkReactor(Protocol):
    """
    What L{BoundedFileWork} needs of a reactor: its clock, its timers, and
    handing a result back to its thread.
    """

    def seconds(self) -> float:
        """
        The time now.
        """

    def callLater(
        self, delay: float, callable: Callable[..., object], *args: object
    ) -> IDelayedCall:
        """
        Call C{callable(*args)} after C{delay} seconds.
        """

    def callFromThread(self, callable: Callable[..., object], *args: object) -> None:
        """
        Call C{callable(*args)} on the reactor thread.
        """


class _Task:
    """
    One piece of file work: what it is about, the file it is on now.
    """

    def __init__(self, what: str, started: float) -> None:
        self.what = what
        self.path: str | None = None
        self.started = started
        self.deferred: Deferred[Any] = Deferred()
        self.timer: IDelayedCall | None = None
        self.abandoned = False


class BoundedFileWork:
    """
    Run blocking file work in daemon threads, each with a time bound.

    @param reactor: provides C{callLater}, C{seconds} and C{callFromThread}.
    @param max_stuck: see L{MAX_STUCK_FILE_THREADS}.
    @param start_thread: called with C{(target, name)} to run C{target} in a
        new daemon thread; tests pass a stand-in.
    """

    _log = Logger()

    def __init__(
        self,
        reactor: FileWorkReactor,
        max_stuck: int = MAX_STUCK_FILE_THREADS,
        start_thread: Callable[
            [Callable[[], object], str], object
        ] = _start_daemon_thread,
    ) -> None:
        self._reactor = reactor
        self._max_stuck = max_stuck
        self._start_thread = start_thread
        self._stuck: list[_Task] = []

    @property
    def stuck(self) -> int:
        """
        How many abandoned threads are still blocked.
        """
        return len(self._stuck)

    def run(
        self,
        what: str,
        timeout_seconds: float,
        f: Callable[[*_Arguments], _T],
        *args: *_Arguments,
    ) -> Deferred[_T]:
        """
        Call C{f(*args)} in a daemon thread.

        @param what: what the work is about (the files, for messages when
            the work is stuck before it reached a file).
        @param timeout_seconds: how long to wait for it.
        @return: a Deferred firing with C{f}'s result or failing with its
            exception; failing with L{BundleError} naming the file the
            thread is blocked on when C{timeout_seconds} pass first, or at
            once when too many earlier threads are still stuck.
        """
        if len(self._stuck) >= self._max_stuck:
            paths = ", ".join(sorted({task.path or task.what for task in self._stuck}))
            return _failed(
                BundleError(
                    what,
                    f"not read: {len(self._stuck)} earlier reads are still"
                    f" blocked ({paths}); the file system does not answer",
                )
            )
        task = _Task(what, self._reactor.seconds())

        def in_thread() -> None:
            _progress.task = task
            outcome: _T | Failure
            try:
                result = f(*args)
            except BaseException:
                outcome = Failure()
            else:
                outcome = result
            finally:
                _progress.task = None
            self._reactor.callFromThread(self._finished, task, outcome)

        task.timer = self._reactor.callLater(
            timeout_seconds, self._timed_out, task, timeout_seconds
        )
        self._start_thread(in_thread, f"sentry-files-{what}")
        return task.deferred

    def _finished(self, task: _Task, outcome: object) -> None:
        if task.abandoned:
            self._stuck.remove(task)
            self._log.info(
                "a blocked read of {path} returned after {seconds:.1f} s;"
                " its result was discarded",
                path=task.path or task.what,
                seconds=self._reactor.seconds() - task.started,
            )
            return
        if task.timer is not None and task.timer.active():
            task.timer.cancel()
        if isinstance(outcome, Failure):
            task.deferred.errback(outcome)
        else:
            task.deferred.callback(outcome)

    def _timed_out(self, task: _Task, timeout_seconds: float) -> None:
        task.abandoned = True
        self._stuck.append(task)
        source = task.path or task.what
        self._log.error(
            "reading {path} did not finish within {seconds} s; abandoning the"
            " read (a hung mount?)",
            path=source,
            seconds=timeout_seconds,
        )
        task.deferred.errback(
            BundleError(
                source,
                f"did not answer within {timeout_seconds:g} s (a hung mount?);"
                " the read was abandoned",
            )
        )


def _failed(error: Exception) -> Deferred[Any]:
    d: Deferred[Any] = Deferred()
    d.errback(error)
    return d


__all__ = [
    "BoundedFileWork",
    "CREDENTIAL_GENERATION_TIMEOUT_SECONDS",
    "CREDENTIAL_READ_TIMEOUT_SECONDS",
    "MAX_STUCK_FILE_THREADS",
    "describe_os_error",
    "file_kind",
    "read_credential_file",
]
