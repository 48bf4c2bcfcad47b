# -*- test-case-name: tests.test_ca_service,tests.test_workers -*-
"""
Serialised, coalesced reloads.

A reload asked for while one runs does not run beside it: every request that
arrives meanwhile is served by one more run after it, with the latest
argument.  Each caller gets a Deferred for the run that served it.
"""

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.python.failure import Failure


class SerialReloads:
    """
    Runs C{reload(argument)} one at a time, coalescing requests.

    @param reload: a callable taking the argument and returning a Deferred.
    """

    def __init__(self, reload):
        self._reload = reload
        self._running = False
        self._waiters = []
        self._argument = None

    @property
    def running(self):
        """
        Whether a reload is running now.
        """
        return self._running

    def request(self, argument):
        """
        Ask for a reload with C{argument}.

        @return: a Deferred that fires with the result of the run that served
            this request, or fails with its failure.
        """
        waiter = Deferred()
        self._argument = argument
        self._waiters.append(waiter)
        if not self._running:
            self._run()
        return waiter

    @inlineCallbacks
    def _run(self):
        self._running = True
        try:
            while self._waiters:
                argument, waiters = self._argument, self._waiters
                self._waiters = []
                try:
                    result = yield self._reload(argument)
                except Exception:
                    failure = Failure()
                    for waiter in waiters:
                        waiter.errback(failure)
                else:
                    for waiter in waiters:
                        waiter.callback(result)
        finally:
            self._running = False


class StartGate:
    """
    Holds back what is asked for while a start runs (a restart must not run
    beside the first load), and lets it go when the start ends, however it
    ends.
    """

    def __init__(self):
        self._waiters = None

    @property
    def starting(self):
        """
        Whether a start is running now.
        """
        return self._waiters is not None

    def begin(self):
        """
        A start begins.
        """
        self._waiters = []

    def end(self, result):
        """
        The start ended (use as C{addBoth}); release every waiter.
        """
        waiters, self._waiters = self._waiters, None
        for waiter in waiters:
            waiter.callback(None)
        return result

    def after_start(self):
        """
        A Deferred that fires with None once the running start has ended.
        """
        waiter = Deferred()
        self._waiters.append(waiter)
        return waiter
