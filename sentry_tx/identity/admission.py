"""
Admission of TokenReviews: at most L{MAX_TOKEN_REVIEWS_IN_FLIGHT} at once to
the API server, the rest wait in a bounded queue, in arrival order.

A call is refused at once with L{ValidatorOverloadedError} (the caller gets
RESOURCE_EXHAUSTED and the trailer C{grpc-retry-pushback-ms}) when:

  - its deadline has passed already (it is not worked on);
  - the queue holds L{MAX_QUEUED_TOKEN_REVIEWS} calls;
  - by the reviews' measured latency, its turn would come too late for a
    review to finish before its deadline.

A queued call whose deadline comes before its turn leaves the queue with the
same refusal.  Nothing here waits without a bound: every queued call has a
timer at its deadline.
"""

from collections import deque

from twisted.internet.defer import Deferred, fail, succeed

from sentry_tx.errors import ValidatorOverloadedError

MAX_TOKEN_REVIEWS_IN_FLIGHT = 64
"""
TokenReviews sent to the API server at once.  Measured (bench/kube_storm.py,
README "Kubernetes mode under load"): with 20 ms per review, 64 in flight
give the signing rate the target asks for with room to spare; with 1 s per
review they certify 300 callers in about 5 s.  It also bounds what sentry_tx
adds to a busy API server during a mass restart, where Dapr sends without
limit.
"""

MAX_QUEUED_TOKEN_REVIEWS = 1024
"""
Calls waiting for a TokenReview slot; one more is refused at once.  As many
as the gRPC server's own bound on calls (MAX_CONCURRENT_RPCS), so that the
queue, not a timeout, decides.
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


class ReviewAdmission:
    """
    The admission queue (see the module docstring).  Reactor thread only.

    @param reactor: the clock.
    @param limit: how many reviews may be in flight.
    @param queue_limit: how many calls may wait.

    @ivar latency_seconds: the moving average of review latency (0 before
        the first review ends: no call is refused for lateness until one
        is measured).
    """

    def __init__(
        self,
        reactor,
        limit=MAX_TOKEN_REVIEWS_IN_FLIGHT,
        queue_limit=MAX_QUEUED_TOKEN_REVIEWS,
    ):
        self._reactor = reactor
        self.limit = limit
        self.queue_limit = queue_limit
        self.in_flight = 0
        self.peak_in_flight = 0
        self.latency_seconds = 0.0
        self._queue = deque()

    @property
    def queued(self):
        """
        How many calls wait now.
        """
        return len(self._queue)

    def _retry_after_ms(self, ahead):
        wait_seconds = (ahead / self.limit + 1) * self.latency_seconds
        return min(
            MAX_RETRY_AFTER_MILLISECONDS,
            max(MIN_RETRY_AFTER_MILLISECONDS, int(wait_seconds * 1000)),
        )

    def acquire(self, deadline):
        """
        Wait for a slot, until C{deadline} at most.

        @param deadline: when the review must have finished (reactor clock).
        @return: Deferred firing with a callable that gives the slot back
            (call it once, when the review has ended, with its duration in
            seconds or None when it failed), or failing with
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
            return succeed(self._take())
        ahead = len(self._queue)
        if ahead >= self.queue_limit:
            return fail(ValidatorOverloadedError(QUEUE_FULL, self._retry_after_ms(ahead)))
        expected_wait = (ahead // self.limit + 1) * self.latency_seconds
        if now + expected_wait + self.latency_seconds > deadline:
            return fail(ValidatorOverloadedError(TOO_LATE, self._retry_after_ms(ahead)))

        def leave(d):
            entry[1].cancel()
            self._queue.remove(entry)

        waiter = Deferred(leave)

        def expire():
            self._queue.remove(entry)
            waiter.errback(
                ValidatorOverloadedError(TOO_LATE, self._retry_after_ms(len(self._queue)))
            )

        entry = (waiter, self._reactor.callLater(deadline - now, expire))
        self._queue.append(entry)
        return waiter

    def _take(self):
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        released = []

        def release(duration_seconds=None):
            if released:
                return
            released.append(True)
            if duration_seconds is not None:
                self._measured(duration_seconds)
            self.in_flight -= 1
            self._next()

        return release

    def _measured(self, duration_seconds):
        if self.latency_seconds == 0.0:
            self.latency_seconds = duration_seconds
        else:
            self.latency_seconds += LATENCY_SMOOTHING * (
                duration_seconds - self.latency_seconds
            )

    def _next(self):
        while self._queue and self.in_flight < self.limit:
            waiter, timer = self._queue.popleft()
            timer.cancel()
            waiter.callback(self._take())
