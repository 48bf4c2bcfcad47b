"""
Tests for L{sentry_tx.ca.kubernetes_renewal}: renewal steps in the Secret
C{dapr-trust-bundle}, one conditional write each, against the fake API
server, with replicas racing.
"""

from datetime import timedelta

from cryptography import x509
from twisted.internet import reactor
from twisted.internet.defer import gatherResults, inlineCallbacks
from twisted.trial.unittest import TestCase
from zope.interface.verify import verifyObject

from sentry_tx.ca.bundle import load_bundle
from sentry_tx.ca.kubernetes_renewal import KubernetesRenewalStore
from sentry_tx.ca.kubernetes_store import KubernetesTrustStore
from sentry_tx.ca.renewal import (
    ACTION_OFF,
    ACTION_RENEW,
    ACTION_SWITCH,
    ACTION_WAIT,
)
from sentry_tx.interfaces import IRenewalStore
from sentry_tx.testing.certificates import (
    FIXED_NOW,
    TEST_NAMESPACE,
    TEST_TRUST_DOMAIN,
    make_chain,
)
from sentry_tx.testing.kubernetes import kubernetes_client_for, start_fake_kubernetes
from sentry_tx.testing.renewal import (
    SHORT_CA_TTL,
    SHORT_RENEW_AT,
    SHORT_RENEWAL_SETTINGS,
    SHORT_SKEW,
    SHORT_SWITCH_AT,
)

NAME = "dapr-trust-bundle"


class KubernetesRenewalTests(TestCase):
    """
    L{KubernetesRenewalStore} writes each step with one conditional PUT.
    """

    timeout = 30

    def setUp(self):
        self.fake = start_fake_kubernetes(self)

    def _replica(self):
        client = kubernetes_client_for(self, self.fake)
        trust_store = KubernetesTrustStore(
            reactor,
            client,
            TEST_NAMESPACE,
            TEST_TRUST_DOMAIN,
            SHORT_SKEW,
            ca_ttl=SHORT_CA_TTL,
        )
        return trust_store, KubernetesRenewalStore(reactor, trust_store)

    def _secret(self):
        return self.fake.secret_data(TEST_NAMESPACE, NAME)

    def _secret_puts(self):
        return [
            request
            for request in self.fake.requests
            if request[0] == "PUT" and "/secrets/" in request[1]
        ]

    def test_interface(self):
        """It provides L{IRenewalStore}."""
        verifyObject(IRenewalStore, self._replica()[1])

    @inlineCallbacks
    def test_racing_replicas_renew_once(self):
        """
        Two replicas due at once renew once (one PUT wins), the ConfigMap follows, and
        both switch to the same issuer.
        """
        first_store, first = self._replica()
        _, second = self._replica()
        yield first_store.load_or_generate(FIXED_NOW)
        results = yield gatherResults(
            [
                first.step(SHORT_RENEW_AT, SHORT_RENEWAL_SETTINGS),
                second.step(SHORT_RENEW_AT, SHORT_RENEWAL_SETTINGS),
            ]
        )
        self.assertEqual(sorted(r.written for r in results), [False, True])
        self.assertEqual(
            sorted(r.step.action for r in results), [ACTION_RENEW, ACTION_WAIT]
        )
        secret = self._secret()
        self.assertEqual(
            sorted(secret),
            [
                "ca.crt",
                "issuer.crt",
                "issuer.key",
                "issuer.next.crt",
                "issuer.next.key",
            ],
        )
        self.assertEqual(len(x509.load_pem_x509_certificates(secret["ca.crt"])), 2)
        config_map = self.fake.get_object("configmaps", TEST_NAMESPACE, NAME)
        self.assertEqual(config_map["data"]["ca.crt"], secret["ca.crt"].decode())
        next_issuer = x509.load_pem_x509_certificates(secret["issuer.next.crt"])[0]
        results = yield gatherResults(
            [
                first.step(SHORT_SWITCH_AT, SHORT_RENEWAL_SETTINGS),
                second.step(SHORT_SWITCH_AT, SHORT_RENEWAL_SETTINGS),
            ]
        )
        self.assertEqual(sorted(r.written for r in results), [False, True])
        self.assertIn(ACTION_SWITCH, [r.step.action for r in results])
        secret = self._secret()
        self.assertEqual(sorted(secret), ["ca.crt", "issuer.crt", "issuer.key"])
        bundle = load_bundle(
            secret["ca.crt"],
            secret["issuer.crt"],
            secret["issuer.key"],
            SHORT_SWITCH_AT,
        )
        self.assertEqual(bundle.issuer, next_issuer)
        self.assertEqual(bundle.active_anchors, (bundle.anchors[1],))

    @inlineCallbacks
    def test_operator_bundle_never_written(self):
        """
        A Secret holding an operator's bundle, past its threshold, is never written.
        """
        chain = make_chain(intermediates=1)
        self.fake.add_secret(
            TEST_NAMESPACE,
            NAME,
            {
                "ca.crt": chain.anchors_pem,
                "issuer.crt": chain.issuer_chain_pem(),
                "issuer.key": chain.issuer_key_pem(),
            },
        )
        _, store = self._replica()
        late = chain.issuer.not_valid_after_utc - timedelta(days=1)
        result = yield store.step(late, SHORT_RENEWAL_SETTINGS)
        self.assertEqual(result.step.action, ACTION_OFF)
        self.assertEqual(
            [request for request in self.fake.requests if request[0] != "GET"], []
        )
