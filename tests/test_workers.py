"""
Tests for the worker pool: the parent (L{sentry_tx.server.workers}) and the
worker process (L{sentry_tx.server.worker}).

Most tests run the parent against in-process workers (the real
L{WorkerCommands} with a fake authority) over an in-memory pipe, on a
L{Clock}; a few run real worker processes serving real gRPC on 127.0.0.1.
"""

import os
import signal
import sys
from datetime import timedelta

import grpc
from cryptography import x509
from twisted.internet import reactor
from twisted.internet.defer import (
    Deferred,
    DeferredQueue,
    fail,
    inlineCallbacks,
    succeed,
)
from twisted.internet.error import (
    ConnectionDone,
    ProcessDone,
    ProcessExitedAlready,
    ProcessTerminated,
)
from twisted.internet.threads import deferToThread
from twisted.logger import LogLevel
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from sentry_tx._proto import sentry_pb2
from sentry_tx.ca.bundle import TrustBundle, generate_bundle
from sentry_tx.config import SentryConfig
from sentry_tx.errors import BundleError
from sentry_tx.identity.caller import VALIDATOR_INSECURE
from sentry_tx.interfaces import ICertificateAuthority, ITrustStore
from sentry_tx.metrics import SentryMetrics
from sentry_tx.server.ipc import (
    WORKER_MODULE,
    Counters,
    Start,
    WorkerRefused,
    bundle_to_pems,
    config_to_json,
)
from sentry_tx.server.pushed_store import PushedTrustStore
from sentry_tx.server.service import NotRunningError, SHUTDOWN_GRACE_SECONDS
from sentry_tx.server.worker import (
    ParentConnection,
    WorkerCommands,
)
from sentry_tx.server.worker_process import (
    KILL_WAIT_SECONDS,
    WorkerError,
    WorkerProcess,
)
from sentry_tx.server.workers import (
    RESPAWN_INITIAL_DELAY_SECONDS,
    STOP_MARGIN_SECONDS,
    WorkerPoolAuthority,
)
from sentry_tx.testing.authority import FakeTrustStore
from sentry_tx.testing.certificates import FIXED_NOW, make_bundle, make_csr
from sentry_tx.testing.clocks import ImmediateReactor, utc_now
from sentry_tx.testing.grpc_client import GrpcTestClient
from sentry_tx.testing.logs import capture_logs, log_messages
from sentry_tx.testing.source_tree import child_environment

FAKE_PORT = 4242


# In-process workers behind an in-memory pipe.


class _Script:
    """
    How a fake worker's authority behaves.

    @ivar start_error: C{start} fails with it when set.
    @ivar start_result: C{start} returns it (a Deferred) when set.
    @ivar restart_error: C{restart} fails with it when set.
    @ivar stubborn: the process ignores its stdin closing and SIGTERM.
    @ivar unkillable: the process does not even end on SIGKILL.
    """

    def __init__(
        self,
        start_error=None,
        start_result=None,
        restart_error=None,
        stubborn=False,
        unkillable=False,
    ):
        self.start_error = start_error
        self.start_result = start_result
        self.restart_error = restart_error
        self.stubborn = stubborn
        self.unkillable = unkillable


@implementer(ICertificateAuthority)
class _FakeWorkerAuthority:
    """
    What a worker would serve with: records restarts and stops; binds
    L{FAKE_PORT} when asked for port 0.
    """

    def __init__(self, script, config, reactor, trust_store, validator_set, metrics):
        self.script = script
        self.config = config
        self.trust_store = trust_store
        self.validator_set = validator_set
        self.metrics = metrics
        self.bundle = None
        self.ready = False
        self.port = None
        self.restarts = []
        self.stops = 0

    def start(self, config):
        if self.script.start_error is not None:
            return fail(self.script.start_error)
        self.port = config.port or FAKE_PORT
        self.config = config
        self.bundle = self.trust_store.bundle
        self.ready = True
        return self.script.start_result or succeed(None)

    def restart(self, config):
        self.restarts.append(config)
        if self.script.restart_error is not None:
            return fail(self.script.restart_error)
        self.config = config
        self.bundle = self.trust_store.bundle
        return succeed(None)

    def stop(self):
        self.stops += 1
        self.ready = False
        return succeed(None)


class _Pipes:
    """
    Carries bytes between the parent and its in-process workers one step
    at a time, so that no AMP answer arrives inside the call that asked.
    """

    def __init__(self, clock):
        self.clock = clock
        self._queue = []

    def send(self, f, *args):
        self._queue.append((f, args))

    def pump(self):
        """
        Deliver everything in flight, and run what is due on the clock now,
        until nothing is left.
        """
        while True:
            self.clock.advance(0)
            if not self._queue:
                return
            queue, self._queue = self._queue, []
            for f, args in queue:
                f(*args)


class _ToParent:
    """
    The transport of a fake worker's end of the pipe.
    """

    def __init__(self, worker):
        self._worker = worker

    def write(self, data):
        self._worker.pipes.send(self._worker.deliver_to_parent, data)

    def writeSequence(self, data):
        self.write(b"".join(data))

    def loseConnection(self):
        self._worker.pipes.send(self._worker.child_lost)


