"""
Tests for L{sentry_tx.ca.kubernetes_store}: the trust bundle in the Secret
and ConfigMap C{dapr-trust-bundle}, against the fake API server.
"""

from datetime import timedelta

from twisted.internet import defer, reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from sentry_tx.ca.bundle import load_bundle
from sentry_tx.ca.kubernetes_store import KubernetesTrustStore
from sentry_tx.config import MTLSConfig, SentryConfig
from sentry_tx.errors import BundleError, ConfigError
from sentry_tx.interfaces import ITrustStore
from sentry_tx.testing.certificates import (
    FIXED_NOW,
    TEST_NAMESPACE,
    TEST_TRUST_DOMAIN,
    make_chain,
)
from sentry_tx.testing.kubernetes import kubernetes_client_for, start_fake_kubernetes

NAME = "dapr-trust-bundle"
SKEW = timedelta(minutes=15)


class KubernetesTrustStoreTests(TestCase):
    """
    L{KubernetesTrustStore} loads, generates and publishes the bundle.
    """

    timeout = 30

    def setUp(self):
        self.fake = start_fake_kubernetes(self)

    def _store(self, **options):
        client = kubernetes_client_for(self, self.fake)
        return KubernetesTrustStore(
            reactor, client, TEST_NAMESPACE, TEST_TRUST_DOMAIN, SKEW, **options
        )

    def _secret(self):
        return self.fake.secret_data(TEST_NAMESPACE, NAME)

    def _config_map_anchors(self):
        config_map = self.fake.get_object("configmaps", TEST_NAMESPACE, NAME)
        return (config_map.get("data") or {}).get("ca.crt")

    def _writes(self):
        return [request for request in self.fake.requests if request[0] != "GET"]

    def test_interface(self):
        """
        It provides L{ITrustStore}, with no directories to watch.
        """
        store = self._store()
        verifyObject(ITrustStore, store)
        self.assertEqual(store.watch_directories, ())

    @defer.inlineCallbacks
    def test_generates_when_secret_missing(self):
        """
        Without a Secret, a bundle is generated and the Secret and ConfigMap
        created; the ConfigMap's ca.crt is the Secret's.
        """
        bundle = yield self._store().load_or_generate(FIXED_NOW)
        data = self._secret()
        self.assertEqual(sorted(data), ["ca.crt", "issuer.crt", "issuer.key"])
        self.assertEqual(data["ca.crt"], bundle.anchors_pem)
        self.assertEqual(self._config_map_anchors(), data["ca.crt"].decode())
        reloaded = load_bundle(
            data["ca.crt"], data["issuer.crt"], data["issuer.key"], FIXED_NOW
        )
        self.assertEqual(reloaded.issuer, bundle.issuer)
        self.assertEqual(
            bundle.anchors[0].subject.rfc4514_string(), f"O={TEST_TRUST_DOMAIN}"
        )
        self.assertEqual([method for method, _ in self._writes()], ["POST", "POST"])

    @defer.inlineCallbacks
    def test_generates_into_empty_secret(self):
        """
        A Secret holding none of the three keys is updated with a generated
        bundle (a conditional PUT); its other keys are kept.
        """
        self.fake.add_secret(TEST_NAMESPACE, NAME, {"other": b"kept"})
        self.fake.add_config_map(TEST_NAMESPACE, NAME)
        bundle = yield self._store().load_or_generate(FIXED_NOW)
        data = self._secret()
        self.assertEqual(data["other"], b"kept")
        self.assertEqual(data["ca.crt"], bundle.anchors_pem)
        self.assertEqual(self._config_map_anchors(), bundle.anchors_pem.decode())
        self.assertEqual([method for method, _ in self._writes()], ["PUT", "PUT"])

    @defer.inlineCallbacks
    def test_empty_values_count_as_absent(self):
        """
        Keys whose values are empty hold no credentials: a bundle is
        generated in their place.
        """
        self.fake.add_secret(
            TEST_NAMESPACE, NAME, {"ca.crt": b"", "issuer.crt": b"", "issuer.key": b""}
        )
        bundle = yield self._store().load_or_generate(FIXED_NOW)
        self.assertEqual(self._secret()["ca.crt"], bundle.anchors_pem)

    @defer.inlineCallbacks
    def test_loads_existing_bundle(self):
        """
        A Secret holding a valid bundle is loaded, not changed, and its ca.crt
        is copied byte for byte into a stale ConfigMap.
        """
        chain = make_chain()
        anchors = b"# the operator's roots\n" + chain.anchors_pem
        self.fake.add_secret(
            TEST_NAMESPACE,
            NAME,
            {
                "ca.crt": anchors,
                "issuer.crt": chain.issuer_chain_pem(),
                "issuer.key": chain.issuer_key_pem(),
            },
        )
        self.fake.add_config_map(TEST_NAMESPACE, NAME, {"ca.crt": "old", "x": "y"})
        before = self.fake.get_object("secrets", TEST_NAMESPACE, NAME)
        bundle = yield self._store().load_or_generate(FIXED_NOW)
        self.assertEqual(bundle.issuer, chain.issuer)
        self.assertEqual(self.fake.get_object("secrets", TEST_NAMESPACE, NAME), before)
        self.assertEqual(self._config_map_anchors(), anchors.decode())
        config_map = self.fake.get_object("configmaps", TEST_NAMESPACE, NAME)
        self.assertEqual(config_map["data"]["x"], "y")

    @defer.inlineCallbacks
    def test_config_map_already_equal(self):
        """
        A ConfigMap already equal to the Secret is not written.
        """
        chain = make_chain()
        self.fake.add_secret(
            TEST_NAMESPACE,
            NAME,
            {
                "ca.crt": chain.anchors_pem,
                "issuer.crt": chain.issuer_chain_pem(),
                "issuer.key": chain.issuer_key_pem(),
            },
        )
        self.fake.add_config_map(
            TEST_NAMESPACE, NAME, {"ca.crt": chain.anchors_pem.decode()}
        )
        yield self._store().load_or_generate(FIXED_NOW)
        self.assertEqual(self._writes(), [])

    @defer.inlineCallbacks
    def test_partial_secret_refused(self):
        """
        A Secret holding some but not all keys is refused, naming the missing
        key, and left untouched.
        """
        chain = make_chain()
        self.fake.add_secret(TEST_NAMESPACE, NAME, {"ca.crt": chain.anchors_pem})
        before = self.fake.get_object("secrets", TEST_NAMESPACE, NAME)
        error = yield self.assertFailure(
            self._store().load_or_generate(FIXED_NOW), BundleError
        )
        self.assertIn(f"Secret {TEST_NAMESPACE}/{NAME} key 'issuer.crt'", error.source)
        self.assertIn(f"Secret {TEST_NAMESPACE}/{NAME} key 'issuer.key'", error.source)
        self.assertIn("missing, while ca.crt is present", error.problem)
        self.assertEqual(self.fake.get_object("secrets", TEST_NAMESPACE, NAME), before)
        self.assertEqual(self._writes(), [])

    @defer.inlineCallbacks
    def test_invalid_secret_refused(self):
        """
        A Secret whose parts do not verify is refused, naming the key at
        fault, and never overwritten.
        """
        chain, other = make_chain(), make_chain()
        self.fake.add_secret(
            TEST_NAMESPACE,
            NAME,
            {
                "ca.crt": chain.anchors_pem,
                "issuer.crt": chain.issuer_chain_pem(),
                "issuer.key": other.issuer_key_pem(),
            },
        )
        error = yield self.assertFailure(
            self._store().load_or_generate(FIXED_NOW), BundleError
        )
        self.assertEqual(
            error.source, f"Secret {TEST_NAMESPACE}/{NAME} key 'issuer.key'"
        )
        self.assertIn("does not belong to the issuer certificate", error.problem)
        self.assertNotIn("PRIVATE KEY", str(error))
        self.assertEqual(self._writes(), [])

    @defer.inlineCallbacks
    def test_bad_base64_refused(self):
        """
        A Secret value that is not base64 is refused, naming the key.
        """
        self.fake.put_object(
            "secrets", TEST_NAMESPACE, NAME, {"data": {"issuer.crt": "%%%"}}
        )
        error = yield self.assertFailure(
            self._store().load_or_generate(FIXED_NOW), BundleError
        )
        self.assertEqual(
            error.source, f"Secret {TEST_NAMESPACE}/{NAME} key 'issuer.crt'"
        )
        self.assertEqual(error.problem, "is not valid base64")

    @defer.inlineCallbacks
    def test_keys_from_flags(self):
        """
        The configured key names are the ones read and written.
        """
        store = self._store(keys=("root.pem", "chain.pem", "key.pem"))
        bundle = yield store.load_or_generate(FIXED_NOW)
        data = self._secret()
        self.assertEqual(sorted(data), ["chain.pem", "key.pem", "root.pem"])
        self.assertEqual(data["root.pem"], bundle.anchors_pem)
        self.assertEqual(self._config_map_anchors(), bundle.anchors_pem.decode())

    @defer.inlineCallbacks
    def test_use_config_sets_skew(self):
        """
        The clock skew of the resolved Configuration is used for a generated
        bundle's NotBefore.
        """
        store = self._store()
        store.use_config(
            SentryConfig(mtls=MTLSConfig(allowed_clock_skew=timedelta(minutes=1)))
        )
        bundle = yield store.load_or_generate(FIXED_NOW)
        self.assertEqual(
            bundle.issuer.not_valid_before_utc, FIXED_NOW - timedelta(minutes=1)
        )

    @defer.inlineCallbacks
    def test_replicas_race_on_empty_secret(self):
        """
        Three replicas that find the same empty Secret end with one bundle:
        one update wins, the others get 409 and use it.
        """
        self.fake.add_secret(TEST_NAMESPACE, NAME)
        self.fake.hold("GET", "secrets", 3)
        stores = [self._store() for _ in range(3)]
        bundles = yield defer.gatherResults(
            [store.load_or_generate(FIXED_NOW) for store in stores]
        )
        self._assert_one_bundle(bundles)
        self.assertEqual(
            [method for method, path in self.fake.requests if "secrets" in path].count(
                "PUT"
            ),
            3,
        )

    @defer.inlineCallbacks
    def test_replicas_race_on_missing_secret(self):
        """
        Three replicas that find no Secret end with one bundle: one creation
        wins, the others get 409 AlreadyExists and use it.
        """
        self.fake.hold("GET", "secrets", 3)
        stores = [self._store() for _ in range(3)]
        bundles = yield defer.gatherResults(
            [store.load_or_generate(FIXED_NOW) for store in stores]
        )
        self._assert_one_bundle(bundles)

    def _assert_one_bundle(self, bundles):
        data = self._secret()
        for bundle in bundles:
            self.assertEqual(bundle.anchors_pem, data["ca.crt"])
            self.assertEqual(bundle.issuer_chain_pem, data["issuer.crt"])
        self.assertEqual(len({bundle.issuer.serial_number for bundle in bundles}), 1)
        self.assertEqual(self._config_map_anchors(), data["ca.crt"].decode())
        # Two Secret writes and (at least) the racing ConfigMap writes lost.
        self.assertGreaterEqual(self.fake.conflicts, 2)

    @defer.inlineCallbacks
    def test_invalid_bundle_written_by_another_replica(self):
        """
        After losing the race, what the winner wrote is verified: a broken
        bundle is refused, not overwritten.
        """
        self.fake.add_secret(TEST_NAMESPACE, NAME)
        store = self._store()

        def another_writer(method, plural, namespace, name):
            # Another writer stores a broken bundle just before our update.
            self.fake.before_write = None
            self.fake.add_secret(
                TEST_NAMESPACE,
                NAME,
                {"ca.crt": b"junk", "issuer.crt": b"junk", "issuer.key": b"junk"},
            )

        self.fake.before_write = another_writer
        error = yield self.assertFailure(store.load_or_generate(FIXED_NOW), BundleError)
        self.assertEqual(error.source, f"Secret {TEST_NAMESPACE}/{NAME} key 'ca.crt'")
        self.assertEqual(self._secret()["ca.crt"], b"junk")

    @defer.inlineCallbacks
    def test_config_map_conflict_retried(self):
        """
        A ConfigMap update that loses a race is retried on the fresh object.
        """
        self.fake.add_config_map(TEST_NAMESPACE, NAME, {"ca.crt": "old"})

        def another_writer(method, plural, namespace, name):
            if plural == "configmaps":
                self.fake.before_write = None
                self.fake.add_config_map(TEST_NAMESPACE, NAME, {"ca.crt": "other"})

        self.fake.before_write = another_writer
        bundle = yield self._store().load_or_generate(FIXED_NOW)
        self.assertEqual(self._config_map_anchors(), bundle.anchors_pem.decode())
        self.assertEqual(self.fake.conflicts, 1)

    @defer.inlineCallbacks
    def test_secret_unreadable(self):
        """
        An API refusal reading the Secret is a L{BundleError} with its status
        and reason.
        """
        self.fake.forbidden.add(("GET", "secrets"))
        error = yield self.assertFailure(
            self._store().load_or_generate(FIXED_NOW), BundleError
        )
        self.assertEqual(error.source, f"Secret {TEST_NAMESPACE}/{NAME}")
        self.assertIn("HTTP 403 Forbidden", error.problem)

    @defer.inlineCallbacks
    def test_secret_not_writable(self):
        """
        A refused creation is a L{BundleError}; nothing is published.
        """
        self.fake.forbidden.add(("POST", "secrets"))
        error = yield self.assertFailure(
            self._store().load_or_generate(FIXED_NOW), BundleError
        )
        self.assertIn("cannot store the generated trust bundle", error.problem)
        self.assertIsNone(self.fake.get_object("configmaps", TEST_NAMESPACE, NAME))

    @defer.inlineCallbacks
    def test_config_map_not_writable(self):
        """
        Anchors that cannot be published stop the start, naming the
        ConfigMap.
        """
        self.fake.forbidden.add(("POST", "configmaps"))
        error = yield self.assertFailure(
            self._store().load_or_generate(FIXED_NOW), BundleError
        )
        self.assertEqual(error.source, f"ConfigMap {TEST_NAMESPACE}/{NAME}")
        self.assertIn("HTTP 403 Forbidden", error.problem)

    @defer.inlineCallbacks
    def test_api_unreachable(self):
        """
        An unreachable API server is a L{BundleError}.
        """
        store = self._store()
        yield self.fake.stop()
        error = yield self.assertFailure(store.load_or_generate(FIXED_NOW), BundleError)
        self.assertIn("cannot be read", error.problem)

    @defer.inlineCallbacks
    def test_load_never_writes(self):
        """
        C{load} reads and verifies the Secret, and writes nothing.
        """
        chain = make_chain()
        self.fake.add_secret(
            TEST_NAMESPACE,
            NAME,
            {
                "ca.crt": chain.anchors_pem,
                "issuer.crt": chain.issuer_chain_pem(),
                "issuer.key": chain.issuer_key_pem(),
            },
        )
        bundle = yield self._store().load(FIXED_NOW)
        self.assertEqual(bundle.issuer, chain.issuer)
        self.assertEqual(self._writes(), [])

    @defer.inlineCallbacks
    def test_load_missing_secret(self):
        """
        C{load} of a missing Secret fails and generates nothing.
        """
        error = yield self.assertFailure(self._store().load(FIXED_NOW), BundleError)
        self.assertEqual(error.problem, "does not exist")
        self.assertEqual(self._writes(), [])


