# -*- test-case-name: tests.test_kube_admission -*-
"""
Admission of TokenReviews: at most L{MAX_TOKEN_REVIEWS_IN_FLIGHT} at once to
the API server, the rest wait in a bounded queue, in arrival order.

A call is refused at once with L{ValidatorOverloadedError} (the caller gets
RESOURCE_EXHAUSTED and the trailer C{grpc-retry-pushback-ms}) when:

  - its deadline has passed already (it is not worked on);
  - the queue holds L{MAX_QUEUED_TOKEN_REVIEWS} calls;
  - by the reviews' measured latency, its turn would come too late for a
    review to finish before its deadline (before any review has ended, the
    time the oldest one in flight has run so far is the latency planned
    with: a lower bound that grows while a cold API server is slow).

A queued call is checked again as time passes and reviews end, and refused
as soon as it cannot make it; one whose deadline comes before its turn
leaves the queue with the same refusal.  Nothing here waits without a
bound: every queued call has a timer at its deadline.

It runs where the validator runs: in sentry_tx on the gRPC loop, with a
L{sentry_tx.server.loop.LoopClock} (the reactor's time, timers on the loop);
its Deferreds are fired there, and the validator awaits them as loop futures
(L{sentry_tx.identity.kubernetes.OnGrpcLoop}).
"""

from collections import deque
from collections.abc import Callable
from typing import Protocol

from twisted.internet.defer import Deferred, fail, succeed

from sentry_tx.errors import ValidatorOverloadedError

MAX_TOKEN_REVIEWS_IN_FLIGHT = 64
"""
TokenReviews sent to the API server at once, per serving process.

Sized by measurement (bench/kube_storm.py, 2 processes, fake API server, on
the 2-core machine with today's gRPC hosting): 1,000 signed/s with 20 ms per
review needs only 20 in flight (Little's law), and the rate at 20 ms was the
same within noise for 16, 64 and 128 (CPU-bound, not admission-bound).  The
storm of 300 callers with 1 s per review decides: 16 per process certified
231 of 300 (the rest refused with a retry hint), 64 certified all 300 in
4.8 s, 128 all 300 in 4.2 s.  64 meets the storm with room and bounds what
sentry_tx adds to a busy API server during a mass restart (Dapr sends
without limit) to half of what 128 would.  The bound is per serving
process: with worker processes the API server sees up to that many times
64.
"""

MAX_QUEUED_TOKEN_REVIEWS = 1024
"""
Calls waiting for a TokenReview slot; one more is refused at once.  As many
as the gRPC server's own bound on calls (MAX_CONCURRENT_RPCS), so that the
queue, not a timeout, decides.
"""

PRUNE_INTERVAL_SECONDS = 0.1
"""
How often, at most, the queue is checked for calls that can no longer be
reviewed in time (each check walks the queue).
"""

LATENCY_SMOOTHING = 0.2
"""
The weight of the newest TokenReview in the moving average of their latency.
"""

MIN_RETRY_AFTER_MILLISECONDS = 100
MAX_RETRY_AFTER_MILLISECONDS = 10_000
"""
The bounds of the retry hint sent with a refusal.
"""

DEADLINE_PASSED = "the call's deadline has passed; it was not worked on"
QUEUE_FULL = "too many callers are waiting for a token review; retry later"
TOO_LATE = (
    "the token review could not finish before the call's deadline; retry later"
)


class Timer(Protocol):
    """
    A pending call of a L{ReviewClock} (an C{IDelayedCall}, or a timer on
    the gRPC loop).
    """

    def active(self) -> bool: ...

    def cancel(self) -> None: ...


class ReviewClock(Protocol):
    """
    What admission needs of a clock: C{IReactorTime}'s C{seconds} and
    C{callLater} (a L{sentry_tx.server.loop.LoopClock}, or a C{Clock} in
    tests).
    """

    def seconds(self) -> float: ...

    def callLater(
        self, delay: float, callable: Callable[..., object], /, *args: object
    ) -> Timer: ...