class _FakeWorker:
    """
    A worker process that runs in the test's process: the parent's
    L{WorkerProcess} is connected to a real L{WorkerCommands} (with a
    L{_FakeWorkerAuthority}) through L{_Pipes}.  It provides the parts of
    C{IProcessTransport} the parent uses.
    """

    def __init__(self, pipes, clock, protocol, argv, environ, pid, script):
        self.pipes = pipes
        self.protocol = protocol
        self.argv = argv
        self.environ = environ
        self.pid = pid
        self.script = script
        self.signals = []
        self.authority = None
        self.ended = False
        self.commands = WorkerCommands(
            clock,
            SentryMetrics(),
            {},
            authority_factory=self._authority_factory,
            on_stopped=lambda: self.child.transport.loseConnection(),
        )
        self.child = ParentConnection(self.commands, on_lost=self._on_child_lost)
        self.child.makeConnection(_ToParent(self))
        self._child_connected = True
        protocol.makeConnection(self)

    def _authority_factory(self, *arguments, jwt_minter=None):
        self.authority = _FakeWorkerAuthority(self.script, *arguments)
        return self.authority

    # The pipe.

    def deliver_to_parent(self, data):
        if not self.ended:
            self.protocol.childDataReceived(1, data)

    def child_lost(self):
        if self._child_connected:
            self._child_connected = False
            self.child.connectionLost(Failure(ConnectionDone()))

    def _on_child_lost(self):
        # As the real worker: stop serving, then exit.
        if not self.script.stubborn:
            self.commands.stop_serving().addCallback(
                lambda _: self.exit(ProcessDone(0))
            )

    def exit(self, reason):
        """
        End the process with C{reason}.
        """
        if self.ended:
            return
        self.ended = True
        self.protocol.childConnectionLost(1)
        self.protocol.processEnded(Failure(reason))

    # IProcessTransport, as the parent uses it.

    def write(self, data):
        if self._child_connected:
            self.pipes.send(self.child.dataReceived, data)

    def writeSequence(self, data):
        self.write(b"".join(data))

    def closeStdin(self):
        self.pipes.send(self.child_lost)

    def loseConnection(self):
        self.closeStdin()

    def signalProcess(self, name):
        if self.ended:
            raise ProcessExitedAlready()
        self.signals.append(name)
        if name == "KILL" and not self.script.unkillable:
            self.exit(ProcessTerminated(signal=signal.SIGKILL))


