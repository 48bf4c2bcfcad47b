"""
Reactors and clocks for tests that run synchronously: a thread pool and a
reactor that run work at once (L{ImmediateReactor}), and a L{Clock} that
records what is scheduled on it (L{SchedulingClock}).
"""

from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import Clock
from twisted.python.failure import Failure

if TYPE_CHECKING:
    from sentry_tx.ca.files import BoundedFileWork


class ImmediateThreadPool:
    """
    A thread pool that runs each call at once in the calling thread, for
    C{deferToThreadPool} in tests that must not need a running reactor.
    """

    def callInThreadWithCallback(
        self,
        onResult: Callable[[bool, object], object],
        func: Callable[..., object],
        *args: object,
        **kw: object,
    ) -> None:
        try:
            result = func(*args, **kw)
        except BaseException:
            onResult(False, Failure())
        else:
            onResult(True, result)

    def callInThread(
        self, func: Callable[..., object], *args: object, **kw: object
    ) -> None:
        func(*args, **kw)


class ImmediateReactor(Clock):
    """
    A L{Clock} whose C{callFromThread} runs the call at once and whose thread
    pool is an L{ImmediateThreadPool}: code that crosses to the reactor
    (C{callFromThread} from the gRPC loop, C{deferToThreadPool}) runs
    synchronously.
    """

    def __init__(self, seconds: float = 0.0) -> None:
        super().__init__()
        self.advance(seconds)
        self._pool = ImmediateThreadPool()

    def callFromThread(
        self, callable: Callable[..., object], *args: object, **kw: object
    ) -> None:
        callable(*args, **kw)

    def getThreadPool(self) -> ImmediateThreadPool:
        return self._pool


def inline_file_work(reactor: ImmediateReactor) -> "BoundedFileWork":
    """
    A L{sentry_tx.ca.files.BoundedFileWork} that runs its work at once in
    the calling thread: with an L{ImmediateReactor}, code that reads
    credential files answers synchronously, without a running reactor.
    """
    from sentry_tx.ca.files import BoundedFileWork

    return BoundedFileWork(reactor, start_thread=lambda target, name: target())


class SchedulingClock(Clock):
    """
    A L{Clock} that tells a test when something is scheduled on it, so a
    test can wait for an event that arrives through the real reactor (an
    inotify read) and then drive time itself.
    """

    def __init__(self) -> None:
        super().__init__()
        self._waiting: list[Deferred[IDelayedCall]] = []

    def when_scheduled(self) -> Deferred[IDelayedCall]:
        """
        @return: a Deferred that fires with the L{IDelayedCall} of the next
            C{callLater}.
        """
        d: Deferred[IDelayedCall] = Deferred()
        self._waiting.append(d)
        return d

    def callLater(
        self, delay: float, callable: Callable[..., object], *args: Any, **kw: Any
    ) -> IDelayedCall:
        call = super().callLater(delay, callable, *args, **kw)
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(call)
        return call


def utc_now() -> datetime:
    """
    The wall-clock time now, in UTC: for tests against real gRPC servers and
    processes, whose certificates are checked against the real clock.
    """
    return datetime.now(UTC)
