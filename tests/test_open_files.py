"""
Tests for L{sentry_tx.open_files} and the raise of the open-file limit when
sentry_tx's root service starts.
"""

import resource

from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from sentry_tx.open_files import OpenFileLimit, describe, raise_open_file_limit
from sentry_tx.service import SentryService


class _Limits:
    """
    C{getrlimit}/C{setrlimit} stand-ins over one (soft, hard) pair.
    """

    def __init__(self, soft, hard, refuse=None):
        self.limits = (soft, hard)
        self.refuse = refuse
        self.calls = []

    def getrlimit(self, which):
        assert which == resource.RLIMIT_NOFILE
        return self.limits

    def setrlimit(self, which, limits):
        self.calls.append((which, limits))
        if self.refuse is not None:
            raise self.refuse
        self.limits = limits


class RaiseOpenFileLimitTests(SynchronousTestCase):
    """
    L{raise_open_file_limit} raises the soft limit to the hard limit.
    """

    def test_raises_to_hard(self):
        """A soft limit of 1,024 under a hard one of 1,048,576 becomes 1,048,576."""
        limits = _Limits(1024, 1048576)
        limit = raise_open_file_limit(limits.getrlimit, limits.setrlimit)
        self.assertEqual(limit, OpenFileLimit(1024, 1048576, 1048576))
        self.assertEqual(limits.calls, [(resource.RLIMIT_NOFILE, (1048576, 1048576))])
        self.assertEqual(
            describe(limit),
            "open file limit raised from 1024 to 1048576 (the hard limit)",
        )

    def test_already_at_hard(self):
        """A soft limit equal to the hard one is left alone."""
        limits = _Limits(4096, 4096)
        limit = raise_open_file_limit(limits.getrlimit, limits.setrlimit)
        self.assertEqual(limits.calls, [])
        self.assertEqual(describe(limit), "open file limit is 4096 (the hard limit)")

    def test_refused(self):
        """A refused raise is reported with the limit that stays."""
        limits = _Limits(1024, 2048, refuse=ValueError("not allowed"))
        limit = raise_open_file_limit(limits.getrlimit, limits.setrlimit)
        self.assertEqual(limit.after, 1024)
        self.assertIn("stays 1024", describe(limit))
        self.assertIn("not allowed", describe(limit))

    def test_real_limit(self):
        """
        With the real resource module, a lowered soft limit goes back up to the hard
        one.
        """
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        self.addCleanup(resource.setrlimit, resource.RLIMIT_NOFILE, (soft, hard))
        lowered = min(soft, 512)
        if lowered == hard:
            lowered -= 1
        resource.setrlimit(resource.RLIMIT_NOFILE, (lowered, hard))
        limit = raise_open_file_limit()
        self.assertEqual((limit.before, limit.after), (lowered, hard))
        self.assertEqual(resource.getrlimit(resource.RLIMIT_NOFILE), (hard, hard))


class StartRaisesLimitTests(SynchronousTestCase):
    """
    The root service raises the limit in startService, never when built.
    """

    def test_raised_and_logged_at_start(self):
        """Building raises nothing; starting raises the limit and logs it."""
        limits = _Limits(1024, 65536)
        root = SentryService(
            MemoryReactorClock(),
            raise_open_file_limit=lambda: raise_open_file_limit(
                limits.getrlimit, limits.setrlimit
            ),
        )
        self.assertEqual(limits.calls, [])
        with capturedLogs() as events:
            root.startService()
        self.assertEqual(limits.limits, (65536, 65536))
        self.assertIn(
            (
                "open file limit raised from 1024 to 65536 (the hard limit)",
                LogLevel.info,
            ),
            [(formatEvent(e), e.get("log_level")) for e in events],
        )
