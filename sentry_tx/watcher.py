# -*- test-case-name: tests.test_watcher,tests.test_kube_store,tests.test_root -*-
"""
The issuer watch: reload the trust bundle when its files change.

L{IssuerWatcher} watches the directories that hold the trust anchors, the
issuer chain and the issuer key with Linux inotify (Twisted's L{INotify}).
It watches the directories, never the files: Twisted drops every watch of an
L{INotify} when one watched path is deleted, and tools replace bundle files
by renaming new ones over them, so a watch on a file would follow the old
inode and fall silent.

A change (a file created, written and closed, moved in, moved out or
deleted) opens a window of L{ISSUER_CHANGE_WINDOW_SECONDS}; changes seen
while it is open join it without extending it.  When it closes the watcher
counts C{dapr_sentry_issuercert_changed_total} and asks the authority for one
restart, which loads and verifies the new bundle and swaps it in, or refuses
it and keeps the old one (L{CertificateAuthorityService.restart}).

Kubernetes projects a Secret into a pod by writing the new files into a
new hidden directory (C{..2026_11_21_...}), pointing a new symbolic link
C{..data_tmp} at it and renaming that over C{..data}; C{ca.crt} and its
siblings are symbolic links into C{..data/}.  Every step is an event in the
watched directory (create, moved-from, moved-to, delete), all within
milliseconds: one window, one reload.

When a watched directory itself is deleted, moved or unmounted, the
L{INotify} is no longer to be trusted (Twisted has closed it on a delete):
the watcher replaces it with a new one, watches every directory again
(retrying with a bounded backoff while a directory does not exist) and then
opens a window, since files may have changed while it could not see them.

A directory missing at start is watched as soon as it exists, without a
reload: the authority is loading (or generating) the bundle then.  A bundle
the authority generates into an existing directory is seen being written,
and reloaded once, unchanged.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Protocol

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.inotify import (
    IN_CLOSE_WRITE,
    IN_CREATE,
    IN_DELETE,
    IN_DELETE_SELF,
    IN_IGNORED,
    IN_MOVE_SELF,
    IN_MOVED_FROM,
    IN_MOVED_TO,
    IN_ONLYDIR,
    IN_UNMOUNT,
    INotify,
    humanReadableMask,
)
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath

if TYPE_CHECKING:
    from sentry_tx.config import SentryConfig
    from sentry_tx.metrics import SentryMetrics

ISSUER_CHANGE_WINDOW_SECONDS = 2.0
"""
How long after the first change the watcher waits before it reloads, so
that the several writes and renames of one update make one reload.
"""

REARM_RETRY_INITIAL_SECONDS = 0.5
"""
How long the watcher waits before it tries again to watch a directory that
does not exist (or cannot be watched); doubled after every failure.
"""

REARM_RETRY_MAX_SECONDS = 30.0
"""
The longest wait between two attempts to watch a missing directory.
"""

CHANGE_EVENTS = IN_CREATE | IN_CLOSE_WRITE | IN_MOVED_TO | IN_MOVED_FROM | IN_DELETE
"""
The inotify events on an entry of a watched directory that count as a change
of the credentials.  Moved-from counts too: the rename of C{..data_tmp} over
C{..data} is a moved-from and a moved-to in the same directory, and a file
moved away is as gone as a deleted one.
"""

LOST_WATCH_EVENTS = IN_DELETE_SELF | IN_MOVE_SELF | IN_UNMOUNT | IN_IGNORED
"""
The inotify events that mean a watch no longer follows the path it was
made for: the directory was deleted, renamed or unmounted, or the kernel
dropped the watch.
"""

WATCH_MASK = CHANGE_EVENTS | IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR
"""
What the watcher asks inotify for (C{IN_UNMOUNT} and C{IN_IGNORED} are
always reported; C{IN_ONLYDIR} refuses to watch anything but a directory).
"""


class ReloadableAuthority(Protocol):
    """
    What the watcher needs of the certificate authority: its configuration
    and a reload with it (the C{restart} of L{ICertificateAuthority}).
    """

    @property
    def config(self) -> SentryConfig:
        """
        The configuration the authority runs with.
        """

    def restart(self, config: SentryConfig) -> Deferred[None]:
        """
        Reload the trust bundle and swap it in.
        """


class _Watch(Protocol):
    """
    What Twisted's L{INotify} passes its callbacks first: the watch, and
    the path it was made for.
    """

    @property
    def path(self) -> FilePath[Any]:
        """
        The watched path.
        """


class IssuerWatcher(Service):
    """
    Reload the authority's trust bundle when the files in its directories
    change.

    @ivar directories: the watched directories, as given.
    """

    name = "issuer-watcher"
    _log = Logger()

    def __init__(
        self,
        authority: ReloadableAuthority,
        directories: Iterable[str | bytes],
        reactor: IReactorTime,
        metrics: SentryMetrics | None,
        inotify_factory: Callable[[], INotify] = INotify,
    ) -> None:
        """
        @param authority: the L{ICertificateAuthority} whose C{restart} (with
            its C{config}) reloads the bundle.
        @param directories: the directories to watch (C{str} or C{bytes}
            paths), normally the trust store's C{watch_directories}.
        @param reactor: an L{IReactorTime}; its C{callLater} times the window
            and the retries.
        @param metrics: the L{SentryMetrics} whose C{issuercert_changed}
            counts reloads, or None in a serving copy (the twistd process
            counts each change once).
        @param inotify_factory: called with no arguments in C{startService}
            (and after a lost watch) to make an L{INotify}; tests pass a
            fake.  Twisted's L{INotify} reads its file descriptor through the
            global reactor.
        """
        self.directories = tuple(directories)
        self._authority = authority
        self._reactor = reactor
        self._metrics = metrics
        self._inotify_factory = inotify_factory
        self._notifier: INotify | None = None
        self._unwatched: list[str | bytes] = []
        self._rearm_after_watch = False
        self._window: IDelayedCall | None = None
        self._rearm: IDelayedCall | None = None
        self._retry: IDelayedCall | None = None
        self._retry_delay_seconds = REARM_RETRY_INITIAL_SECONDS

    @property
    def window_open(self) -> bool:
        """
        Whether a change was seen and its reload is still to come.
        """
        return self._window is not None

    # IService

    def startService(self) -> None:
        """
        Open the inotify file descriptor and watch every directory; with no
        directories (a store that is not file-backed), do nothing.
        """
        super().startService()
        if not self.directories:
            return
        self._retry_delay_seconds = REARM_RETRY_INITIAL_SECONDS
        self._unwatched = list(self.directories)
        self._rearm_after_watch = False
        self._watch_unwatched()

    def stopService(self) -> None:
        """
        Close the inotify file descriptor and cancel the window and retries.
        """
        super().stopService()
        for call in (self._window, self._rearm, self._retry):
            if call is not None and call.active():
                call.cancel()
        self._window = self._rearm = self._retry = None
        self._close_notifier()

    # Watching

    def _close_notifier(self) -> None:
        notifier, self._notifier = self._notifier, None
        if notifier is not None:
            notifier.loseConnection()

    def _watch_unwatched(self) -> None:
        """
        Watch every directory not watched yet; retry later for those that
        cannot be watched now.  Once all are watched after a lost watch,
        open a window.
        """
        self._retry = None
        if self._notifier is None:
            try:
                notifier = self._inotify_factory()
                notifier.startReading()
            except Exception as e:
                self._schedule_retry(f"cannot open inotify ({e})")
                return
            self._notifier = notifier
        notifier = self._notifier
        still_unwatched: list[str | bytes] = []
        problems: list[str] = []
        for directory in self._unwatched:
            try:
                notifier.watch(
                    FilePath(directory), mask=WATCH_MASK, callbacks=[self._notify]
                )
            except Exception as e:
                still_unwatched.append(directory)
                reason = str(e) if os.path.exists(directory) else "it does not exist"
                problems.append(f"cannot watch {_show(directory)} ({reason})")
            else:
                self._log.info(
                    "watching {directory} for issuer credential changes",
                    directory=_show(directory),
                )
        self._unwatched = still_unwatched
        if problems:
            # At start, before the authority is ready, a directory that does
            # not exist yet is expected: a first start generates the bundle
            # into it.  Said at info level, not as a warning to act on.
            expected = (
                not self._rearm_after_watch
                and not getattr(self._authority, "ready", True)
                and not any(os.path.exists(d) for d in still_unwatched)
            )
            self._schedule_retry("; ".join(problems), expected)
            return
        self._retry_delay_seconds = REARM_RETRY_INITIAL_SECONDS
        if self._rearm_after_watch:
            self._rearm_after_watch = False
            # Whatever happened while the watcher could not see may have
            # changed the bundle.
            self._change_seen()

    def _schedule_retry(self, problem: str, expected: bool = False) -> None:
        """
        Log C{problem} (a warning, or at info level when C{expected}) and
        try again to watch what is not watched, later each time, up to
        L{REARM_RETRY_MAX_SECONDS}.
        """
        delay = self._retry_delay_seconds
        log = self._log.info if expected else self._log.warn
        log(
            "{problem}; changes to the issuer credentials there go unseen; "
            "trying again in {delay} s",
            problem=problem,
            delay=delay,
        )
        self._retry_delay_seconds = min(delay * 2, REARM_RETRY_MAX_SECONDS)
        self._retry = self._reactor.callLater(delay, self._watch_unwatched)

    def _watch_lost(self, path: FilePath[Any], mask: int) -> None:
        """
        A watched directory was deleted, moved or unmounted: replace the
        L{INotify} and watch everything again, after the read that reported
        it is over (Twisted still works on the old one until then).
        """
        self._log.warn(
            "lost the watch on {directory} ({events}); watching the issuer "
            "credential directories again",
            directory=_show(path),
            events=",".join(humanReadableMask(mask)),
        )
        if self._rearm is None:
            self._rearm = self._reactor.callLater(0, self._rewatch)

    def _rewatch(self) -> None:
        self._rearm = None
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._close_notifier()
        self._unwatched = list(self.directories)
        self._rearm_after_watch = True
        self._retry_delay_seconds = REARM_RETRY_INITIAL_SECONDS
        self._watch_unwatched()

    def _notify(self, watch: _Watch, path: FilePath[bytes], mask: int) -> None:
        """
        The L{INotify} callback.  It must not raise: an exception here would
        reach the reactor, which would close the L{INotify}.
        """
        try:
            if not self.running:
                return
            if mask & LOST_WATCH_EVENTS:
                self._watch_lost(watch.path, mask)
            elif mask & CHANGE_EVENTS:
                self._log.debug(
                    "issuer credentials event {events} on {path}",
                    events=",".join(humanReadableMask(mask)),
                    path=_show(path),
                )
                self._change_seen()
        except Exception:
            self._log.failure("handling an issuer credentials event failed")

    # The window

    def _change_seen(self) -> None:
        if self._window is None:
            self._window = self._reactor.callLater(
                ISSUER_CHANGE_WINDOW_SECONDS, self._window_closed
            )

    def _window_closed(self) -> None:
        self._window = None
        if self._metrics is not None:
            self._metrics.issuercert_changed.inc()
        self._log.info("issuer credentials changed; reloading")
        try:
            d = self._authority.restart(self._authority.config)
        except Exception:
            self._log.failure("asking the certificate authority to reload failed")
            return
        d.addErrback(self._reload_failed)

    def _reload_failed(self, failure: Failure) -> None:
        # The authority has logged and counted a refused bundle already; only
        # keep the failure from being reported as unhandled.
        self._log.debug(
            "the issuer credentials reload failed: {error}",
            error=failure.getErrorMessage(),
        )


def _show(path: str | bytes | FilePath[Any]) -> str:
    """
    A path (C{str}, C{bytes} or L{FilePath}) as text for a log message.
    """
    name: str | bytes = path.path if isinstance(path, FilePath) else path
    if isinstance(name, bytes):
        return name.decode("utf-8", "backslashreplace")
    return name


__all__ = [
    "CHANGE_EVENTS",
    "ISSUER_CHANGE_WINDOW_SECONDS",
    "IssuerWatcher",
    "LOST_WATCH_EVENTS",
    "REARM_RETRY_INITIAL_SECONDS",
    "REARM_RETRY_MAX_SECONDS",
    "WATCH_MASK",
]
