"""
Tests for L{sentry_tx.ca.store.FileTrustStore}.
"""

import errno
import os
import stat
from datetime import timedelta

from cryptography.hazmat.primitives.asymmetric import ed25519
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from sentry_tx.ca.bundle import TrustBundle, load_bundle
from sentry_tx.ca.store import FileTrustStore
from sentry_tx.errors import BundleError
from sentry_tx.interfaces import ITrustStore
from sentry_tx.testing.certificates import FIXED_NOW, make_chain

SKEW = timedelta(minutes=15)
NAMES = ("ca.crt", "issuer.crt", "issuer.key")


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def _snapshot(directory):
    """
    Every file of C{directory} with its bytes and modification time.
    """
    result = {}
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        with open(path, "rb") as f:
            result[name] = (f.read(), os.stat(path).st_mtime_ns)
    return result


class FileTrustStoreMixin:
    """
    Build stores over a fresh directory.
    """

    def make_store(
        self,
        directory=None,
        key_type="ecdsa-p256",
        _open=os.open,
        reactor=None,
        **options,
    ):
        """
        A L{FileTrustStore} over C{ca.crt}, C{issuer.crt} and C{issuer.key}
        in C{directory} (a new temporary path by default, not created).
        """
        if directory is None:
            directory = self.mktemp()
        self.directory = directory
        self.paths = tuple(os.path.join(directory, name) for name in NAMES)
        return FileTrustStore(
            reactor,
            *self.paths,
            trust_domain="example.org",
            namespace="dapr-system",
            allowed_clock_skew=SKEW,
            key_type=key_type,
            _open=_open,
            **options,
        )


class GenerationTests(FileTrustStoreMixin, SynchronousTestCase):
    """
    When none of the three files exists, the store generates and writes them.
    """

    def test_interface(self):
        """FileTrustStore provides ITrustStore."""
        self.assertTrue(verifyObject(ITrustStore, self.make_store()))

    def test_writes_three_files(self):
        """Generation writes the three files, which load into the same bundle."""
        store = self.make_store()
        bundle = store.load_or_generate_sync(FIXED_NOW)
        self.assertIsInstance(bundle, TrustBundle)
        contents = []
        for path in self.paths:
            with open(path, "rb") as f:
                contents.append(f.read())
        loaded = load_bundle(*contents, FIXED_NOW)
        self.assertEqual(loaded.anchors, bundle.anchors)
        self.assertEqual(loaded.issuer_chain, bundle.issuer_chain)
        self.assertEqual(contents[0], bundle.anchors_pem)
        self.assertEqual(contents[1], bundle.issuer_chain_pem)

    def test_modes(self):
        """The key is 0600, certificates 0644, the new directory 0700."""
        store = self.make_store()
        old_umask = os.umask(0o022)
        self.addCleanup(os.umask, old_umask)
        store.load_or_generate_sync(FIXED_NOW)
        self.assertEqual(_mode(self.directory), 0o700)
        self.assertEqual(_mode(self.paths[0]), 0o644)
        self.assertEqual(_mode(self.paths[1]), 0o644)
        self.assertEqual(_mode(self.paths[2]), 0o600)

    def test_modes_despite_umask(self):
        """The modes are exact whatever the umask."""
        store = self.make_store()
        old_umask = os.umask(0o077)
        self.addCleanup(os.umask, old_umask)
        store.load_or_generate_sync(FIXED_NOW)
        self.assertEqual(_mode(self.paths[0]), 0o644)
        self.assertEqual(_mode(self.paths[2]), 0o600)

    def test_parent_directories(self):
        """Missing parent directories are created too, private."""
        top = self.mktemp()
        store = self.make_store(os.path.join(top, "var", "credentials"))
        store.load_or_generate_sync(FIXED_NOW)
        self.assertEqual(sorted(os.listdir(self.directory)), sorted(NAMES))
        self.assertEqual(_mode(top), 0o700)

    def test_existing_directory_kept(self):
        """An existing empty directory is used and its mode left alone."""
        directory = self.mktemp()
        os.makedirs(directory)
        os.chmod(directory, 0o755)
        self.make_store(directory).load_or_generate_sync(FIXED_NOW)
        self.assertEqual(_mode(directory), 0o755)

    def test_no_temporary_files(self):
        """Only the three files are left in the directory."""
        self.make_store().load_or_generate_sync(FIXED_NOW)
        self.assertEqual(sorted(os.listdir(self.directory)), sorted(NAMES))

    def test_then_loads(self):
        """A second start loads what the first generated, without regenerating."""
        store = self.make_store()
        first = store.load_or_generate_sync(FIXED_NOW)
        before = _snapshot(self.directory)
        second = store.load_or_generate_sync(FIXED_NOW + timedelta(days=1))
        self.assertEqual(second.issuer_chain, first.issuer_chain)
        self.assertEqual(_snapshot(self.directory), before)

    def test_ed25519(self):
        """The store generates Ed25519 bundles on request."""
        bundle = self.make_store(key_type="ed25519").load_or_generate_sync(FIXED_NOW)
        self.assertIsInstance(bundle.issuer_key, ed25519.Ed25519PrivateKey)
        self.assertIsInstance(bundle.anchors[0].public_key(), ed25519.Ed25519PublicKey)
        self.assertIsNone(bundle.signature_hash)

    def test_unknown_key_type(self):
        """An unknown key type is refused at construction."""
        self.assertRaises(ValueError, self.make_store, key_type="dsa")

    def test_logs_generation(self):
        """Generation is logged, without key material."""
        store = self.make_store()
        with capturedLogs() as events:
            store.load_or_generate_sync(FIXED_NOW)
        texts = [formatEvent(e) for e in events if e.get("log_source") is store]
        self.assertEqual(len(texts), 1)
        self.assertIn("generated a new trust bundle", texts[0])
        self.assertNotIn("PRIVATE", texts[0])

    def test_watch_directories(self):
        """The watched directories are the distinct directories of the files."""
        store = self.make_store()
        self.assertEqual(store.watch_directories, (os.path.abspath(self.directory),))
        other = FileTrustStore(
            None, "/a/ca.crt", "/b/issuer.crt", "/a/issuer.key",
            "example.org", "default", SKEW,
        )
        self.assertEqual(other.watch_directories, ("/a", "/b"))


