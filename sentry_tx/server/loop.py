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
import threading
import time

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure

LOOP_THREAD_NAME = "sentry-grpc-loop"


class GrpcLoop:
    """
    An asyncio event loop running in a dedicated thread.

    @param reactor: the reactor Deferreds are fired on.
    @ivar loop: the asyncio loop, while the thread runs.
    """

    _log = Logger()

    def __init__(self, reactor):
        self._reactor = reactor
        self.loop = None
        self._thread = None
        self._ended = None

    @property
    def running(self):
        """
        Whether the loop's thread was started and has not been joined.
        """
        return self._thread is not None

    def start(self):
        """
        Start the thread and its loop.
        """
        if self._thread is not None:
            raise RuntimeError("the gRPC loop is running already")
        self.loop = asyncio.new_event_loop()
        self._ended = Deferred()
        self._thread = threading.Thread(
            target=self._run, name=LOOP_THREAD_NAME, daemon=True
        )
        self._thread.start()

    def _run(self):
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
            # Let what was cancelled by the stop run its cleanup.
            pending = asyncio.all_tasks(self.loop)
            for task in pending:
                task.cancel()
            if pending:
                self.loop.run_until_complete(
                    asyncio.gather(*pending, return_exceptions=True)
                )
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        finally:
            self.loop.close()
            self._reactor.callFromThread(self._ended.callback, None)

    def run(self, coroutine_function, *args):
        """
        Run C{coroutine_function(*args)} on the loop.

        @return: a Deferred fired on the reactor thread with its result.
        """
        d = Deferred()

        def done(future):
            try:
                result = future.result()
            except BaseException as e:
                self._reactor.callFromThread(d.errback, Failure(e))
            else:
                self._reactor.callFromThread(d.callback, result)

        future = asyncio.run_coroutine_threadsafe(
            coroutine_function(*args), self.loop
        )
        future.add_done_callback(done)
        return d

    def stop(self):
        """
        Stop the loop (tasks still on it are cancelled) and join its thread.

        @return: a Deferred that fires once the thread has ended; the
            reactor thread never waits for it.
        """
        if self._thread is None:
            d = Deferred()
            d.callback(None)
            return d
        thread, ended = self._thread, self._ended
        self._thread = None
        self.loop.call_soon_threadsafe(self.loop.stop)

        def joined(_):
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

    def __init__(self, seconds=time.time):
        self.seconds = seconds

    def callLater(self, delay, f, *args, **kwargs):
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

    def __init__(self, loop, delay, f, args, kwargs):
        self._active = True

        def fire():
            self._active = False
            f(*args, **kwargs)

        self._handle = loop.call_later(max(0.0, delay), fire)

    def active(self):
        return self._active

    def cancel(self):
        if not self._active:
            raise RuntimeError("the call has run or was cancelled already")
        self._active = False
        self._handle.cancel()


def on_reactor(reactor, loop, f, *args):
    """
    Call C{f(*args)} on the reactor thread, from the gRPC loop.

    @param loop: the running gRPC loop (the caller's).
    @return: an asyncio future, completed on C{loop} with the result of
        C{f} (a Deferred's result when it returns one) or its exception.
        Cancelling the future cancels that Deferred.
    """
    future = loop.create_future()
    started = []

    def call():
        d = maybeDeferred(f, *args)
        started.append(d)
        d.addBoth(_settle_from_reactor, loop, future)

    def cancelled(done):
        if done.cancelled():
            # callFromThread keeps order: call() has run by then.
            reactor.callFromThread(lambda: [d.cancel() for d in started])

    future.add_done_callback(cancelled)
    reactor.callFromThread(call)
    return future


def _settle_from_reactor(result, loop, future):
    try:
        loop.call_soon_threadsafe(_settle, future, result)
    except RuntimeError:
        # The loop was closed (stopped past its grace): nobody waits.
        pass


def _settle(future, result):
    if future.done():
        return
    if isinstance(result, Failure):
        future.set_exception(result.value)
    else:
        future.set_result(result)
