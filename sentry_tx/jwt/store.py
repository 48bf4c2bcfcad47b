# -*- test-case-name: tests.test_jwt,tests.test_jwt_kube -*-
"""
Where the JWT signing material is kept (standalone mode: two files), and the
trust store that loads it with the X.509 bundle.

L{FileJWTStore} keeps C{jwt.key} (mode 0600) and C{jwks.json}: when neither
exists it generates an RSA-2048 pair and writes both, all or nothing, with
the bundle store's writer; when one exists without the other it refuses to
start and names the missing one; it never overwrites.  Every read goes
through L{sentry_tx.ca.store.read_credential}.

The certificate authority loads the pair with the X.509 bundle, at start and
at every reload (L{sentry_tx.server.service.CertificateAuthorityService.prepare}):
loading has no side effect, so a broken pair fails the whole reload and the
previous bundle and pair stay in service.
"""

import os
from collections.abc import Callable
from datetime import datetime

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from sentry_tx.ca.files import (
    CREDENTIAL_GENERATION_TIMEOUT_SECONDS,
    CREDENTIAL_READ_TIMEOUT_SECONDS,
    BoundedFileWork,
    FileWorkReactor,
)
from sentry_tx.ca.store import (
    CERTIFICATE_FILE_MODE,
    KEY_FILE_MODE,
    CredentialWriter,
    credential_exists,
    distinct_directories,
    read_credential,
)
from sentry_tx.errors import BundleError
from sentry_tx.jwt.material import (
    RSA_ALGORITHMS,
    JWTMaterial,
    generate_jwt_material,
    load_jwt_material,
)


def check_generation_algorithm(algorithm: str, source: str) -> None:
    """
    @raise BundleError: when no key may be generated for C{algorithm}
        (generated keys are RSA keys, as Dapr's).
    """
    if algorithm not in RSA_ALGORITHMS:
        raise BundleError(
            source,
            f"missing; sentry_tx generates RSA keys only, which cannot sign with"
            f" --jwt-signing-algorithm {algorithm} (supply jwt.key and jwks.json,"
            f" or use an RS*/PS* algorithm)",
        )


class FileJWTStore:
    """
    The JWT key pair in two files.  It shares the bundle store's file
    handling (L{credential_exists}, the all-or-nothing L{CredentialWriter});
    it is not itself a trust store.

    @ivar watch_directories: the directories of the two files.
    """

    _log = Logger()

    def __init__(
        self,
        reactor: FileWorkReactor,
        key_path: str,
        jwks_path: str,
        algorithm: str,
        key_id: str | None,
        _open: Callable[[str, int, int], int] = os.open,
        file_work: BoundedFileWork | None = None,
    ) -> None:
        self._reactor = reactor
        self._file_work: BoundedFileWork = (
            file_work if file_work is not None else BoundedFileWork(reactor)
        )
        self._paths: tuple[str, str] = (key_path, jwks_path)
        self._algorithm = algorithm
        self._key_id = key_id
        self.watch_directories = distinct_directories(self._paths)
        self._writer = CredentialWriter(self.watch_directories, _open)

    def load_or_generate(self, now: datetime | None = None) -> Deferred[JWTMaterial]:
        """
        L{load_or_generate_sync} in a bounded file thread
        (L{sentry_tx.ca.files.BoundedFileWork}), never the reactor's pool.

        @return: Deferred firing with a L{JWTMaterial} or failing with
            L{BundleError}.
        """
        return self._file_work.run(
            "the JWT key pair",
            CREDENTIAL_GENERATION_TIMEOUT_SECONDS,
            self.load_or_generate_sync,
        )

    def load(self, now: datetime | None = None) -> Deferred[JWTMaterial]:
        """
        L{load_sync} in a bounded file thread.
        """
        return self._file_work.run(
            "the JWT key pair", CREDENTIAL_READ_TIMEOUT_SECONDS, self.load_sync
        )

    def load_or_generate_sync(self, now: datetime | None = None) -> JWTMaterial:
        """
        Load the pair; generate and write one when neither file exists.

        @raise BundleError: when one file exists without the other, when the
            pair fails the start checks, or when writing fails.
        """
        key_path, jwks_path = self._paths
        present = [path for path in self._paths if credential_exists(path)]
        if not present:
            check_generation_algorithm(self._algorithm, key_path)
            key_pem, jwks_json = generate_jwt_material(self._algorithm, self._key_id)
            self._writer.write_all(
                [
                    (key_path, key_pem, KEY_FILE_MODE),
                    (jwks_path, jwks_json, CERTIFICATE_FILE_MODE),
                ]
            )
            self._log.info(
                "generated a new JWT signing key in {key_path} and its JWKS in"
                " {jwks_path}",
                key_path=key_path,
                jwks_path=jwks_path,
            )
        elif len(present) == 1:
            (missing,) = [path for path in self._paths if path not in present]
            raise BundleError(
                missing,
                f"missing, while {present[0]} exists; refusing to generate a new"
                " JWT key pair, which would overwrite existing credentials"
                " (supply both files, or remove both to have a new pair"
                " generated)",
            )
        return self.load_sync()

    def load_sync(self, now: datetime | None = None) -> JWTMaterial:
        """
        Read and check both files; never generates.

        @raise BundleError: naming the file that cannot be read or is wrong.
        """
        key_path, jwks_path = self._paths
        key_pem = read_credential(key_path, is_key=True)
        jwks_json = read_credential(jwks_path)
        return load_jwt_material(
            key_pem, jwks_json, self._algorithm, self._key_id, self._paths
        )
