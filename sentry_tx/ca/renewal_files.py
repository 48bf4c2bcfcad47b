# -*- test-case-name: tests.test_renewal_files -*-
"""
Automatic CA renewal in files (standalone mode): L{FileRenewalStore}.

Each step (L{sentry_tx.ca.renewal.step_writes}) is a short sequence of file
replacements, each one atomic (a temporary file beside the target, flushed,
renamed over it; a removal is an unlink), in an order chosen so that a
process killed between any two leaves files that
L{sentry_tx.ca.renewal.read_state} reads and L{sentry_tx.ca.renewal.plan}
completes at the next start:

  - renew: C{issuer.next.key}, C{issuer.next.crt} (the new issuer and its
    root), then C{ca.crt} with the root appended;
  - switch: C{issuer.crt}, then C{issuer.key}, then the two next files
    removed.  Between the first two renames C{issuer.key} is stale; the
    loader (L{sentry_tx.ca.store.FileTrustStore}) then takes the key from
    C{issuer.next.key}, the one exception to failing closed, so that
    C{issuer.crt} and the key in use are never mismatched.

Reads and writes run in a daemon thread with a time bound
(L{sentry_tx.ca.files.BoundedFileWork}), never on the reactor.  Only the
twistd process writes; serving copies see the files change and reload.
"""

import os
from collections.abc import Callable
from datetime import datetime

from twisted.internet.defer import Deferred
from zope.interface import implementer

from sentry_tx.ca.files import (
    CREDENTIAL_GENERATION_TIMEOUT_SECONDS,
    BoundedFileWork,
    FileWorkReactor,
    describe_os_error,
    read_credential_file,
)
from sentry_tx.ca.renewal import (
    PART_KEY,
    PART_NEXT_KEY,
    PARTS,
    WRITING_ACTIONS,
    RenewalSettings,
    RenewalState,
    StepResult,
    plan,
    read_state,
    step_writes,
)
from sentry_tx.ca.store import (
    CERTIFICATE_FILE_MODE,
    KEY_FILE_MODE,
    MAX_BUNDLE_FILE_BYTES,
    FileTrustStore,
    sync_directory,
    temporary_name,
)
from sentry_tx.errors import BundleError
from sentry_tx.interfaces import IRenewalStore

_KEY_PARTS = (PART_KEY, PART_NEXT_KEY)


@implementer(IRenewalStore)
class FileRenewalStore:
    """
    The renewal steps of a L{sentry_tx.ca.store.FileTrustStore}'s files.

    @param reactor: runs the time bound and takes the thread's result.
    @param trust_store: the L{FileTrustStore} whose files are renewed.
    @param file_work: the L{BoundedFileWork}; a new one by default.
    @param _after_write: called with C{(action, part)} after each write of a
        step (a test's stand-in raises there to leave the files as a kill at
        that point would).
    """

    def __init__(
        self,
        reactor: FileWorkReactor,
        trust_store: FileTrustStore,
        file_work: BoundedFileWork | None = None,
        _after_write: Callable[[str, str], object] | None = None,
    ) -> None:
        self._paths = dict(
            zip(PARTS, trust_store.paths + trust_store.next_paths, strict=True)
        )
        self.description = ", ".join(self._paths[part] for part in PARTS)
        self._file_work = (
            file_work if file_work is not None else BoundedFileWork(reactor)
        )
        self._after_write = _after_write

    def step(self, now: datetime, settings: RenewalSettings) -> Deferred[StepResult]:
        """
        Read, plan and write one step, in a thread.
        """
        return self._file_work.run(
            self.description,
            CREDENTIAL_GENERATION_TIMEOUT_SECONDS,
            self.step_sync,
            now,
            settings,
        )

    def step_sync(self, now: datetime, settings: RenewalSettings) -> StepResult:
        """
        L{step}, blocking.

        @return: a L{StepResult}.
        """
        state = self.read_sync(now)
        step = plan(state, now, settings)
        if step.action not in WRITING_ACTIONS:
            return StepResult(step, state)
        writes = step_writes(state, step, now, settings)
        for part, contents in writes.writes:
            path = self._paths[part]
            try:
                if contents is None:
                    _remove(path)
                else:
                    _replace(
                        path,
                        contents,
                        KEY_FILE_MODE if part in _KEY_PARTS else CERTIFICATE_FILE_MODE,
                    )
            except OSError as e:
                raise BundleError(
                    path, f"cannot be written ({step.action}): {describe_os_error(e)}"
                ) from None
            if self._after_write is not None:
                self._after_write(step.action, part)
        directories = {
            os.path.dirname(os.path.abspath(p)) for p in self._paths.values()
        }
        for directory in sorted(directories):
            sync_directory(directory)
        return StepResult(step, state, True, writes.renewed)

    def read_sync(self, now: datetime) -> RenewalState:
        """
        The L{sentry_tx.ca.renewal.RenewalState} of the files, blocking.

        The five are read in the order of L{PARTS}; the two next parts may
        be absent.
        """
        anchors, issuer, key, next_crt, next_key = (self._paths[part] for part in PARTS)
        return read_state(
            read_credential_file(anchors, MAX_BUNDLE_FILE_BYTES),
            read_credential_file(issuer, MAX_BUNDLE_FILE_BYTES),
            read_credential_file(key, MAX_BUNDLE_FILE_BYTES),
            _read_if_present(next_crt),
            _read_if_present(next_key),
            now,
            (anchors, issuer, key, next_crt, next_key),
        )


def _read_if_present(path: str) -> bytes | None:
    """
    The contents of C{path}, or None when nothing (not even a dangling link)
    is there.
    """
    if not os.path.lexists(path):
        return None
    return read_credential_file(path, MAX_BUNDLE_FILE_BYTES)


def _replace(path: str, data: bytes, mode: int) -> None:
    """
    Replace C{path} with C{data} atomically: a new temporary file beside it
    with C{mode} exactly, flushed, renamed over it.
    """
    directory = os.path.dirname(os.path.abspath(path))
    temporary = os.path.join(directory, temporary_name(os.path.basename(path)))
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        try:
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


__all__ = ["FileRenewalStore"]
