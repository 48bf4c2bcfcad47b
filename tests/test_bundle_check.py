"""
Tests for C{python -m sentry_tx check-bundle DIR} (L{sentry_tx.bundle_check}).
"""

import os
import re
import subprocess
import sys
from datetime import UTC, timedelta
from io import StringIO

from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import SynchronousTestCase, TestCase

from sentry_tx.bundle_check import check_bundle, main
from sentry_tx.testing.certificates import FIXED_NOW, make_chain
from sentry_tx.testing.rotation import BUNDLE_FILE_NAMES, replace_bundle_files
from sentry_tx.testing.source_tree import PROJECT_ROOT
from sentry_tx.testing.twistd import LOOPBACK_FREE_PORTS, spawn_twistd


def _directory(test, chain=None):
    """
    A directory holding C{chain}'s three files (none when C{chain} is None).
    """
    directory = os.path.abspath(test.mktemp())
    os.makedirs(directory)
    if chain is not None:
        replace_bundle_files(chain, directory)
    return directory


def _paths(directory):
    return tuple(os.path.join(directory, name) for name in BUNDLE_FILE_NAMES)


def _run(directory, now=FIXED_NOW):
    out, err = StringIO(), StringIO()
    status = check_bundle(_paths(directory), now, out, err)
    return status, out.getvalue(), err.getvalue()


class CheckBundleTests(SynchronousTestCase):
    """
    L{check_bundle} runs the start-up checks and reports.
    """

    def test_pending_renewal(self):
        """
        A pending renewal: check-bundle names the next issuer, the switch time and what
        to do before it.
        """
        from sentry_tx.ca.renewal import RenewalSettings
        from sentry_tx.ca.renewal_files import FileRenewalStore
        from sentry_tx.ca.store import FileTrustStore
        from sentry_tx.testing.clocks import ImmediateReactor

        directory = _directory(self)
        store = FileTrustStore(
            ImmediateReactor(),
            *_paths(directory),
            "localhost",
            "default",
            timedelta(seconds=1),
            ca_ttl=timedelta(seconds=90),
        )
        store.load_or_generate_sync(FIXED_NOW)
        now = FIXED_NOW + timedelta(seconds=50)
        grace = timedelta(seconds=15)
        settings = RenewalSettings(
            ca_ttl=timedelta(seconds=90), threshold=0.5, grace=grace,
            workload_ttl=timedelta(seconds=20), allowed_clock_skew=timedelta(seconds=1),
        )
        FileRenewalStore(None, store).step_sync(now, settings)
        out, err = StringIO(), StringIO()
        status = check_bundle(_paths(directory), now, out, err, settings=settings)
        self.assertEqual((status, err.getvalue()), (0, ""))
        text = out.getvalue()
        self.assertIn("renewal: pending next issuer (", text)
        self.assertIn("its root is in the trust anchors", text)
        switch_at = (
            (now - timedelta(seconds=1)).replace(microsecond=0)
            + timedelta(seconds=1)
            + grace
        )
        self.assertIn(f"switches to it at {switch_at.isoformat()}", text)
        self.assertIn("restart workloads before then", text)

    def test_good_bundle(self):
        """
        A bundle that loads: exit 0, and the anchors and the issuer chain
        with their expiry dates and key types, the anchor reached, and that
        the key matches.
        """
        chain = make_chain("ecdsa-p256", intermediates=1)
        status, out, err = _run(_directory(self, chain))
        self.assertEqual((status, err), (0, ""))
        self.assertIn("trust anchors (", out)
        self.assertIn(": 1\n", out)
        self.assertIn("issuer chain (", out)
        self.assertIn(": 2\n", out)
        self.assertIn(
            f"expires {chain.issuer.not_valid_after_utc.isoformat()} (in 365 days)", out
        )
        self.assertIn("key ECDSA secp256r1", out)
        self.assertIn(
            f"verifies up to the anchor {chain.root.subject.rfc4514_string()}", out
        )
        self.assertIn("matches the issuer certificate", out)
        self.assertTrue(out.endswith("OK: sentry_tx would load this bundle\n"))

    def test_expiring_soon_flagged(self):
        """
        A certificate within 30 days of its end is flagged (it still loads).
        """
        chain = make_chain(issuer_not_after=FIXED_NOW + timedelta(days=10))
        status, out, _ = _run(_directory(self, chain))
        self.assertEqual(status, 0)
        self.assertIn("(in 10 days; WITHIN 30 DAYS)", out)

    def test_wrong_key(self):
        """
        A key of another issuer: exit 1, the message naming the key file,
        nothing on stdout.
        """
        directory = _directory(self, make_chain())
        with open(os.path.join(directory, "issuer.key"), "wb") as f:
            f.write(make_chain().issuer_key_pem())
        status, out, err = _run(directory)
        self.assertEqual((status, out), (1, ""))
        self.assertEqual(
            err,
            f"refusing to start: {os.path.join(directory, 'issuer.key')}: the"
            " private key does not belong to the issuer certificate (subject"
            f" {make_chain().issuer.subject.rfc4514_string()!r}) in"
            f" {os.path.join(directory, 'issuer.crt')}\n",
        )

    def test_expired_issuer(self):
        """
        An issuer that has expired at the time of the check: exit 1.
        """
        chain = make_chain(issuer_not_after=FIXED_NOW + timedelta(days=1))
        status, _, err = _run(_directory(self, chain), FIXED_NOW + timedelta(days=2))
        self.assertEqual(status, 1)
        self.assertIn("issuer.crt", err)

    def test_nothing_to_check(self):
        """
        An empty directory is not a bundle: exit 1 saying sentry_tx would
        generate one, and nothing is written.
        """
        directory = _directory(self)
        status, _, err = _run(directory)
        self.assertEqual(status, 1)
        self.assertIn("would generate a new trust bundle", err)
        self.assertEqual(os.listdir(directory), [])

    def test_filenames(self):
        """
        The --issuer-*-filename flags choose other names, as sentry_tx's do.
        """
        directory = _directory(self, make_chain())
        os.rename(
            os.path.join(directory, "issuer.key"), os.path.join(directory, "tls.key")
        )
        out, err = StringIO(), StringIO()
        status = main(
            [directory, "--issuer-key-filename", "tls.key"], out, err, now=FIXED_NOW
        )
        self.assertEqual(status, 0, err.getvalue())
        self.assertIn("tls.key", out.getvalue())


