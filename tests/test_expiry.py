"""
Tests of L{sentry_tx.expiry}: the hourly expiry check.
"""

from datetime import timedelta

from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from sentry_tx.expiry import (
    BUNDLE_WAIT_SECONDS,
    EXPIRY_CHECK_INTERVAL_SECONDS,
    EXPIRY_WARNING_DAYS,
    ExpiryChecker,
)
from sentry_tx.metrics import SentryMetrics
from sentry_tx.testing.authority import FakeCertificateAuthority
from sentry_tx.testing.certificates import FIXED_NOW, make_chain
from sentry_tx.testing.logs import log_messages

CHECKER_NAMESPACE = "sentry_tx.expiry.ExpiryChecker"

LONG_AGO = FIXED_NOW - timedelta(days=90)
"""
When the test certificates start.
"""

LOADED_AT = FIXED_NOW - timedelta(days=60)
"""
When the test bundles are loaded: before any of them expires, so that
bundles whose certificates have expired by L{FIXED_NOW} can be built.
"""


def _bundle(root_left, issuer_left, intermediates=0):
    """
    A loaded bundle whose root (and intermediates) and issuer expire
    C{root_left} and C{issuer_left} (L{timedelta}s) after L{FIXED_NOW}.
    """
    return make_chain(
        intermediates=intermediates,
        not_before=LONG_AGO,
        not_after=FIXED_NOW + root_left,
        issuer_not_after=FIXED_NOW + issuer_left,
    ).load(LOADED_AT)


FAR = timedelta(days=365)