class WorkerPoolTests(SynchronousTestCase):
    """
    L{WorkerPoolAuthority} with in-process workers on a L{Clock}.
    """

    def setUp(self):
        self.clock = ImmediateReactor(FIXED_NOW.timestamp())
        self.pipes = _Pipes(self.clock)
        self.bundle = make_bundle()
        self.store = FakeTrustStore(self.bundle)
        self.metrics = SentryMetrics()
        self.config = SentryConfig(listen_address="127.0.0.1", port=0, log_level="warn")
        self.spawned = []
        self.scripts = {}
        self.serving = []
        self.events = capture_logs(self)
        self.pool = self.make_pool(2)

    def make_pool(self, workers, **options):
        """
        A pool of C{workers} whose processes are L{_FakeWorker}s.
        """
        return WorkerPoolAuthority(
            self.config,
            self.clock,
            self.store,
            self.metrics,
            workers,
            spawn=self._spawn,
            environ={"PATH": "/bin"},
            on_worker_serving=lambda index, pid: self.serving.append((index, pid)),
            **options,
        )

    def _spawn(self, protocol, argv, environ):
        script = self.scripts.get(len(self.spawned), _Script())
        worker = _FakeWorker(
            self.pipes,
            self.clock,
            protocol,
            argv,
            environ,
            1000 + len(self.spawned),
            script,
        )
        self.spawned.append(worker)
        return worker

    def start(self):
        """
        Start the pool; stop it at cleanup.
        """
        d = self.pool.start(self.config)
        self.pipes.pump()
        self.successResultOf(d)
        self.addCleanup(self.stop)

    def stop(self):
        d = self.pool.stop()
        self.pipes.pump()
        self.successResultOf(d)

    def live(self):
        """
        The fake workers that have not ended.
        """
        return [worker for worker in self.spawned if not worker.ended]

    def test_interface(self):
        """
        The pool provides L{ICertificateAuthority}.
        """
        verifyObject(ICertificateAuthority, self.pool)

    def test_at_least_one_worker(self):
        """
        A pool of no workers is refused.
        """
        self.assertRaises(ValueError, self.make_pool, 0)

    def test_nothing_spawned_before_start(self):
        """
        Building the pool spawns nothing (twistd forks after makeService).
        """
        self.assertEqual(self.spawned, [])
        self.assertFalse(self.pool.ready)

    def test_start(self):
        """
        The first worker binds the port asked for; the others then bind the
        port it reports; every worker runs the worker module with the log
        options, in the environment given, with the bundle of the store.
        """
        self.pool = self.make_pool(3)
        self.start()
        self.assertTrue(self.pool.ready)
        self.assertEqual(self.pool.port, FAKE_PORT)
        self.assertIs(self.pool.bundle, self.bundle)
        self.assertEqual(len(self.spawned), 3)
        for worker in self.spawned:
            self.assertEqual(
                worker.argv,
                [sys.executable, "-m", WORKER_MODULE, "--log-level", "warn"],
            )
            self.assertEqual(worker.environ, {"PATH": "/bin"})
            self.assertEqual(worker.authority.bundle.issuer, self.bundle.issuer)
        self.assertEqual(
            [worker.authority.config.port for worker in self.spawned],
            [0, FAKE_PORT, FAKE_PORT],
        )
        self.assertEqual(self.serving, [(0, 1000), (1, 1001), (2, 1002)])
        self.assertEqual(
            [process.port for process in self.pool.processes()], [FAKE_PORT] * 3
        )

    def local_pool(self, workers=1):
        """
        A pool of C{workers} worker processes that also serves in this
        process, with a L{_FakeWorkerAuthority} as the local authority
        (in C{self.locals}).
        """
        self.locals = []

        def local_factory(config, trust_store):
            local = _FakeWorkerAuthority(
                _Script(), config, self.clock, trust_store, None, self.metrics
            )
            self.locals.append(local)
            return local

        return self.make_pool(workers, local_factory=local_factory)

    def test_local_serves_first(self):
        """
        With a local authority, this process binds the port asked for (0
        picks one) and serves the bundle; the workers then bind the port it
        reports, and N serving processes are N - 1 workers and this one.
        """
        self.pool = self.local_pool(1)
        self.start()
        [local] = self.locals
        self.assertEqual(local.config.port, 0)
        self.assertEqual(self.pool.port, FAKE_PORT)
        self.assertIs(local.bundle, self.bundle)
        self.assertEqual(len(self.spawned), 1)
        self.assertEqual(self.spawned[0].authority.config.port, FAKE_PORT)
        self.assertTrue(self.pool.ready)

    def test_local_ready_before_workers(self):
        """
        With a local authority, the pool is ready (and started) as soon as
        this process serves; a worker joins when it answers its Start.
        """
        held = Deferred()
        self.scripts[0] = _Script(start_result=held)
        self.pool = self.local_pool(1)
        self.start()
        self.assertTrue(self.pool.ready)
        self.assertEqual(self.serving, [])
        held.callback(None)
        self.pipes.pump()
        self.assertEqual(self.serving, [(0, 1000)])

    def test_local_worker_start_failure_respawned(self):
        """
        With a local authority, a worker that cannot start does not fail
        the start: it is killed and started again after the respawn delay.
        """
        self.scripts[0] = _Script(start_error=RuntimeError("cannot bind"))
        self.pool = self.local_pool(1)
        self.start()
        self.assertTrue(self.pool.ready)
        self.assertEqual(self.live(), [])
        self.clock.advance(RESPAWN_INITIAL_DELAY_SECONDS)
        self.pipes.pump()
        self.assertEqual(len(self.spawned), 2)
        self.assertEqual(self.serving, [(0, 1001)])

    def test_port_shared_by_another_refused(self):
        """
        A port another process holds, even with SO_REUSEPORT (another
        sentry_tx of this user), fails the start with one line naming
        --port; nothing is spawned.
        """
        import socket

        from sentry_tx.errors import ListenError

        other = socket.socket()
        self.addCleanup(other.close)
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        self.config = SentryConfig(listen_address="127.0.0.1", port=port)
        self.pool = self.local_pool(1)
        d = self.pool.start(self.config)
        self.pipes.pump()
        failure = self.failureResultOf(d, ListenError)
        self.assertEqual((failure.value.flag, failure.value.port), ("--port", port))
        self.assertIn("address already in use", failure.getErrorMessage())
        self.assertEqual(self.spawned, [])
        self.assertEqual(self.locals, [])

    def test_local_keeps_pool_ready(self):
        """
        While this process serves, the pool stays ready when its worker
        ends.
        """
        self.pool = self.local_pool(1)
        self.start()
        self.spawned[0].exit(ProcessTerminated(signal=9))
        self.pipes.pump()
        self.assertEqual(self.live(), [])
        self.assertTrue(self.pool.ready)

    def test_local_reloaded(self):
        """
        A reload puts the new bundle in service in this process too.
        """
        self.pool = self.local_pool(1)
        self.start()
        new = make_bundle()
        self.store.bundle = new
        d = self.pool.restart(self.config)
        self.pipes.pump()
        self.successResultOf(d)
        [local] = self.locals
        self.assertIs(local.bundle, new)
        self.assertEqual(local.restarts[-1].port, FAKE_PORT)
        self.assertEqual(self.spawned[0].authority.bundle.issuer, new.issuer)

    def test_local_stopped(self):
        """
        Stopping the pool stops this process's server as well as the
        workers.
        """
        self.pool = self.local_pool(1)
        self.start()
        d = self.pool.stop()
        self.pipes.pump()
        self.successResultOf(d)
        self.assertEqual(self.locals[0].stops, 1)
        self.assertEqual(self.live(), [])
        self.assertFalse(self.pool.ready)

    def test_local_start_failure(self):
        """
        When this process cannot serve (the port is taken), the start fails
        with that reason and no worker is spawned.
        """
        def refusing_factory(config, trust_store):
            return _FakeWorkerAuthority(
                _Script(start_error=RuntimeError("port in use")),
                config,
                self.clock,
                trust_store,
                None,
                self.metrics,
            )

        self.pool = self.make_pool(1, local_factory=refusing_factory)
        d = self.pool.start(self.config)
        self.pipes.pump()
        self.failureResultOf(d, RuntimeError)
        self.assertEqual(self.spawned, [])
        self.assertFalse(self.pool.ready)

    def test_ready_once_every_worker_answered(self):
        """
        The pool is not ready, nor is C{start} done, until every worker has
        answered its Start.
        """
        held = Deferred()
        self.scripts[1] = _Script(start_result=held)
        d = self.pool.start(self.config)
        self.pipes.pump()
        self.assertNoResult(d)
        self.assertFalse(self.pool.ready)
        held.callback(None)
        self.pipes.pump()
        self.successResultOf(d)
        self.addCleanup(self.stop)
        self.assertTrue(self.pool.ready)

    def test_start_refused(self):
        """
        A worker that cannot start fails C{start} with its reason; every
        worker spawned is stopped, and the pool is not ready.
        """
        self.scripts[0] = _Script(
            start_error=RuntimeError("cannot listen on 127.0.0.1:0: address in use")
        )
        d = self.pool.start(self.config)
        self.pipes.pump()
        failure = self.failureResultOf(d, WorkerError)
        self.assertIn("address in use", failure.getErrorMessage())
        self.assertEqual(self.live(), [])
        self.assertFalse(self.pool.ready)

    def test_start_failure_fatal(self):
        """
        C{startService} hands a failed start to C{on_start_failure}.
        """
        failures = []
        self.pool = self.make_pool(1, on_start_failure=failures.append)
        self.store.error = BundleError("ca.crt", "no certificate")
        self.pool.startService()
        self.pipes.pump()
        self.assertEqual(len(failures), 1)
        self.assertTrue(failures[0].check(BundleError))
        self.assertEqual(self.spawned, [])

    def test_worker_dies_before_answering(self):
        """
        A worker that ends before it answers Start fails C{start} with its
        exit status.
        """
        d = self.pool.start(self.config)
        self.spawned[0].exit(ProcessTerminated(exitCode=1))
        self.pipes.pump()
        failure = self.failureResultOf(d, WorkerError)
        self.assertIn("worker 0", failure.getErrorMessage())
        self.assertIn("exit status 1", failure.getErrorMessage())

    def test_unexpected_end_respawned_with_backoff(self):
        """
        A worker that ends unexpectedly is logged as an error with its exit
        status and started again with the current bundle after 1 s, then
        2 s, 4 s ... up to 30 s when it keeps ending.
        """
        self.start()
        delays = []
        for attempt in range(7):
            self.spawned[-1 if attempt else 1].exit(ProcessTerminated(signal=9))
            self.pipes.pump()
            before = len(self.spawned)
            waited = 0.0
            while len(self.spawned) == before:
                self.clock.advance(0.5)
                waited += 0.5
            self.pipes.pump()
            delays.append(waited)
        self.assertEqual(delays, [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0])
        self.assertTrue(self.pool.ready)
        self.assertEqual(self.serving[-1], (1, self.spawned[-1].pid))
        self.assertEqual(self.spawned[-1].authority.bundle.issuer, self.bundle.issuer)
        errors = log_messages(self.events, LogLevel.error, with_failures=True)
        self.assertIn("worker 1 (pid 1001) ended unexpectedly: signal 9", errors)

    def test_backoff_starts_over_after_serving_long(self):
        """
        A worker that served for the longest delay or more is started again
        after the shortest delay.
        """
        self.start()
        self.spawned[1].exit(ProcessTerminated(signal=9))
        self.clock.advance(1.0)
        self.pipes.pump()
        self.spawned[-1].exit(ProcessTerminated(signal=9))
        self.clock.advance(2.0)
        self.pipes.pump()
        self.clock.advance(30.0)
        self.pipes.pump()
        before = len(self.spawned)
        self.spawned[-1].exit(ProcessTerminated(signal=9))
        self.clock.advance(1.0)
        self.pipes.pump()
        self.assertEqual(len(self.spawned), before + 1)

    def test_ready_while_one_serves(self):
        """
        The pool stays ready while at least one worker serves.
        """
        self.start()
        self.spawned[0].exit(ProcessTerminated(signal=9))
        self.pipes.pump()
        self.assertTrue(self.pool.ready)
        self.spawned[1].exit(ProcessTerminated(signal=9))
        self.pipes.pump()
        self.assertFalse(self.pool.ready)
        self.clock.advance(1.0)
        self.pipes.pump()
        self.assertTrue(self.pool.ready)

    def test_respawn_refused_tried_again(self):
        """
        A respawned worker that cannot start is killed, and tried again
        after a longer delay.
        """
        self.start()
        self.scripts[2] = _Script(start_error=RuntimeError("no"))
        self.spawned[1].exit(ProcessTerminated(signal=9))
        self.clock.advance(1.0)
        self.pipes.pump()
        self.assertEqual(self.spawned[2].signals, ["KILL"])
        self.assertEqual(len(self.spawned), 3)
        self.clock.advance(2.0)
        self.pipes.pump()
        self.assertEqual(len(self.spawned), 4)
        self.assertTrue(self.spawned[3].authority.ready)

    def test_restart(self):
        """
        A restart loads the new bundle and puts it in every worker, with the
        configuration and the bound port.
        """
        self.start()
        new = make_bundle()
        self.store.bundle = new
        d = self.pool.restart(self.config)
        self.pipes.pump()
        self.successResultOf(d)
        self.assertIs(self.pool.bundle, new)
        for worker in self.spawned:
            self.assertEqual(worker.authority.bundle.issuer, new.issuer)
            self.assertEqual(worker.authority.restarts[-1].port, FAKE_PORT)
        self.assertEqual(
            self.metrics.issuercert_expiry_timestamp._value.get(),
            new.issuer.not_valid_after_utc.timestamp(),
        )

    def test_restart_while_starting(self):
        """
        A restart asked for while the pool starts runs once the start is
        over.
        """
        held = Deferred()
        self.scripts[1] = _Script(start_result=held)
        started = self.pool.start(self.config)
        self.pipes.pump()
        self.addCleanup(self.stop)
        new = make_bundle()
        self.store.bundle = new
        d = self.pool.restart(self.config)
        self.pipes.pump()
        self.assertNoResult(d)
        self.assertEqual(self.spawned[0].authority.restarts, [])
        held.callback(None)
        self.pipes.pump()
        self.successResultOf(started)
        self.successResultOf(d)
        self.assertIs(self.pool.bundle, new)
        for worker in self.spawned:
            self.assertEqual(worker.authority.bundle.issuer, new.issuer)

    def test_restart_unchanged(self):
        """
        A restart that finds the same bundle and configuration pushes
        nothing to the workers.
        """
        self.start()
        self.store.bundle = TrustBundle.from_certificates(
            self.bundle.anchors, self.bundle.issuer_chain, self.bundle.issuer_key
        )
        d = self.pool.restart(self.config)
        self.pipes.pump()
        self.successResultOf(d)
        self.assertIs(self.pool.bundle, self.bundle)
        for worker in self.spawned:
            self.assertEqual(worker.authority.restarts, [])
        self.assertIn(
            "issuer credentials unchanged",
            log_messages(self.events, with_failures=True),
        )

    def test_restart_not_running(self):
        """
        C{restart} before C{start} fails with L{NotRunningError}.
        """
        self.failureResultOf(self.pool.restart(self.config), NotRunningError)

    def test_restart_refused(self):
        """
        A bundle the store refuses fails the restart, is counted and logged,
        and reaches no worker: the old bundle stays everywhere.
        """
        self.start()
        self.store.error = BundleError("issuer.crt", "garbage")
        d = self.pool.restart(self.config)
        self.pipes.pump()
        self.failureResultOf(d, BundleError)
        self.assertIs(self.pool.bundle, self.bundle)
        self.assertEqual(self.metrics.issuercert_reload_failed._value.get(), 1)
        for worker in self.spawned:
            self.assertEqual(worker.authority.restarts, [])
        self.assertTrue(self.pool.ready)
        self.assertTrue(
            any(
                "issuer.crt: garbage" in text
                for text in log_messages(self.events, LogLevel.error, with_failures=True)
            )
        )

    def test_restart_refused_by_worker(self):
        """
        A worker that refuses the new bundle is logged, told to stop and
        started again with the new bundle; the other keeps serving, and the
        restart succeeds.
        """
        self.scripts[1] = _Script(restart_error=RuntimeError("out of memory"))
        self.start()
        new = make_bundle()
        self.store.bundle = new
        d = self.pool.restart(self.config)
        self.pipes.pump()
        self.successResultOf(d)
        self.assertTrue(self.spawned[1].ended)
        self.assertEqual(self.spawned[1].authority.stops, 1)
        self.assertTrue(self.pool.ready)
        self.clock.advance(1.0)
        self.pipes.pump()
        self.assertEqual(len(self.spawned), 3)
        self.assertEqual(self.spawned[2].authority.bundle.issuer, new.issuer)
        self.assertEqual(self.spawned[0].authority.bundle.issuer, new.issuer)
        errors = log_messages(self.events, LogLevel.error, with_failures=True)
        self.assertTrue(
            any(
                "worker 1 (pid 1001) did not take the new trust bundle" in text
                and "out of memory" in text
                for text in errors
            ),
            errors,
        )

    def test_counters_pulled(self):
        """
        Every second, the workers' counter increments are added to the
        parent's metrics; a stopping worker's last counts are added too.
        """
        self.start()
        for worker in self.spawned:
            worker.authority.metrics.sign_request_received.inc(3)
            worker.authority.metrics.sign_success.inc(2)
            worker.authority.metrics.sign_failure.labels(reason="validator").inc()
        self.clock.advance(0.9)
        self.pipes.pump()
        self.assertEqual(self.metrics.sign_success._value.get(), 0)
        self.clock.advance(0.1)
        self.pipes.pump()
        self.assertEqual(self.metrics.sign_request_received._value.get(), 6)
        self.assertEqual(self.metrics.sign_success._value.get(), 4)
        self.assertEqual(
            self.metrics.sign_failure.labels(reason="validator")._value.get(), 2
        )
        self.spawned[0].authority.metrics.sign_success.inc()
        self.stop()
        self.assertEqual(self.metrics.sign_success._value.get(), 5)

    def test_collect_counters_survives_silent_worker(self):
        """
        A worker that does not answer Counters does not stop the pulls of
        the others, and is logged.
        """
        self.start()
        self.spawned[1].write = lambda data: None
        self.spawned[0].authority.metrics.sign_success.inc()
        d = self.pool.collect_counters()
        self.pipes.pump()
        self.assertNoResult(d)
        self.clock.advance(5.0)
        self.pipes.pump()
        self.successResultOf(d)
        self.assertEqual(self.metrics.sign_success._value.get(), 1)
        self.assertTrue(
            any(
                "could not read the counters of worker 1" in text
                for text in log_messages(self.events, LogLevel.warn, with_failures=True)
            )
        )
        self.spawned[1].exit(ProcessDone(0))

    def test_stop(self):
        """
        C{stop} tells every worker to stop, waits for their ends, and leaves
        the pool not ready with no worker left or respawning.
        """
        self.start()
        self.spawned[0].exit(ProcessTerminated(signal=9))
        self.pipes.pump()
        d = self.pool.stop()
        self.pipes.pump()
        self.successResultOf(d)
        self.assertFalse(self.pool.ready)
        self.assertEqual(self.live(), [])
        self.assertEqual(self.spawned[1].authority.stops, 1)
        self.clock.advance(60)
        self.pipes.pump()
        self.assertEqual(len(self.spawned), 2)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stop_kills_stragglers(self):
        """
        A worker that has not exited the grace period plus a margin after it
        was told to stop is killed.
        """
        self.scripts[1] = _Script(stubborn=True)
        self.start()
        d = self.pool.stop()
        self.pipes.pump()
        self.assertNoResult(d)
        self.clock.advance(SHUTDOWN_GRACE_SECONDS + STOP_MARGIN_SECONDS - 0.1)
        self.assertEqual(self.spawned[1].signals, [])
        self.clock.advance(0.1)
        self.assertEqual(self.spawned[1].signals, ["KILL"])
        self.successResultOf(d)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stop_never_hangs(self):
        """
        C{stop} finishes even when a killed worker is never reaped, and says
        so.
        """
        self.scripts[1] = _Script(stubborn=True, unkillable=True)
        self.start()
        d = self.pool.stop()
        self.pipes.pump()
        self.clock.advance(
            SHUTDOWN_GRACE_SECONDS + STOP_MARGIN_SECONDS + KILL_WAIT_SECONDS
        )
        self.successResultOf(d)
        self.assertTrue(
            any(
                "was killed but has not ended" in text
                for text in log_messages(self.events, LogLevel.error, with_failures=True)
            )
        )
        self.spawned[1].exit(ProcessTerminated(signal=9))

    def test_key_never_logged(self):
        """
        Neither the issuer key's PEM nor its base64 body appears in any log
        event, through start, restart and a worker's refusal.
        """
        self.scripts[1] = _Script(restart_error=RuntimeError("refused"))
        self.config = SentryConfig(
            listen_address="127.0.0.1", port=0, log_level="debug"
        )
        self.pool = self.make_pool(2)
        self.start()
        self.store.bundle = make_bundle()
        d = self.pool.restart(self.config)
        self.pipes.pump()
        self.successResultOf(d)
        self.clock.advance(1.0)
        self.pipes.pump()
        text = "\n".join(log_messages(self.events, with_failures=True))
        # The logs checked hold the refusal, where a key would most likely leak.
        self.assertIn("did not take the new trust bundle", text)
        for bundle in (self.bundle, self.store.bundle):
            key_pem = bundle_to_pems(bundle)[2]
            body = key_pem.splitlines()[1].decode("ascii")
            self.assertNotIn(body, text)


