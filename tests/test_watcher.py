"""
Tests of L{sentry_tx.watcher}: the issuer watch.

Most drive an L{IssuerWatcher} with a L{FakeINotifyFactory} and a
L{Clock}; the fake is held to Twisted's L{INotify} by the same contract
tests.  A few use the real L{INotify} on a temporary directory, with the
real reactor delivering the events and a L{SchedulingClock} timing the
window.
"""

import gc
import os
import shutil

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.inotify import (
    IN_ACCESS,
    IN_ATTRIB,
    IN_CLOSE_NOWRITE,
    IN_CLOSE_WRITE,
    IN_CREATE,
    IN_DELETE,
    IN_DELETE_SELF,
    IN_IGNORED,
    IN_ISDIR,
    IN_MODIFY,
    IN_MOVE_SELF,
    IN_MOVED_FROM,
    IN_MOVED_TO,
    IN_ONLYDIR,
    IN_OPEN,
    IN_UNMOUNT,
    INotify,
    INotifyError,
    humanReadableMask,
)
from twisted.internet.task import Clock, deferLater
from twisted.logger import LogLevel, capturedLogs
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from sentry_tx.ca.store import FileTrustStore
from sentry_tx.config import SentryConfig
from sentry_tx.errors import BundleError
from sentry_tx.interfaces import ICertificateAuthority
from sentry_tx.metrics import SentryMetrics
from sentry_tx.testing.authority import (
    FakeCertificateAuthority,
    ObservedAuthority,
    RefusingCertificateAuthority,
)
from sentry_tx.testing.certificates import (
    FIXED_NOW,
    TEST_NAMESPACE,
    TEST_TRUST_DOMAIN,
    make_chain,
)
from sentry_tx.testing.clocks import SchedulingClock
from sentry_tx.testing.inotify import FakeINotifyFactory
from sentry_tx.testing.logs import log_messages
from sentry_tx.testing.rotation import (
    project_volume,
    replace_bundle_files,
    swap_projected_volume,
)
from sentry_tx.watcher import (
    ISSUER_CHANGE_WINDOW_SECONDS,
    REARM_RETRY_INITIAL_SECONDS,
    REARM_RETRY_MAX_SECONDS,
    WATCH_MASK,
    IssuerWatcher,
)

WATCHER_NAMESPACE = "sentry_tx.watcher.IssuerWatcher"

REAL_INOTIFY_TIMEOUT_SECONDS = 10


def _restarts(authority):
    return [call for call in authority.calls if call[0] == "restart"]


def _changed(metrics):
    return metrics.registry.get_sample_value("dapr_sentry_issuercert_changed_total")


class FakeWatcherMixin:
    """
    An L{IssuerWatcher} of two directories over a L{FakeINotifyFactory},
    a L{FakeCertificateAuthority} and a L{Clock}.
    """

    def setUp(self):
        self.clock = Clock()
        self.factory = FakeINotifyFactory()
        self.metrics = SentryMetrics()
        self.directories = ("/credentials", "/anchors")
        self.authority = FakeCertificateAuthority(config=SentryConfig(port=1234))
        self.watcher = self.make_watcher(self.authority)

    def make_watcher(self, authority):
        return IssuerWatcher(
            authority,
            self.directories,
            self.clock,
            self.metrics,
            inotify_factory=self.factory,
        )

    def event(self, mask, name="issuer.crt", directory="/credentials"):
        """
        Have the current fake INotify report C{mask} on C{name}.
        """
        self.factory.current.event(directory, mask, name)

    def callback(self, directory="/credentials"):
        """
        The callback the watcher registered for C{directory}.
        """
        watches = self.factory.current.watches
        _, _, callbacks = watches[FilePath(directory).asBytesMode()]
        [callback] = callbacks
        return callback


