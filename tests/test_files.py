"""
Tests for L{sentry_tx.ca.files}: the one reader of credential files and the
time-bounded threads it runs in, and the file store's start-up hygiene
(leftover temporary files, loose credential directories).
"""

import os
import queue
import socket
import stat
import threading
from datetime import timedelta

from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from sentry_tx.ca.bundle import TrustBundle
from sentry_tx.ca.files import (
    CREDENTIAL_READ_TIMEOUT_SECONDS,
    BoundedFileWork,
    read_credential_file,
)
from sentry_tx.ca.store import FileTrustStore, temporary_name
from sentry_tx.errors import BundleError
from sentry_tx.testing.certificates import FIXED_NOW, make_chain

NAMES = ("ca.crt", "issuer.crt", "issuer.key")
SKEW = timedelta(minutes=15)

# Real threads are waited for with this bound, so that a broken test fails
# instead of hanging; it is never slept.
THREAD_WAIT_SECONDS = 10.0


class ThreadClock(Clock):
    """
    A L{Clock} whose C{callFromThread} queues the call, thread-safely, until
    the test runs it with L{drain}: time stays fake while real threads work.
    """

    def __init__(self):
        super().__init__()
        self.from_threads = queue.Queue()

    def callFromThread(self, f, *args, **kw):
        self.from_threads.put((f, args, kw))

    def drain(self, wait=False):
        """
        Run the queued calls; with C{wait}, wait (bounded) for one first.
        """
        if wait:
            f, args, kw = self.from_threads.get(timeout=THREAD_WAIT_SECONDS)
            f(*args, **kw)
        while True:
            try:
                f, args, kw = self.from_threads.get_nowait()
            except queue.Empty:
                return
            f(*args, **kw)


class HeldThreads:
    """
    A C{start_thread} stand-in that keeps the targets; the test runs them
    (in its own thread) when it chooses, or never.
    """

    def __init__(self):
        self.targets = []

    def __call__(self, target, name):
        self.targets.append(target)


def _result(d):
    results = []
    d.addBoth(results.append)
    [result] = results
    return result


class ReadCredentialFileTests(SynchronousTestCase):
    """
    L{read_credential_file} reads regular files only, up to a limit.
    """

    def setUp(self):
        self.directory = self.mktemp()
        os.makedirs(self.directory)

    def path(self, name):
        return os.path.join(self.directory, name)

    def test_regular_file(self):
        """A regular file's bytes are returned whole."""
        with open(self.path("f"), "wb") as f:
            f.write(b"x" * 70000)
        self.assertEqual(read_credential_file(self.path("f"), 70000), b"x" * 70000)

    def test_limit(self):
        """A file one byte over the limit is refused, naming it."""
        with open(self.path("f"), "wb") as f:
            f.write(b"x" * 11)
        error = self.assertRaises(BundleError, read_credential_file, self.path("f"), 10)
        self.assertEqual(error.source, self.path("f"))
        self.assertIn("larger than 10 bytes", error.problem)

    def test_fifo(self):
        """A FIFO without a writer is refused at once, not waited on."""
        os.mkfifo(self.path("fifo"))
        error = self.assertRaises(
            BundleError, read_credential_file, self.path("fifo"), 10
        )
        self.assertEqual(error.source, self.path("fifo"))
        self.assertIn("a FIFO (named pipe), not a regular file", error.problem)

    def test_symlink_to_fifo(self):
        """A symbolic link to a FIFO is refused like the FIFO itself."""
        os.mkfifo(self.path("fifo"))
        os.symlink(os.path.abspath(self.path("fifo")), self.path("link"))
        error = self.assertRaises(
            BundleError, read_credential_file, self.path("link"), 10
        )
        self.assertIn("FIFO", error.problem)

    def test_socket(self):
        """A listening Unix socket at the path cannot be read and is refused."""
        path = self.path("s")
        listener = socket.socket(socket.AF_UNIX)
        self.addCleanup(listener.close)
        listener.bind(path)
        listener.listen(1)
        error = self.assertRaises(BundleError, read_credential_file, path, 10)
        self.assertEqual(error.source, path)
        self.assertIn("ENXIO", error.problem)

    def test_device(self):
        """A character device is refused without being read."""
        error = self.assertRaises(BundleError, read_credential_file, os.devnull, 10)
        self.assertIn("a character device", error.problem)

    def test_directory(self):
        """A directory is refused, naming it."""
        error = self.assertRaises(
            BundleError, read_credential_file, self.directory, 10
        )
        self.assertIn("a directory, not a regular file", error.problem)

    def test_flags(self):
        """The open is non-blocking and never takes a controlling terminal."""
        seen = []

        def recording_open(path, flags):
            seen.append(flags)
            return os.open(path, flags)

        with open(self.path("f"), "wb") as f:
            f.write(b"x")
        read_credential_file(self.path("f"), 10, _open=recording_open)
        [flags] = seen
        self.assertEqual(flags & os.O_NONBLOCK, os.O_NONBLOCK)
        self.assertEqual(flags & os.O_NOCTTY, os.O_NOCTTY)
        self.assertEqual(flags & os.O_ACCMODE, os.O_RDONLY)

    def test_inspect(self):
        """C{inspect} gets the open file's fstat before the read."""
        with open(self.path("f"), "wb") as f:
            f.write(b"abc")
        os.chmod(self.path("f"), 0o640)
        statuses = []
        read_credential_file(self.path("f"), 10, inspect=statuses.append)
        self.assertEqual(stat.S_IMODE(statuses[0].st_mode), 0o640)


