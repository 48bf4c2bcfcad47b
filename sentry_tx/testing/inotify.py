"""
A verified fake of Twisted's C{INotify}: file-system events delivered when a
test says so, for the issuer watcher's tests.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from twisted.python.filepath import FilePath

_Callback = Callable[["_FakeWatch", "FilePath[bytes]", int], object]
"""
What a watch calls with each event: C{(watch, path, mask)}.
"""


class FakeINotify:
    """
    An in-memory stand-in for Twisted's L{twisted.internet.inotify.INotify},
    made by a L{FakeINotifyFactory}: it holds watches and delivers the events
    a test makes, as the real one does.

    @ivar connected: true until the connection is lost.
    @ivar reading: whether C{startReading} was called.
    @ivar watches: the watched paths (L{FilePath} in bytes mode) and their
        C{(descriptor, mask, callbacks)}.
    """

    def __init__(self, missing: set[bytes]) -> None:
        self._missing = missing
        self.connected = 1
        self.reading = False
        self.watches: dict[FilePath[bytes], tuple[int, int, list[_Callback]]] = {}
        self._next_descriptor = 1

    def startReading(self) -> None:
        self.reading = True

    def loseConnection(self) -> None:
        self.connected = 0
        self.reading = False

    def watch(
        self,
        path: "str | bytes | FilePath[str] | FilePath[bytes]",
        mask: int | None = None,
        autoAdd: bool = False,
        callbacks: list[_Callback] | None = None,
        recursive: bool = False,
    ) -> int:
        """
        Watch C{path}; raise L{INotifyError} when it is in the factory's
        C{missing} set, or when the connection is lost.

        @return: the watch descriptor, the same for a path watched already.
        """
        from twisted.internet import inotify

        watched = _as_file_path(path)
        if watched in self.watches:
            return self.watches[watched][0]
        if not self.connected or watched.path in self._missing:
            raise inotify.INotifyError(f"Failed to add watch on '{watched!r}' - (-1)")
        if mask is None:
            mask = inotify.IN_WATCH_MASK
        descriptor = self._next_descriptor
        self._next_descriptor += 1
        self.watches[watched] = (
            descriptor,
            mask | inotify.IN_DELETE_SELF,
            list(callbacks or ()),
        )
        return descriptor

    def ignore(self, path: "str | bytes | FilePath[str] | FilePath[bytes]") -> None:
        watched = _as_file_path(path)
        if watched not in self.watches:
            raise KeyError(f"{watched!r} is not watched")
        del self.watches[watched]

    def event(
        self,
        directory: "str | bytes | FilePath[str] | FilePath[bytes]",
        mask: int,
        name: str | bytes | None = None,
    ) -> None:
        """
        Deliver an event on C{directory} (on its entry C{name}, when given)
        to the callbacks of its watch, as the real one does when it reads
        one from the kernel: only while reading, only for a watched path and
        an event asked for (or one the kernel always reports); and after
        C{IN_DELETE_SELF} it drops the watch and loses its connection.
        """
        from twisted.internet import inotify

        if not (self.connected and self.reading):
            return
        watched = _as_file_path(directory)
        if watched not in self.watches:
            return
        _, watched_mask, callbacks = self.watches[watched]
        if not mask & (watched_mask | inotify.IN_IGNORED | inotify.IN_UNMOUNT):
            return
        path = watched
        if name is not None:
            path = watched.child(name.encode() if isinstance(name, str) else name)
        watch = _FakeWatch(watched, watched_mask, callbacks)
        for callback in callbacks:
            callback(watch, path, mask)
        if mask & inotify.IN_DELETE_SELF:
            del self.watches[watched]
            self.loseConnection()


@dataclass
class _FakeWatch:
    """
    What the callbacks of a L{FakeINotify} get first: a watch point with its
    C{path}, as Twisted's C{_Watch}.
    """

    path: "FilePath[bytes]"
    mask: int
    callbacks: list[_Callback]


class FakeINotifyFactory:
    """
    Makes L{FakeINotify}s, as the watcher's C{inotify_factory}.

    @ivar notifiers: every L{FakeINotify} made, oldest first.
    @ivar missing: the paths (C{bytes}) that cannot be watched now, as if
        they did not exist; use L{remove} and L{restore}.
    """

    def __init__(self) -> None:
        self.notifiers: list[FakeINotify] = []
        self.missing: set[bytes] = set()

    def __call__(self) -> FakeINotify:
        notifier = FakeINotify(self.missing)
        self.notifiers.append(notifier)
        return notifier

    @property
    def current(self) -> FakeINotify:
        """
        The last L{FakeINotify} made.
        """
        return self.notifiers[-1]

    def remove(self, path: "str | bytes | FilePath[str] | FilePath[bytes]") -> None:
        """
        Make C{path} unwatchable, as if it was deleted.
        """
        self.missing.add(_as_file_path(path).path)

    def restore(self, path: "str | bytes | FilePath[str] | FilePath[bytes]") -> None:
        """
        Make C{path} watchable again, as if it was created.
        """
        self.missing.discard(_as_file_path(path).path)


def _as_file_path(
    path: "str | bytes | FilePath[str] | FilePath[bytes]",
) -> "FilePath[bytes]":
    """
    C{path} (C{str}, C{bytes} or L{FilePath}) as a L{FilePath} in bytes mode.
    """
    from twisted.python.filepath import FilePath

    if isinstance(path, FilePath):
        return path.asBytesMode()
    if isinstance(path, str):
        return FilePath(path).asBytesMode()
    return FilePath(path)
