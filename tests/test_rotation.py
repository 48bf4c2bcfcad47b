"""
Issuer rotation end to end: a real L{CertificateAuthorityService} on
127.0.0.1 over a L{FileTrustStore} in a temporary directory, watched by a
real L{IssuerWatcher} with Twisted's L{INotify}, called by real gRPC clients.
"""

import os
import threading
import time
from datetime import timedelta

from cryptography import x509
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from sentry_tx._proto import sentry_pb2
from sentry_tx.ca.store import FileTrustStore
from sentry_tx.config import SentryConfig
from sentry_tx.errors import BundleError
from sentry_tx.identity.caller import VALIDATOR_INSECURE
from sentry_tx.identity.insecure import InsecureValidator
from sentry_tx.metrics import SentryMetrics
from sentry_tx.server.service import CertificateAuthorityService
from sentry_tx.testing.authority import ObservedAuthority
from sentry_tx.testing.certificates import TEST_TRUST_DOMAIN, make_chain, make_csr
from sentry_tx.testing.clocks import SchedulingClock, utc_now
from sentry_tx.testing.grpc_client import GrpcTestClient
from sentry_tx.testing.rotation import reissue_chain, replace_bundle_files
from sentry_tx.watcher import ISSUER_CHANGE_WINDOW_SECONDS, IssuerWatcher

CLIENT_THREADS = 4

MAX_CALLS_PER_CLIENT = 20000
"""
A client stops after this many calls whatever happens.
"""

CLIENT_DEADLINE_SECONDS = 20.0
"""
A client stops this long after it started whatever happens.
"""

NEW_ISSUER_CALLS_PER_CLIENT = 20
"""
A client stops once it has had this many leaves from the new issuer.
"""

NEW_ISSUER_DEADLINE_SECONDS = 3.0
"""
The new issuer must sign within this long of the swap.
"""

SIGN_TIMEOUT_SECONDS = 5.0

GARBAGE_CERTIFICATE_PEM = (
    b"-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n"
)


def _key_identifier(response):
    """
    The authority key identifier of the leaf in a SignCertificate response.
    """
    leaf = x509.load_pem_x509_certificates(response.workload_certificate)[0]
    return leaf.extensions.get_extension_for_class(
        x509.AuthorityKeyIdentifier
    ).value.key_identifier


def _sign_request(csr):
    return sentry_pb2.SignCertificateRequest(
        id="rotation",
        namespace="default",
        certificate_signing_request=csr,
        token_validator=sentry_pb2.SignCertificateRequest.INSECURE,
    )


class _Load:
    """
    Several client threads signing until each has had enough leaves from
    the new issuer, or a bound is reached.

    @ivar running: fires (on the reactor) once every client has had a leaf.
    @ivar results: per client, C{(started, finished, key identifier)} of
        each successful call, in C{time.monotonic} seconds.
    @ivar errors: per client, the exceptions its calls raised.
    """

    def __init__(self, clients, new_key_identifier):
        self._clients = clients
        self._new_key_identifier = new_key_identifier
        self._lock = threading.Lock()
        self._started = 0
        self.running = Deferred()
        self.results = [[] for _ in clients]
        self.errors = [[] for _ in clients]

    def run(self):
        """
        Start every client in a thread of the reactor's pool.

        @return: a Deferred that fires when all have stopped.
        """
        return gatherResults(
            [
                deferToThread(self._sign_until_done, index, client)
                for index, client in enumerate(self._clients)
            ]
        )

    def _sign_until_done(self, index, client):
        _, csr = make_csr()
        request = _sign_request(csr)
        results, errors = self.results[index], self.errors[index]
        deadline = time.monotonic() + CLIENT_DEADLINE_SECONDS
        new_leaves = 0
        for _ in range(MAX_CALLS_PER_CLIENT):
            if new_leaves >= NEW_ISSUER_CALLS_PER_CLIENT or time.monotonic() > deadline:
                return
            started = time.monotonic()
            try:
                response = client.sign(request, timeout=SIGN_TIMEOUT_SECONDS)
            except Exception as e:
                errors.append(e)
                continue
            key_identifier = _key_identifier(response)
            results.append((started, time.monotonic(), key_identifier))
            if key_identifier == self._new_key_identifier:
                new_leaves += 1
            if len(results) == 1:
                with self._lock:
                    self._started += 1
                    if self._started == len(self._clients):
                        reactor.callFromThread(self.running.callback, None)


