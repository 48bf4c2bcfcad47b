"""
Tests for a port that cannot be bound: L{sentry_tx.listen}, the web
listeners, the root service's one-line fatal path, and C{twistd} itself.
"""

import os
import socket

from twisted.application.service import Service
from twisted.internet.defer import inlineCallbacks
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, capturedLogs
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource

from sentry_tx.errors import ListenError
from sentry_tx.listen import PortCheck, check_port_free
from sentry_tx.service import QuietSite, SentryService, WebService
from sentry_tx.testing.twistd import LOOPBACK_FREE_PORTS, spawn_twistd


def _occupied_port(test):
    """
    A port on 127.0.0.1 that a listening socket holds until cleanup.
    """
    holder = socket.socket()
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    test.addCleanup(holder.close)
    return holder.getsockname()[1]


class CheckPortFreeTests(SynchronousTestCase):
    """
    L{check_port_free} diagnoses the bind grpcio is about to do.
    """

    def test_port_in_use(self):
        """
        A port another socket listens on raises L{ListenError} naming the
        flag, the address and the port, in words.
        """
        port = _occupied_port(self)
        error = self.assertRaises(
            ListenError, check_port_free, "--port", "127.0.0.1", port
        )
        self.assertEqual((error.flag, error.port), ("--port", port))
        self.assertEqual(
            str(error),
            f"--port: cannot listen on 127.0.0.1 port {port}: address already in use",
        )

    def test_free_port(self):
        """
        A free port passes, and stays free (the probe is closed).
        """
        port = _occupied_port(self)
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[1]
        probe.close()
        self.assertNotEqual(free, port)
        check_port_free("--port", "127.0.0.1", free)
        check_port_free("--port", "127.0.0.1", free)

    def test_host_name_not_resolved(self):
        """
        A host name is not looked up (that could block): it is left to the
        real bind, even on a port in use.
        """
        port = _occupied_port(self)
        check_port_free("--port", "sentry.invalid", port)

    def test_port_zero(self):
        """
        Port 0 (the kernel picks) is never reported.
        """
        check_port_free("--port", "127.0.0.1", 0)


class _FailingListener(Service):
    """
    A child whose bind fails as a taken port does.
    """

    def privilegedStartService(self):
        raise ListenError("--metrics-port", 9090, "", "address already in use")


class _Recorder(Service):
    """
    A child that records whether it was started.
    """

    started = False

    def startService(self):
        super().startService()
        self.started = True


class WebServiceTests(SynchronousTestCase):
    """
    L{WebService} turns Twisted's C{CannotListenError} into L{ListenError}.
    """

    def test_taken_port(self):
        """
        Binding a taken port raises L{ListenError} naming the listener's
        flag and the port.
        """
        port = _occupied_port(self)
        service = WebService(
            "healthz", port, QuietSite(Resource()), interface="127.0.0.1"
        )
        error = self.assertRaises(ListenError, service.privilegedStartService)
        self.assertEqual(
            str(error),
            f"--healthz-port: cannot listen on 127.0.0.1 port {port}:"
            " address already in use",
        )

    def test_flag_given(self):
        """
        A listener built with its own C{flag} names that one.
        """
        port = _occupied_port(self)
        service = WebService(
            "oidc",
            port,
            QuietSite(Resource()),
            interface="127.0.0.1",
            flag="--oidc-server-listen-port",
        )
        error = self.assertRaises(ListenError, service.startService)
        self.assertEqual(error.flag, "--oidc-server-listen-port")


