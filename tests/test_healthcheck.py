"""
Tests for C{python -m sentry_tx healthcheck} (L{sentry_tx.healthcheck}), the
image's HEALTHCHECK.
"""

import sys
from io import StringIO

from twisted.internet import error, reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from sentry_tx.healthcheck import healthz_url, main, probe
from sentry_tx.healthz import HealthzResource


class HealthzURLTests(SynchronousTestCase):
    """
    L{healthz_url} reads the port from the running process's flags.
    """

    def test_default(self):
        """
        Without --healthz-port, port 8080 on loopback.
        """
        self.assertEqual(
            healthz_url(
                [
                    "python",
                    "twistd",
                    "-n",
                    "--pidfile=",
                    "sentry",
                    "--mode",
                    "kubernetes",
                ]
            ),
            "http://127.0.0.1:8080/healthz",
        )

    def test_port_and_address(self):
        """
        --healthz-port and --healthz-listen-address, in either Go form, the
        last one winning; all interfaces means loopback; IPv6 is bracketed.
        """
        self.assertEqual(
            healthz_url(
                ["twistd", "sentry", "--healthz-port", "8081", "-healthz-port=9999"]
            ),
            "http://127.0.0.1:9999/healthz",
        )
        self.assertEqual(
            healthz_url(
                [
                    "twistd",
                    "sentry",
                    "--healthz-listen-address",
                    "10.0.0.5",
                    "--healthz-port=81",
                ]
            ),
            "http://10.0.0.5:81/healthz",
        )
        self.assertEqual(
            healthz_url(["twistd", "sentry", "--healthz-listen-address=::1"]),
            "http://[::1]:8080/healthz",
        )
        self.assertEqual(
            healthz_url(["twistd", "sentry", "--healthz-listen-address=0.0.0.0"]),
            "http://127.0.0.1:8080/healthz",
        )

    def test_flags_of_twistd_ignored(self):
        """
        Only the flags after the C{sentry} subcommand count.
        """
        self.assertEqual(
            healthz_url(["twistd", "--healthz-port=1", "sentry"]),
            "http://127.0.0.1:8080/healthz",
        )


class _Ready:
    ready = True


class _NotReady:
    ready = False


class _Sleeper(ProcessProtocol):
    """
    A child that says C{up} once it runs its own program (so its command
    line is its own, not the forking parent's), then waits to be killed.
    """

    def __init__(self):
        self.ended = Deferred()
        self.up = Deferred()

    def outReceived(self, data):
        if not self.up.called:
            self.up.callback(None)

    def processEnded(self, reason):
        self.ended.callback(None)


class ProbeTests(TestCase):
    """
    L{probe} and L{main} against a real healthz server on 127.0.0.1.
    """

    timeout = 30

    def _serve(self, source):
        root = Resource()
        root.putChild(b"healthz", HealthzResource(source))
        port = reactor.listenTCP(0, Site(root), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return port.getHost().port

    @inlineCallbacks
    def test_probe(self):
        """
        200 is healthy; 503 and a closed port are not.
        """
        healthy = self._serve(_Ready())
        unhealthy = self._serve(_NotReady())
        self.assertTrue((yield deferToThread(probe, f"http://127.0.0.1:{healthy}/healthz")))
        self.assertFalse((yield deferToThread(probe, f"http://127.0.0.1:{unhealthy}/healthz")))
        self.assertFalse(
            (yield deferToThread(probe, "http://127.0.0.1:1/healthz", 1.0))
        )

    @inlineCallbacks
    def test_main_follows_the_process_flags(self):
        """
        C{main} reads the given process's command line and probes the
        --healthz-port it names: exit 0 when that port is healthy, 1 when it
        is not.
        """
        healthy = self._serve(_Ready())
        unhealthy = self._serve(_NotReady())
        for port, status in ((healthy, 0), (unhealthy, 1)):
            sleeper = _Sleeper()
            transport = reactor.spawnProcess(
                sleeper,
                sys.executable,
                [
                    sys.executable,
                    "-c",
                    "import time; print('up', flush=True); time.sleep(30)",
                    "sentry",
                    "--healthz-listen-address",
                    "127.0.0.1",
                    "--healthz-port",
                    str(port),
                ],
            )

            def kill(transport=transport, sleeper=sleeper):
                try:
                    transport.signalProcess("KILL")
                except error.ProcessExitedAlready:
                    return None
                return sleeper.ended

            self.addCleanup(kill)
            yield sleeper.up
            out = StringIO()
            result = yield deferToThread(main, [str(transport.pid)], out=out)
            self.assertEqual(result, status, out.getvalue())
            if status:
                self.assertIn(f":{port}/healthz did not answer 200", out.getvalue())