class WriteFailureTests(FileTrustStoreMixin, SynchronousTestCase):
    """
    A failed generation leaves nothing behind and says why.
    """

    def _failing_open(self, fail_on, make_error=None):
        """
        An C{os.open} stand-in that fails on the C{fail_on}th call.
        """
        calls = []

        def _open(path, flags, mode=0o777):
            calls.append(path)
            if len(calls) == fail_on:
                if make_error is not None:
                    return make_error(path, flags, mode)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
            return os.open(path, flags, mode)

        return _open

    def test_disk_full_on_key(self):
        """A full disk on the third file: BundleError naming it, no files left."""
        directory = self.mktemp()
        os.makedirs(directory)
        store = self.make_store(directory, _open=self._failing_open(3))
        error = self.assertRaises(BundleError, store.load_or_generate_sync, FIXED_NOW)
        self.assertEqual(error.source, self.paths[2])
        self.assertIn("No space left on device", error.problem)
        self.assertIn("ENOSPC", error.problem)
        self.assertEqual(os.listdir(directory), [])

    def test_first_file(self):
        """A failure on the first file leaves nothing, not even the new directory."""
        store = self.make_store(_open=self._failing_open(1))
        error = self.assertRaises(BundleError, store.load_or_generate_sync, FIXED_NOW)
        self.assertEqual(error.source, self.paths[0])
        self.assertFalse(os.path.exists(self.directory))

    def test_write_fails_after_open(self):
        """A temporary file that was created but could not be written is removed."""

        def read_only(path, flags, mode):
            os.close(os.open(path, flags, mode))
            return os.open(path, os.O_RDONLY)

        directory = self.mktemp()
        os.makedirs(directory)
        store = self.make_store(directory, _open=self._failing_open(2, read_only))
        error = self.assertRaises(BundleError, store.load_or_generate_sync, FIXED_NOW)
        self.assertEqual(error.source, self.paths[1])
        self.assertIn("EBADF", error.problem)
        self.assertEqual(os.listdir(directory), [])

    def test_file_appears_during_generation(self):
        """A file an operator writes meanwhile is never overwritten."""

        def operator_writes(path, flags, mode):
            with open(self.paths[0], "wb") as f:
                f.write(b"operator's roots")
            return os.open(path, flags, mode)

        directory = self.mktemp()
        os.makedirs(directory)
        store = self.make_store(directory, _open=self._failing_open(3, operator_writes))
        error = self.assertRaises(BundleError, store.load_or_generate_sync, FIXED_NOW)
        self.assertEqual(error.source, self.paths[0])
        self.assertEqual(os.listdir(directory), ["ca.crt"])
        with open(self.paths[0], "rb") as f:
            self.assertEqual(f.read(), b"operator's roots")


