# -*- test-case-name: tests.test_loop -*-
"""
The gRPC loop: an asyncio event loop in a thread of its own, on which
C{grpc.aio} serves SignCertificate, and the bridge between it and the
reactor, which stays in the main thread.

State crosses between the two only three ways:

  - the reactor runs a coroutine on the loop with L{GrpcLoop.run}, and gets
    a Deferred that the loop fires on the reactor thread
    (C{reactor.callFromThread});
  - a coroutine on the loop runs a function on the reactor with
    L{on_reactor}, and awaits a future that the reactor completes with
    C{loop.call_soon_threadsafe};
  - immutable objects (L{sentry_tx.server.servicer.InService}, the
    informers' caches) published by one attribute assignment.

L{LoopClock} gives code on the loop the reactor's clock and timers on the
loop, so that a component written against C{IReactorTime} (admission) runs
on the loop, and on a L{twisted.internet.task.Clock} in tests.
"""

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorFromThreads
from twisted.logger import Logger
from twisted.python.failure import Failure

LOOP_THREAD_NAME = "sentry-grpc-loop"

_T = TypeVar("_T")


class GrpcLoop:
    """
    An asyncio event loop running in a dedicated thread.

    @param reactor: the reactor Deferreds are fired on.
    @ivar loop: the asyncio loop, while the thread runs.
    """

    _log = Logger()

    def __init__(self, reactor: IReactorFromThreads) -> None:
        self._reactor = reactor
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ended: Deferred[None] | None = None

    @property
    def running(self) -> bool:
        """
        Whether the loop's thread was started and has not been joined.
        """
        return self._thread is not None

    def start(self) -> None:
        """
        Start the thread and its loop.
        """
        if self._thread is not None:
            raise RuntimeError("the gRPC loop is running already")
        self.loop = loop = asyncio.new_event_loop()
        ended: Deferred[None] = Deferred()
        self._ended = ended
        self._thread = threading.Thread(
            target=self._run, args=(loop, ended), name=LOOP_THREAD_NAME, daemon=True
        )
        self._thread.start()

    def _run(self, loop: asyncio.AbstractEventLoop, ended: Deferred[None]) -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
            # Let what was cancelled by the stop run its cleanup.
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(
                    asyncio.gather(*pending, return_exceptions=True)
                )
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            loop.close()
            self._reactor.callFromThread(ended.callback, None)

    def run(
        self,
        coroutine_function: Callable[..., Coroutine[Any, Any, _T]],
        *args: object,
    ) -> Deferred[_T]:
        """
        Run C{coroutine_function(*args)} on the loop.

        @return: a Deferred fired on the reactor thread with its result.
        """
        loop = self.loop
        if loop is None:
            raise RuntimeError("the gRPC loop is not running")
        d: Deferred[_T] = Deferred()

        def done(future: "concurrent.futures.Future[_T]") -> None:
            try:
                result = future.result()
            except BaseException as e:
                self._reactor.callFromThread(d.errback, Failure(e))
            else:
                self._reactor.callFromThread(d.callback, result)

        future = asyncio.run_coroutine_threadsafe(coroutine_function(*args), loop)
        future.add_done_callback(done)
        return d

    def stop(self) -> Deferred[None]:
        """
        Stop the loop (tasks still on it are cancelled) and join its thread.

        @return: a Deferred that fires once the thread has ended; the
            reactor thread never waits for it.
        """
        thread, ended, loop = self._thread, self._ended, self.loop
        if thread is None or ended is None or loop is None:
            d: Deferred[None] = Deferred()
            d.callback(None)
            return d
        self._thread = None
        loop.call_soon_threadsafe(loop.stop)

        def joined(_: None) -> None:
            # The thread has done its last callFromThread: it ends now.  (A
            # fake reactor runs this in that thread itself.)
            if thread is not threading.current_thread():
                thread.join()
            self.loop = None

        return ended.addCallback(joined)


class LoopClock:
    """
    C{IReactorTime}'s C{seconds} and C{callLater} for code on an asyncio
    loop: the time is the reactor's (wall-clock seconds, which deadlines
    are given in); the timers run on the loop running when they are set.

    @param seconds: the clock (the reactor's C{seconds}).
    """

    def __init__(self, seconds: Callable[[], float] = time.time) -> None:
        self.seconds = seconds

    def callLater(
        self, delay: float, f: Callable[..., object], *args: object, **kwargs: object
    ) -> "_LoopCall":
        """
        Call C{f(*args, **kwargs)} on the running loop in C{delay} seconds.

        @return: an object with C{active()} and C{cancel()}.
        """
        return _LoopCall(asyncio.get_running_loop(), delay, f, args, kwargs)


class _LoopCall:
    """
    A timer of L{LoopClock}, with C{IDelayedCall}'s C{active} and
    C{cancel}.
    """

    __slots__ = ("_handle", "_active")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        delay: float,
        f: Callable[..., object],
        args: tuple[object, ...],
        kwargs: dict[str, object],
    ) -> None:
        self._active = True

        def fire() -> None:
            self._active = False
            f(*args, **kwargs)

        self._handle = loop.call_later(max(0.0, delay), fire)

    def active(self) -> bool:
        return self._active

    def cancel(self) -> None:
        if not self._active:
            raise RuntimeError("the call has run or was cancelled already")
        self._active = False
        self._handle.cancel()


def on_reactor(
    reactor: IReactorFromThreads,
    loop: asyncio.AbstractEventLoop,
    f: Callable[..., object],
    *args: object,
) -> "asyncio.Future[Any]":
    """
    Call C{f(*args)} on the reactor thread, from the gRPC loop.

    @param loop: the running gRPC loop (the caller's).
    @return: an asyncio future, completed on C{loop} with the result of
        C{f} (a Deferred's result when it returns one) or its exception.
        Cancelling the future cancels that Deferred.
    """
    future = loop.create_future()
    started: list[Deferred[Any]] = []

    def call() -> None:
        d = maybeDeferred(f, *args)
        started.append(d)
        d.addBoth(_settle_from_reactor, loop, future)

    def cancelled(done: "asyncio.Future[Any]") -> None:
        if done.cancelled():
            # callFromThread keeps order: call() has run by then.
            reactor.callFromThread(_cancel_all, started)

    future.add_done_callback(cancelled)
    reactor.callFromThread(call)
    return future


def _cancel_all(started: list[Deferred[Any]]) -> None:
    for d in started:
        d.cancel()


def _settle_from_reactor(
    result: object, loop: asyncio.AbstractEventLoop, future: "asyncio.Future[Any]"
) -> None:
    try:
        loop.call_soon_threadsafe(_settle, future, result)
    except RuntimeError:
        # The loop was closed (stopped past its grace): nobody waits.
        pass


def _settle(future: "asyncio.Future[Any]", result: object) -> None:
    if future.done():
        return
    if isinstance(result, Failure):
        assert result.value is not None  # a Failure holds its exception
        future.set_exception(result.value)
    else:
        future.set_result(result)
