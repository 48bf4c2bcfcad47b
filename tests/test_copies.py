"""
Tests for the serving copies' supervision (L{sentry_tx.server.copies}), their
liveness check (L{sentry_tx.server.liveness}) and the private directory
(L{sentry_tx.rundir}).
"""

import os

from twisted.internet import error, reactor, task
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.logger import LogLevel
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from sentry_tx.metrics import SentryMetrics
from sentry_tx.rundir import PrivateDirectory
from sentry_tx.server import copies
from sentry_tx.server.copies import ServingCopies
from sentry_tx.server.liveness import liveness_site, probe
from sentry_tx.testing.logs import capture_logs, log_messages


class _FakeTransport:
    def __init__(self, pid):
        self.pid = pid
        self.signals = []
        self.stdin_closed = False

    def signalProcess(self, name):
        self.signals.append(name)

    def closeStdin(self):
        self.stdin_closed = True


class _ProcessReactor(Clock):
    """
    A clock that records spawned processes instead of running them.
    """

    def __init__(self):
        super().__init__()
        self.spawned = []
        self._next_pid = 1000

    failures = 0
    """
    How many of the next spawns fail as C{fork} does when it cannot.
    """

    def spawnProcess(self, protocol, executable, args, env=None, childFDs=None):
        if self.failures:
            self.failures -= 1
            raise OSError(11, "Resource temporarily unavailable")
        self._next_pid += 1
        transport = _FakeTransport(self._next_pid)
        protocol.makeConnection(transport)
        self.spawned.append((protocol, args, env, childFDs))
        return transport

    def end(self, protocol, reason):
        protocol.processEnded(Failure(reason))


class _Authority:
    port = 4242

    class config:
        listen_address = "127.0.0.1"

    def when_serving(self):
        return succeed(None)


class _Directory:
    path = "/nonexistent-private"
    metrics_path = "/nonexistent-private/metrics"

    def socket_path(self, name):
        return os.path.join(self.path, name)