class BoundedFileWorkTests(SynchronousTestCase):
    """
    L{BoundedFileWork} runs file work in threads and stops waiting at a
    time bound.
    """

    def setUp(self):
        self.clock = ThreadClock()
        self.threads = HeldThreads()
        self.work = BoundedFileWork(self.clock, max_stuck=2, start_thread=self.threads)

    def test_result(self):
        """The work's result fires the Deferred; the time bound is cancelled."""
        d = self.work.run("files", 5.0, lambda: 42)
        [target] = self.threads.targets
        target()
        self.clock.drain()
        self.assertEqual(_result(d), 42)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_error(self):
        """The work's exception fails the Deferred."""
        d = self.work.run("files", 5.0, read_credential_file, "/nonexistent/x", 10)
        self.threads.targets[0]()
        self.clock.drain()
        self.assertEqual(_result(d).value.source, "/nonexistent/x")

    def test_timeout(self):
        """Work that does not return within the bound fails with BundleError."""
        d = self.work.run("the files", 5.0, lambda: 42)
        self.clock.advance(4.9)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        error = _result(d).value
        self.assertIsInstance(error, BundleError)
        self.assertEqual(error.source, "the files")
        self.assertIn("did not answer within 5 s", error.problem)
        self.assertEqual(self.work.stuck, 1)

    def test_late_result_discarded(self):
        """A result after the bound is discarded and frees the stuck slot."""
        d = self.work.run("files", 5.0, lambda: 42)
        self.clock.advance(5.0)
        self.assertIsInstance(_result(d).value, BundleError)
        with capturedLogs() as events:
            self.threads.targets[0]()
            self.clock.drain()
        self.assertEqual(self.work.stuck, 0)
        self.assertIn("was discarded", formatEvent(events[-1]))

    def test_stuck_threads_bounded(self):
        """While max_stuck threads are stuck, new work fails at once, no thread."""
        for _ in range(2):
            self.work.run("files", 5.0, lambda: 42).addErrback(lambda _: None)
        self.clock.advance(5.0)
        d = self.work.run("files", 5.0, lambda: 42)
        self.assertEqual(len(self.threads.targets), 2)
        self.assertIn("2 earlier reads are still blocked", _result(d).value.problem)


class BlockedReadTests(SynchronousTestCase):
    """
    A store whose read blocks in the kernel (a hung mount) gives up at the
    bound, names the file, and serves the next load.
    """

    def setUp(self):
        self.directory = self.mktemp()
        os.makedirs(self.directory)
        self.chain = make_chain()
        self.chain.write(self.directory)
        self.paths = tuple(os.path.join(self.directory, name) for name in NAMES)
        self.clock = ThreadClock()
        self.entered = threading.Event()
        self.release = threading.Event()
        self.blocking = True
        self.threads = []

        def start_thread(target, name):
            thread = threading.Thread(target=target, name=name, daemon=True)
            self.threads.append(thread)
            thread.start()

        def blocking_open(path, flags):
            if path == self.paths[1] and self.blocking:
                self.entered.set()
                self.release.wait(THREAD_WAIT_SECONDS)
            return os.open(path, flags)

        self.store = FileTrustStore(
            self.clock,
            *self.paths,
            trust_domain="example.org",
            namespace="default",
            allowed_clock_skew=SKEW,
            file_work=BoundedFileWork(self.clock, start_thread=start_thread),
            _read_open=blocking_open,
        )
        self.addCleanup(self._release)

    def _release(self):
        self.release.set()
        for thread in self.threads:
            thread.join(THREAD_WAIT_SECONDS)

    def test_blocked_read_named_then_next_load(self):
        """A blocked read fails the load naming the file; the next load works."""
        d = self.store.load(FIXED_NOW)
        self.assertTrue(self.entered.wait(THREAD_WAIT_SECONDS))
        self.clock.advance(CREDENTIAL_READ_TIMEOUT_SECONDS)
        error = _result(d).value
        self.assertIsInstance(error, BundleError)
        self.assertEqual(error.source, self.paths[1])
        self.blocking = False
        second = self.store.load(FIXED_NOW)
        self.clock.drain(wait=True)
        self.assertIsInstance(_result(second), TrustBundle)
        self._release()
        self.clock.drain()
        self.assertEqual(self.store._file_work.stuck, 0)

    def test_blocked_start_named(self):
        """At start, load_or_generate fails at the bound naming the blocked file."""
        d = self.store.load_or_generate(FIXED_NOW)
        self.assertTrue(self.entered.wait(THREAD_WAIT_SECONDS))
        self.clock.advance(CREDENTIAL_READ_TIMEOUT_SECONDS)
        self.assertEqual(_result(d).value.source, self.paths[1])


