"""
Tests for the service tree: the twistd plugin, the composition in
L{sentry_tx.tap.build_service} and the root service's fatal path (the fakes
of L{sentry_tx.testing} are checked in C{tests/test_testing.py}).
"""

from twisted.application.service import IServiceMaker
from twisted.internet.testing import MemoryReactorClock
from twisted.plugin import IPlugin, getPlugins
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from sentry_tx.config import SentryConfig
from sentry_tx.errors import BundleError
from sentry_tx.expiry import ExpiryChecker
from sentry_tx.interfaces import ICertificateAuthority
from sentry_tx.server.service import CertificateAuthorityService
from sentry_tx.service import SentryService, WebService
from sentry_tx.stderr_capture import StandardErrorCapture
from sentry_tx.tap import build_service
from sentry_tx.watcher import IssuerWatcher


class PluginTests(SynchronousTestCase):
    """
    twistd finds the plugin.
    """

    def test_found(self):
        """
        C{getPlugins} finds a C{sentry} service maker for L{sentry_tx.tap}.
        """
        import twisted.plugins

        makers = {
            plugin.tapname: plugin
            for plugin in getPlugins(IServiceMaker, twisted.plugins)
            if IPlugin.providedBy(plugin)
        }
        self.assertIn("sentry", makers)
        self.assertEqual(makers["sentry"].module, "sentry_tx.tap")


class BuildServiceTests(SynchronousTestCase):
    """
    Tests for L{build_service}.
    """

    def test_children(self):
        """
        The root holds the standard error capture, the private directory,
        the shared metrics, the port check, the CA, then the issuer watcher,
        the copies' supervision and the expiry checker, then healthz and
        metrics, and builds them without opening anything.
        """
        from sentry_tx.metrics import SharedMetrics
        from sentry_tx.rundir import PrivateDirectory
        from sentry_tx.server.copies import ServingCopies

        reactor = MemoryReactorClock()
        root = build_service(SentryConfig(issuer_credentials=self.mktemp()), reactor)
        capture, directory, shared, port_check, *children = list(root)
        self.assertIsInstance(capture, StandardErrorCapture)
        self.assertIsInstance(directory, PrivateDirectory)
        self.assertIsNone(directory.path)
        self.assertIsInstance(shared, SharedMetrics)
        self.assertEqual((port_check.flag, port_check.port), ("--port", 50001))
        self.assertFalse(capture.capturing)
        self.assertIsInstance(children[0], CertificateAuthorityService)
        verifyObject(ICertificateAuthority, children[0])
        self.assertIsInstance(children[1], IssuerWatcher)
        self.assertIsInstance(children[2], ServingCopies)
        self.assertEqual(children[2].count, 0)
        self.assertIsInstance(children[3], ExpiryChecker)
        self.assertEqual(
            [child.label for child in children[4:] if isinstance(child, WebService)],
            ["healthz", "metrics"],
        )
        self.assertEqual(reactor.tcpServers, [])
        self.assertEqual(reactor.getDelayedCalls(), [])

    def test_workers(self):
        """
        With more than one serving process, the authority is the same one,
        binding with SO_REUSEPORT, and the copies are supervised by a
        service that spawns nothing yet.
        """
        from sentry_tx.server.copies import ServingCopies

        reactor = MemoryReactorClock()
        root = build_service(
            SentryConfig(issuer_credentials=self.mktemp(), workers=3), reactor
        )
        (authority,) = [c for c in root if isinstance(c, CertificateAuthorityService)]
        self.assertTrue(authority._reuse_port)
        (supervisor,) = [c for c in root if isinstance(c, ServingCopies)]
        self.assertEqual(supervisor.count, 2)
        self.assertEqual(reactor.tcpServers, [])

    def test_copy_role(self):
        """
        A serving copy is the same authority, loading only, and answers its
        liveness socket instead of serving healthz, metrics or copies.
        """
        from twisted.application.internet import UNIXServer

        from sentry_tx.server.copies import ServingCopies
        from sentry_tx.tap import CopyRole

        reactor = MemoryReactorClock()
        root = build_service(
            SentryConfig(issuer_credentials=self.mktemp(), workers=3),
            reactor,
            copy=CopyRole("/nonexistent/copy.sock", "/nonexistent/metrics"),
        )
        (authority,) = [c for c in root if isinstance(c, CertificateAuthorityService)]
        self.assertFalse(authority._primary)
        self.assertTrue(authority._reuse_port)
        self.assertEqual(
            [c for c in root if isinstance(c, (ServingCopies, WebService))], []
        )
        self.assertEqual(len([c for c in root if isinstance(c, UNIXServer)]), 1)
        self.assertEqual(reactor.unixServers, [])

    def test_metrics_disabled(self):
        """
        With C{--enable-metrics=false} there is no metrics server.
        """
        root = build_service(
            SentryConfig(issuer_credentials=self.mktemp(), enable_metrics=False),
            MemoryReactorClock(),
        )
        self.assertEqual(
            [child.label for child in root if isinstance(child, WebService)],
            ["healthz"],
        )


