"""
Tests for L{CertificateAuthorityService}'s lifecycle: start, stop and the
serialised, coalesced restart.
"""

import socket
from datetime import timedelta

from twisted.internet.defer import Deferred, succeed
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from sentry_tx.ca.bundle import load_bundle
from sentry_tx.config import SentryConfig
from sentry_tx.errors import BundleError
from sentry_tx.interfaces import ICertificateAuthority
from sentry_tx.metrics import SentryMetrics
from sentry_tx.server.service import (
    AlreadyRunningError,
    CertificateAuthorityService,
    NotRunningError,
    listen_target,
)
from sentry_tx.testing.authority import FakeTrustStore
from sentry_tx.testing.certificates import FIXED_NOW, make_bundle, make_chain
from sentry_tx.testing.clocks import ImmediateReactor
from sentry_tx.testing.grpc_client import SynchronousGrpcLoop


class _ControlledTrustStore(FakeTrustStore):
    """
    A trust store whose C{load} answers only when the test fires it.
    """

    def __init__(self, bundle):
        super().__init__(bundle)
        self.waiting = []

    def load(self, now):
        self.loads += 1
        d = Deferred()
        self.waiting.append(d)
        return d

    def load_or_generate(self, now):
        return succeed(self.bundle)


class CertificateAuthorityServiceTests(SynchronousTestCase):
    """
    Lifecycle of the CA with a synchronous reactor and a real gRPC server on
    127.0.0.1 port 0.
    """

    def setUp(self):
        self.reactor = ImmediateReactor(FIXED_NOW.timestamp())
        chain = make_chain()
        self.bundle = chain.load(FIXED_NOW)
        self.key_pem = chain.issuer_key_pem()
        self.store = _ControlledTrustStore(self.bundle)
        self.metrics = SentryMetrics()
        self.config = SentryConfig(listen_address="127.0.0.1", port=0)
        self.failures = []
        self.ca = CertificateAuthorityService(
            self.config,
            self.reactor,
            self.store,
            {},
            None,
            self.metrics,
            on_start_failure=self.failures.append,
            grpc_loop_factory=SynchronousGrpcLoop,
        )

    def start(self):
        """
        Start the CA and stop it at cleanup.
        """
        self.successResultOf(self.ca.start(self.config))
        self.addCleanup(lambda: self.successResultOf(self.ca.stop()))

    def test_interface(self):
        """
        The CA provides L{ICertificateAuthority}.
        """
        verifyObject(ICertificateAuthority, self.ca)

    def test_start(self):
        """
        C{start} loads the bundle, listens and becomes ready; the issuer
        expiry gauge is published.
        """
        self.assertFalse(self.ca.ready)
        self.start()
        self.assertTrue(self.ca.ready)
        self.assertIs(self.ca.bundle, self.bundle)
        self.assertGreater(self.ca.port, 0)
        # Something accepts connections on the port reported.
        socket.create_connection(("127.0.0.1", self.ca.port), timeout=5).close()
        self.assertEqual(
            self.metrics.issuercert_expiry_timestamp._value.get(),
            self.bundle.issuer.not_valid_after_utc.timestamp(),
        )

    def test_start_twice(self):
        """
        C{start} on a running CA fails with L{AlreadyRunningError}.
        """
        self.start()
        self.failureResultOf(self.ca.start(self.config), AlreadyRunningError)

    def test_start_failure(self):
        """
        A bundle the store refuses fails C{start}; C{startService} hands the
        failure to C{on_start_failure}, and the CA is not ready.
        """
        self.store.load_or_generate = lambda now: FakeTrustStore(
            error=BundleError("ca.crt", "no certificate")
        ).load(now)
        self.ca.startService()
        self.assertEqual(len(self.failures), 1)
        self.assertTrue(self.failures[0].check(BundleError))
        self.assertFalse(self.ca.ready)

    def test_stop(self):
        """
        C{stop} makes the CA unready and lets it start again.
        """
        self.successResultOf(self.ca.start(self.config))
        self.successResultOf(self.ca.stop())
        self.assertFalse(self.ca.ready)
        self.start()
        self.assertTrue(self.ca.ready)

    def test_restart_not_running(self):
        """
        C{restart} before C{start} fails with L{NotRunningError}.
        """
        self.failureResultOf(self.ca.restart(self.config), NotRunningError)

    def test_restart_swaps(self):
        """
        A restart with a valid bundle puts it in service.
        """
        self.start()
        d = self.ca.restart(self.config)
        new = make_bundle()
        self.store.waiting.pop().callback(new)
        self.successResultOf(d)
        self.assertIs(self.ca.bundle, new)

    def test_restart_refused(self):
        """
        A restart whose bundle is refused keeps the old bundle, fails, and
        counts C{issuercert_reload_failed}; the CA stays ready.
        """
        self.start()
        d = self.ca.restart(self.config)
        self.store.waiting.pop().errback(BundleError("issuer.crt", "garbage"))
        self.failureResultOf(d, BundleError)
        self.assertIs(self.ca.bundle, self.bundle)
        self.assertTrue(self.ca.ready)
        self.assertEqual(self.metrics.issuercert_reload_failed._value.get(), 1)

    def test_copy_counts_no_process_wide_event(self):
        """
        A serving copy's authority (not primary) only loads the bundle,
        sets no expiry gauge and does not count a refused reload: the
        twistd process counts each once.
        """
        self.store.load_or_generate = lambda now: self.fail("a copy generated")
        self.store.load = lambda now: succeed(self.bundle)
        ca = CertificateAuthorityService(
            self.config,
            self.reactor,
            self.store,
            {},
            None,
            self.metrics,
            grpc_loop_factory=SynchronousGrpcLoop,
            primary=False,
        )
        self.successResultOf(ca.start(self.config))
        self.addCleanup(lambda: self.successResultOf(ca.stop()))
        self.assertIs(ca.bundle, self.bundle)
        self.assertEqual(self.metrics.issuercert_expiry_timestamp._value.get(), 0)
        self.store.load = lambda now: FakeTrustStore(
            error=BundleError("issuer.crt", "garbage")
        ).load(now)
        self.failureResultOf(ca.restart(self.config), BundleError)
        self.assertEqual(self.metrics.issuercert_reload_failed._value.get(), 0)

    def test_restart_during_start_waits(self):
        """
        A restart asked for while the first load is still running waits for
        the start to finish, then reloads.
        """
        pending = Deferred()
        self.store.load_or_generate = lambda now: pending
        started = self.ca.start(self.config)
        self.addCleanup(lambda: self.successResultOf(self.ca.stop()))
        restarted = self.ca.restart(self.config)
        self.assertEqual(self.store.loads, 0)
        pending.callback(self.bundle)
        self.successResultOf(started)
        self.assertEqual(self.store.loads, 1)
        new = make_bundle()
        self.store.waiting.pop().callback(new)
        self.successResultOf(restarted)
        self.assertIs(self.ca.bundle, new)

    def test_restart_after_failed_start(self):
        """
        A restart waiting on a start that fails fails with
        L{NotRunningError}.
        """
        pending = Deferred()
        self.store.load_or_generate = lambda now: pending
        started = self.ca.start(self.config)
        restarted = self.ca.restart(self.config)
        pending.errback(BundleError("ca.crt", "no certificate"))
        self.failureResultOf(started, BundleError)
        self.failureResultOf(restarted, NotRunningError)

    def test_restart_unchanged(self):
        """
        A reload that finds the same credentials keeps the bundle in
        service as it is, and issues no new server certificate.
        """
        self.start()
        issued = []
        issue = self.ca._issue_server_certificate
        self.ca._issue_server_certificate = lambda *a: issued.append(a) or issue(*a)
        d = self.ca.restart(self.config)
        self.store.waiting.pop().callback(
            load_bundle(
                self.bundle.anchors_pem,
                self.bundle.issuer_chain_pem,
                self.key_pem,
                FIXED_NOW,
            )
        )
        self.successResultOf(d)
        self.assertIs(self.ca.bundle, self.bundle)
        self.assertIsNone(self.ca._credentials._fetch())
        self.assertEqual(issued, [])

    def test_restart_serialised_and_coalesced(self):
        """
        Restarts asked for while one runs do not run beside it; they are
        served together by one more reload after it.
        """
        self.start()
        first = self.ca.restart(self.config)
        second = self.ca.restart(self.config)
        third = self.ca.restart(self.config)
        self.assertEqual(self.store.loads, 1)
        self.store.waiting.pop().callback(make_bundle())
        self.successResultOf(first)
        self.assertNoResult(second)
        self.assertEqual(self.store.loads, 2)
        latest = make_bundle()
        self.store.waiting.pop().callback(latest)
        self.successResultOf(second)
        self.successResultOf(third)
        self.assertEqual(self.store.loads, 2)
        self.assertIs(self.ca.bundle, latest)

    def test_server_certificate_renewed_at_half_life(self):
        """
        The server certificate is renewed at half its life.
        """
        self.start()
        renewal = self.ca._renewal
        self.assertTrue(renewal.active())
        lifetime = 24 * 3600
        self.assertAlmostEqual(
            renewal.getTime() - self.reactor.seconds(), lifetime / 2, delta=1
        )
        self.assertIsNone(self.ca._credentials._fetch())
        self.reactor.advance(lifetime / 2)
        self.assertIsNotNone(self.ca._credentials._fetch())
        self.assertIsNot(self.ca._renewal, renewal)
        self.assertTrue(self.ca._renewal.active())


    def test_renewal_superseded_by_reload(self):
        """
        A server certificate still being issued from a bundle that a reload
        then replaced is dropped: the reload's certificate and its renewal
        timer stay in service.
        """
        self.start()
        pending: Deferred[object] = Deferred()
        issue = self.ca._issue_server_certificate
        self.ca._issue_server_certificate = lambda *a: pending
        self.reactor.advance(24 * 3600 / 2)
        self.ca._issue_server_certificate = issue
        d = self.ca.restart(self.config)
        self.store.waiting.pop().callback(make_bundle())
        self.successResultOf(d)
        self.assertIsNotNone(self.ca._credentials._fetch())
        timer = self.ca._renewal
        pending.callback(
            (b"stale key", b"stale chain", FIXED_NOW, FIXED_NOW + timedelta(days=1))
        )
        self.assertIsNone(self.ca._credentials._fetch())
        self.assertIs(self.ca._renewal, timer)
        self.assertTrue(timer.active())


class ListenTargetTests(SynchronousTestCase):
    """
    Tests for L{listen_target}.
    """

    def test_targets(self):
        """
        An empty address is every interface; IPv6 literals get brackets.
        """
        self.assertEqual(listen_target("", 50001), "[::]:50001")
        self.assertEqual(listen_target("127.0.0.1", 0), "127.0.0.1:0")
        self.assertEqual(listen_target("::1", 5), "[::1]:5")
        self.assertEqual(listen_target("[::1]", 5), "[::1]:5")