class FailClosedTests(FileTrustStoreMixin, SynchronousTestCase):
    """
    Existing files are loaded or refused, never replaced.
    """

    def setUp(self):
        self.store = self.make_store()
        os.makedirs(self.directory)
        self.chain = make_chain()

    def _write(self, name, data):
        with open(os.path.join(self.directory, name), "wb") as f:
            f.write(data)

    def test_loads_existing(self):
        """A valid bundle on disk is loaded as it is."""
        self.chain.write(self.directory)
        before = _snapshot(self.directory)
        bundle = self.store.load_or_generate_sync(FIXED_NOW)
        self.assertEqual(bundle.issuer, self.chain.issuer)
        self.assertEqual(_snapshot(self.directory), before)

    def test_one_of_three(self):
        """
        Only ca.crt present: refused, naming the two missing files; nothing touched.
        """
        self._write("ca.crt", self.chain.anchors_pem)
        before = _snapshot(self.directory)
        error = self.assertRaises(
            BundleError, self.store.load_or_generate_sync, FIXED_NOW
        )
        self.assertEqual(error.source, f"{self.paths[1]}, {self.paths[2]}")
        self.assertIn("refusing", error.problem)
        self.assertIn("overwrite", error.problem)
        self.assertIn(self.paths[0], error.problem)
        self.assertEqual(_snapshot(self.directory), before)

    def test_two_of_three(self):
        """The key missing: refused, naming the key; nothing touched."""
        self._write("ca.crt", self.chain.anchors_pem)
        self._write("issuer.crt", self.chain.issuer_chain_pem())
        before = _snapshot(self.directory)
        error = self.assertRaises(
            BundleError, self.store.load_or_generate_sync, FIXED_NOW
        )
        self.assertEqual(error.source, self.paths[2])
        self.assertIn("refusing", error.problem)
        self.assertEqual(_snapshot(self.directory), before)

    def test_dangling_symlink_counts(self):
        """
        A dangling symbolic link counts as present: the store refuses, not generates.
        """
        os.symlink(os.path.join(self.directory, "..data", "ca.crt"), self.paths[0])
        error = self.assertRaises(
            BundleError, self.store.load_or_generate_sync, FIXED_NOW
        )
        self.assertIn("refusing", error.problem)
        self.assertEqual(os.listdir(self.directory), ["ca.crt"])

    def test_invalid(self):
        """
        An invalid bundle is refused with the path of the bad file; nothing touched.
        """
        self.chain.write(self.directory)
        self._write("issuer.crt", b"not a certificate\n")
        before = _snapshot(self.directory)
        error = self.assertRaises(
            BundleError, self.store.load_or_generate_sync, FIXED_NOW
        )
        self.assertEqual(error.source, self.paths[1])
        self.assertIn(self.paths[1], str(error))
        self.assertEqual(_snapshot(self.directory), before)

    def test_wrong_key_names_key_path(self):
        """A key that does not match is refused naming the key's path."""
        self.chain.write(self.directory)
        self._write("issuer.key", make_chain().issuer_key_pem())
        error = self.assertRaises(BundleError, self.store.load_sync, FIXED_NOW)
        self.assertEqual(error.source, self.paths[2])

    def test_unreadable(self):
        """A file that cannot be read is refused with its path and the OS error."""
        self.chain.write(self.directory)

        def failing_open(path, flags):
            if path == self.paths[1]:
                raise OSError(errno.EIO, os.strerror(errno.EIO))
            return os.open(path, flags)

        store = self.make_store(self.directory, _read_open=failing_open)
        error = self.assertRaises(BundleError, store.load_sync, FIXED_NOW)
        self.assertEqual(error.source, self.paths[1])
        self.assertIn("(EIO)", error.problem)

    def test_directory_refused(self):
        """A directory in place of a bundle file is refused with its path."""
        self.chain.write(self.directory)
        os.unlink(self.paths[1])
        os.mkdir(self.paths[1])
        error = self.assertRaises(BundleError, self.store.load_sync, FIXED_NOW)
        self.assertEqual(error.source, self.paths[1])
        self.assertIn("is a directory, not a regular file", error.problem)

    def test_fifo_refused(self):
        """A FIFO in place of the issuer chain is refused at once, naming it."""
        self.chain.write(self.directory)
        os.unlink(self.paths[1])
        os.mkfifo(self.paths[1])
        error = self.assertRaises(BundleError, self.store.load_sync, FIXED_NOW)
        self.assertEqual(error.source, self.paths[1])
        self.assertIn("FIFO", error.problem)

    def test_load_never_generates(self):
        """load_sync with no files fails and writes nothing."""
        error = self.assertRaises(BundleError, self.store.load_sync, FIXED_NOW)
        self.assertEqual(error.source, self.paths[0])
        self.assertIn("No such file", error.problem)
        self.assertEqual(os.listdir(self.directory), [])

    def test_too_large(self):
        """A file over the size limit is refused without being parsed."""
        self.chain.write(self.directory)
        self._write("ca.crt", b"#" * (1024 * 1024 + 1))
        error = self.assertRaises(BundleError, self.store.load_sync, FIXED_NOW)
        self.assertEqual(error.source, self.paths[0])
        self.assertIn("larger than", error.problem)

    def test_loose_key_mode_warns(self):
        """A key readable by others is loaded with a warning naming the file."""
        self.chain.write(self.directory)
        os.chmod(self.paths[2], 0o644)
        with capturedLogs() as events:
            self.store.load_sync(FIXED_NOW)
        warnings = [
            e for e in events
            if e.get("log_source") is self.store and e["log_level"] is LogLevel.warn
        ]
        self.assertEqual(len(warnings), 1)
        text = formatEvent(warnings[0])
        self.assertIn(self.paths[2], text)
        self.assertIn("0644", text)

    def test_private_key_mode_silent(self):
        """A key with mode 0600 loads without a warning."""
        self.chain.write(self.directory)
        with capturedLogs() as events:
            self.store.load_sync(FIXED_NOW)
        self.assertEqual(
            [e for e in events if e.get("log_level") is LogLevel.warn], []
        )


class DeferredTests(FileTrustStoreMixin, TestCase):
    """
    The Deferred API runs the work in the real reactor's thread pool.
    """

    def test_load_or_generate(self):
        """load_or_generate fires with the generated bundle."""
        from twisted.internet import reactor

        store = self.make_store(reactor=reactor)
        d = store.load_or_generate(FIXED_NOW)

        def check(bundle):
            self.assertIsInstance(bundle, TrustBundle)
            self.assertEqual(sorted(os.listdir(self.directory)), sorted(NAMES))

        return d.addCallback(check)

    def test_load_fails(self):
        """load fails with BundleError when the files are missing."""
        from twisted.internet import reactor

        store = self.make_store(reactor=reactor)
        return self.assertFailure(store.load(FIXED_NOW), BundleError)
