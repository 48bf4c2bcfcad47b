# -*- test-case-name: tests.test_store,tests.test_files,tests.test_jwt -*-
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
removed again.  A process killed while it writes leaves its temporary files
(C{.issuer.key.sentry-tx-<16 hex digits>.tmp}); the next start removes
those, and only those, and logs each removal.

Every file is read through L{sentry_tx.ca.files.read_credential_file}, in a
daemon thread with a time bound (L{BoundedFileWork}), never in the reactor's
thread pool.  A credentials directory that group or others may write, or
that another user owns, is warned about at start and at every reload: whoever
can write there can swap in a whole CA.
"""

import errno
import os
import re
import secrets
import stat
from collections.abc import Callable, Generator, Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.logger import Logger
from zope.interface import implementer

from sentry_tx.ca.bundle import (
    KEY_TYPE_ECDSA_P256,
    KEY_TYPES,
    TrustBundle,
    generate_bundle,
    load_bundle,
)
from sentry_tx.ca.files import (
    CREDENTIAL_GENERATION_TIMEOUT_SECONDS,
    CREDENTIAL_READ_TIMEOUT_SECONDS,
    BoundedFileWork,
    FileWorkReactor,
    describe_os_error,
    read_credential_file,
)
from sentry_tx.ca.renewal import next_path
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
CREDENTIAL_DIRECTORY_MODE_TEXT = f"{CREDENTIALS_DIRECTORY_MODE:04o}"

_LOOSE_KEY_MODE_BITS = stat.S_IRWXG | stat.S_IRWXO

_LOOSE_DIRECTORY_MODE_BITS = stat.S_IWGRP | stat.S_IWOTH

_TEMPORARY_MARKER = ".sentry-tx-"
_TEMPORARY_SUFFIX = ".tmp"
_TEMPORARY_RANDOM_HEX_DIGITS = 16


def temporary_name(basename: str) -> str:
    """
    The name of a new temporary file for the bundle file C{basename}:
    hidden, marked as sentry_tx's, random, C{.tmp}.
    """
    token = secrets.token_hex(_TEMPORARY_RANDOM_HEX_DIGITS // 2)
    return f".{basename}{_TEMPORARY_MARKER}{token}{_TEMPORARY_SUFFIX}"


def _temporary_pattern(basenames: Iterable[str]) -> re.Pattern[str]:
    """
    A regular expression matching L{temporary_name}'s names for
    C{basenames}, and nothing else.
    """
    names = "|".join(re.escape(name) for name in sorted(basenames))
    return re.compile(
        rf"\.(?:{names}){re.escape(_TEMPORARY_MARKER)}"
        rf"[0-9a-f]{{{_TEMPORARY_RANDOM_HEX_DIGITS}}}{re.escape(_TEMPORARY_SUFFIX)}"
    )


_log = Logger()


def read_credential(
    path: str, is_key: bool = False, log: Logger | None = None
) -> bytes:
    """
    The contents of one credential file that is not a bundle file (the JWT
    key and JWKS, a JWKS validator's source file, the OIDC server's TLS
    files), through the same bounded reader as the bundle
    (L{sentry_tx.ca.files.read_credential_file}).  Blocking: run it through
    a L{BoundedFileWork}, never on the reactor or the gRPC loop.

    @param is_key: warn when the file is accessible to group or others.
    @param log: the L{Logger} that warns (the caller's); this module's by
        default.
    @raise BundleError: when it cannot be read, is not a regular file or is
        larger than L{MAX_BUNDLE_FILE_BYTES}.
    """

    def inspect(status: os.stat_result) -> None:
        if status.st_mode & _LOOSE_KEY_MODE_BITS:
            (log or _log).warn(
                "key file {path} is accessible to group or others (mode"
                " {mode}); it should be {expected}",
                path=path,
                mode=f"{stat.S_IMODE(status.st_mode):04o}",
                expected=f"{KEY_FILE_MODE:04o}",
            )

    return read_credential_file(
        path, MAX_BUNDLE_FILE_BYTES, inspect=inspect if is_key else None
    )


def distinct_directories(paths: Iterable[str]) -> tuple[str, ...]:
    """
    The distinct directories of C{paths}, in their order.
    """
    directories: list[str] = []
    for path in paths:
        directory = os.path.dirname(os.path.abspath(path))
        if directory not in directories:
            directories.append(directory)
    return tuple(directories)


def credential_exists(path: str) -> bool:
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
        raise BundleError(path, f"cannot be checked: {describe_os_error(e)}") from e
    return True


def sync_directory(directory: str) -> None:
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


class CredentialWriter:
    """
    Writes a set of generated credential files all or nothing, never over
    an existing file; what the bundle store and the JWT store share.
    """

    def __init__(
        self,
        watch_directories: Sequence[str],
        _open: Callable[[str, int, int], int] = os.open,
    ) -> None:
        """
        @param watch_directories: the directories whose entries are flushed
            to disk after the renames.
        @param _open: L{os.open}, or a test's stand-in to make writes fail.
        """
        self.watch_directories = tuple(watch_directories)
        self._open = _open

    def write_all(self, files: Sequence[tuple[str, bytes, int]]) -> None:
        """
        Write every C{(path, data, mode)} of C{files}, all or nothing.

        First every file goes to a new temporary file next to it, then all
        are renamed into place.  On failure, the temporary files, the files
        already renamed and the directories created are removed again.

        @raise BundleError: naming the path whose write failed.
        """
        created_directories: list[str] = []
        temporaries: list[str] = []
        renamed: list[str] = []
        current = files[0][0]
        try:
            for path, data, mode in files:
                current = path
                directory = os.path.dirname(os.path.abspath(path))
                created_directories.extend(self._make_directory(directory))
                temporary = os.path.join(
                    directory, temporary_name(os.path.basename(path))
                )
                fd = self._open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
                temporaries.append(temporary)
                self._write_file(fd, data, mode)
            for (path, _, _), temporary in list(zip(files, temporaries, strict=True)):
                current = path
                if credential_exists(path):
                    raise FileExistsError(
                        errno.EEXIST, "it appeared while the bundle was generated"
                    )
                os.replace(temporary, path)
                temporaries.remove(temporary)
                renamed.append(path)
            for directory in self.watch_directories:
                current = directory
                sync_directory(directory)
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
                current, f"cannot write the generated bundle: {describe_os_error(e)}"
            ) from None

    def _make_directory(self, directory: str) -> list[str]:
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
        created: list[str] = []
        for directory in reversed(missing):
            os.mkdir(directory, CREDENTIALS_DIRECTORY_MODE)
            os.chmod(directory, CREDENTIALS_DIRECTORY_MODE)
            created.append(directory)
        return created

    def _write_file(self, fd: int, data: bytes, mode: int) -> None:
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
        reactor: FileWorkReactor,
        ca_path: str,
        issuer_certificate_path: str,
        issuer_key_path: str,
        trust_domain: str,
        namespace: str,
        allowed_clock_skew: timedelta,
        key_type: str = KEY_TYPE_ECDSA_P256,
        _open: Callable[[str, int, int], int] = os.open,
        file_work: BoundedFileWork | None = None,
        _read_open: Callable[[str, int], int] = os.open,
        _geteuid: Callable[[], int] = os.geteuid,
        ca_ttl: timedelta | None = None,
    ) -> None:
        """
        @param reactor: provides C{seconds}, C{callLater} and
            C{callFromThread}, for the L{BoundedFileWork} made by default.
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
        @param file_work: the L{BoundedFileWork} that runs the file work
            with a time bound; a new one over C{reactor} by default.
        @param _read_open: L{os.open} for reads, or a test's stand-in to make
            a read block.
        @param _geteuid: L{os.geteuid}, or a test's stand-in.
        @param ca_ttl: the life of a generated root and issuer
            (C{--ca-ttl}, a L{timedelta}); 365 days by default.
        @raise ValueError: for an unknown C{key_type}.
        """
        if key_type not in KEY_TYPES:
            raise ValueError(
                f"unknown key type {key_type!r}; expected one of {KEY_TYPES}"
            )
        self._reactor = reactor
        self._paths = (ca_path, issuer_certificate_path, issuer_key_path)
        self.paths = self._paths
        self._trust_domain = trust_domain
        self._namespace = namespace
        self._allowed_clock_skew = allowed_clock_skew
        self._key_type = key_type
        self._ca_ttl = ca_ttl
        self._read_open = _read_open
        self._geteuid = _geteuid
        self._file_work = (
            file_work if file_work is not None else BoundedFileWork(reactor)
        )
        # Where a renewal keeps the pending issuer pair (sentry_tx.ca.renewal).
        self.next_paths = (
            next_path(issuer_certificate_path),
            next_path(issuer_key_path),
        )
        self._description = ", ".join(self._paths)
        self.watch_directories = distinct_directories(self._paths)
        self._writer = CredentialWriter(self.watch_directories, _open)

    # ITrustStore

    @inlineCallbacks
    def load_or_generate(
        self, now: datetime
    ) -> Generator[Deferred[Any], Any, TrustBundle]:
        """
        L{load_or_generate_sync} off the reactor, with time bounds: the
        reads and checks within L{CREDENTIAL_READ_TIMEOUT_SECONDS}, a
        generation within L{CREDENTIAL_GENERATION_TIMEOUT_SECONDS}.

        @param now: an aware L{datetime.datetime}.
        @return: a Deferred firing with a L{TrustBundle}, or failing with
            L{BundleError} (naming the file a read is blocked on, when the
            bound passes first).
        """
        bundle: TrustBundle | None = yield self._file_work.run(
            self._description,
            CREDENTIAL_READ_TIMEOUT_SECONDS,
            self._prepare_and_load_sync,
            now,
        )
        if bundle is None:
            generated: TrustBundle = yield self._file_work.run(
                self._description,
                CREDENTIAL_GENERATION_TIMEOUT_SECONDS,
                self._generate,
                now,
            )
            return generated
        return bundle

    def load(self, now: datetime) -> Deferred[TrustBundle]:
        """
        L{load_sync} off the reactor, within
        L{CREDENTIAL_READ_TIMEOUT_SECONDS}.

        @param now: an aware L{datetime.datetime}.
        @return: a Deferred firing with a L{TrustBundle}, or failing with
            L{BundleError}.
        """
        return self._file_work.run(
            self._description, CREDENTIAL_READ_TIMEOUT_SECONDS, self.load_sync, now
        )

    # The synchronous work

    def load_or_generate_sync(self, now: datetime) -> TrustBundle:
        """
        Remove the temporary files a killed generation left, warn about
        loose directories, then load the bundle; when none of the three
        files exists, generate one, write it and return it.

        @param now: an aware L{datetime.datetime}.
        @return: a L{TrustBundle}.
        @raise BundleError: when only some files exist (naming the missing
            ones), when the files are invalid, or when writing fails.
        """
        bundle = self._prepare_and_load_sync(now)
        if bundle is None:
            return self._generate(now)
        return bundle

    def _prepare_and_load_sync(self, now: datetime) -> TrustBundle | None:
        """
        The start's checks, then the bundle, or None when none of the three
        files exists.
        """
        self.remove_leftover_temporaries()
        self.check_directories()
        present = [path for path in self._paths if credential_exists(path)]
        if not present:
            return None
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
        return self._load_files(now)

    def load_sync(self, now: datetime) -> TrustBundle:
        """
        Warn about loose directories, then read and verify the three files;
        never generates.

        @param now: an aware L{datetime.datetime}.
        @return: a L{TrustBundle}.
        @raise BundleError: naming the file that cannot be read or is wrong.
        """
        self.check_directories()
        return self._load_files(now)

    def _load_files(self, now: datetime) -> TrustBundle:
        """
        Read and verify the three files.

        The one exception to failing closed: a renewal's switch (see
        L{sentry_tx.ca.renewal_files}) replaces C{issuer.crt} and then moves
        C{issuer.next.key} over C{issuer.key}.  When C{issuer.key} does not
        belong to C{issuer.crt} but C{issuer.next.key} does, the switch was
        interrupted between the two: that pair is loaded (the twistd
        process finishes the switch).  A key that matches neither may be a
        read that fell between the two renames of a switch in progress: the
        files are read once more before the mismatch is refused.
        """
        ca_path, issuer_path, key_path = self._paths
        next_key_path = self.next_paths[1]
        for attempt in range(2):
            anchors_pem = self._read(ca_path)
            issuer_pem = self._read(issuer_path)
            key_pem = self._read(key_path, is_key=True)
            try:
                return load_bundle(
                    anchors_pem, issuer_pem, key_pem, now, sources=self._paths
                )
            except BundleError as e:
                if e.source != key_path or attempt:
                    raise
                if credential_exists(next_key_path):
                    try:
                        bundle = load_bundle(
                            anchors_pem,
                            issuer_pem,
                            self._read(next_key_path, is_key=True),
                            now,
                            sources=(ca_path, issuer_path, next_key_path),
                        )
                    except BundleError:
                        continue
                    self._log.warn(
                        "{issuer} is the renewed issuer and its key is still in"
                        " {next_key}: a switch was interrupted; serving with"
                        " that pair until the switch is finished",
                        issuer=issuer_path,
                        next_key=next_key_path,
                    )
                    return bundle
        # The second attempt returns or raises.
        raise AssertionError("unreachable")

    # Helpers

    def _read(self, path: str, is_key: bool = False) -> bytes:
        """
        The contents of one bundle file, through L{read_credential_file}.

        @param is_key: warn when the file is accessible to group or others.
        @raise BundleError: when it cannot be read, is not a regular file or
            is too large.
        """

        def inspect(status: os.stat_result) -> None:
            if status.st_mode & _LOOSE_KEY_MODE_BITS:
                self._log.warn(
                    "issuer key file {path} is accessible to group or "
                    "others (mode {mode}); it should be {expected}",
                    path=path,
                    mode=f"{stat.S_IMODE(status.st_mode):04o}",
                    expected=f"{KEY_FILE_MODE:04o}",
                )

        return read_credential_file(
            path,
            MAX_BUNDLE_FILE_BYTES,
            inspect=inspect if is_key else None,
            _open=self._read_open,
        )

    def remove_leftover_temporaries(self) -> None:
        """
        Remove the temporary files of a generation that was killed before it
        could clean up: in the bundle's directories, names made by
        L{temporary_name} for the three files only.  Each removal is logged.
        """
        for directory, pattern in self._temporary_patterns():
            try:
                names = os.listdir(directory)
            except OSError:
                continue
            for name in sorted(names):
                if not pattern.fullmatch(name):
                    continue
                path = os.path.join(directory, name)
                try:
                    if not stat.S_ISREG(os.lstat(path).st_mode):
                        continue
                    os.unlink(path)
                except OSError as e:
                    self._log.warn(
                        "cannot remove the temporary file {path} left by an"
                        " interrupted generation: {error}",
                        path=path,
                        error=describe_os_error(e),
                    )
                else:
                    self._log.warn(
                        "removed the temporary file {path} left by an"
                        " interrupted generation",
                        path=path,
                    )

    def _temporary_patterns(self) -> list[tuple[str, re.Pattern[str]]]:
        by_directory: dict[str, set[str]] = {}
        for path in self._paths + self.next_paths:
            directory = os.path.dirname(os.path.abspath(path))
            by_directory.setdefault(directory, set()).add(os.path.basename(path))
        return [
            (directory, _temporary_pattern(names))
            for directory, names in by_directory.items()
        ]

    def check_directories(self) -> list[str]:
        """
        Warn about each existing credentials directory that group or others
        may write, or that a user other than this process's (or root) owns:
        whoever can write there can replace the whole bundle.

        @return: the warnings, as text (for tests).
        """
        warnings: list[str] = []
        uid = self._geteuid()
        for directory in self.watch_directories:
            try:
                status = os.stat(directory)
            except OSError:
                continue
            mode = stat.S_IMODE(status.st_mode)
            if mode & _LOOSE_DIRECTORY_MODE_BITS:
                warnings.append(
                    f"credentials directory {directory} is writable by group or"
                    f" others (mode {mode:04o}); anyone who can write there can"
                    f" replace the trust bundle; it should be"
                    f" {CREDENTIAL_DIRECTORY_MODE_TEXT}"
                )
            if status.st_uid not in (uid, 0):
                warnings.append(
                    f"credentials directory {directory} is owned by user"
                    f" {status.st_uid}, not by this process's user {uid} (or"
                    f" root); that user can replace the trust bundle"
                )
        for warning in warnings:
            self._log.warn("{directory_warning}", directory_warning=warning)
        return warnings

    def _generate(self, now: datetime) -> TrustBundle:
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
            **({} if self._ca_ttl is None else {"lifetime": self._ca_ttl}),
        )
        ca_path, issuer_path, key_path = self._paths
        self._writer.write_all(
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