class KubernetesTrustStoreArgumentTests(SynchronousTestCase):
    """
    L{KubernetesTrustStore} checks its arguments when built.
    """

    def test_bad_key_name(self):
        """
        A key name a Secret cannot hold is a L{ConfigError}.
        """
        error = self.assertRaises(
            ConfigError,
            KubernetesTrustStore,
            None,
            None,
            TEST_NAMESPACE,
            TEST_TRUST_DOMAIN,
            SKEW,
            keys=("ca crt", "issuer.crt", "issuer.key"),
        )
        self.assertIn("cannot be a key of the Secret", str(error))

    def test_duplicate_keys(self):
        """
        Two parts under the same key are a L{ConfigError}.
        """
        self.assertRaises(
            ConfigError,
            KubernetesTrustStore,
            None,
            None,
            TEST_NAMESPACE,
            TEST_TRUST_DOMAIN,
            SKEW,
            keys=("ca.crt", "ca.crt", "issuer.key"),
        )

    def test_unknown_key_type(self):
        """
        An unknown key type is a L{ValueError}.
        """
        self.assertRaises(
            ValueError,
            KubernetesTrustStore,
            None,
            None,
            TEST_NAMESPACE,
            TEST_TRUST_DOMAIN,
            SKEW,
            key_type="dsa",
        )