class ServingCopiesTests(SynchronousTestCase):
    """
    Supervision with a fake reactor: spawn, liveness, restart with backoff.
    """

    def setUp(self):
        self.reactor = _ProcessReactor()
        self.metrics = SentryMetrics()
        self.answers = {}
        self.copies = ServingCopies(
            _Authority(),
            self.reactor,
            _Directory(),
            ["--trust-domain", "example.org"],
            2,
            self.metrics,
            environ={"PATH": "/bin"},
            executable="/py",
            check=self.check,
        )

    def check(self, reactor, path, timeout):
        answer = self.answers.get(path, True)
        return answer if isinstance(answer, Deferred) else succeed(answer)

    def value(self, name):
        return self.metrics.registry.get_sample_value(name) or 0.0

    def start_serving(self):
        self.copies.startService()
        self.reactor.advance(copies.LIVENESS_INTERVAL_SECONDS)

    def test_spawn_same_flags_through_entry_point(self):
        """
        Each copy runs C{python -m sentry_tx serve} with the same flags and
        the bound port, its stdin a pipe and its stdout and stderr this
        process's own, with the metrics directory and its socket.
        """
        self.copies.startService()
        self.assertEqual(len(self.reactor.spawned), 2)
        _, args, env, child_fds = self.reactor.spawned[0]
        self.assertEqual(
            args,
            ["/py", "-m", "sentry_tx", "serve", "--trust-domain", "example.org",
             "--port", "4242"],
        )
        self.assertEqual(child_fds, {0: "w", 1: 1, 2: 2})
        self.assertEqual(env["PROMETHEUS_MULTIPROC_DIR"], _Directory.metrics_path)
        self.assertEqual(
            env[copies.LIVENESS_SOCKET_VARIABLE], "/nonexistent-private/copy-0.sock"
        )

    def test_serving_counted_and_described(self):
        """
        Copies that answer their check count as serving: the gauge and the
        healthz body say so.
        """
        self.copies.startService()
        self.assertEqual(self.value("dapr_sentry_serving_processes"), 1)
        self.assertEqual(self.copies.describe(), "serving processes: 1 of 3\n")
        self.reactor.advance(copies.STARTING_CHECK_INTERVAL_SECONDS)
        self.assertEqual(self.value("dapr_sentry_serving_processes"), 3)
        self.assertEqual(self.copies.describe(), "serving processes: 3 of 3\n")

    def test_stuck_copy_killed(self):
        """
        A serving copy that fails its checks twice in a row is killed with
        SIGKILL; one failure is not enough.
        """
        self.start_serving()
        stuck = "/nonexistent-private/copy-1.sock"
        self.answers[stuck] = False
        protocol = self.reactor.spawned[1][0]
        self.reactor.advance(copies.LIVENESS_INTERVAL_SECONDS)
        self.assertEqual(protocol.transport.signals, [])
        self.reactor.advance(copies.LIVENESS_INTERVAL_SECONDS)
        self.assertEqual(protocol.transport.signals, ["KILL"])

    def test_pending_check_not_repeated(self):
        """
        A check that has not answered is not asked again beside itself; its
        timeout counts as one failure.
        """
        self.start_serving()
        pending = Deferred()
        self.answers["/nonexistent-private/copy-0.sock"] = pending
        asked = []
        original = self.check

        def counting(reactor, path, timeout):
            asked.append(path)
            return original(reactor, path, timeout)

        self.copies._check = counting
        self.reactor.advance(copies.LIVENESS_INTERVAL_SECONDS)
        self.reactor.advance(copies.LIVENESS_INTERVAL_SECONDS)
        self.assertEqual(asked.count("/nonexistent-private/copy-0.sock"), 1)

    def test_ended_copy_restarted_with_backoff(self):
        """
        A copy that ends is counted, logged at error and started again after
        a delay that doubles while it keeps ending.
        """
        self.start_serving()
        first = self.reactor.spawned[0][0]
        self.reactor.end(first, error.ProcessTerminated(signal=9))
        self.assertEqual(self.value("dapr_sentry_serving_process_restarts_total"), 1)
        self.assertEqual(self.value("dapr_sentry_serving_processes"), 2)
        self.reactor.advance(copies.RESPAWN_INITIAL_DELAY_SECONDS)
        self.assertEqual(len(self.reactor.spawned), 3)
        second = self.reactor.spawned[2][0]
        self.reactor.end(second, error.ProcessTerminated(exitCode=1))
        self.reactor.advance(copies.RESPAWN_INITIAL_DELAY_SECONDS)
        self.assertEqual(len(self.reactor.spawned), 3)
        self.reactor.advance(copies.RESPAWN_INITIAL_DELAY_SECONDS)
        self.assertEqual(len(self.reactor.spawned), 4)
        self.assertEqual(self.reactor.spawned[3][1][-1], "4242")
        self.assertEqual(self.value("dapr_sentry_serving_process_restarts_total"), 2)
        errors = [e for e in self.flushLoggedErrors()]
        self.assertEqual(errors, [])

    def test_failed_spawn_retried_with_backoff(self):
        """
        A copy that cannot be started is logged at error, not supervised,
        and tried again after the respawn delay, which doubles.
        """
        events = capture_logs(self)
        self.reactor.failures = 3
        self.copies.startService()
        self.assertEqual(len(self.reactor.spawned), 0)
        self.assertEqual(self.copies.serving, 0)
        delay = copies.RESPAWN_INITIAL_DELAY_SECONDS
        # Both retried after the first delay; copy 0 fails once more.
        self.reactor.advance(delay)
        self.assertEqual(len(self.reactor.spawned), 1)
        # Copy 0's next try comes after twice the delay.
        self.reactor.advance(delay)
        self.assertEqual(len(self.reactor.spawned), 1)
        self.reactor.advance(delay)
        self.assertEqual(len(self.reactor.spawned), 2)
        failures = [
            m
            for m in log_messages(events, LogLevel.error)
            if "could not start serving process" in m
        ]
        self.assertEqual(len(failures), 3)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_stop_closes_stdin_then_kills(self):
        """
        Stopping closes every copy's stdin, restarts none, and kills one
        still running after the drain grace and margin.
        """
        self.start_serving()
        d = self.copies.stopService()
        protocols = [spawned[0] for spawned in self.reactor.spawned]
        self.assertTrue(all(p.transport.stdin_closed for p in protocols))
        self.reactor.end(protocols[0], error.ProcessDone(0))
        self.assertNoResult(d)
        self.reactor.advance(
            copies.SHUTDOWN_GRACE_SECONDS + copies.STOP_MARGIN_SECONDS
        )
        self.assertEqual(protocols[1].transport.signals, ["KILL"])
        self.reactor.end(protocols[1], error.ProcessTerminated(signal=9))
        self.successResultOf(d)
        self.reactor.advance(copies.RESPAWN_MAX_DELAY_SECONDS)
        self.assertEqual(len(self.reactor.spawned), 2)

    def test_no_copies(self):
        """
        With one serving process, nothing is spawned and this process is the
        one serving process.
        """
        self.copies.count = 0
        self.copies.startService()
        self.assertEqual(self.reactor.spawned, [])
        self.assertEqual(self.value("dapr_sentry_serving_processes"), 1)


class _LoopAuthority:
    """
    An authority whose loop round trip comes back with C{result}: None
    (it came back), an exception (it does not serve), or never when
    C{result} is a Deferred that never fires.
    """

    def __init__(self, result=None):
        self._result = result

    def loop_round_trip(self):
        if isinstance(self._result, Deferred):
            return self._result
        if isinstance(self._result, Exception):
            return fail(self._result)
        return succeed(None)