class ThresholdTests(SynchronousTestCase):
    """
    What one check says about certificates of various remaining lifetimes.
    """

    def setUp(self):
        self.clock = Clock()
        self.clock.advance(FIXED_NOW.timestamp())
        self.authority = FakeCertificateAuthority()
        self.checker = ExpiryChecker(self.authority, self.clock)

    def check(self, bundle):
        """
        Check C{bundle} once.

        @return: the warnings and the errors logged, formatted.
        """
        self.authority.bundle = bundle
        with capturedLogs() as events:
            self.checker.check()
        return (
            log_messages(events, LogLevel.warn, namespace=CHECKER_NAMESPACE),
            log_messages(events, LogLevel.error, namespace=CHECKER_NAMESPACE),
        )

    def test_far_from_expiry_silent(self):
        """
        A root and an issuer with more than 30 days left are not mentioned.
        """
        left = timedelta(days=EXPIRY_WARNING_DAYS, seconds=1)
        self.assertEqual(self.check(_bundle(left, left)), ([], []))

    def test_issuer_warning(self):
        """
        An issuer with 29 days and 5 hours left gets a warning that names it
        and says "certificate expires in 29 days and 5 hours"; the root,
        with a year left, is not mentioned.
        """
        bundle = _bundle(FAR, timedelta(days=29, hours=5))
        warnings, errors = self.check(bundle)
        self.assertEqual(errors, [])
        [warning] = warnings
        self.assertIn("certificate expires in 29 days and 5 hours", warning)
        self.assertIn("issuer certificate", warning)
        self.assertIn(bundle.issuer.subject.rfc4514_string(), warning)

    def test_replaced_root_silent(self):
        """
        After a renewal's switch, the old root (expired, or about to) in
        the anchors is neither warned about nor an error, nor in the root
        expiry gauge: the figures follow the root the issuer chains to.
        """
        from sentry_tx.ca.bundle import load_bundle

        old = make_chain(not_before=LONG_AGO, not_after=FIXED_NOW - timedelta(hours=1))
        new = make_chain(not_before=LONG_AGO, not_after=FIXED_NOW + FAR)
        bundle = load_bundle(
            old.anchors_pem + new.anchors_pem,
            new.issuer_chain_pem(),
            new.issuer_key_pem(),
            FIXED_NOW,
        )
        self.assertEqual(self.check(bundle), ([], []))
        metrics = SentryMetrics()
        metrics.record_bundle(bundle)
        self.assertEqual(
            metrics.registry.get_sample_value("dapr_sentry_rootcert_expiry_timestamp"),
            (FIXED_NOW + FAR).timestamp(),
        )

    def test_root_warning(self):
        """
        A root with 29 days and 5 hours left gets a warning that names it
        as the root.
        """
        bundle = _bundle(timedelta(days=29, hours=5), FAR)
        warnings, errors = self.check(bundle)
        self.assertEqual(errors, [])
        [warning] = warnings
        self.assertIn("certificate expires in 29 days and 5 hours", warning)
        self.assertIn("root certificate", warning)
        self.assertIn(bundle.anchors[0].subject.rfc4514_string(), warning)

    def test_partial_hours_truncated(self):
        """
        Days and hours are whole: 29 days, 5 hours and 59 minutes read "29
        days and 5 hours".
        """
        warnings, _ = self.check(_bundle(FAR, timedelta(days=29, hours=5, minutes=59)))
        self.assertIn("certificate expires in 29 days and 5 hours", warnings[0])

    def test_exactly_thirty_days_warns(self):
        """
        Exactly 30 days left is within the warning period.
        """
        warnings, _ = self.check(_bundle(FAR, timedelta(days=EXPIRY_WARNING_DAYS)))
        self.assertIn("certificate expires in 30 days and 0 hours", warnings[0])

    def test_issuer_expired_error(self):
        """
        An issuer that expired 2 days and 3 hours ago is an error naming it,
        not a warning.
        """
        bundle = _bundle(FAR, -timedelta(days=2, hours=3))
        warnings, errors = self.check(bundle)
        self.assertEqual(warnings, [])
        [error] = errors
        self.assertIn("certificate has expired", error)
        self.assertIn("the issuer certificate", error)
        self.assertIn(bundle.issuer.subject.rfc4514_string(), error)
        self.assertIn("expired 2 days and 3 hours ago", error)

    def test_root_expired_error(self):
        """
        A root that has expired is an error naming it as the root.
        """
        bundle = _bundle(-timedelta(hours=1), -timedelta(hours=2))
        warnings, errors = self.check(bundle)
        self.assertEqual(warnings, [])
        self.assertEqual(len(errors), 2)
        self.assertIn("the root certificate", errors[0])
        self.assertIn("expired 0 days and 1 hours ago", errors[0])
        self.assertIn("the issuer certificate", errors[1])

    def test_every_chain_certificate(self):
        """
        Every anchor and every certificate of the issuer chain is checked;
        an intermediate is named as such.
        """
        bundle = _bundle(timedelta(days=10), timedelta(days=5), intermediates=1)
        warnings, _ = self.check(bundle)
        self.assertEqual(len(warnings), 3)
        self.assertIn("the root certificate", warnings[0])
        self.assertIn(
            "certificate expires in 5 days and 0 hours: the issuer", warnings[1]
        )
        self.assertIn("the intermediate certificate", warnings[2])
        self.assertIn(bundle.issuer_chain[1].subject.rfc4514_string(), warnings[2])

    def test_no_bundle(self):
        """
        Before a bundle is loaded there is nothing to check, and nothing is
        logged.
        """
        self.assertEqual(self.check(None), ([], []))
        self.assertEqual(self.clock.getDelayedCalls(), [])


class _Authority:
    """
    An authority whose C{bundle} (C{current}) counts its reads and raises
    C{error} when it is set.
    """

    def __init__(self, bundle):
        self.current = bundle
        self.error = None
        self.reads = 0

    @property
    def bundle(self):
        self.reads += 1
        if self.error is not None:
            raise self.error
        return self.current