class CommandTests(TestCase):
    """
    The command as an operator runs it, against twistd's own refusal.
    """

    timeout = 60

    def test_module_entry_point(self):
        """
        C{python -m sentry_tx check-bundle DIR} exits 0 on a bundle that
        loads (valid now) and 1 on one that does not.
        """
        from datetime import datetime

        now = datetime.now(UTC)
        good = _directory(
            self,
            make_chain(
                not_before=now - timedelta(days=1), not_after=now + timedelta(days=90)
            ),
        )
        env = dict(os.environ, PYTHONPATH=PROJECT_ROOT)
        result = subprocess.run(
            [sys.executable, "-m", "sentry_tx", "check-bundle", good],
            capture_output=True,
            env=env,
            timeout=30,
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn(b"OK: sentry_tx would load this bundle", result.stdout)
        os.remove(os.path.join(good, "issuer.crt"))
        result = subprocess.run(
            [sys.executable, "-m", "sentry_tx", "check-bundle", good],
            capture_output=True,
            env=env,
            timeout=30,
        )
        self.assertEqual(result.returncode, 1)

    @inlineCallbacks
    def test_same_message_as_twistd(self):
        """
        For a bundle that would not load, the checker's message is the one
        twistd logs when it refuses to start with that directory.
        """
        directory = _directory(self, make_chain())
        os.remove(os.path.join(directory, "issuer.key"))
        out, err = StringIO(), StringIO()
        self.assertEqual(main([directory], out, err), 1)
        message = err.getvalue().strip()
        self.assertTrue(message.startswith("refusing to start: "))
        protocol = spawn_twistd(
            self,
            [
                "--config",
                os.path.abspath(self.mktemp()),
                "--issuer-credentials",
                directory,
            ]
            + LOOPBACK_FREE_PORTS,
        )
        reason = yield protocol.ended
        self.assertEqual(reason.exitCode, 1)
        logged = [
            re.sub(r"^\S+ fatal dapr\.sentry: ", "", line)
            for line in protocol.output.decode().splitlines()
            if " fatal " in line
        ]
        self.assertEqual(logged, [message])