class SentryServiceTests(SynchronousTestCase):
    """
    Tests for L{SentryService}.
    """

    def test_fatal(self):
        """
        A fatal error logs why, stops the reactor, and exits 1 after the
        reactor has shut down.
        """
        reactor = MemoryReactorClock()
        reactor.running = True
        exits = []
        root = SentryService(reactor, exit=exits.append)
        root.fatal(Failure(BundleError("/x/issuer.key", "missing")))
        self.assertTrue(reactor.hasStopped)
        self.assertEqual(exits, [])
        [(call, args, kw)] = reactor.triggers["after"]["shutdown"]
        call(*args, **kw)
        self.assertEqual(exits, [1])
        self.assertEqual(root.exit_status, 1)

    def test_fatal_logs_reason(self):
        """
        The reason names the file and the problem, at critical level.
        """
        from twisted.logger import LogLevel, capturedLogs

        reactor = MemoryReactorClock()
        reactor.running = True
        with capturedLogs() as events:
            SentryService(reactor, exit=lambda status: None).fatal(
                Failure(BundleError("/x/issuer.key", "missing"))
            )
        [event] = [e for e in events if e.get("log_level") == LogLevel.critical]
        self.assertIn("/x/issuer.key: missing", event["error"])

    def test_startup_warnings(self):
        """
        Warnings found while parsing options are logged at start.
        """
        from twisted.logger import LogLevel, capturedLogs

        root = SentryService(MemoryReactorClock(), ["config file missing"])
        with capturedLogs() as events:
            root.startService()
        self.assertIn(
            ("config file missing", LogLevel.warn),
            [(e.get("startup_warning"), e.get("log_level")) for e in events],
        )


class HelpImportsTests(SynchronousTestCase):
    """
    C{twistd --help} stays cheap.
    """

    def test_help_imports_nothing_heavy(self):
        """
        C{twistd --help} lists C{sentry} without importing grpc or
        cryptography (the plugin line imports nothing heavy).
        """
        import os
        import subprocess
        import sys

        from sentry_tx.testing.source_tree import PROJECT_ROOT as root
        script = (
            "import sys\n"
            "from twisted.scripts.twistd import run\n"
            "sys.argv = ['twistd', '--help']\n"
            "try:\n"
            "    run()\n"
            "except SystemExit:\n"
            "    pass\n"
            "heavy = sorted(m for m in ('grpc', 'cryptography') if m in sys.modules)\n"
            "print('HEAVY:' + ','.join(heavy))\n"
        )
        result = subprocess.run(
            [sys.executable, "-c", script],
            capture_output=True,
            text=True,
            timeout=60,
            env=dict(os.environ, PYTHONPATH=root),
            cwd=root,
        )
        self.assertIn(" sentry ", result.stdout)
        self.assertIn("HEAVY:\n", result.stdout)