class Release(Protocol):
    """
    Gives an admission slot back: call it once, when the review has ended,
    with its duration in seconds, or None when it was not measured.
    """

    def __call__(self, duration_seconds: float | None = None) -> None: ...


class _Waiter:
    """
    A call in the queue.
    """

    __slots__ = ("deferred", "deadline", "timer")

    # Set by ReviewAdmission.acquire at once after the waiter is made.
    timer: Timer

    def __init__(self, deferred: "Deferred[Release]", deadline: float) -> None:
        self.deferred = deferred
        self.deadline = deadline


class ReviewAdmission:
    """
    The admission queue (see the module docstring).  Used from one thread
    only, the one C{reactor}'s timers run on (the gRPC loop's in
    sentry_tx).

    When a call would have to wait, its turn is estimated from the start
    times of the reviews in flight and the measured latency: the I{k}-th
    call in the queue gets the slot of the I{(k mod limit)}-th oldest review
    in flight, I{k div limit} latencies after that one ends.  When a review
    ends and changes the latency, the queue is checked again (at most every
    L{PRUNE_INTERVAL_SECONDS}) and calls that can no longer be reviewed in
    time are refused then, not at their deadline.

    @param reactor: the clock (C{seconds}, C{callLater}): a
        L{sentry_tx.server.loop.LoopClock} on the gRPC loop, a C{Clock} in
        tests.
    @param limit: how many reviews may be in flight.
    @param queue_limit: how many calls may wait.

    @ivar latency_seconds: the moving average of review latency (0 before
        the first review ends: no call is refused for lateness until one
        is measured).
    """

    def __init__(
        self,
        reactor: ReviewClock,
        limit: int = MAX_TOKEN_REVIEWS_IN_FLIGHT,
        queue_limit: int = MAX_QUEUED_TOKEN_REVIEWS,
    ) -> None:
        self._reactor = reactor
        self.limit = limit
        self.queue_limit = queue_limit
        self.in_flight = 0
        self.peak_in_flight = 0
        self.latency_seconds = 0.0
        self._queue: deque[_Waiter] = deque()
        self._starts: deque[float] = deque()
        self._last_prune: float | None = None
        self._prune_timer: Timer | None = None

    @property
    def queued(self) -> int:
        """
        How many calls wait now.
        """
        return len(self._queue)

    def _retry_after_ms(self, ahead: int) -> int:
        wait_seconds = (ahead / self.limit + 1) * self._latency(
            self._reactor.seconds()
        )
        return min(
            MAX_RETRY_AFTER_MILLISECONDS,
            max(MIN_RETRY_AFTER_MILLISECONDS, int(wait_seconds * 1000)),
        )

    def _latency(self, now: float) -> float:
        """
        The review latency to plan with: the measured average; before any
        review has ended, how long the oldest one in flight has run so far
        (a lower bound, which grows while a cold API server is slow).
        """
        if self.latency_seconds:
            return self.latency_seconds
        if self._starts:
            return now - self._starts[0]
        return 0.0

    def _expected_finish(self, position: int, now: float) -> float:
        """
        When the call at C{position} in the queue should have its review
        answered (0 when nothing is known of the latency yet).
        """
        latency = self._latency(now)
        if not latency:
            return 0.0
        if self.in_flight < self.limit or not self._starts:
            start = now
        else:
            oldest = self._starts[position % len(self._starts)]
            start = max(
                now,
                oldest + latency + (position // len(self._starts)) * latency,
            )
        return start + latency

    def try_acquire(self, deadline: float) -> Release | None:
        """
        A slot at once, without a Deferred, when one is free, nobody waits
        and C{deadline} has not passed (the common case, taken on every
        call's path); None otherwise, when the caller uses L{acquire}.

        @return: the callable that gives the slot back (as L{acquire}'s),
            or None.
        """
        now = self._reactor.seconds()
        if deadline > now and self.in_flight < self.limit and not self._queue:
            return self._take(now)
        return None

    def acquire(self, deadline: float) -> "Deferred[Release]":
        """
        Wait for a slot, until C{deadline} at most.

        @param deadline: when the review must have finished (reactor clock).
        @return: Deferred firing with a callable that gives the slot back
            (call it once, when the review has ended, with its duration in
            seconds or None when it was not measured), or failing with
            L{ValidatorOverloadedError}.  Cancelling it leaves the queue.
        """
        now = self._reactor.seconds()
        if deadline <= now:
            return fail(
                ValidatorOverloadedError(
                    DEADLINE_PASSED, self._retry_after_ms(len(self._queue))
                )
            )
        if self.in_flight < self.limit and not self._queue:
            return succeed(self._take(now))
        ahead = len(self._queue)
        if ahead >= self.queue_limit:
            return fail(
                ValidatorOverloadedError(QUEUE_FULL, self._retry_after_ms(ahead))
            )
        if self._expected_finish(ahead, now) > deadline:
            return fail(ValidatorOverloadedError(TOO_LATE, self._retry_after_ms(ahead)))

        def leave(d: object) -> None:
            waiter.timer.cancel()
            self._queue.remove(waiter)

        waiter = _Waiter(Deferred(leave), deadline)
        waiter.timer = self._reactor.callLater(deadline - now, self._expire, waiter)
        self._queue.append(waiter)
        if self._prune_timer is None:
            self._prune_timer = self._reactor.callLater(
                PRUNE_INTERVAL_SECONDS, self._prune_periodically
            )
        return waiter.deferred

    def _prune_periodically(self) -> None:
        """
        While calls wait, check every L{PRUNE_INTERVAL_SECONDS} whether the
        latency now known rules some out (no review may end for a while:
        a cold or slow API server).
        """
        self._prune_timer = None
        if self._queue:
            now = self._reactor.seconds()
            self._last_prune = now
            self._prune(now)
        if self._queue:
            self._prune_timer = self._reactor.callLater(
                PRUNE_INTERVAL_SECONDS, self._prune_periodically
            )

    def _expire(self, waiter: _Waiter) -> None:
        self._queue.remove(waiter)
        self._refuse(waiter)

    def _refuse(self, waiter: _Waiter) -> None:
        if waiter.timer.active():
            waiter.timer.cancel()
        waiter.deferred.errback(
            ValidatorOverloadedError(TOO_LATE, self._retry_after_ms(len(self._queue)))
        )

    def _take(self, now: float) -> Release:
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        self._starts.append(now)
        released: list[bool] = []

        def release(duration_seconds: float | None = None) -> None:
            if released:
                return
            released.append(True)
            self._starts.remove(now)
            if duration_seconds is not None:
                self._measured(duration_seconds)
            self.in_flight -= 1
            self._next()

        return release

    def _measured(self, duration_seconds: float) -> None:
        if self.latency_seconds == 0.0:
            self.latency_seconds = duration_seconds
        else:
            self.latency_seconds += LATENCY_SMOOTHING * (
                duration_seconds - self.latency_seconds
            )

    def _next(self) -> None:
        now = self._reactor.seconds()
        while self._queue and self.in_flight < self.limit:
            waiter = self._queue.popleft()
            latency = self._latency(now)
            if latency and now + latency > waiter.deadline:
                # Its turn has come too late for a review to finish: a slot
                # given to it would be wasted on the API server.
                self._refuse(waiter)
                continue
            waiter.timer.cancel()
            waiter.deferred.callback(self._take(now))
        if self._queue and (
            self._last_prune is None
            or now - self._last_prune >= PRUNE_INTERVAL_SECONDS
        ):
            self._last_prune = now
            self._prune(now)

    def _prune(self, now: float) -> None:
        """
        Refuse now the queued calls that can no longer be reviewed before
        their deadline.
        """
        kept: deque[_Waiter] = deque()
        late: list[_Waiter] = []
        for waiter in self._queue:
            if self._expected_finish(len(kept), now) > waiter.deadline:
                late.append(waiter)
            else:
                kept.append(waiter)
        self._queue = kept
        for waiter in late:
            self._refuse(waiter)
