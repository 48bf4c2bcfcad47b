"""
Tests for L{sentry_tx.modes}: what each mode adds to the service tree.
"""

import os

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from sentry_tx.config import MODE_KUBERNETES, SentryConfig
from sentry_tx.identity.caller import VALIDATOR_INSECURE, VALIDATOR_KUBERNETES
from sentry_tx.interfaces import IConfigurationSource, IIdentityValidator, ITrustStore
from sentry_tx.kube.client import KubernetesClientService
from sentry_tx.modes import build_kubernetes_parts, build_validators
from sentry_tx.testing.certificates import TEST_NAMESPACE
from sentry_tx.testing.clocks import ImmediateReactor


class BuildKubernetesPartsTests(SynchronousTestCase):
    """
    L{build_kubernetes_parts} wires kubernetes mode without touching
    anything.
    """

    def _parts(self, **config):
        config.setdefault("kubeconfig", "/nonexistent/kubeconfig")
        config.setdefault("issuer_credentials", "/nonexistent/credentials")
        return build_kubernetes_parts(
            SentryConfig(mode=MODE_KUBERNETES, namespace=TEST_NAMESPACE, **config),
            Clock(),
            {},
        )

    def test_builds_without_reading(self):
        """
        A kubeconfig that does not exist is not an error at build time (it is
        read when the service starts, after twistd forks).
        """
        parts = self._parts()
        self.assertIsNone(parts.client._connection)
        self.assertIsNone(parts.client._pool)

    def test_validators(self):
        """
        KUBERNETES is the only validator and the default; INSECURE is not
        enabled.
        """
        parts = self._parts()
        self.assertEqual(list(parts.validators), [VALIDATOR_KUBERNETES])
        self.assertNotIn(VALIDATOR_INSECURE, parts.validators)
        self.assertEqual(parts.default_validator, VALIDATOR_KUBERNETES)
        verifyObject(IIdentityValidator, parts.validators[VALIDATOR_KUBERNETES])

    def test_validator_on_grpc_loop(self):
        """
        The KUBERNETES validator runs on the gRPC loop (the servicer awaits
        it there, never through the reactor).
        """
        parts = self._parts()
        validator = parts.validators[VALIDATOR_KUBERNETES]
        self.assertTrue(validator.runs_on_loop)
        self.assertFalse(validator.needs_reactor)

    def test_interfaces(self):
        """
        The trust store and configuration source provide their interfaces.
        """
        parts = self._parts()
        verifyObject(ITrustStore, parts.trust_store)
        verifyObject(IConfigurationSource, parts.configuration_source)
        self.assertEqual(parts.trust_store.watch_directories, ())

    def test_services_when_watching(self):
        """
        Its service runs the client's service first and the informers after
        it (so they stop before the client closes), and the validator is a
        healthz source, not ready before its caches sync.
        """
        from sentry_tx.kube.informer import InformerService

        parts = self._parts()
        children = list(parts.service)
        self.assertIsInstance(children[0], KubernetesClientService)
        self.assertIsInstance(children[1], InformerService)
        self.assertEqual(len(children[1].informers), 2)
        validator = parts.validators[VALIDATOR_KUBERNETES]
        self.assertEqual(parts.readiness, (validator,))
        self.assertFalse(validator.ready)

    def test_healthz_waits_for_caches(self):
        """
        The composition root gives /healthz the validator as a readiness
        source next to the authority: not ready until its caches have
        synced.  With serving copies too, since the twistd process serves
        (and so watches) as well.  The last source is the JWKS hook, ready
        while the Configuration names no jwks validator.
        """
        from sentry_tx.service import WebService
        from sentry_tx.tap import build_service

        def healthz_sources(**fields):
            config = SentryConfig(
                mode=MODE_KUBERNETES,
                namespace=TEST_NAMESPACE,
                kubeconfig="/nonexistent/kubeconfig",
                issuer_credentials="/nonexistent/credentials",
                **fields,
            )
            root = build_service(config, Clock())
            (web,) = [
                service
                for service in root
                if isinstance(service, WebService) and service.label == "healthz"
            ]
            return web.args[1].resource.children[b"healthz"]._sources

        for workers in (1, 2):
            *_, validator, jwks = healthz_sources(workers=workers)
            self.assertEqual(validator.name, VALIDATOR_KUBERNETES)
            self.assertFalse(validator.ready)
            for informer in validator._informers:
                informer.ready = True
            self.assertTrue(validator.ready)
            self.assertTrue(jwks.ready)

    def test_mounted_secret_watched(self):
        """
        When C{--issuer-credentials} exists (the Secret mounted in the pod),
        the trust store asks for it to be watched: the kubelet's update there
        means the Secret changed.
        """
        directory = self.mktemp()
        os.makedirs(directory)
        parts = self._parts(issuer_credentials=directory)
        self.assertEqual(parts.trust_store.watch_directories, (directory,))

    def test_nothing_mounted(self):
        """
        When C{--issuer-credentials} does not exist, nothing is watched.
        """
        self.assertEqual(self._parts().trust_store.watch_directories, ())

    def test_audiences(self):
        """
        C{--token-audience} replaces the default audiences.
        """
        default = self._parts().validators[VALIDATOR_KUBERNETES]
        self.assertEqual(
            default.audiences,
            ("dapr.io/sentry", "spiffe://localhost/ns/dapr-system/dapr-sentry"),
        )
        custom = self._parts(token_audiences=("a", "b")).validators[
            VALIDATOR_KUBERNETES
        ]
        self.assertEqual(custom.audiences, ("a", "b"))

    def test_secret_keys_from_flags(self):
        """
        The Secret keys are the base names of the issuer file flags.
        """
        parts = self._parts(
            issuer_ca_filename="/etc/x/root.pem",
            issuer_certificate_filename="chain.pem",
            issuer_key_filename="key.pem",
        )
        self.assertEqual(parts.trust_store._keys, ("root.pem", "chain.pem", "key.pem"))

    def test_service_closes_client(self):
        """
        Stopping the client service closes the client.
        """
        parts = self._parts()
        parts.service.startService()
        self.successResultOf(parts.service.stopService())
        self.assertTrue(parts.client._closed)