class RotationTests(TestCase):
    """
    Replacing the bundle files under a serving CA.
    """

    timeout = 60

    @inlineCallbacks
    def setUp(self):
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        now = utc_now()
        self.old = make_chain(
            not_before=now - timedelta(days=1), not_after=now + timedelta(days=90)
        )
        self.new = reissue_chain(self.old)
        self.old.write(self.directory)
        self.config = SentryConfig(
            trust_domain=TEST_TRUST_DOMAIN,
            namespace="default",
            listen_address="127.0.0.1",
            port=0,
            issuer_credentials=self.directory,
        )
        self.metrics = SentryMetrics()
        self.store = FileTrustStore(
            reactor,
            self.config.ca_path,
            self.config.issuer_certificate_path,
            self.config.issuer_key_path,
            self.config.trust_domain,
            self.config.namespace,
            self.config.mtls.allowed_clock_skew,
        )
        self.ca = CertificateAuthorityService(
            self.config,
            reactor,
            self.store,
            {VALIDATOR_INSECURE: InsecureValidator()},
            VALIDATOR_INSECURE,
            self.metrics,
        )
        yield self.ca.start(self.config)
        self.addCleanup(self.ca.stop)
        self.old_key_identifier = self.ca.bundle.authority_key_identifier.key_identifier
        self.new_key_identifier = self.new.load(
            now
        ).authority_key_identifier.key_identifier
        self.assertNotEqual(self.old_key_identifier, self.new_key_identifier)

    def client(self):
        client = GrpcTestClient(f"127.0.0.1:{self.ca.port}", self.old.anchors_pem)
        self.addCleanup(client.close)
        return client

    def start_watcher(self, authority, clock):
        watcher = IssuerWatcher(
            authority, self.store.watch_directories, clock, self.metrics
        )
        watcher.startService()
        self.addCleanup(watcher.stopService)

    def sample(self, name):
        return self.metrics.registry.get_sample_value(name)

    @inlineCallbacks
    def test_rotation_under_load(self):
        """
        While four clients sign without pause, the files are replaced by a
        new issuer (new key, same root): no call fails, the new issuer signs
        within 3 s of the swap (and not before the 2 s window closed), and
        every call that starts after its first leaf gets a leaf from it.
        """
        self.start_watcher(self.ca, reactor)
        load = _Load(
            [self.client() for _ in range(CLIENT_THREADS)], self.new_key_identifier
        )
        done = load.run()
        yield load.running
        swapped_at = time.monotonic()
        replace_bundle_files(self.new, self.directory)
        yield done

        self.assertEqual([error for errors in load.errors for error in errors], [])
        results = [result for results in load.results for result in results]
        self.assertEqual(
            {key_identifier for _, _, key_identifier in results},
            {self.old_key_identifier, self.new_key_identifier},
        )
        first_new = min(
            finished
            for _, finished, key_identifier in results
            if key_identifier == self.new_key_identifier
        )
        self.assertLess(first_new - swapped_at, NEW_ISSUER_DEADLINE_SECONDS)
        self.assertGreaterEqual(first_new - swapped_at, ISSUER_CHANGE_WINDOW_SECONDS)
        late_old = [
            started
            for started, _, key_identifier in results
            if started > first_new and key_identifier == self.old_key_identifier
        ]
        self.assertEqual(late_old, [])
        self.assertEqual(self.sample("dapr_sentry_issuercert_changed_total"), 1)
        self.assertEqual(self.sample("dapr_sentry_issuercert_reload_failed_total"), 0)
        self.assertEqual(
            self.sample("dapr_sentry_issuercert_expiry_timestamp"),
            self.new.issuer.not_valid_after_utc.timestamp(),
        )

    @inlineCallbacks
    def test_broken_update_keeps_old_issuer(self):
        """
        A garbage C{issuer.crt} is refused after the window: the old issuer
        goes on signing, the refusal is counted once and the CA stays ready.
        """
        clock = SchedulingClock()
        authority = ObservedAuthority(self.ca)
        self.start_watcher(authority, clock)
        restarted = authority.when_restarted()
        scheduled = clock.when_scheduled()
        with open(self.config.issuer_certificate_path, "wb") as f:
            f.write(GARBAGE_CERTIFICATE_PEM)
        yield scheduled
        yield deferLater(reactor, 0, lambda: None)
        clock.advance(ISSUER_CHANGE_WINDOW_SECONDS)
        succeeded, failure = yield restarted
        self.assertFalse(succeeded)
        failure.trap(BundleError)

        _, csr = make_csr()
        response = yield deferToThread(self.client().sign, _sign_request(csr))
        self.assertEqual(_key_identifier(response), self.old_key_identifier)
        self.assertEqual(self.sample("dapr_sentry_issuercert_changed_total"), 1)
        self.assertEqual(self.sample("dapr_sentry_issuercert_reload_failed_total"), 1)
        self.assertTrue(self.ca.ready)