class StartHygieneTests(SynchronousTestCase):
    """
    At start, the file store removes its own leftover temporary files and
    warns about credentials directories others can write.
    """

    def setUp(self):
        self.directory = self.mktemp()

    def make_store(self, **options):
        self.paths = tuple(os.path.join(self.directory, name) for name in NAMES)
        return FileTrustStore(
            None,
            *self.paths,
            trust_domain="example.org",
            namespace="default",
            allowed_clock_skew=SKEW,
            **options,
        )

    def warnings(self, events):
        return [
            formatEvent(event)
            for event in events
            if event.get("log_level") is LogLevel.warn
        ]

    def test_temporary_name(self):
        """Temporary names are hidden, marked as sentry_tx's and unique."""
        first, second = temporary_name("issuer.key"), temporary_name("issuer.key")
        self.assertNotEqual(first, second)
        self.assertTrue(first.startswith(".issuer.key.sentry-tx-"))
        self.assertTrue(first.endswith(".tmp"))

    def test_leftovers_removed_and_logged(self):
        """A killed generation's temporary files go at start, each logged."""
        os.makedirs(self.directory)
        store = self.make_store()
        leftovers = [temporary_name(name) for name in NAMES]
        others = [
            ".issuer.key.1234567890abcdef.tmp",
            ".other.crt.sentry-tx-1234567890abcdef.tmp",
            ".issuer.key.sentry-tx-12345.tmp",
            "issuer.key.sentry-tx-1234567890abcdef.tmp",
            "notes.tmp",
        ]
        for name in leftovers + others:
            with open(os.path.join(self.directory, name), "wb") as f:
                f.write(b"x")
        with capturedLogs() as events:
            bundle = store.load_or_generate_sync(FIXED_NOW)
        self.assertIsInstance(bundle, TrustBundle)
        self.assertEqual(
            sorted(os.listdir(self.directory)), sorted(list(NAMES) + others)
        )
        removals = [w for w in self.warnings(events) if "removed the temporary" in w]
        self.assertEqual(
            sorted(removals),
            sorted(
                f"removed the temporary file "
                f"{os.path.join(os.path.abspath(self.directory), name)}"
                " left by an interrupted generation"
                for name in leftovers
            ),
        )

    def test_generated_directory_private_despite_umask(self):
        """A directory sentry_tx creates ends 0700 even under umask 000."""
        old_umask = os.umask(0)
        self.addCleanup(os.umask, old_umask)
        store = self.make_store()
        with capturedLogs() as events:
            store.load_or_generate_sync(FIXED_NOW)
        self.assertEqual(stat.S_IMODE(os.stat(self.directory).st_mode), 0o700)
        self.assertEqual([w for w in self.warnings(events) if "directory" in w], [])

    def test_world_writable_directory_warned(self):
        """Generating into an existing 0777 directory warns, naming it."""
        os.makedirs(self.directory)
        os.chmod(self.directory, 0o777)
        store = self.make_store()
        with capturedLogs() as events:
            store.load_or_generate_sync(FIXED_NOW)
        [warning] = [w for w in self.warnings(events) if "writable by group" in w]
        self.assertIn(os.path.abspath(self.directory), warning)
        self.assertIn("mode 0777", warning)

    def test_group_writable_warned_at_reload(self):
        """Each reload warns again about a group-writable directory."""
        os.makedirs(self.directory)
        store = self.make_store()
        store.load_or_generate_sync(FIXED_NOW)
        os.chmod(self.directory, 0o770)
        for _ in range(2):
            with capturedLogs() as events:
                store.load_sync(FIXED_NOW)
            self.assertEqual(
                len([w for w in self.warnings(events) if "writable by group" in w]), 1
            )

    def test_other_owner_warned(self):
        """A directory owned by another user (not root) is warned about."""
        os.makedirs(self.directory)
        if os.geteuid() == 0:
            # Root can give the directory away; anyone else pretends to be
            # another user instead.
            owner = 4242
            os.chown(self.directory, owner, -1)
            store = self.make_store()
        else:
            owner = os.geteuid()
            store = self.make_store(_geteuid=lambda: owner + 1)
        store.load_or_generate_sync(FIXED_NOW)
        with capturedLogs() as events:
            store.load_sync(FIXED_NOW)
        [warning] = [w for w in self.warnings(events) if "owned by user" in w]
        self.assertIn(f"owned by user {owner}", warning)

    def test_private_directory_silent(self):
        """A 0700 directory of this user draws no warning."""
        store = self.make_store()
        store.load_or_generate_sync(FIXED_NOW)
        with capturedLogs() as events:
            store.load_sync(FIXED_NOW)
        self.assertEqual(self.warnings(events), [])