class BuildValidatorsTests(SynchronousTestCase):
    """
    L{build_validators}.
    """

    def test_standalone(self):
        """
        Standalone mode enables INSECURE, the default.
        """
        chosen = build_validators(SentryConfig(), ImmediateReactor(), {})
        self.assertEqual(list(chosen.validators), [VALIDATOR_INSECURE])
        self.assertEqual(chosen.default_validator, VALIDATOR_INSECURE)
        self.assertIsNone(chosen.service)

    def test_kubernetes_with_jwks(self):
        """
        In kubernetes mode a (worker's, resolved) config naming jwks adds
        JWKS beside KUBERNETES, which stays the default; the set's service
        runs both the client's service and the validator.
        """
        import json

        from sentry_tx.config import MTLSConfig, TokenValidatorConfig
        from sentry_tx.identity.caller import VALIDATOR_JWKS
        from sentry_tx.testing.jwk import jwk_member, rsa_key

        source = json.dumps({"keys": [jwk_member(rsa_key(), kid="k1")]})
        config = SentryConfig(
            mode=MODE_KUBERNETES,
            mtls=MTLSConfig(
                token_validators=(TokenValidatorConfig("jwks", (("source", source),)),)
            ),
        )
        chosen = build_validators(config, ImmediateReactor(), {})
        self.assertEqual(
            sorted(chosen.validators), [VALIDATOR_KUBERNETES, VALIDATOR_JWKS]
        )
        self.assertEqual(chosen.default_validator, VALIDATOR_KUBERNETES)
        self.assertIn(chosen.validators[VALIDATOR_JWKS], list(chosen.service))

    def test_kubernetes(self):
        """
        Kubernetes mode enables KUBERNETES, the default, with a service
        that closes its client, and opens nothing.
        """
        chosen = build_validators(
            SentryConfig(mode=MODE_KUBERNETES), ImmediateReactor(), {}
        )
        self.assertEqual(list(chosen.validators), [VALIDATOR_KUBERNETES])
        self.assertEqual(chosen.default_validator, VALIDATOR_KUBERNETES)
        self.assertIsNotNone(chosen.service)
