"""
Tests for the PodDisruptionBudget and NetworkPolicy in C{conf/kubernetes}
and the Helm values in C{conf/helm}.
"""

import os

import yaml
from twisted.trial.unittest import SynchronousTestCase

from sentry_tx.config import SentryConfig
from sentry_tx.testing.manifests import CONF, load_manifests

HELM_VALUES = os.path.join(CONF, "helm", "values-sentry_tx.yaml")


class _Manifests(SynchronousTestCase):
    def setUp(self):
        self.documents = load_manifests()
        self.deployment = self.documents[("Deployment", "dapr-sentry")]
        self.labels = self.deployment["spec"]["template"]["metadata"]["labels"]
        self.ports = {
            port["name"]: port["containerPort"]
            for port in self.deployment["spec"]["template"]["spec"]["containers"][0][
                "ports"
            ]
        }

    def selects_deployment(self, selector):
        return all(self.labels.get(key) == value for key, value in selector.items())


class PodDisruptionBudgetTests(_Manifests):
    """
    C{poddisruptionbudget.yaml}.
    """

    def test_budget(self):
        """
        The budget selects the Deployment's pods and lets one go at a time,
        leaving replicas serving.
        """
        budget = self.documents[("PodDisruptionBudget", "dapr-sentry-budget")]
        self.assertEqual(budget["apiVersion"], "policy/v1")
        self.assertTrue(self.selects_deployment(budget["spec"]["selector"]["matchLabels"]))
        self.assertEqual(budget["spec"]["maxUnavailable"], 1)
        self.assertGreater(self.deployment["spec"]["replicas"], 1)


class NetworkPolicyTests(_Manifests):
    """
    C{networkpolicy.yaml}: only what must reach each port may.
    """

    def setUp(self):
        super().setUp()
        self.policy = self.documents[("NetworkPolicy", "dapr-sentry")]
        self.rules = {
            port["port"]: rule.get("from")
            for rule in self.policy["spec"]["ingress"]
            for port in rule["ports"]
        }

    def test_selects_sentry(self):
        """
        The policy applies to the Deployment's pods, for ingress.
        """
        self.assertTrue(self.selects_deployment(self.policy["spec"]["podSelector"]["matchLabels"]))
        self.assertEqual(self.policy["spec"]["policyTypes"], ["Ingress"])

    def test_grpc_from_every_pod(self):
        """
        The gRPC port is open to pods of every namespace (sidecars), and to
        nothing outside the cluster (no ipBlock).
        """
        self.assertEqual(self.rules[self.ports["grpc"]], [{"namespaceSelector": {}}])

    def test_metrics_from_prometheus_only(self):
        """
        The metrics port is open to one selected set of pods only.
        """
        [peer] = self.rules[self.ports["metrics"]]
        self.assertTrue(peer["namespaceSelector"]["matchLabels"])
        self.assertTrue(peer["podSelector"]["matchLabels"])

    def test_healthz_not_open_to_pods(self):
        """
        No pod may reach healthz (the kubelet probes it from the node), and
        no rule opens every port.
        """
        self.assertNotIn(self.ports["healthz"], self.rules)
        for rule in self.policy["spec"]["ingress"]:
            self.assertTrue(rule.get("ports"))

    def test_service_ports_allowed(self):
        """
        Every port the Service forwards to is one the policy lets in.
        """
        service = self.documents[("Service", "dapr-sentry")]
        for port in service["spec"]["ports"]:
            self.assertIn(port["targetPort"], self.rules)


class HelmValuesTests(SynchronousTestCase):
    """
    C{conf/helm/values-sentry_tx.yaml}, for Dapr's own chart.
    """

    def setUp(self):
        with open(HELM_VALUES, encoding="utf-8") as f:
            self.values = yaml.safe_load(f)

    def test_only_sentry_changes(self):
        """
        The values touch the dapr_sentry subchart only: nothing else of the
        installation changes.
        """
        self.assertEqual(list(self.values), ["dapr_sentry"])
        self.assertLessEqual(set(self.values["dapr_sentry"]), {"image", "resources"})

    def test_image_used_as_is(self):
        """
        The image name has a "/", so the chart's template uses it as the
        whole image reference, with a tag.
        """
        name = self.values["dapr_sentry"]["image"]["name"]
        self.assertIn("/", name)
        self.assertRegex(name.rsplit("/", 1)[1], r"^[a-z0-9._-]+:[A-Za-z0-9._-]+$")

    def test_memory_limit_above_default_request(self):
        """
        The memory limit is at least the request.
        """
        resources = self.values["dapr_sentry"]["resources"]

        def mebibytes(text):
            return int(text.rstrip("Mi"))

        self.assertGreaterEqual(
            mebibytes(resources["limits"]["memory"]),
            mebibytes(resources["requests"]["memory"]),
        )

    def test_readme_command(self):
        """
        The README gives the one helm upgrade command with this file.
        """
        from sentry_tx.testing.source_tree import PROJECT_ROOT

        with open(os.path.join(PROJECT_ROOT, "README.md"), encoding="utf-8") as f:
            readme = f.read()
        self.assertIn("-f conf/helm/values-sentry_tx.yaml", readme)
        self.assertIn("helm upgrade --install dapr dapr/dapr", readme)
        self.assertNotIn("--issuer-credentials", str(self.values))
        self.assertEqual(
            SentryConfig().issuer_credentials, "/var/run/secrets/dapr.io/credentials"
        )
