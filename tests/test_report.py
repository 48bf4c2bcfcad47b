"""
Tests for L{sentry_tx.report}: the settings in effect, logged once at start.
"""

from datetime import timedelta

from twisted.internet.defer import succeed
from twisted.logger import LogLevel, capturedLogs
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from sentry_tx.config import MTLSConfig, SentryConfig
from sentry_tx.identity.caller import VALIDATOR_INSECURE, VALIDATOR_KUBERNETES
from sentry_tx.interfaces import IConfigurationSource
from sentry_tx.report import SettingsReport, describe_settings


class _Source:
    """
    A configuration source that sets the TTL to two hours.
    """

    def __init__(self):
        self.calls = 0

    def resolve(self, config):
        self.calls += 1
        return succeed(
            SentryConfig(
                mode=config.mode,
                mtls=MTLSConfig(workload_cert_ttl=timedelta(hours=2)),
            )
        )


def _resolved(d):
    results = []
    d.addBoth(results.append)
    [result] = results
    return result


class SettingsReportTests(SynchronousTestCase):
    """
    L{SettingsReport} resolves, then says what is in effect, once.
    """

    def test_interface(self):
        """
        It is an L{IConfigurationSource}.
        """
        verifyObject(IConfigurationSource, SettingsReport(None, (), None))

    def test_standalone_logs_once(self):
        """
        Without a wrapped source the configuration is returned as it is, and
        one info line gives TTL, skew, validators and the default; a second
        resolve logs nothing.
        """
        report = SettingsReport(None, [VALIDATOR_INSECURE], VALIDATOR_INSECURE)
        config = SentryConfig(
            mtls=MTLSConfig(
                workload_cert_ttl=timedelta(hours=1, minutes=30),
                allowed_clock_skew=timedelta(seconds=90),
            )
        )
        with capturedLogs() as events:
            self.assertIs(_resolved(report.resolve(config)), config)
            _resolved(report.resolve(config))
        lines = [
            e for e in events if "log_format" in e and "in effect" in e["log_format"]
        ]
        self.assertEqual(len(lines), 1)
        self.assertEqual(lines[0]["log_level"], LogLevel.info)
        from twisted.logger import formatEvent

        text = formatEvent(lines[0])
        self.assertIn("workload certificates live 1h30m0s", text)
        self.assertIn("allowed clock skew 1m30s", text)
        self.assertIn("validators INSECURE, default INSECURE", text)

    def test_kubernetes_reports_resolved(self):
        """
        With a wrapped source, what is reported is what the source resolved
        (the resource's TTL), and that is what is returned.
        """
        source = _Source()
        report = SettingsReport(source, [VALIDATOR_KUBERNETES], VALIDATOR_KUBERNETES)
        with capturedLogs() as events:
            config = _resolved(report.resolve(SentryConfig(mode="kubernetes")))
        self.assertEqual(source.calls, 1)
        self.assertEqual(config.mtls.workload_cert_ttl, timedelta(hours=2))
        [line] = [e for e in events if e.get("workload_cert_ttl")]
        self.assertEqual(line["workload_cert_ttl"], "2h0m0s")
        self.assertEqual(line["validators"], "KUBERNETES")

    def test_failure_passes_through(self):
        """
        A source that fails makes C{resolve} fail, and nothing is reported.
        """

        class Failing:
            def resolve(self, config):
                raise ValueError("no")

        with capturedLogs() as events:
            result = _resolved(
                SettingsReport(Failing(), (), None).resolve(SentryConfig())
            )
        self.assertTrue(result.check(ValueError))
        self.assertEqual([e for e in events if e.get("validators")], [])

    def test_no_default(self):
        """
        No default validator is said in words.
        """
        fields = describe_settings(SentryConfig(), [], None)
        self.assertEqual(fields["validators"], "none")
        self.assertEqual(fields["default_validator"], "none (callers must name one)")
