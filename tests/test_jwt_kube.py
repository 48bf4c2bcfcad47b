"""
Tests for L{sentry_tx.jwt.kubernetes_store}: the JWT key pair in the Secret
and its JWKS in the ConfigMap C{dapr-trust-bundle}, against the fake API
server, behind the X.509 store as in kubernetes mode.
"""

import json
from datetime import timedelta

from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase

from sentry_tx.ca.kubernetes_store import KubernetesTrustStore
from sentry_tx.config import SentryConfig
from sentry_tx.errors import BundleError
from sentry_tx.jwt.kubernetes_store import KubernetesJWTStore
from sentry_tx.jwt.material import generate_jwt_material
from sentry_tx.testing.certificates import FIXED_NOW, TEST_NAMESPACE, TEST_TRUST_DOMAIN
from sentry_tx.testing.jwk import rfc7638_kid
from sentry_tx.testing.kubernetes import kubernetes_client_for, start_fake_kubernetes

NAME = "dapr-trust-bundle"


class _BundleThenPair:
    """
    The bundle, then the JWT pair, loaded as the authority's C{prepare}
    loads them; C{material} is the last pair that loaded.
    """

    def __init__(self, trust_store, jwt_store):
        self._trust_store = trust_store
        self._jwt_store = jwt_store
        self.material = None

    @defer.inlineCallbacks
    def load_or_generate(self, now):
        bundle = yield self._trust_store.load_or_generate(now)
        self.material = yield self._jwt_store.load_or_generate(now)
        return bundle

    @defer.inlineCallbacks
    def load(self, now):
        bundle = yield self._trust_store.load(now)
        self.material = yield self._jwt_store.load(now)
        return bundle


class KubernetesJWTStoreTests(TestCase):
    """
    The pair is generated into the Secret once, published in the ConfigMap,
    loaded, and never overwritten.
    """

    timeout = 60

    def setUp(self):
        self.fake = start_fake_kubernetes(self)

    def store(self):
        client = kubernetes_client_for(self, self.fake)
        store = _BundleThenPair(
            KubernetesTrustStore(
                reactor,
                client,
                TEST_NAMESPACE,
                TEST_TRUST_DOMAIN,
                timedelta(minutes=15),
            ),
            KubernetesJWTStore.for_config(
                reactor, client, SentryConfig(namespace=TEST_NAMESPACE)
            ),
        )
        return store, store

    def secret(self):
        return self.fake.secret_data(TEST_NAMESPACE, NAME)

    def config_map_jwks(self):
        config_map = self.fake.get_object("configmaps", TEST_NAMESPACE, NAME)
        return (config_map.get("data") or {}).get("jwks.json")

    @defer.inlineCallbacks
    def test_generated_into_secret(self):
        """
        With no Secret, the bundle and the JWT pair are generated: the Secret
        holds jwt.key and jwks.json beside the X.509 keys, the ConfigMap
        jwks.json equals the Secret's, and the minter signs with that key.
        """
        store, minter = self.store()
        yield store.load_or_generate(FIXED_NOW)
        data = self.secret()
        self.assertEqual(
            sorted(data), ["ca.crt", "issuer.crt", "issuer.key", "jwks.json", "jwt.key"]
        )
        self.assertEqual(self.config_map_jwks(), data["jwks.json"].decode())
        self.assertEqual(minter.material.jwks_json, data["jwks.json"])
        from cryptography.hazmat.primitives import serialization

        key = serialization.load_pem_private_key(data["jwt.key"], None)
        self.assertEqual(minter.material.key_id, rfc7638_kid(key.public_key()))

    @defer.inlineCallbacks
    def test_loads_existing(self):
        """
        A Secret holding a pair is loaded as it is, nothing written to it.
        """
        key_pem, jwks_json = generate_jwt_material()
        first, _ = self.store()
        yield first.load_or_generate(FIXED_NOW)
        secret = self.fake.get_object("secrets", TEST_NAMESPACE, NAME)
        import base64

        secret["data"]["jwt.key"] = base64.b64encode(key_pem).decode()
        secret["data"]["jwks.json"] = base64.b64encode(jwks_json).decode()
        self.fake.put_object("secrets", TEST_NAMESPACE, NAME, secret)
        store, minter = self.store()
        yield store.load_or_generate(FIXED_NOW)
        self.assertEqual(self.secret()["jwt.key"], key_pem)
        self.assertEqual(minter.material.jwks_json, jwks_json)
        self.assertEqual(self.config_map_jwks(), jwks_json.decode())

    @defer.inlineCallbacks
    def test_partial_refused(self):
        """
        A Secret with jwt.key but no jwks.json is refused naming the missing
        key; nothing is written.
        """
        first, _ = self.store()
        yield first.load_or_generate(FIXED_NOW)
        secret = self.fake.get_object("secrets", TEST_NAMESPACE, NAME)
        del secret["data"]["jwks.json"]
        self.fake.put_object("secrets", TEST_NAMESPACE, NAME, secret)
        before = self.secret()
        store, _ = self.store()
        error = yield self.assertFailure(store.load_or_generate(FIXED_NOW), BundleError)
        self.assertIn("'jwks.json'", error.source)
        self.assertIn("refusing to generate a new JWT key pair", error.problem)
        self.assertEqual(self.secret(), before)

    @defer.inlineCallbacks
    def test_replicas_race(self):
        """
        Three replicas starting together end with one bundle and one JWT
        key pair: the losers of each conditional write use the winner's.
        """
        self.fake.add_secret(TEST_NAMESPACE, NAME)
        self.fake.hold("GET", "secrets", 3)
        stores = [self.store() for _ in range(3)]
        yield defer.gatherResults(
            [store.load_or_generate(FIXED_NOW) for store, _ in stores]
        )
        data = self.secret()
        kids = {minter.material.key_id for _, minter in stores}
        self.assertEqual(len(kids), 1)
        for _, minter in stores:
            self.assertEqual(minter.material.key_pem, data["jwt.key"])
        (member,) = json.loads(data["jwks.json"])["keys"]
        self.assertEqual(kids, {member["kid"]})
        self.assertEqual(self.config_map_jwks(), data["jwks.json"].decode())
        self.assertGreaterEqual(self.fake.conflicts, 2)

    @defer.inlineCallbacks
    def test_reload_rotation(self):
        """
        load() reads a new pair from the Secret; a broken one fails the
        reload and the previous pair stays in service.
        """
        store, minter = self.store()
        yield store.load_or_generate(FIXED_NOW)
        first = minter.material
        import base64

        key_pem, jwks_json = generate_jwt_material()
        secret = self.fake.get_object("secrets", TEST_NAMESPACE, NAME)
        secret["data"]["jwt.key"] = base64.b64encode(key_pem).decode()
        secret["data"]["jwks.json"] = base64.b64encode(jwks_json).decode()
        self.fake.put_object("secrets", TEST_NAMESPACE, NAME, secret)
        yield store.load(FIXED_NOW)
        self.assertEqual(minter.material.jwks_json, jwks_json)
        self.assertNotEqual(minter.material.key_id, first.key_id)
        rotated = minter.material
        secret["data"]["jwks.json"] = base64.b64encode(b'{"keys": []}').decode()
        self.fake.put_object("secrets", TEST_NAMESPACE, NAME, secret)
        yield self.assertFailure(store.load(FIXED_NOW), BundleError)
        self.assertIs(minter.material, rotated)