class WindowTests(FakeWatcherMixin, SynchronousTestCase):
    """
    Changes open a window of L{ISSUER_CHANGE_WINDOW_SECONDS}; one reload
    when it closes.
    """

    def test_nothing_opened_before_start(self):
        """
        Building the watcher opens no INotify; C{startService} does.
        """
        self.assertEqual(self.factory.notifiers, [])
        self.watcher.startService()
        self.assertEqual(len(self.factory.notifiers), 1)
        self.assertTrue(self.factory.current.reading)

    def test_no_directories(self):
        """
        A watcher of no directories (a store that is not file-backed) opens
        no INotify.
        """
        self.directories = ()
        watcher = self.make_watcher(self.authority)
        watcher.startService()
        watcher.stopService()
        self.assertEqual(self.factory.notifiers, [])

    def test_watches_directories(self):
        """
        Each directory is watched, as a directory only, for the events that
        count and those that say the watch is lost.
        """
        self.watcher.startService()
        watches = self.factory.current.watches
        self.assertEqual(
            sorted(watches),
            sorted(FilePath(d).asBytesMode() for d in self.directories),
        )
        for _, mask, _ in watches.values():
            for bit in (
                IN_CREATE,
                IN_CLOSE_WRITE,
                IN_MOVED_TO,
                IN_MOVED_FROM,
                IN_DELETE,
                IN_DELETE_SELF,
                IN_MOVE_SELF,
                IN_ONLYDIR,
            ):
                self.assertTrue(mask & bit, bit)
        self.assertEqual(WATCH_MASK & (IN_ACCESS | IN_OPEN | IN_MODIFY), 0)

    def test_events_in_window_make_one_reload(self):
        """
        Events at 0, 0.5 and 1.5 s make exactly one reload, at 2.0 s, with
        the authority's config.
        """
        self.watcher.startService()
        self.event(IN_CLOSE_WRITE)
        self.clock.advance(0.5)
        self.event(IN_MOVED_TO, "ca.crt")
        self.clock.advance(1.0)
        self.event(IN_DELETE, "issuer.key", directory="/anchors")
        self.clock.advance(0.499)
        self.assertEqual(_restarts(self.authority), [])
        self.clock.advance(0.001)
        self.assertEqual(
            _restarts(self.authority), [("restart", self.authority.config)]
        )
        self.clock.advance(10)
        self.assertEqual(len(_restarts(self.authority)), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_event_after_reload_opens_new_window(self):
        """
        An event after the reload opens a new window and makes a second
        reload when it closes.
        """
        self.watcher.startService()
        self.event(IN_CREATE)
        self.clock.advance(ISSUER_CHANGE_WINDOW_SECONDS)
        self.event(IN_CLOSE_WRITE)
        self.assertTrue(self.watcher.window_open)
        self.clock.advance(ISSUER_CHANGE_WINDOW_SECONDS - 0.01)
        self.assertEqual(len(_restarts(self.authority)), 1)
        self.clock.advance(0.01)
        self.assertEqual(len(_restarts(self.authority)), 2)

    def test_reload_counted_and_logged(self):
        """
        A closing window counts issuercert_changed once and logs exactly
        "issuer credentials changed; reloading".
        """
        self.watcher.startService()
        self.event(IN_CREATE)
        self.event(IN_CLOSE_WRITE)
        with capturedLogs() as events:
            self.clock.advance(ISSUER_CHANGE_WINDOW_SECONDS)
        self.assertEqual(_changed(self.metrics), 1)
        self.assertEqual(
            log_messages(events, LogLevel.info, namespace=WATCHER_NAMESPACE),
            ["issuer credentials changed; reloading"],
        )

    def test_counting_event_kinds(self):
        """
        Create, close-write, moved-to, moved-from and delete each open a
        window, for a file or a directory entry.
        """
        self.watcher.startService()
        for mask in (
            IN_CREATE,
            IN_CLOSE_WRITE,
            IN_MOVED_TO,
            IN_MOVED_FROM,
            IN_DELETE,
            IN_CREATE | IN_ISDIR,
        ):
            self.event(mask)
            self.assertTrue(self.watcher.window_open, mask)
            self.clock.advance(ISSUER_CHANGE_WINDOW_SECONDS)
        self.assertEqual(len(_restarts(self.authority)), 6)

    def test_other_event_kinds_ignored(self):
        """
        Access, open, close without writing, modify and attribute events do
        nothing, even when delivered to the watcher's callback.
        """
        self.watcher.startService()
        callback = self.callback()
        watch = self.factory.current
        for mask in (IN_ACCESS, IN_OPEN, IN_CLOSE_NOWRITE, IN_MODIFY, IN_ATTRIB):
            self.event(mask)
            callback(watch, FilePath(b"/credentials/issuer.crt"), mask)
        self.assertFalse(self.watcher.window_open)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.authority.calls, [])

    def test_refused_reload_consumed(self):
        """
        A restart that fails is consumed (no unhandled error) and the
        watcher goes on: the next change makes another reload.
        """
        authority = RefusingCertificateAuthority(
            BundleError("issuer.crt", "is garbage")
        )
        verifyObject(ICertificateAuthority, authority)
        self.watcher = self.make_watcher(authority)
        self.watcher.startService()
        self.event(IN_CLOSE_WRITE)
        self.clock.advance(ISSUER_CHANGE_WINDOW_SECONDS)
        gc.collect()
        self.assertEqual(self.flushLoggedErrors(), [])
        self.event(IN_CLOSE_WRITE)
        self.clock.advance(ISSUER_CHANGE_WINDOW_SECONDS)
        self.assertEqual(len(_restarts(authority)), 2)
        self.assertEqual(_changed(self.metrics), 2)

    def test_restart_raising_logged(self):
        """
        A restart that raises instead of failing its Deferred is logged and
        the watcher goes on.
        """

        class RaisingAuthority(FakeCertificateAuthority):
            def restart(self, config):
                raise RuntimeError("broken authority")

        self.watcher = self.make_watcher(RaisingAuthority())
        self.watcher.startService()
        self.event(IN_CLOSE_WRITE)
        self.clock.advance(ISSUER_CHANGE_WINDOW_SECONDS)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.event(IN_CLOSE_WRITE)
        self.assertTrue(self.watcher.window_open)

    def test_callback_never_raises(self):
        """
        An error while handling an event is logged, not raised into
        INotify (which would close it).
        """

        class BrokenClock(Clock):
            def callLater(self, *args, **kwargs):
                raise RuntimeError("no time")

        watcher = IssuerWatcher(
            self.authority,
            self.directories,
            BrokenClock(),
            self.metrics,
            inotify_factory=self.factory,
        )
        watcher.startService()
        self.event(IN_CLOSE_WRITE)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertTrue(self.factory.current.connected)

    def test_stop_closes_and_cancels(self):
        """
        C{stopService} closes the INotify and cancels a pending window: no
        reload comes.
        """
        self.watcher.startService()
        self.event(IN_CLOSE_WRITE)
        self.watcher.stopService()
        self.assertFalse(self.factory.current.connected)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(10)
        self.assertEqual(self.authority.calls, [])

    def test_events_after_stop_ignored(self):
        """
        An event delivered after C{stopService} opens no window.
        """
        self.watcher.startService()
        callback = self.callback()
        self.watcher.stopService()
        callback(self.factory.current, FilePath(b"/credentials/ca.crt"), IN_CREATE)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_restart_after_stop(self):
        """
        A stopped watcher started again opens a new INotify and watches
        again.
        """
        self.watcher.startService()
        self.watcher.stopService()
        self.watcher.startService()
        self.assertEqual(len(self.factory.notifiers), 2)
        self.event(IN_CLOSE_WRITE)
        self.clock.advance(ISSUER_CHANGE_WINDOW_SECONDS)
        self.assertEqual(len(_restarts(self.authority)), 1)


