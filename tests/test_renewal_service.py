"""
Tests for L{sentry_tx.ca.renewal_service}: the renewal service driven by a
fake clock over the in-memory store.
"""

from datetime import UTC, timedelta

from twisted.internet.defer import succeed
from twisted.internet.task import Clock
from twisted.logger import LogLevel
from twisted.trial.unittest import SynchronousTestCase

from sentry_tx.ca.bundle import load_bundle
from sentry_tx.ca.renewal import PART_ANCHORS, PART_ISSUER, PART_KEY
from sentry_tx.ca.renewal_service import RETRY_SECONDS, CARenewalService
from sentry_tx.config import MTLSConfig, SentryConfig
from sentry_tx.errors import BundleError
from sentry_tx.metrics import SentryMetrics
from sentry_tx.testing.authority import FakeCertificateAuthority
from sentry_tx.testing.certificates import FIXED_NOW, TEST_NAMESPACE, TEST_TRUST_DOMAIN
from sentry_tx.testing.logs import capture_logs, log_messages
from sentry_tx.testing.renewal import MemoryRenewalStore, generated_parts

SKEW = timedelta(seconds=1)
TTL = timedelta(seconds=90)

CONFIG = SentryConfig(
    trust_domain=TEST_TRUST_DOMAIN,
    namespace=TEST_NAMESPACE,
    mtls=MTLSConfig(workload_cert_ttl=timedelta(seconds=20), allowed_clock_skew=SKEW),
    ca_ttl_seconds=90,
    ca_renewal_threshold=0.5,
    trust_anchor_propagation_grace_seconds=15,
)


class ReloadingAuthority(FakeCertificateAuthority):
    """
    A fake authority whose restart loads what the store holds.
    """

    def __init__(self, store, clock, config):
        self._store = store
        self._clock = clock
        super().__init__(self._load(), config)
        self.restarts = 0

    def _load(self):
        from datetime import datetime

        parts = self._store.parts
        now = datetime.fromtimestamp(self._clock.seconds(), UTC)
        return load_bundle(
            parts[PART_ANCHORS], parts[PART_ISSUER], parts[PART_KEY], now
        )

    def restart(self, config):
        self.restarts += 1
        self.bundle = self._load()
        return succeed(None)


class RenewalServiceTests(SynchronousTestCase):
    """
    L{CARenewalService} renews, switches and reports on the clock it is given.
    """

    def setUp(self):
        self.clock = Clock()
        self.clock.advance(FIXED_NOW.timestamp())
        self.store = MemoryRenewalStore(
            generated_parts(TEST_TRUST_DOMAIN, TEST_NAMESPACE, FIXED_NOW, SKEW, TTL)
        )
        self.metrics = SentryMetrics()
        self.events = capture_logs(self)
        self.fatal = []

    def _service(self, config=CONFIG):
        self.authority = ReloadingAuthority(self.store, self.clock, config)
        service = CARenewalService(
            self.store, self.authority, self.clock, self.metrics, self.fatal.append
        )
        service.startService()
        self.addCleanup(service.stopService)
        return service

    def _sample(self, name):
        return self.metrics.registry.get_sample_value(name)

    def test_two_renewals(self):
        """
        Over 200 s of 90 s CAs, the service renews and switches twice, reloads the
        authority, and counts both.
        """
        self._service()
        first_issuer = self.authority.bundle.issuer
        pending_seen = False
        for _ in range(200):
            self.clock.advance(1)
            pending_seen |= self._sample("dapr_sentry_ca_renewal_pending") == 1
        self.assertGreaterEqual(self._sample("dapr_sentry_ca_renewal_total"), 2)
        self.assertGreaterEqual(self._sample("dapr_sentry_ca_switchover_total"), 2)
        self.assertTrue(pending_seen)
        # Reloaded after each switch: what it serves is the stored issuer
        # (the whole certificate: renewed issuers share their subject), a
        # new one.
        self.assertGreaterEqual(self.authority.restarts, 2)
        self.assertEqual(self.authority.bundle.issuer, self.authority._load().issuer)
        self.assertNotEqual(self.authority.bundle.issuer, first_issuer)
        warnings = log_messages(self.events, LogLevel.warn)
        self.assertTrue(
            any(
                "restart workloads before then so their sidecars trust the new root"
                in w
                for w in warnings
            ),
            warnings,
        )

    def test_pending_timestamp(self):
        """
        After a renewal the switchover timestamp is the switch time; after the switch,
        0.
        """
        self._service()
        self.clock.advance(46)
        self.assertEqual(self._sample("dapr_sentry_ca_renewal_pending"), 1)
        switch_at = self._sample("dapr_sentry_ca_switchover_timestamp")
        self.assertLessEqual(abs(switch_at - (FIXED_NOW.timestamp() + 45 + 15)), 2)
        self.clock.advance(switch_at - self.clock.seconds() + 1)
        self.assertEqual(self._sample("dapr_sentry_ca_renewal_pending"), 0)
        self.assertEqual(self._sample("dapr_sentry_ca_switchover_timestamp"), 0)

    def test_disabled(self):
        """Renewal off: nothing is written, and the start-up line says so and why."""
        from dataclasses import replace

        self._service(replace(CONFIG, ca_renewal_enabled=False))
        self.clock.advance(200)
        self.assertEqual(self.store.history, [])
        self.assertIn(
            "automatic CA renewal is off: --ca-renewal-enabled is false",
            log_messages(self.events),
        )

    def test_settings_refused(self):
        """
        Settings the Configuration makes impossible (kubernetes mode learns it at start)
        are fatal.
        """
        from dataclasses import replace

        self._service(replace(CONFIG, trust_anchor_propagation_grace_seconds=60))
        self.clock.advance(1)
        self.assertEqual(len(self.fatal), 1)
        self.assertIn("--trust-anchor-propagation-grace", self.fatal[0].value.field)

    def test_failure_retried(self):
        """
        A step that fails is logged and tried again after RETRY_SECONDS; the service
        does not die.
        """
        self.store.fail_next = BundleError("memory", "unreadable")
        self._service()
        self.clock.advance(0)
        self.assertTrue(
            any(
                "the step failed; trying again in 60.0 s: memory: unreadable" in line
                or "the step failed; trying again in 60 s: memory: unreadable" in line
                for line in log_messages(self.events, LogLevel.error)
            ),
            log_messages(self.events),
        )
        self.assertEqual(self._sample("dapr_sentry_ca_renewal_total"), 0)
        self.clock.advance(RETRY_SECONDS)
        self.assertEqual(self._sample("dapr_sentry_ca_renewal_total"), 1)
