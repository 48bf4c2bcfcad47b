"""
Tests for L{sentry_tx.server.loop}: the gRPC loop's thread and the bridge
between it and the reactor, with the real reactor and a real loop thread.
"""

import asyncio
import threading

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.trial.unittest import TestCase

from sentry_tx.server.loop import LOOP_THREAD_NAME, GrpcLoop, LoopClock, on_reactor


class GrpcLoopTests(TestCase):
    """
    L{GrpcLoop}: a loop in its own thread, started and joined.
    """

    def setUp(self):
        self.grpc_loop = GrpcLoop(reactor)
        self.grpc_loop.start()
        self.addCleanup(self.grpc_loop.stop)

    @inlineCallbacks
    def test_run_on_loop_thread(self):
        """
        A coroutine handed to C{run} runs in the loop's thread, and its
        result fires the Deferred on the reactor thread.
        """
        async def where():
            return threading.current_thread().name

        fired_in = []
        d = self.grpc_loop.run(where)
        d.addCallback(lambda name: fired_in.append(threading.current_thread()) or name)
        name = yield d
        self.assertEqual(name, LOOP_THREAD_NAME)
        self.assertEqual(fired_in, [threading.main_thread()])

    @inlineCallbacks
    def test_run_failure(self):
        """
        A coroutine's exception fails the Deferred with it.
        """
        async def fail():
            raise ValueError("boom")

        yield self.assertFailure(self.grpc_loop.run(fail), ValueError)

    @inlineCallbacks
    def test_stop_joins(self):
        """
        C{stop} ends the loop's thread: once its Deferred fired, no thread
        of that name is alive, and the loop is closed.
        """
        loop = self.grpc_loop.loop
        yield self.grpc_loop.stop()
        self.assertFalse(self.grpc_loop.running)
        self.assertTrue(loop.is_closed())
        self.assertNotIn(
            LOOP_THREAD_NAME, [thread.name for thread in threading.enumerate()]
        )

    @inlineCallbacks
    def test_on_reactor(self):
        """
        C{on_reactor} runs the function on the reactor thread and the
        coroutine gets its Deferred's result once the reactor fires it.
        """
        answer = Deferred()
        ran_in = []

        def on_the_reactor():
            ran_in.append(threading.current_thread())
            reactor.callLater(0, answer.callback, "answered")
            return answer

        async def ask():
            return await on_reactor(
                reactor, asyncio.get_running_loop(), on_the_reactor
            )

        result = yield self.grpc_loop.run(ask)
        self.assertEqual(result, "answered")
        self.assertEqual(ran_in, [threading.main_thread()])

    @inlineCallbacks
    def test_on_reactor_failure(self):
        """
        A failure on the reactor is raised in the coroutine.
        """
        def refuse():
            raise KeyError("no")

        async def ask():
            try:
                await on_reactor(reactor, asyncio.get_running_loop(), refuse)
            except KeyError as e:
                return e.args
            return None

        result = yield self.grpc_loop.run(ask)
        self.assertEqual(result, ("no",))

    @inlineCallbacks
    def test_cancel_reaches_reactor(self):
        """
        Cancelling the awaited future (the call went away) cancels the
        Deferred on the reactor.
        """
        pending = Deferred()
        cancelled = Deferred()
        pending.addErrback(lambda failure: cancelled.callback(failure.type))

        async def ask_then_cancel():
            future = on_reactor(reactor, asyncio.get_running_loop(), lambda: pending)
            await asyncio.sleep(0)
            future.cancel()

        yield self.grpc_loop.run(ask_then_cancel)
        kind = yield cancelled
        from twisted.internet.defer import CancelledError

        self.assertIs(kind, CancelledError)


class LoopClockTests(TestCase):
    """
    L{LoopClock}: the reactor's time, timers on the running loop.
    """

    def setUp(self):
        self.loop = asyncio.new_event_loop()
        self.addCleanup(self.loop.close)
        self.clock = LoopClock(lambda: 1234.5)

    def test_seconds(self):
        """
        C{seconds} is the clock it was given.
        """
        self.assertEqual(self.clock.seconds(), 1234.5)

    def test_call_later_on_loop(self):
        """
        A timer runs on the loop once its delay has passed, and is active
        only until then.
        """
        calls = []

        async def run():
            call = self.clock.callLater(0, calls.append, "fired")
            active_before = call.active()
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            return active_before, call.active()

        self.assertEqual(self.loop.run_until_complete(run()), (True, False))
        self.assertEqual(calls, ["fired"])

    def test_cancel(self):
        """
        A cancelled timer does not run, is no longer active, and cannot be
        cancelled twice.
        """
        calls = []

        async def run():
            call = self.clock.callLater(0, calls.append, "fired")
            call.cancel()
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            self.assertRaises(RuntimeError, call.cancel)
            return call.active()

        self.assertFalse(self.loop.run_until_complete(run()))
        self.assertEqual(calls, [])