class LostWatchTests(FakeWatcherMixin, SynchronousTestCase):
    """
    When a watched directory is deleted, moved or unmounted, the watcher
    watches again with a new INotify, and never goes silently deaf.
    """

    def assertRearmed(self, mask):
        self.watcher.startService()
        old = self.factory.current
        with capturedLogs() as events:
            self.event(mask, name=None)
        self.assertEqual(
            log_messages(events, LogLevel.warn, namespace=WATCHER_NAMESPACE),
            [
                f"lost the watch on /credentials "
                f"({','.join(humanReadableMask(mask))}); "
                f"watching the issuer credential directories again"
            ],
        )
        self.clock.advance(0)
        self.assertFalse(old.connected)
        self.assertEqual(len(self.factory.notifiers), 2)
        self.assertEqual(
            sorted(self.factory.current.watches),
            sorted(FilePath(d).asBytesMode() for d in self.directories),
        )
        # What changed while the watcher could not see counts as a change.
        self.assertTrue(self.watcher.window_open)
        self.clock.advance(ISSUER_CHANGE_WINDOW_SECONDS)
        self.assertEqual(len(_restarts(self.authority)), 1)
        self.event(IN_CLOSE_WRITE)
        self.assertTrue(self.watcher.window_open)

    def test_delete_self(self):
        """
        IN_DELETE_SELF (after which Twisted closes the INotify) re-arms.
        """
        self.assertRearmed(IN_DELETE_SELF)

    def test_move_self(self):
        """
        IN_MOVE_SELF (the watch now follows the moved directory) re-arms.
        """
        self.assertRearmed(IN_MOVE_SELF)

    def test_ignored(self):
        """
        IN_IGNORED (the kernel dropped the watch) re-arms.
        """
        self.assertRearmed(IN_IGNORED)

    def test_unmount(self):
        """
        IN_UNMOUNT re-arms.
        """
        self.assertRearmed(IN_UNMOUNT)

    def test_one_rearm_for_several_losses(self):
        """
        Several lost watches reported in one read make one re-arm.
        """
        self.watcher.startService()
        self.event(IN_MOVE_SELF, name=None)
        self.event(IN_MOVE_SELF, name=None, directory="/anchors")
        self.clock.advance(0)
        self.assertEqual(len(self.factory.notifiers), 2)

    def test_rearm_waits_for_the_read_to_end(self):
        """
        The new INotify is made after the callback returns, not inside it
        (Twisted still uses the old one until its read is over).
        """
        self.watcher.startService()
        self.event(IN_DELETE_SELF, name=None)
        self.assertEqual(len(self.factory.notifiers), 1)

    def test_missing_directory_retried_with_bounded_backoff(self):
        """
        While a directory does not exist, watching it is retried after 0.5,
        1, 2 ... s, never more than L{REARM_RETRY_MAX_SECONDS} apart, and
        each failure is logged; once it exists it is watched and a window
        opens.
        """
        self.watcher.startService()
        self.factory.remove("/credentials")
        self.event(IN_DELETE_SELF, name=None)
        with capturedLogs() as events:
            self.clock.advance(0)
            delays = []
            for _ in range(10):
                [call] = self.clock.getDelayedCalls()
                delay = call.getTime() - self.clock.seconds()
                delays.append(delay)
                self.clock.advance(delay)
        self.assertEqual(delays[0], REARM_RETRY_INITIAL_SECONDS)
        self.assertEqual(delays[1], REARM_RETRY_INITIAL_SECONDS * 2)
        self.assertEqual(max(delays), REARM_RETRY_MAX_SECONDS)
        self.assertEqual(delays[-1], REARM_RETRY_MAX_SECONDS)
        warnings = log_messages(events, LogLevel.warn, namespace=WATCHER_NAMESPACE)
        self.assertEqual(len(warnings), 11)
        self.assertIn("cannot watch /credentials", warnings[0])
        self.assertIn(f"trying again in {REARM_RETRY_INITIAL_SECONDS} s", warnings[0])
        self.assertFalse(self.watcher.window_open)
        self.assertEqual(self.authority.calls, [])

        self.factory.restore("/credentials")
        self.clock.advance(REARM_RETRY_MAX_SECONDS)
        self.assertIn(
            FilePath(b"/credentials"), self.factory.current.watches
        )
        self.assertTrue(self.watcher.window_open)
        self.clock.advance(ISSUER_CHANGE_WINDOW_SECONDS)
        self.assertEqual(len(_restarts(self.authority)), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_other_directories_watched_while_one_missing(self):
        """
        While one directory is missing, the others are watched by the new
        INotify and their changes still reload.
        """
        self.watcher.startService()
        self.factory.remove("/credentials")
        self.event(IN_DELETE_SELF, name=None)
        self.clock.advance(0)
        self.assertEqual(
            list(self.factory.current.watches), [FilePath(b"/anchors")]
        )
        self.event(IN_CLOSE_WRITE, "ca.crt", directory="/anchors")
        self.clock.advance(ISSUER_CHANGE_WINDOW_SECONDS)
        self.assertEqual(len(_restarts(self.authority)), 1)

    def test_missing_at_start(self):
        """
        A directory missing at start is retried and watched once it exists,
        without a reload (the authority itself is loading the bundle then).
        """
        self.factory.remove("/anchors")
        self.watcher.startService()
        self.assertEqual(
            list(self.factory.current.watches), [FilePath(b"/credentials")]
        )
        self.factory.restore("/anchors")
        self.clock.advance(REARM_RETRY_INITIAL_SECONDS)
        self.assertEqual(len(self.factory.current.watches), 2)
        self.assertFalse(self.watcher.window_open)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_inotify_open_failure_retried(self):
        """
        When no INotify can be made, the failure is logged and retried.
        """
        made = []

        def factory():
            if not made:
                made.append(None)
                raise INotifyError("INotify initialization error.")
            return self.factory()

        watcher = IssuerWatcher(
            self.authority, self.directories, self.clock, self.metrics, factory
        )
        with capturedLogs() as events:
            watcher.startService()
        warnings = log_messages(events, LogLevel.warn, namespace=WATCHER_NAMESPACE)
        self.assertIn("cannot open inotify", warnings[0])
        self.assertEqual(self.factory.notifiers, [])
        self.clock.advance(REARM_RETRY_INITIAL_SECONDS)
        self.assertEqual(len(self.factory.current.watches), 2)

    def test_stop_cancels_retry_and_rearm(self):
        """
        C{stopService} cancels a pending re-arm or retry.
        """
        self.watcher.startService()
        self.factory.remove("/credentials")
        self.event(IN_DELETE_SELF, name=None)
        self.watcher.stopService()
        self.assertEqual(self.clock.getDelayedCalls(), [])

        self.watcher.startService()
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.watcher.stopService()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertFalse(self.factory.current.connected)


class INotifyContractMixin:
    """
    What L{IssuerWatcher} relies on in an INotify, for the real one and
    for L{FakeINotify}.
    """

    timeout = REAL_INOTIFY_TIMEOUT_SECONDS

    def setUp(self):
        self.directory = FilePath(self.mktemp())
        self.directory.makedirs()
        self.notifier = self.make_notifier()
        self.notifier.startReading()
        self.addCleanup(self.notifier.loseConnection)

    def test_watch_missing_directory(self):
        """
        Watching a path that does not exist raises L{INotifyError}.
        """
        missing = self.directory.child("missing")
        self.make_missing(missing)
        self.assertRaises(
            INotifyError, self.notifier.watch, missing, mask=WATCH_MASK
        )

    def test_watch_twice(self):
        """
        Watching the same directory twice gives the same descriptor.
        """
        first = self.notifier.watch(self.directory, mask=WATCH_MASK)
        self.assertEqual(self.notifier.watch(self.directory, mask=WATCH_MASK), first)

    @inlineCallbacks
    def test_event_arguments(self):
        """
        A callback gets the watch (whose C{path} is the directory), the
        entry's path in bytes mode and the mask.
        """
        seen = Deferred()
        self.notifier.watch(
            self.directory,
            mask=WATCH_MASK,
            callbacks=[lambda *args: seen.called or seen.callback(args)],
        )
        self.create(self.directory, "ca.crt")
        watch, path, mask = yield seen
        self.assertEqual(watch.path, self.directory.asBytesMode())
        self.assertEqual(path, self.directory.asBytesMode().child(b"ca.crt"))
        self.assertTrue(mask & IN_CREATE)

    @inlineCallbacks
    def test_delete_self_loses_connection(self):
        """
        Deleting a watched directory reports IN_DELETE_SELF, after which the
        INotify has lost its connection.
        """
        seen = Deferred()

        def callback(watch, path, mask):
            if mask & IN_DELETE_SELF and not seen.called:
                seen.callback(mask)

        self.notifier.watch(self.directory, mask=WATCH_MASK, callbacks=[callback])
        self.delete(self.directory)
        yield seen
        yield self.next_turn()
        self.assertFalse(self.notifier.connected)

    def test_lose_connection(self):
        """
        C{loseConnection} leaves the INotify not connected.
        """
        self.notifier.loseConnection()
        self.assertFalse(self.notifier.connected)


class FakeINotifyContractTests(INotifyContractMixin, TestCase):
    """
    L{FakeINotify} keeps the contract.
    """

    def make_notifier(self):
        self.factory = FakeINotifyFactory()
        return self.factory()

    def make_missing(self, path):
        self.factory.remove(path)

    def create(self, directory, name):
        self.notifier.event(directory, IN_CREATE, name)

    def delete(self, directory):
        self.notifier.event(directory, IN_DELETE_SELF)

    def next_turn(self):
        return deferLater(reactor, 0, lambda: None)


class RealINotifyContractTests(INotifyContractMixin, TestCase):
    """
    Twisted's L{INotify} keeps the contract.
    """

    def make_notifier(self):
        return INotify()

    def make_missing(self, path):
        pass

    def create(self, directory, name):
        directory.child(name).touch()

    def delete(self, directory):
        directory.remove()

    def next_turn(self):
        return deferLater(reactor, 0, lambda: None)


class RealINotifyTests(TestCase):
    """
    L{IssuerWatcher} with Twisted's L{INotify} on a temporary directory: the
    real reactor delivers the events, a L{SchedulingClock} times the window.
    """

    timeout = REAL_INOTIFY_TIMEOUT_SECONDS

    def setUp(self):
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.clock = SchedulingClock()
        self.metrics = SentryMetrics()
        self.authority = FakeCertificateAuthority()
        self.first = make_chain()
        self.second = make_chain()

    def start_watcher(self):
        watcher = IssuerWatcher(
            self.authority, [self.directory], self.clock, self.metrics
        )
        watcher.startService()
        self.addCleanup(watcher.stopService)
        return watcher

    def store(self):
        return FileTrustStore(
            reactor,
            os.path.join(self.directory, "ca.crt"),
            os.path.join(self.directory, "issuer.crt"),
            os.path.join(self.directory, "issuer.key"),
            TEST_TRUST_DOMAIN,
            TEST_NAMESPACE,
            SentryConfig().mtls.allowed_clock_skew,
        )

    @inlineCallbacks
    def window_opened(self, scheduled):
        """
        Wait until the first event opened the window, then for the rest of
        the read that brought it (events of one update arrive together).
        """
        yield scheduled
        yield deferLater(reactor, 0, lambda: None)

    @inlineCallbacks
    def assertOneReload(self, change):
        """
        After C{change()}, the window opens, and closing it makes exactly
        one reload.
        """
        scheduled = self.clock.when_scheduled()
        change()
        yield self.window_opened(scheduled)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.clock.advance(ISSUER_CHANGE_WINDOW_SECONDS)
        self.assertEqual(len(_restarts(self.authority)), 1)
        yield deferLater(reactor, 0, lambda: None)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    @inlineCallbacks
    def test_in_place_write(self):
        """
        Rewriting C{issuer.crt} in place makes one reload.
        """
        self.first.write(self.directory)
        self.start_watcher()

        def change():
            with open(os.path.join(self.directory, "issuer.crt"), "wb") as f:
                f.write(self.first.issuer_chain_pem())

        yield self.assertOneReload(change)

    @inlineCallbacks
    def test_atomic_rename(self):
        """
        Writing temporary files and renaming them over the bundle makes one
        reload, after which the new bundle is in the files.
        """
        self.first.write(self.directory)
        self.start_watcher()
        yield self.assertOneReload(
            lambda: replace_bundle_files(self.second, self.directory)
        )
        self.assertEqual(
            self.store().load_sync(FIXED_NOW).issuer, self.second.issuer
        )

    @inlineCallbacks
    def test_projected_volume_swap(self):
        """
        The kubelet's update of a projected volume (new version directory,
        C{..data_tmp} renamed over C{..data}, old version removed) makes
        exactly one reload, after which the visible files are the new bundle.
        """
        project_volume(self.directory, self.first, "..2026_11_21_x")
        self.assertEqual(self.store().load_sync(FIXED_NOW).issuer, self.first.issuer)
        self.start_watcher()
        yield self.assertOneReload(
            lambda: swap_projected_volume(self.directory, self.second, "..2026_11_21_y")
        )
        self.assertEqual(
            sorted(os.listdir(self.directory)),
            ["..2026_11_21_y", "..data", "ca.crt", "issuer.crt", "issuer.key"],
        )
        self.assertEqual(
            self.store().load_sync(FIXED_NOW).issuer, self.second.issuer
        )

    @inlineCallbacks
    def test_directory_deleted_and_recreated(self):
        """
        Deleting the watched directory loses the watch; the watcher says so,
        retries while it is missing, watches it again once it is re-created
        (reloading then) and hears later changes in it.
        """
        self.first.write(self.directory)
        self.start_watcher()

        with capturedLogs() as events:
            scheduled = self.clock.when_scheduled()
            shutil.rmtree(self.directory)
            yield self.window_opened(scheduled)
            self.clock.advance(0)

        warnings = log_messages(events, LogLevel.warn, namespace=WATCHER_NAMESPACE)
        self.assertEqual(len(warnings), 2)
        self.assertIn(f"lost the watch on {self.directory}", warnings[0])
        self.assertIn(f"cannot watch {self.directory}", warnings[1])

        os.mkdir(self.directory)
        self.second.write(self.directory)
        self.clock.advance(REARM_RETRY_INITIAL_SECONDS)
        self.clock.advance(ISSUER_CHANGE_WINDOW_SECONDS)
        self.assertEqual(len(_restarts(self.authority)), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

        yield self.assertOneMoreReload()

    @inlineCallbacks
    def assertOneMoreReload(self):
        scheduled = self.clock.when_scheduled()
        self.first.write(self.directory)
        yield self.window_opened(scheduled)
        self.clock.advance(ISSUER_CHANGE_WINDOW_SECONDS)
        self.assertEqual(len(_restarts(self.authority)), 2)

    @inlineCallbacks
    def test_restart_outcome_observed(self):
        """
        L{ObservedAuthority} forwards the watcher's restart to the authority
        it wraps and reports when it finished.
        """
        self.first.write(self.directory)
        inner = self.authority
        self.authority = ObservedAuthority(inner)
        verifyObject(ICertificateAuthority, self.authority)
        self.start_watcher()
        restarted = self.authority.when_restarted()
        scheduled = self.clock.when_scheduled()
        replace_bundle_files(self.second, self.directory)
        yield self.window_opened(scheduled)
        self.clock.advance(ISSUER_CHANGE_WINDOW_SECONDS)
        succeeded, _ = yield restarted
        self.assertTrue(succeeded)
        self.assertEqual(_restarts(inner), [("restart", inner.config)])