class MountedSecretRotationTests(TestCase):
    """
    In kubernetes mode, the kubelet's update of the mounted Secret makes the
    watcher reload the bundle from the API server, without a restart.
    """

    timeout = 30

    @defer.inlineCallbacks
    def test_rotation_through_mounted_secret(self):
        """
        After the Secret is changed and its mount directory sees the
        kubelet's C{..data} swap, one reload puts the new issuer in service.
        """
        from twisted.internet import inotify
        from twisted.internet.task import Clock

        from sentry_tx.identity.caller import VALIDATOR_KUBERNETES
        from sentry_tx.metrics import SentryMetrics
        from sentry_tx.server.service import CertificateAuthorityService
        from sentry_tx.testing.authority import FakeValidator
        from sentry_tx.testing.inotify import FakeINotifyFactory
        from sentry_tx.watcher import ISSUER_CHANGE_WINDOW_SECONDS, IssuerWatcher

        fake = start_fake_kubernetes(self)
        first, second = make_chain(), make_chain()

        def store_secret(chain):
            fake.add_secret(
                TEST_NAMESPACE,
                NAME,
                {
                    "ca.crt": chain.anchors_pem,
                    "issuer.crt": chain.issuer_chain_pem(),
                    "issuer.key": chain.issuer_key_pem(),
                },
            )

        store_secret(first)
        fake.add_config_map(
            TEST_NAMESPACE, NAME, {"ca.crt": first.anchors_pem.decode()}
        )
        mount = self.mktemp()
        store = KubernetesTrustStore(
            reactor,
            kubernetes_client_for(self, fake),
            TEST_NAMESPACE,
            TEST_TRUST_DOMAIN,
            SKEW,
            watch_directories=(mount,),
        )
        config = SentryConfig(
            listen_address="127.0.0.1", port=0, namespace=TEST_NAMESPACE,
            trust_domain=TEST_TRUST_DOMAIN, mtls=MTLSConfig(),
        )
        metrics = SentryMetrics()
        ca = CertificateAuthorityService(
            config, reactor, store, {VALIDATOR_KUBERNETES: FakeValidator(2)},
            VALIDATOR_KUBERNETES, metrics,
        )
        yield ca.start(config)
        self.addCleanup(ca.stop)
        self.assertEqual(ca.bundle.issuer, first.issuer)

        restarts = []
        restart = ca.restart
        ca.restart = lambda config: restarts.append(restart(config)) or restarts[-1]
        clock = Clock()
        notifiers = FakeINotifyFactory()
        watcher = IssuerWatcher(
            ca, store.watch_directories, clock, metrics, inotify_factory=notifiers
        )
        watcher.startService()
        self.addCleanup(watcher.stopService)

        store_secret(second)
        notifiers.current.event(mount, inotify.IN_MOVED_TO, "..data")
        clock.advance(ISSUER_CHANGE_WINDOW_SECONDS)
        self.assertEqual(len(restarts), 1)
        yield restarts[0]
        self.assertEqual(ca.bundle.issuer, second.issuer)
        self.assertEqual(metrics.issuercert_changed._value.get(), 1)
