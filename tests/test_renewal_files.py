"""
Tests for L{sentry_tx.ca.renewal_files}: renewal steps written to files,
each crash point completed at the next start.
"""

import os
from datetime import timedelta

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from sentry_tx.ca.renewal import (
    ACTION_FINISH_SWITCH,
    ACTION_OFF,
    ACTION_RENEW,
    ACTION_SWITCH,
    ACTION_WAIT,
    RenewalSettings,
)
from sentry_tx.ca.renewal_files import FileRenewalStore
from sentry_tx.ca.store import FileTrustStore
from sentry_tx.testing.certificates import (
    FIXED_NOW,
    TEST_NAMESPACE,
    TEST_TRUST_DOMAIN,
    make_chain,
)
from sentry_tx.testing.renewal import (
    SHORT_CA_TTL,
    SHORT_RENEW_AT,
    SHORT_RENEWAL_SETTINGS,
    SHORT_SKEW,
    SHORT_SWITCH_AT,
)


class _Killed(Exception):
    """
    Stands for a SIGKILL between two writes.
    """


def _kill_at(point):
    def after_write(action, part):
        if (action, part) == point:
            raise _Killed(point)

    return after_write


class FileRenewalTests(SynchronousTestCase):
    """
    L{FileRenewalStore} writes each step so that the bundle always loads.
    """

    def setUp(self):
        self.directory = self.mktemp()
        self.trust_store = self._trust_store()
        self.trust_store.load_or_generate_sync(FIXED_NOW)

    def _trust_store(self):
        return FileTrustStore(
            Clock(),
            os.path.join(self.directory, "ca.crt"),
            os.path.join(self.directory, "issuer.crt"),
            os.path.join(self.directory, "issuer.key"),
            TEST_TRUST_DOMAIN,
            TEST_NAMESPACE,
            SHORT_SKEW,
            ca_ttl=SHORT_CA_TTL,
        )

    def _store(self, after_write=None):
        return FileRenewalStore(Clock(), self.trust_store, _after_write=after_write)

    def _listing(self):
        return {
            name: open(os.path.join(self.directory, name), "rb").read()
            for name in sorted(os.listdir(self.directory))
        }

    def _run_until_wait(self, store, now):
        actions = []
        for _ in range(10):
            result = store.step_sync(now, SHORT_RENEWAL_SETTINGS)
            actions.append(result.step.action)
            self.trust_store.load_sync(now)
            if not result.written:
                return actions
        self.fail(f"no rest after {actions}")

    def test_renew_and_switch(self):
        """
        A renewal writes the next pair and appends the root; the switch makes the pair
        active and removes the next files.
        """
        store = self._store()
        self.assertEqual(
            self._run_until_wait(store, SHORT_RENEW_AT), [ACTION_RENEW, ACTION_WAIT]
        )
        self.assertEqual(
            sorted(os.listdir(self.directory)),
            [
                "ca.crt",
                "issuer.crt",
                "issuer.key",
                "issuer.next.crt",
                "issuer.next.key",
            ],
        )
        self.assertEqual(len(self.trust_store.load_sync(SHORT_RENEW_AT).anchors), 2)
        self.assertEqual(
            os.stat(os.path.join(self.directory, "issuer.next.key")).st_mode & 0o777,
            0o600,
        )
        pending = store.read_sync(SHORT_RENEW_AT)
        self.assertEqual(
            self._run_until_wait(store, SHORT_SWITCH_AT), [ACTION_SWITCH, ACTION_WAIT]
        )
        self.assertEqual(
            sorted(os.listdir(self.directory)), ["ca.crt", "issuer.crt", "issuer.key"]
        )
        bundle = self.trust_store.load_sync(SHORT_SWITCH_AT)
        self.assertEqual(bundle.issuer, pending.next_issuer)
        self.assertEqual(bundle.active_anchors, (pending.next_root,))
        self.assertEqual(
            os.stat(os.path.join(self.directory, "issuer.key")).st_mode & 0o777, 0o600
        )

    def test_kill_at_every_write(self):
        """
        Killed after any write of a renewal or a switch, the files load, and the next
        start completes the step.
        """
        points = [
            (ACTION_RENEW, "next_key"),
            (ACTION_RENEW, "next_crt"),
            (ACTION_RENEW, "anchors"),
            (ACTION_SWITCH, "issuer"),
            (ACTION_SWITCH, "key"),
            (ACTION_SWITCH, "next_key"),
        ]
        for point in points:
            self.directory = self.mktemp()
            self.trust_store = self._trust_store()
            self.trust_store.load_or_generate_sync(FIXED_NOW)
            now = SHORT_RENEW_AT if point[0] == ACTION_RENEW else SHORT_SWITCH_AT
            if point[0] == ACTION_SWITCH:
                self._run_until_wait(self._store(), SHORT_RENEW_AT)
            killed = self._store(_kill_at(point))
            self.assertRaises(_Killed, killed.step_sync, now, SHORT_RENEWAL_SETTINGS)
            # What a serving copy loads meanwhile is a consistent pair.
            self.trust_store.load_sync(now)
            self._run_until_wait(self._store(), now)
            self._run_until_wait(self._store(), SHORT_SWITCH_AT)
            bundle = self.trust_store.load_sync(SHORT_SWITCH_AT)
            self.assertEqual(len(bundle.anchors), 2, point)
            self.assertNotEqual(bundle.issuer, bundle.anchors[0], point)
            self.assertEqual(bundle.active_anchors, (bundle.anchors[1],), point)
            self.assertEqual(
                sorted(os.listdir(self.directory)),
                ["ca.crt", "issuer.crt", "issuer.key"],
                point,
            )

    def test_mid_switch_finished(self):
        """
        Killed between issuer.crt and issuer.key, the next step finishes the switch.
        """
        self._run_until_wait(self._store(), SHORT_RENEW_AT)
        killed = self._store(_kill_at((ACTION_SWITCH, "issuer")))
        self.assertRaises(
            _Killed, killed.step_sync, SHORT_SWITCH_AT, SHORT_RENEWAL_SETTINGS
        )
        result = self._store().step_sync(SHORT_SWITCH_AT, SHORT_RENEWAL_SETTINGS)
        self.assertEqual(result.step.action, ACTION_FINISH_SWITCH)

    def test_operator_bundle_untouched(self):
        """A bundle not in the generated shape, past its threshold, is never written."""
        self.directory = self.mktemp()
        os.mkdir(self.directory)
        chain = make_chain(intermediates=1)
        chain.write(self.directory)
        self.trust_store = self._trust_store()
        before = self._listing()
        late = chain.issuer.not_valid_after_utc - timedelta(days=1)
        result = self._store().step_sync(late, SHORT_RENEWAL_SETTINGS)
        self.assertEqual(result.step.action, ACTION_OFF)
        self.assertEqual(self._listing(), before)

    def test_disabled_untouched(self):
        """With renewal off, a generated bundle past its threshold is not written."""
        before = self._listing()
        settings = RenewalSettings(enabled=False)
        result = self._store().step_sync(SHORT_RENEW_AT, settings)
        self.assertEqual(result.step.action, ACTION_OFF)
        self.assertEqual(self._listing(), before)
