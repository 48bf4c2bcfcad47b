"""
A verified fake of Twisted's C{INotify}: file-system events delivered when a
test says so, for the issuer watcher's tests.
"""

from dataclasses import dataclass


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

    def __init__(self, missing):
        self._missing = missing
        self.connected = 1
        self.reading = False
        self.watches = {}
        self._next_descriptor = 1

    def startReading(self):
        self.reading = True

    def loseConnection(self):
        self.connected = 0
        self.reading = False

    def watch(self, path, mask=None, autoAdd=False, callbacks=None, recursive=False):
        """
        Watch C{path}; raise L{INotifyError} when it is in the factory's
        C{missing} set, or when the connection is lost.

        @return: the watch descriptor, the same for a path watched already.
        """
        from twisted.internet import inotify

        path = _as_file_path(path)
        if path in self.watches:
            return self.watches[path][0]
        if not self.connected or path.path in self._missing:
            raise inotify.INotifyError(f"Failed to add watch on '{path!r}' - (-1)")
        if mask is None:
            mask = inotify.IN_WATCH_MASK
        descriptor = self._next_descriptor
        self._next_descriptor += 1
        self.watches[path] = (
            descriptor,
            mask | inotify.IN_DELETE_SELF,
            list(callbacks or ()),
        )
        return descriptor

    def ignore(self, path):
        path = _as_file_path(path)
        if path not in self.watches:
            raise KeyError(f"{path!r} is not watched")
        del self.watches[path]

    def event(self, directory, mask, name=None):
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
        directory = _as_file_path(directory)
        if directory not in self.watches:
            return
        _, watched_mask, callbacks = self.watches[directory]
        if not mask & (watched_mask | inotify.IN_IGNORED | inotify.IN_UNMOUNT):
            return
        path = directory
        if name is not None:
            path = directory.child(name.encode() if isinstance(name, str) else name)
        watch = _FakeWatch(directory, watched_mask, callbacks)
        for callback in callbacks:
            callback(watch, path, mask)
        if mask & inotify.IN_DELETE_SELF:
            del self.watches[directory]
            self.loseConnection()


@dataclass
class _FakeWatch:
    """
    What the callbacks of a L{FakeINotify} get first: a watch point with its
    C{path}, as Twisted's C{_Watch}.
    """

    path: object
    mask: int
    callbacks: list


class FakeINotifyFactory:
    """
    Makes L{FakeINotify}s, as the watcher's C{inotify_factory}.

    @ivar notifiers: every L{FakeINotify} made, oldest first.
    @ivar missing: the paths (C{bytes}) that cannot be watched now, as if
        they did not exist; use L{remove} and L{restore}.
    """

    def __init__(self):
        self.notifiers = []
        self.missing = set()

    def __call__(self):
        notifier = FakeINotify(self.missing)
        self.notifiers.append(notifier)
        return notifier

    @property
    def current(self):
        """
        The last L{FakeINotify} made.
        """
        return self.notifiers[-1]

    def remove(self, path):
        """
        Make C{path} unwatchable, as if it was deleted.
        """
        self.missing.add(_as_file_path(path).path)

    def restore(self, path):
        """
        Make C{path} watchable again, as if it was created.
        """
        self.missing.discard(_as_file_path(path).path)


def _as_file_path(path):
    """
    C{path} (C{str}, C{bytes} or L{FilePath}) as a L{FilePath} in bytes mode.
    """
    from twisted.python.filepath import FilePath

    if not isinstance(path, FilePath):
        path = FilePath(path)
    return path.asBytesMode()