class WorkerCommandsTests(SynchronousTestCase):
    """
    L{WorkerCommands}, the worker's side, called directly.
    """

    def setUp(self):
        self.clock = ImmediateReactor(FIXED_NOW.timestamp())
        self.bundle = make_bundle()
        self.script = _Script()
        self.authorities = []
        self.stopped = []
        self.commands = WorkerCommands(
            self.clock,
            SentryMetrics(),
            {},
            authority_factory=self._authority_factory,
            on_stopped=lambda: self.stopped.append(True),
        )

    def _authority_factory(self, *arguments, jwt_minter=None):
        authority = _FakeWorkerAuthority(self.script, *arguments)
        self.authorities.append(authority)
        return authority

    def arguments(self, bundle=None, config=None):
        anchors_pem, chain_pem, key_pem = bundle_to_pems(bundle or self.bundle)
        return {
            "config_json": config_to_json(config or SentryConfig(port=0)),
            "anchors_pem": anchors_pem,
            "chain_pem": chain_pem,
            "key_pem": key_pem,
        }

    def test_start(self):
        """
        Start serves the bundle sent with the standalone validators and
        answers the port bound.
        """
        answer = self.successResultOf(self.commands.start(**self.arguments()))
        self.assertEqual(answer, {"port": FAKE_PORT})
        [authority] = self.authorities
        self.assertEqual(authority.bundle.issuer, self.bundle.issuer)
        self.assertEqual(list(authority.validator_set.validators), [VALIDATOR_INSECURE])
        self.assertEqual(authority.validator_set.default_validator, VALIDATOR_INSECURE)

    def test_start_twice(self):
        """
        A second Start is refused.
        """
        self.successResultOf(self.commands.start(**self.arguments()))
        self.assertRaises(WorkerRefused, self.commands.start, **self.arguments())

    def test_start_failure_message(self):
        """
        A failure written for an operator is answered with its message;
        any other only with its type, and logged in the worker.
        """
        events = capture_logs(self)
        self.script.start_error = RuntimeError("cannot listen on 127.0.0.1:1: in use")
        failure = self.failureResultOf(
            self.commands.start(**self.arguments()), WorkerRefused
        )
        self.assertEqual(
            failure.getErrorMessage(),
            "could not start serving: cannot listen on 127.0.0.1:1: in use",
        )
        self.commands = WorkerCommands(
            self.clock, SentryMetrics(), {}, authority_factory=self._authority_factory
        )
        self.script.start_error = KeyError("SECRET")
        failure = self.failureResultOf(
            self.commands.start(**self.arguments()), WorkerRefused
        )
        self.assertEqual(
            failure.getErrorMessage(),
            "could not start serving: KeyError (see the worker's log)",
        )
        texts = log_messages(events, with_failures=True)
        self.assertTrue(any("SECRET" in text for text in texts))
        self.assertEqual(len(self.flushLoggedErrors(KeyError)), 1)

    def test_bad_key_refused_without_quoting_it(self):
        """
        A key that does not parse is refused with a message that does not
        quote it.
        """
        arguments = self.arguments()
        arguments["key_pem"] = arguments["key_pem"].replace(b"\n", b"\nSECRET", 1)
        error = self.assertRaises(WorkerRefused, self.commands.start, **arguments)
        self.assertEqual(
            str(error), "the trust bundle cannot be used: the issuer key does not parse"
        )

    def test_reload(self):
        """
        Reload puts the new bundle and configuration in service.
        """
        self.successResultOf(self.commands.start(**self.arguments()))
        new = make_bundle()
        config = SentryConfig(port=FAKE_PORT, trust_domain="example.org")
        self.successResultOf(self.commands.reload(**self.arguments(new, config)))
        [authority] = self.authorities
        self.assertEqual(authority.bundle.issuer, new.issuer)
        self.assertEqual(authority.restarts, [config])

    def test_reload_refused(self):
        """
        A refused reload is answered with the reason, and the worker's store
        keeps the old bundle.
        """
        self.successResultOf(self.commands.start(**self.arguments()))
        self.script.restart_error = BundleError("ca.crt", "expired")
        d = self.commands.reload(**self.arguments(make_bundle()))
        failure = self.failureResultOf(d, WorkerRefused)
        self.assertIn("ca.crt: expired", failure.getErrorMessage())
        self.assertEqual(
            self.authorities[0].trust_store.bundle.issuer, self.bundle.issuer
        )

    def test_reload_before_start(self):
        """
        Reload before Start is refused.
        """
        self.assertRaises(WorkerRefused, self.commands.reload, **self.arguments())

    def test_stop(self):
        """
        Stop stops the authority, answers the last counts, then (a turn
        later) asks for the pipe to close; stopping again changes nothing.
        """
        self.successResultOf(self.commands.start(**self.arguments()))
        self.authorities[0].metrics.sign_success.inc(2)
        answer = self.successResultOf(self.commands.stop())
        self.assertEqual(answer["success"], 2)
        self.assertEqual(self.authorities[0].stops, 1)
        self.assertEqual(self.stopped, [])
        self.clock.advance(0)
        self.assertEqual(self.stopped, [True])
        self.successResultOf(self.commands.stop_serving())
        self.assertEqual(self.authorities[0].stops, 1)
        self.assertRaises(WorkerRefused, self.commands.start, **self.arguments())