class RootListenFailureTests(SynchronousTestCase):
    """
    The root service makes a L{ListenError} one fatal line.
    """

    def test_one_fatal_line(self):
        """
        A child that cannot bind during C{privilegedStartService} makes
        C{startService} log one critical line naming the flag and the port,
        stop the reactor, exit 1, and start no child.
        """
        reactor = MemoryReactorClock()
        reactor.running = True
        exits = []
        root = SentryService(reactor, exit=exits.append)
        before, after = _Recorder(), _Recorder()
        before.setServiceParent(root)
        _FailingListener().setServiceParent(root)
        after.setServiceParent(root)
        with capturedLogs() as events:
            root.privilegedStartService()
            root.startService()
        serious = [e for e in events if e["log_level"] >= LogLevel.warn]
        self.assertEqual(len(serious), 1)
        self.assertEqual(serious[0]["log_level"], LogLevel.critical)
        self.assertIn("--metrics-port: cannot listen on port 9090", serious[0]["error"])
        self.assertNotIn("log_failure", serious[0])
        self.assertFalse(before.started or after.started)
        self.assertTrue(reactor.hasStopped)
        [(call, args, kw)] = reactor.triggers["after"]["shutdown"]
        call(*args, **kw)
        self.assertEqual(exits, [1])

    def test_stop_skips_children_not_started(self):
        """
        After a failed start, stopping the root stops only the children that
        were started.
        """
        root = SentryService(MemoryReactorClock(), exit=lambda status: None)
        stopped = []

        class Child(Service):
            def stopService(self):
                stopped.append(self.name)
                return super().stopService()

        for name in ("a", "b"):
            child = Child()
            child.setName(name)
            child.setServiceParent(root)
        root.running = 1
        root.getServiceNamed("a").running = 1
        root.stopService()
        self.assertEqual(stopped, ["a"])


class TwistdPortInUseTests(TestCase):
    """
    C{twistd sentry} with a port already in use: one line, exit 1.
    """

    timeout = 60

    def _arguments(self, flag, port):
        arguments = [
            "--config",
            os.path.abspath(self.mktemp()),
            "--issuer-credentials",
            os.path.abspath(self.mktemp()),
        ] + LOOPBACK_FREE_PORTS
        index = arguments.index(flag)
        arguments[index + 1] = str(port)
        return arguments

    @inlineCallbacks
    def _assert_one_line(self, flag, *extra):
        port = _occupied_port(self)
        protocol = spawn_twistd(self, self._arguments(flag, port) + list(extra))
        reason = yield protocol.ended
        self.assertEqual(reason.exitCode, 1)
        lines = protocol.output.decode().splitlines()
        serious = [
            line
            for line in lines
            if " info " not in line and " debug " not in line
            # the missing --config file (the test's own choice) is a warning
            and "not found; using the defaults" not in line
        ]
        self.assertEqual(
            serious,
            [
                line
                for line in lines
                if f"{flag}: cannot listen on 127.0.0.1 port {port}:"
                " address already in use" in line
            ],
        )
        self.assertEqual(len(serious), 1)
        self.assertNotIn("Traceback", protocol.output.decode())

    def test_healthz_port(self):
        """
        A taken --healthz-port: one line naming it and the port, exit 1.
        """
        return self._assert_one_line("--healthz-port")

    def test_metrics_port(self):
        """
        A taken --metrics-port: one line naming it and the port, exit 1.
        """
        return self._assert_one_line("--metrics-port")

    def test_grpc_port(self):
        """
        A taken --port: one line naming it and the port (no grpc core line,
        no traceback), exit 1.
        """
        return self._assert_one_line("--port")

    def test_grpc_port_workers(self):
        """
        With serving copies (which bind with SO_REUSEPORT), a taken --port
        is still one line naming it.
        """
        return self._assert_one_line("--port", "--workers", "2")


class PortCheckTests(SynchronousTestCase):
    """
    L{PortCheck}, the root's child that checks the gRPC port at start.
    """

    def test_raises_at_start(self):
        """
        C{startService} raises L{ListenError} for a taken port, and building
        it opens nothing.
        """
        port = _occupied_port(self)
        check = PortCheck("--port", "127.0.0.1", port)
        error = self.assertRaises(ListenError, check.startService)
        self.assertEqual(error.flag, "--port")
