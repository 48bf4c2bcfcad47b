"""
Tests for L{sentry_tx.kube.configuration}: Dapr's Configuration resource
read through the Kubernetes API.
"""

from twisted.internet import defer
from twisted.trial.unittest import TestCase
from zope.interface.verify import verifyObject

from sentry_tx.config import MODE_KUBERNETES, SentryConfig
from sentry_tx.errors import ConfigError
from sentry_tx.interfaces import IConfigurationSource
from sentry_tx.kube.configuration import KubernetesConfigurationSource
from sentry_tx.kube.paths import configuration_path
from sentry_tx.testing.certificates import TEST_NAMESPACE
from sentry_tx.testing.kubernetes import kubernetes_client_for, start_fake_kubernetes


class ConfigurationSourceTests(TestCase):
    """
    L{KubernetesConfigurationSource} reads the Configuration resource.
    """

    timeout = 30

    def setUp(self):
        self.fake = start_fake_kubernetes(self)
        self.client = kubernetes_client_for(self, self.fake)
        self.resolved = []
        self.source = KubernetesConfigurationSource(
            self.client, on_resolved=(self.resolved.append,)
        )
        self.config = SentryConfig(mode=MODE_KUBERNETES, namespace=TEST_NAMESPACE)

    def test_interface(self):
        """
        It provides L{IConfigurationSource}.
        """
        verifyObject(IConfigurationSource, self.source)

    @defer.inlineCallbacks
    def test_present(self):
        """
        The resource's spec.mtls completes the config, and listeners see it.
        """
        self.fake.add_configuration(
            TEST_NAMESPACE,
            "daprsystem",
            {"mtls": {"workloadCertTTL": "1h", "allowedClockSkew": "5m"}},
        )
        config = yield self.source.resolve(self.config)
        self.assertEqual(config.mtls.workload_cert_ttl.total_seconds(), 3600)
        self.assertEqual(config.mtls.allowed_clock_skew.total_seconds(), 300)
        self.assertEqual(config.config, "daprsystem")
        self.assertEqual(self.resolved, [config])
        self.assertIn(
            ("GET", configuration_path(TEST_NAMESPACE, "daprsystem")),
            self.fake.requests,
        )

    @defer.inlineCallbacks
    def test_missing(self):
        """
        A missing resource is a L{ConfigError} naming it.
        """
        error = yield self.assertFailure(self.source.resolve(self.config), ConfigError)
        self.assertEqual(error.field, "--config")
        self.assertIn("Configuration dapr-system/daprsystem not found", str(error))
        self.assertEqual(self.resolved, [])

    @defer.inlineCallbacks
    def test_invalid_field(self):
        """
        A wrong field is a L{ConfigError} naming the field and the resource.
        """
        self.fake.add_configuration(
            TEST_NAMESPACE, "daprsystem", {"mtls": {"workloadCertTTL": "0s"}}
        )
        error = yield self.assertFailure(self.source.resolve(self.config), ConfigError)
        self.assertEqual(error.field, "spec.mtls.workloadCertTTL")
        self.assertIn("Configuration dapr-system/daprsystem", str(error))

    @defer.inlineCallbacks
    def test_api_error(self):
        """
        An API refusal is a L{ConfigError} carrying the status and reason.
        """
        self.fake.forbidden.add(("GET", "configurations"))
        error = yield self.assertFailure(self.source.resolve(self.config), ConfigError)
        self.assertIn("HTTP 403 Forbidden", str(error))

    @defer.inlineCallbacks
    def test_unreachable(self):
        """
        An unreachable API server is a L{ConfigError}.
        """
        yield self.fake.stop()
        error = yield self.assertFailure(self.source.resolve(self.config), ConfigError)
        self.assertIn("cannot read Configuration dapr-system/daprsystem", str(error))


class ConfigurationSourceWarningTests(TestCase):
    """
    L{KubernetesConfigurationSource} warns about what it ignores in the
    resource.
    """

    timeout = 30

    @defer.inlineCallbacks
    def test_unknown_and_missing_mtls(self):
        """
        An unknown key under spec.mtls is warned about by name, with the
        resource named; a resource without spec.mtls is warned about too.
        """
        from dataclasses import replace

        from twisted.logger import LogLevel, capturedLogs

        fake = start_fake_kubernetes(self)
        source = KubernetesConfigurationSource(kubernetes_client_for(self, fake))
        config = SentryConfig(mode=MODE_KUBERNETES, namespace=TEST_NAMESPACE)
        fake.add_configuration(
            TEST_NAMESPACE, "misspelt", {"mtls": {"workloadCertTTl": "1h"}}
        )
        fake.add_configuration(TEST_NAMESPACE, "bare", {})
        with capturedLogs() as events:
            resolved = yield source.resolve(replace(config, config="misspelt"))
            yield source.resolve(replace(config, config="bare"))
        warnings = [
            e["configuration_warning"]
            for e in events
            if e["log_level"] == LogLevel.warn
        ]
        self.assertEqual(len(warnings), 2)
        self.assertIn("spec.mtls.workloadCertTTl: unknown key", warnings[0])
        self.assertIn(f"Configuration {TEST_NAMESPACE}/misspelt", warnings[0])
        self.assertIn("has no spec.mtls", warnings[1])
        self.assertEqual(resolved.mtls.workload_cert_ttl.total_seconds(), 24 * 3600)
