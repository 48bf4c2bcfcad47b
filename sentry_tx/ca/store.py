"""
The trust bundle kept in three files (standalone mode).

L{FileTrustStore} loads C{ca.crt}, C{issuer.crt} and C{issuer.key} from
disk and verifies them with L{load_bundle}.  When none of the three exists
it generates a bundle and writes it; it never overwrites a file, and when
only some of the three exist, it refuses to start rather than replace an
operator's credentials (unlike Dapr, which regenerates).

Generated files are written so that no reader ever sees a partial bundle:
each goes to a temporary file in its own directory, is flushed to disk and
renamed into place; if anything fails, every file this generation made is
removed again.
"""

import errno
import os
import secrets
import stat

from twisted.internet import threads
from twisted.logger import Logger
from zope.interface import implementer

from sentry_tx.ca.bundle import (
    KEY_TYPE_ECDSA_P256,
    KEY_TYPES,
    generate_bundle,
    load_bundle,
)
from sentry_tx.errors import BundleError
from sentry_tx.interfaces import ITrustStore

MAX_BUNDLE_FILE_BYTES = 1024 * 1024
"""
The largest bundle file sentry_tx reads; a bigger one is refused (it is
surely not a bundle).
"""

KEY_FILE_MODE = 0o600
CERTIFICATE_FILE_MODE = 0o644
CREDENTIALS_DIRECTORY_MODE = 0o700

_LOOSE_KEY_MODE_BITS = stat.S_IRWXG | stat.S_IRWXO

_TEMPORARY_SUFFIX = ".tmp"


def _describe_os_error(error):
    """
    An L{OSError} in words, without the file name (the caller names the
    file itself).
    """
    if error.errno is not None:
        name = errno.errorcode.get(error.errno, str(error.errno))
        return f"{error.strerror or os.strerror(error.errno)} ({name})"
    return str(error)


_log = Logger()


def read_credential_file(path, is_key=False, log=None):
    """
    The contents of one credential file (a bundle file, the JWT key and
    JWKS, a JWKS validator's source file): the one reader every credential
    file goes through.  Blocking: call it in a thread.

    @param is_key: warn when the file is accessible to group or others.
    @param log: the L{Logger} that warns (the caller's); this module's by
        default.
    @raise BundleError: when it cannot be read or is larger than
        L{MAX_BUNDLE_FILE_BYTES}.
    """
    try:
        with open(path, "rb") as f:
            if is_key:
                mode = os.fstat(f.fileno()).st_mode
                if mode & _LOOSE_KEY_MODE_BITS:
                    (log or _log).warn(
                        "key file {path} is accessible to group or "
                        "others (mode {mode}); it should be {expected}",
                        path=path,
                        mode=f"{stat.S_IMODE(mode):04o}",
                        expected=f"{KEY_FILE_MODE:04o}",
                    )
            data = f.read(MAX_BUNDLE_FILE_BYTES + 1)
    except OSError as e:
        raise BundleError(path, f"cannot be read: {_describe_os_error(e)}")
    if len(data) > MAX_BUNDLE_FILE_BYTES:
        raise BundleError(
            path, f"is larger than {MAX_BUNDLE_FILE_BYTES} bytes; not a bundle file"
        )
    return data


