"""
Tests for the healthz and metrics web resources.
"""

from twisted.trial.unittest import SynchronousTestCase

from sentry_tx.healthz import healthz_root
from sentry_tx.metrics import SentryMetrics, metrics_root
from sentry_tx.testing.authority import FakeCertificateAuthority
from sentry_tx.testing.certificates import make_bundle
from sentry_tx.testing.rendering import render


class HealthzTests(SynchronousTestCase):
    """
    Tests for C{/healthz}.
    """

    def test_not_ready(self):
        """
        C{/healthz} is 503 until the authority is ready.
        """
        code, _ = render(healthz_root(FakeCertificateAuthority()), b"/healthz")
        self.assertEqual(code, 503)

    def test_ready(self):
        """
        C{/healthz} is 200 once the authority is ready.
        """
        authority = FakeCertificateAuthority()
        authority.ready = True
        code, body = render(healthz_root(authority), b"/healthz")
        self.assertEqual((code, body), (200, b"ok\n"))

    def test_other_source_not_ready(self):
        """
        C{/healthz} stays 503 while another readiness source (a validator's
        cache, say) is not ready, and turns 200 once it is.
        """

        class Source:
            ready = False

        authority, source = FakeCertificateAuthority(), Source()
        authority.ready = True
        root = healthz_root(authority, source)
        self.assertEqual(render(root, b"/healthz")[0], 503)
        source.ready = True
        self.assertEqual(render(root, b"/healthz")[0], 200)

    def test_other_paths(self):
        """
        Other paths are 404.
        """
        root = healthz_root(FakeCertificateAuthority())
        for path in (b"/", b"/metrics", b"/healthz/x"):
            code, _ = render(root, path)
            self.assertEqual(code, 404, path)


class MetricsTests(SynchronousTestCase):
    """
    Tests for the metrics and their exposition.
    """

    def test_names(self):
        """
        The Prometheus text carries Dapr's six metric names, every failure
        reason at zero from the start, and no C{_created} series.
        """
        metrics = SentryMetrics()
        metrics.record_bundle(make_bundle())
        code, body = render(metrics_root(metrics), b"/metrics")
        self.assertEqual(code, 200)
        text = body.decode()
        for line in (
            "dapr_sentry_cert_sign_request_received_total 0.0",
            "dapr_sentry_cert_sign_success_total 0.0",
            'dapr_sentry_cert_sign_failure_total{reason="validator"} 0.0',
            'dapr_sentry_cert_sign_failure_total{reason="cert_parse"} 0.0',
            'dapr_sentry_cert_sign_failure_total{reason="cert_sign"} 0.0',
            "dapr_sentry_servercert_issue_failed_total 0.0",
            "dapr_sentry_issuercert_changed_total 0.0",
            "dapr_sentry_issuercert_reload_failed_total 0.0",
        ):
            self.assertIn(line + "\n", text)
        self.assertIn("dapr_sentry_issuercert_expiry_timestamp ", text)
        self.assertIn("dapr_sentry_rootcert_expiry_timestamp ", text)
        self.assertNotIn("_created", text)

    def test_root_path(self):
        """
        The metrics are served at C{/} too; other paths are 404.
        """
        metrics = SentryMetrics()
        metrics.sign_success.inc()
        code, body = render(metrics_root(metrics), b"/")
        self.assertEqual(code, 200)
        self.assertIn(b"dapr_sentry_cert_sign_success_total 1.0", body)
        code, _ = render(metrics_root(metrics), b"/other")
        self.assertEqual(code, 404)

    def test_expiry_gauges(self):
        """
        C{record_bundle} publishes the issuer's and the earliest root's
        NotAfter as unix seconds.
        """
        bundle = make_bundle()
        metrics = SentryMetrics()
        metrics.record_bundle(bundle)
        self.assertEqual(
            metrics.issuercert_expiry_timestamp._value.get(),
            bundle.issuer.not_valid_after_utc.timestamp(),
        )
        self.assertEqual(
            metrics.rootcert_expiry_timestamp._value.get(),
            bundle.roots_not_after.timestamp(),
        )

    def test_registries_separate(self):
        """
        Two L{SentryMetrics} never share counters.
        """
        first, second = SentryMetrics(), SentryMetrics()
        first.sign_success.inc()
        self.assertEqual(second.sign_success._value.get(), 0)