class PushedTrustStoreTests(SynchronousTestCase):
    """
    L{PushedTrustStore}.
    """

    def test_interface(self):
        """
        It provides L{ITrustStore} and answers with the bundle pushed last,
        loading or generating alike.
        """
        bundle, later = make_bundle(), make_bundle()
        store = PushedTrustStore(bundle)
        verifyObject(ITrustStore, store)
        store.bundle = later
        self.assertIs(self.successResultOf(store.load(FIXED_NOW)), later)
        self.assertIs(self.successResultOf(store.load_or_generate(FIXED_NOW)), later)


# Real worker processes.


def _authority_key_identifier(response):
    leaf = x509.load_pem_x509_certificates(response.workload_certificate)[0]
    return leaf.extensions.get_extension_for_class(
        x509.AuthorityKeyIdentifier
    ).value.key_identifier


class WorkerProcessTests(TestCase):
    """
    One real worker process, spoken to directly.
    """

    timeout = 30

    def spawn(self):
        """
        Start a worker process; kill it at cleanup if it still runs.
        """
        process = WorkerProcess(0)
        reactor.spawnProcess(
            process,
            sys.executable,
            [sys.executable, "-m", WORKER_MODULE, "--log-level", "warn"],
            env=child_environment(),
            childFDs={0: "w", 1: "r", 2: 2},
        )

        def kill():
            process.kill()
            return process.wait_ended()

        self.addCleanup(kill)
        return process

    @inlineCallbacks
    def test_exits_when_stdin_closes(self):
        """
        A worker ignores SIGINT, and exits with status 0 when its stdin
        closes.
        """
        process = self.spawn()
        yield process.call(Counters)
        process.transport.signalProcess("INT")
        answer = yield process.call(Counters)
        self.assertEqual(answer["received"], 0)
        process.close_stdin()
        reason = yield process.wait_ended()
        self.assertIsInstance(reason, ProcessDone)

    @inlineCallbacks
    def test_sigterm(self):
        """
        A worker exits with status 0 on SIGTERM.
        """
        process = self.spawn()
        yield process.call(Counters)
        process.transport.signalProcess("TERM")
        reason = yield process.wait_ended()
        self.assertIsInstance(reason, ProcessDone)

    @inlineCallbacks
    def test_start_refused_over_the_pipe(self):
        """
        A refusal crosses the pipe as L{WorkerRefused} with its message.
        """
        process = self.spawn()
        anchors_pem, chain_pem, _ = bundle_to_pems(make_bundle())
        error = yield self.assertFailure(
            process.call(
                Start,
                config_json=config_to_json(SentryConfig()),
                anchors_pem=anchors_pem,
                chain_pem=chain_pem,
                key_pem=b"garbage",
            ),
            WorkerRefused,
        )
        self.assertEqual(
            str(error), "the trust bundle cannot be used: the issuer key does not parse"
        )
        process.close_stdin()
        yield process.wait_ended()