@implementer(ITrustStore)
class FileTrustStore:
    """
    A trust bundle in three files.

    @ivar watch_directories: the distinct directories of the three files, in
        the order anchors, issuer chain, key.
    """

    _log = Logger()

    def __init__(
        self,
        reactor,
        ca_path,
        issuer_certificate_path,
        issuer_key_path,
        trust_domain,
        namespace,
        allowed_clock_skew,
        key_type=KEY_TYPE_ECDSA_P256,
        _open=os.open,
    ):
        """
        @param reactor: provides C{getThreadPool} and C{callFromThread}; the
            file work runs in its thread pool.
        @param ca_path: path of the trust anchors.
        @param issuer_certificate_path: path of the issuer chain.
        @param issuer_key_path: path of the issuer key.
        @param trust_domain: trust domain of a generated bundle.
        @param namespace: namespace in a generated issuer's subject.
        @param allowed_clock_skew: how far before now a generated bundle
            starts, a L{timedelta}.
        @param key_type: key type of a generated bundle (C{"ecdsa-p256"} or
            C{"ed25519"}).
        @param _open: L{os.open}, or a test's stand-in to make writes fail.
        @raise ValueError: for an unknown C{key_type}.
        """
        if key_type not in KEY_TYPES:
            raise ValueError(
                f"unknown key type {key_type!r}; expected one of {KEY_TYPES}"
            )
        self._reactor = reactor
        self._paths = (ca_path, issuer_certificate_path, issuer_key_path)
        self._trust_domain = trust_domain
        self._namespace = namespace
        self._allowed_clock_skew = allowed_clock_skew
        self._key_type = key_type
        self._open = _open
        directories = []
        for path in self._paths:
            directory = os.path.dirname(os.path.abspath(path))
            if directory not in directories:
                directories.append(directory)
        self.watch_directories = tuple(directories)

    # ITrustStore

    def load_or_generate(self, now):
        """
        L{load_or_generate_sync} in the reactor's thread pool.

        @param now: an aware L{datetime.datetime}.
        @return: a Deferred firing with a L{TrustBundle}, or failing with
            L{BundleError}.
        """
        return threads.deferToThreadPool(
            self._reactor,
            self._reactor.getThreadPool(),
            self.load_or_generate_sync,
            now,
        )

    def load(self, now):
        """
        L{load_sync} in the reactor's thread pool.

        @param now: an aware L{datetime.datetime}.
        @return: a Deferred firing with a L{TrustBundle}, or failing with
            L{BundleError}.
        """
        return threads.deferToThreadPool(
            self._reactor, self._reactor.getThreadPool(), self.load_sync, now
        )

    # The synchronous work

    def load_or_generate_sync(self, now):
        """
        Load the bundle; when none of the three files exists, generate one,
        write it and return it.

        @param now: an aware L{datetime.datetime}.
        @return: a L{TrustBundle}.
        @raise BundleError: when only some files exist (naming the missing
            ones), when the files are invalid, or when writing fails.
        """
        present = [path for path in self._paths if self._exists(path)]
        if not present:
            return self._generate(now)
        if len(present) < len(self._paths):
            missing = [path for path in self._paths if path not in present]
            raise BundleError(
                ", ".join(missing),
                f"missing, while {', '.join(present)} "
                f"{'exists' if len(present) == 1 else 'exist'}; refusing to "
                f"generate a new trust bundle, which would overwrite existing "
                f"credentials (supply all three files, or remove all of them to "
                f"have a new bundle generated)",
            )
        return self.load_sync(now)

    def load_sync(self, now):
        """
        Read and verify the three files; never generates.

        @param now: an aware L{datetime.datetime}.
        @return: a L{TrustBundle}.
        @raise BundleError: naming the file that cannot be read or is wrong.
        """
        ca_path, issuer_path, key_path = self._paths
        anchors_pem = self._read(ca_path)
        issuer_pem = self._read(issuer_path)
        key_pem = self._read(key_path, is_key=True)
        return load_bundle(anchors_pem, issuer_pem, key_pem, now, sources=self._paths)

    # Helpers

    def _exists(self, path):
        """
        Whether C{path} exists (a dangling symbolic link counts: reading it
        will fail, loudly, rather than be overwritten).

        @raise BundleError: when it cannot be told (a directory on the way
            is unreadable): absence is never assumed.
        """
        try:
            os.lstat(path)
        except FileNotFoundError:
            return False
        except OSError as e:
            raise BundleError(path, f"cannot be checked: {_describe_os_error(e)}")
        return True

    def _read(self, path, is_key=False):
        """
        The contents of one bundle file, through L{read_credential_file}.
        """
        return read_credential_file(path, is_key=is_key, log=self._log)

    def _generate(self, now):
        """
        Generate a bundle and write its three files.

        @return: the L{TrustBundle}.
        @raise BundleError: naming the file that could not be written; no
            file of this generation is left behind.
        """
        generated = generate_bundle(
            self._trust_domain,
            self._namespace,
            now,
            self._allowed_clock_skew,
            self._key_type,
        )
        ca_path, issuer_path, key_path = self._paths
        self._write_all(
            [
                (ca_path, generated.anchors_pem, CERTIFICATE_FILE_MODE),
                (issuer_path, generated.issuer_chain_pem, CERTIFICATE_FILE_MODE),
                (key_path, generated.issuer_key_pem, KEY_FILE_MODE),
            ]
        )
        self._log.info(
            "generated a new trust bundle for trust domain {trust_domain} in "
            "{paths}; the root and issuer expire at {not_after}",
            trust_domain=self._trust_domain,
            paths=", ".join(self._paths),
            not_after=generated.bundle.chain_not_after.isoformat(),
        )
        return generated.bundle

    def _write_all(self, files):
        """
        Write every C{(path, data, mode)} of C{files}, all or nothing.

        First every file goes to a new temporary file next to it, then all
        are renamed into place.  On failure, the temporary files, the files
        already renamed and the directories created are removed again.

        @raise BundleError: naming the path whose write failed.
        """
        created_directories = []
        temporaries = []
        renamed = []
        current = files[0][0]
        try:
            for path, data, mode in files:
                current = path
                directory = os.path.dirname(os.path.abspath(path))
                created_directories.extend(self._make_directory(directory))
                temporary = os.path.join(
                    directory,
                    f".{os.path.basename(path)}.{secrets.token_hex(8)}"
                    f"{_TEMPORARY_SUFFIX}",
                )
                fd = self._open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
                temporaries.append(temporary)
                self._write_file(fd, data, mode)
            for (path, _, _), temporary in list(zip(files, temporaries)):
                current = path
                if self._exists(path):
                    raise FileExistsError(
                        errno.EEXIST, "it appeared while the bundle was generated"
                    )
                os.replace(temporary, path)
                temporaries.remove(temporary)
                renamed.append(path)
            for directory in self.watch_directories:
                current = directory
                self._sync_directory(directory)
        except (OSError, BundleError) as e:
            for leftover in temporaries + renamed:
                try:
                    os.unlink(leftover)
                except OSError:
                    pass
            for directory in reversed(created_directories):
                try:
                    os.rmdir(directory)
                except OSError:
                    pass
            if isinstance(e, BundleError):
                raise
            raise BundleError(
                current, f"cannot write the generated bundle: {_describe_os_error(e)}"
            ) from None

    def _make_directory(self, directory):
        """
        Create C{directory} with mode 0700 if it is missing, with any missing
        parents.

        @return: the directories created, outermost first.
        """
        missing = []
        while not os.path.isdir(directory):
            missing.append(directory)
            parent = os.path.dirname(directory)
            if parent == directory:
                break
            directory = parent
        created = []
        for directory in reversed(missing):
            os.mkdir(directory, CREDENTIALS_DIRECTORY_MODE)
            os.chmod(directory, CREDENTIALS_DIRECTORY_MODE)
            created.append(directory)
        return created

    def _write_file(self, fd, data, mode):
        """
        Write C{data} to the new file open as C{fd}, give it C{mode} exactly
        (whatever the umask), flush it to disk and close it.
        """
        try:
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)

    def _sync_directory(self, directory):
        """
        Flush a directory's entries (the renames) to disk, where the file
        system can.
        """
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        except OSError as e:
            if e.errno not in (errno.EINVAL, errno.ENOTSUP):
                raise
        finally:
            os.close(fd)
