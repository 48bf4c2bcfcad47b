# -*- test-case-name: tests.test_workers -*-
"""
The trust store of a serving process that reads no files: the bundle its
parent last pushed (L{PushedTrustStore}), for a worker process and for the
pool's own serving in the parent.
"""

from twisted.internet.defer import succeed
from zope.interface import implementer

from sentry_tx.interfaces import ITrustStore


@implementer(ITrustStore)
class PushedTrustStore:
    """
    The trust store of a worker: the bundle its parent last sent.  Never
    generates, never reads a file.

    @ivar bundle: the L{TrustBundle} to answer with.
    """

    watch_directories = ()

    def __init__(self, bundle):
        self.bundle = bundle

    def load(self, now):
        return succeed(self.bundle)

    def load_or_generate(self, now):
        return succeed(self.bundle)