class WorkerPoolProcessTests(TestCase):
    """
    L{WorkerPoolAuthority} with two real worker processes serving real gRPC
    on 127.0.0.1, and a real client in a thread.
    """

    timeout = 60

    @inlineCallbacks
    def setUp(self):
        self.generated = generate_bundle(
            "cluster.local", "default", utc_now(), timedelta(minutes=15)
        )
        self.next = generate_bundle(
            "cluster.local", "default", utc_now(), timedelta(minutes=15)
        )
        self.store = FakeTrustStore(self.generated.bundle)
        self.metrics = SentryMetrics()
        self.config = SentryConfig(
            trust_domain="cluster.local",
            listen_address="127.0.0.1",
            port=0,
            log_level="warn",
        )
        self.serving = DeferredQueue()
        self.pool = WorkerPoolAuthority(
            self.config,
            reactor,
            self.store,
            self.metrics,
            2,
            environ=child_environment(),
            on_worker_serving=lambda index, pid: self.serving.put((index, pid)),
            respawn_initial_delay_seconds=0.1,
        )
        yield self.pool.start(self.config)
        self.addCleanup(self.pool.stop)
        self.client = GrpcTestClient(
            f"127.0.0.1:{self.pool.port}",
            self.generated.anchors_pem + self.next.anchors_pem,
        )
        self.addCleanup(self.client.close)

    def sign(self, app_id="myapp"):
        """
        Sign a new CSR for C{app_id} in a thread.
        """
        _, csr = make_csr()
        return deferToThread(
            self.client.sign,
            sentry_pb2.SignCertificateRequest(
                id=app_id,
                namespace="default",
                certificate_signing_request=csr,
                token_validator=sentry_pb2.SignCertificateRequest.INSECURE,
            ),
        )

    @inlineCallbacks
    def test_signs_and_counts(self):
        """
        Both workers bind the same port; calls are signed, and after a
        counters pull the parent's metrics count every call.
        """
        processes = self.pool.processes()
        self.assertTrue(self.pool.ready)
        self.assertEqual(len({process.pid for process in processes}), 2)
        self.assertEqual({process.port for process in processes}, {self.pool.port})
        for _ in range(3):
            response = yield self.sign()
            self.assertEqual(
                _authority_key_identifier(response),
                self.generated.bundle.authority_key_identifier.key_identifier,
            )
        error = yield self.assertFailure(self.sign(app_id=""), grpc.RpcError)
        self.assertEqual(error.code(), grpc.StatusCode.PERMISSION_DENIED)
        yield self.pool.collect_counters()
        self.assertEqual(self.metrics.sign_success._value.get(), 3)
        self.assertEqual(self.metrics.sign_request_received._value.get(), 4)
        self.assertEqual(
            self.metrics.sign_failure.labels(reason="validator")._value.get(), 1
        )

    @inlineCallbacks
    def test_restart_new_bundle(self):
        """
        After a restart with a new bundle, calls are signed by the new
        issuer.
        """
        self.store.bundle = self.next.bundle
        yield self.pool.restart(self.config)
        response = yield self.sign()
        self.assertEqual(
            _authority_key_identifier(response),
            self.next.bundle.authority_key_identifier.key_identifier,
        )

    @inlineCallbacks
    def test_restart_refused(self):
        """
        A refused bundle fails the restart, is counted, and the old issuer
        keeps signing.
        """
        self.store.error = BundleError("issuer.crt", "garbage")
        yield self.assertFailure(self.pool.restart(self.config), BundleError)
        self.assertEqual(self.metrics.issuercert_reload_failed._value.get(), 1)
        self.assertIs(self.pool.bundle, self.generated.bundle)
        response = yield self.sign()
        self.assertEqual(
            _authority_key_identifier(response),
            self.generated.bundle.authority_key_identifier.key_identifier,
        )

    @inlineCallbacks
    def test_killed_worker_respawned(self):
        """
        A worker killed with SIGKILL is logged with its signal and started
        again; the pool stays ready and keeps signing.
        """
        events = capture_logs(self)
        yield self.serving.get()
        yield self.serving.get()
        victim = self.pool.processes()[1]
        os.kill(victim.pid, signal.SIGKILL)
        index, pid = yield self.serving.get()
        self.assertEqual(index, 1)
        self.assertNotEqual(pid, victim.pid)
        self.assertTrue(self.pool.ready)
        self.assertIn(
            f"worker 1 (pid {victim.pid}) ended unexpectedly: signal 9",
            log_messages(events, LogLevel.error, with_failures=True),
        )
        yield self.sign()

    @inlineCallbacks
    def test_stop_ends_every_worker(self):
        """
        After C{stop}, every worker process has exited with status 0 and the
        pool is not ready.
        """
        processes = self.pool.processes()
        self.assertEqual(len(processes), 2)
        yield self.pool.stop()
        self.assertFalse(self.pool.ready)
        for process in processes:
            self.assertIsInstance(process.exit_reason, ProcessDone)
            self.assertRaises(ProcessLookupError, os.kill, process.pid, 0)