class ScheduleTests(SynchronousTestCase):
    """
    L{ExpiryChecker} as a service: at start, then hourly, whatever happens.
    """

    def setUp(self):
        self.clock = Clock()
        self.clock.advance(FIXED_NOW.timestamp())
        self.metrics = SentryMetrics()
        self.bundle = _bundle(
            timedelta(days=100), timedelta(days=EXPIRY_WARNING_DAYS, hours=2)
        )
        self.authority = _Authority(self.bundle)
        self.checker = ExpiryChecker(self.authority, self.clock, self.metrics)

    def test_at_start_and_hourly(self):
        """
        The first check runs at start, the next ones every
        L{EXPIRY_CHECK_INTERVAL_SECONDS}.
        """
        self.checker.startService()
        self.addCleanup(self.checker.stopService)
        self.assertEqual(self.authority.reads, 1)
        self.clock.advance(EXPIRY_CHECK_INTERVAL_SECONDS - 1)
        self.assertEqual(self.authority.reads, 1)
        self.clock.advance(1)
        self.assertEqual(self.authority.reads, 2)
        self.clock.pump([EXPIRY_CHECK_INTERVAL_SECONDS] * 3)
        self.assertEqual(self.authority.reads, 5)

    def test_warns_once_the_period_begins(self):
        """
        An issuer with 30 days and 2 hours left is silent at start and two
        hours later warned about: the hourly runs see time pass.
        """
        with capturedLogs() as events:
            self.checker.startService()
            self.addCleanup(self.checker.stopService)
            self.clock.advance(EXPIRY_CHECK_INTERVAL_SECONDS)
            self.assertEqual(
                log_messages(events, LogLevel.warn, namespace=CHECKER_NAMESPACE), []
            )
            self.clock.advance(EXPIRY_CHECK_INTERVAL_SECONDS)
        [warning] = log_messages(events, LogLevel.warn, namespace=CHECKER_NAMESPACE)
        self.assertIn("certificate expires in 30 days and 0 hours", warning)

    def test_survives_exception(self):
        """
        A run that raises is logged with its traceback and the check keeps
        running: the next run comes an hour later and works again.
        """
        self.authority.error = RuntimeError("bundle unavailable")
        self.checker.startService()
        self.addCleanup(self.checker.stopService)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.clock.advance(EXPIRY_CHECK_INTERVAL_SECONDS)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.authority.error = None
        self.clock.advance(EXPIRY_CHECK_INTERVAL_SECONDS)
        self.assertEqual(self.authority.reads, 3)
        self.assertEqual(self.flushLoggedErrors(), [])
        self.assertEqual(
            self.metrics.registry.get_sample_value(
                "dapr_sentry_issuercert_expiry_timestamp"
            ),
            self.bundle.issuer.not_valid_after_utc.timestamp(),
        )

    def test_sets_expiry_gauges(self):
        """
        Each run sets the issuer gauge to the issuer's NotAfter and the root
        gauge to the earliest root NotAfter.
        """
        self.checker.startService()
        self.addCleanup(self.checker.stopService)
        value = self.metrics.registry.get_sample_value
        self.assertEqual(
            value("dapr_sentry_rootcert_expiry_timestamp"),
            (FIXED_NOW + timedelta(days=100)).timestamp(),
        )
        self.assertEqual(
            value("dapr_sentry_issuercert_expiry_timestamp"),
            (FIXED_NOW + timedelta(days=EXPIRY_WARNING_DAYS, hours=2)).timestamp(),
        )

    def test_waits_for_the_first_bundle(self):
        """
        While the authority has no bundle yet, the check looks again every
        L{BUNDLE_WAIT_SECONDS}; the first bundle is checked then, not an hour
        later, and the waiting ends.
        """
        self.authority.current = None
        with capturedLogs() as events:
            self.checker.startService()
            self.addCleanup(self.checker.stopService)
            self.clock.advance(BUNDLE_WAIT_SECONDS)
            self.assertEqual(self.authority.reads, 2)
            self.authority.current = _bundle(FAR, timedelta(days=3))
            self.clock.advance(BUNDLE_WAIT_SECONDS)
        self.assertEqual(self.authority.reads, 3)
        [warning] = log_messages(events, LogLevel.warn, namespace=CHECKER_NAMESPACE)
        self.assertIn("certificate expires in 2 days and 23 hours", warning)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.clock.advance(EXPIRY_CHECK_INTERVAL_SECONDS - 2 * BUNDLE_WAIT_SECONDS)
        self.assertEqual(self.authority.reads, 4)

    def test_stop_cancels_bundle_wait(self):
        """
        C{stopService} also cancels the wait for a first bundle.
        """
        self.authority.current = None
        self.checker.startService()
        self.checker.stopService()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stop(self):
        """
        C{stopService} stops the runs.
        """
        self.checker.startService()
        self.checker.stopService()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(EXPIRY_CHECK_INTERVAL_SECONDS * 2)
        self.assertEqual(self.authority.reads, 1)