class LivenessTests(TestCase):
    """
    The liveness socket, over a real Unix socket.
    """

    def ask(self, authority, timeout_seconds=5.0):
        """
        Serve C{authority}'s liveness on a Unix socket and ask it once.
        """
        import shutil
        import tempfile

        # A short path: a Unix socket's may not be longer than 107 bytes.
        directory = tempfile.mkdtemp(prefix="sentry-tx-test-")
        self.addCleanup(shutil.rmtree, directory)
        path = os.path.join(directory, "copy.sock")
        port = reactor.listenUNIX(path, liveness_site(authority, reactor))
        self.addCleanup(port.stopListening)
        return probe(reactor, path, timeout_seconds)

    def test_live_after_loop_round_trip(self):
        """
        The answer is 200 once the round trip through the gRPC loop came
        back.
        """
        return self.ask(_LoopAuthority()).addCallback(self.assertTrue)

    def test_stuck_loop_times_out(self):
        """
        A loop that never answers makes the check fail at its time bound.
        """
        return self.ask(_LoopAuthority(Deferred()), 0.2).addCallback(self.assertFalse)

    def test_late_round_trip_after_asker_left(self):
        """
        A round trip that comes back after the asker gave up writes nothing
        and raises nothing.
        """
        late = Deferred()
        d = self.ask(_LoopAuthority(late), 0.2)
        d.addCallback(self.assertFalse)

        def come_back(_):
            # Let the server see the connection close, then answer.
            return task.deferLater(reactor, 0.1, late.callback, None)

        return d.addCallback(come_back)

    def test_not_serving_fails(self):
        """
        An authority that does not serve answers 503: the check fails.
        """
        authority = _LoopAuthority(RuntimeError("not serving"))
        return self.ask(authority).addCallback(self.assertFalse)

    def test_no_socket_fails(self):
        """
        Nobody listening: the check fails at once.
        """
        return probe(reactor, os.path.abspath(self.mktemp()), 5.0).addCallback(
            self.assertFalse
        )


class ServeCommandTests(SynchronousTestCase):
    """
    C{python -m sentry_tx serve} is for the twistd process only.
    """

    def test_refused_without_the_parent(self):
        """
        Without the liveness socket and metrics directory the twistd process
        passes, it exits 2 with one line saying how to run sentry_tx.
        """
        import io

        from sentry_tx.serve import main

        stderr = io.StringIO()
        self.assertEqual(main(["--port", "1"], environ={}, stderr=stderr), 2)
        self.assertIn("twistd -n sentry", stderr.getvalue())
        self.assertEqual(stderr.getvalue().count("\n"), 1)


class ParentPipeTests(TestCase):
    """
    A copy notices its parent's end as end of file on the pipe.
    """

    def test_end_of_file_calls_on_lost(self):
        """
        Data on the pipe is ignored; its end (the parent closed it, or
        died) calls C{on_lost} once.
        """
        from sentry_tx.serve import ParentPipe

        read_fd, write_fd = os.pipe()
        self.addCleanup(os.close, read_fd)
        lost = Deferred()
        pipe = ParentPipe(lambda: lost.callback(None), fd=read_fd)
        reactor.addReader(pipe)
        self.addCleanup(reactor.removeReader, pipe)
        os.write(write_fd, b"ignored")
        os.close(write_fd)
        return lost


class PrivateDirectoryTests(SynchronousTestCase):
    """
    The private directory is made at start under $TMPDIR and removed at stop.
    """

    def test_made_at_start_removed_at_stop(self):
        """
        Nothing exists before start; at start a 0700 directory with a
        metrics directory exists under $TMPDIR; stop removes it.
        """
        base = os.path.abspath(self.mktemp())
        os.mkdir(base)
        directory = PrivateDirectory({"TMPDIR": base})
        self.assertEqual(os.listdir(base), [])
        directory.startService()
        self.assertTrue(os.path.isdir(directory.metrics_path))
        self.assertEqual(os.stat(directory.path).st_mode & 0o777, 0o700)
        self.assertEqual(os.path.dirname(directory.path), base)
        directory.stopService()
        self.assertEqual(os.listdir(base), [])

    def test_stale_directories_wiped(self):
        """
        At start, a directory left by a process that no longer runs is
        removed; one of a running process, and names not ours, are kept.
        """
        import subprocess

        base = os.path.abspath(self.mktemp())
        os.mkdir(base)
        ended = subprocess.Popen(["true"])
        ended.wait()
        names = [
            f"sentry-tx-{ended.pid}-abc_123",
            f"sentry-tx-{os.getpid()}-def456",
            "sentry-tx-other",
            "something-else",
        ]
        for name in names:
            os.mkdir(os.path.join(base, name))
        directory = PrivateDirectory({"TMPDIR": base})
        directory.startService()
        self.addCleanup(directory.stopService)
        self.assertEqual(
            sorted(os.listdir(base)),
            sorted(names[1:] + [os.path.basename(directory.path)]),
        )

    def test_default_base(self):
        """
        Without $TMPDIR the directory goes under /dev/shm.
        """
        from sentry_tx.rundir import base_directory

        self.assertEqual(base_directory({}), "/dev/shm")
        self.assertEqual(base_directory({"TMPDIR": "/x"}), "/x")
