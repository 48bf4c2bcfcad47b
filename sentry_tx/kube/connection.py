# -*- test-case-name: tests.test_kube_connection,tests.test_kube_kubeconfig -*-
"""
Where the Kubernetes client connects to and how it proves who it is: a
L{ClusterConnection}, with a fixed token (L{StaticToken}) or a token file that
is re-read when it rotates (L{TokenFile}), and the checks shared by the ways to
build one (bounded file reads, PEM certificates).
"""

import os
import stat
from dataclasses import dataclass, field
from typing import Protocol

from cryptography import x509
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from sentry_tx.errors import ConfigError

MAX_KUBECONFIG_BYTES = 4 * 1024 * 1024
"""
The largest kubeconfig, token or certificate file read.
"""

TOKEN_FILE_CHECK_INTERVAL_SECONDS = 10.0
"""
How often, at most, a token file is checked for a new token (one C{stat}).
Projected tokens are refreshed by the kubelet well before they expire, so
noticing within seconds is plenty; a 401 forces a check at once.
"""


def is_bearer_token(token: str) -> bool:
    """
    Whether C{token} can go in an C{Authorization: Bearer} header: printable
    ASCII without spaces.
    """
    return bool(token) and all("!" <= character <= "~" for character in token)


class BearerToken(Protocol):
    """
    The token a L{ClusterConnection} sends: L{StaticToken} or L{TokenFile}.
    """

    def current(self) -> str:
        """
        The token to send now.
        """

    def refresh(self) -> bool:
        """
        Look for a new token (after the API server refused this one).

        @return: whether a different token is now current.
        """


class StaticToken:
    """
    A bearer token that never changes (C{token} in a kubeconfig).
    """

    def __init__(self, token: str) -> None:
        self._token = token

    def current(self) -> str:
        """
        The token.
        """
        return self._token

    def refresh(self) -> bool:
        """
        A static token cannot be refreshed.

        @return: False: the token did not change.
        """
        return False


class TokenFile:
    """
    A bearer token read from a file and re-read when the file changes.

    The file is checked (one C{stat}: inode, size and modification time) at
    most every C{check_interval_seconds}; when it changed, it is read again.
    When a later read fails or finds the file empty, the last token stays in
    use and a warning is logged: the kubelet swaps projected tokens
    atomically, so this is a transient state.

    @param path: the token file.
    @param clock: an C{IReactorTime}, for the check interval.
    @param check_interval_seconds: the least time between two checks.
    @raise ConfigError: when the file cannot be read or is empty at first.
    """

    _log = Logger()

    def __init__(
        self,
        path: str,
        clock: IReactorTime,
        check_interval_seconds: float = TOKEN_FILE_CHECK_INTERVAL_SECONDS,
        field: str = "token",
    ) -> None:
        self.path = path
        self._clock = clock
        self._check_interval_seconds = check_interval_seconds
        self._field = field
        self._checked_at = clock.seconds()
        self._signature: tuple[int, int, int, int] | None = None
        token = self._read()
        if isinstance(token, Exception):
            raise ConfigError(self._field, f"{path}: {token}")
        self._token = token

    def current(self) -> str:
        """
        The token, re-read first if the file changed since the last check
        and the check interval has passed.
        """
        now = self._clock.seconds()
        if now - self._checked_at >= self._check_interval_seconds:
            self._checked_at = now
            self._reload_if_changed()
        return self._token

    def refresh(self) -> bool:
        """
        Check the file now (after the API server refused the token).

        @return: whether a different token was read.
        """
        self._checked_at = self._clock.seconds()
        previous = self._token
        self._reload_if_changed(force=True)
        return self._token != previous

    def _file_signature(self) -> tuple[int, int, int, int]:
        status = os.stat(self.path)
        return (status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns)

    def _reload_if_changed(self, force: bool = False) -> None:
        try:
            signature = self._file_signature()
        except OSError as e:
            self._log.warn(
                "cannot check the token file {path}: {error}; keeping the"
                " current token",
                path=self.path,
                error=e.strerror or str(e),
            )
            return
        if signature == self._signature and not force:
            return
        token = self._read()
        if isinstance(token, Exception):
            self._log.warn(
                "cannot re-read the token file {path}: {error}; keeping the"
                " current token",
                path=self.path,
                error=str(token),
            )
            return
        if token != self._token:
            self._log.info(
                "token file {path} changed; using the new token", path=self.path
            )
        self._token = token

    def _read(self) -> str | Exception:
        """
        The token in the file, or the exception saying why there is none.
        """
        try:
            signature = self._file_signature()
            data = read_limited(self.path)
        except OSError as e:
            return OSError(f"cannot be read: {e.strerror or e}")
        except ValueError as e:
            return e
        token = data.decode("latin-1").strip()
        if not token:
            return ValueError("is empty")
        if not is_bearer_token(token):
            return ValueError("does not hold a bearer token (spaces or non-ASCII)")
        self._signature = signature
        return token


@dataclass(frozen=True)
class ClusterConnection:
    """
    Where the API server is and how to talk to it.

    @ivar server: the base URL, C{https://host:port} (maybe with a path
        prefix), or C{http://} on loopback; no trailing slash.
    @ivar trust_roots_pem: the PEM certificates the server's certificate must
        chain to, or None for the system's roots.
    @ivar tls_server_name: the name to verify the server certificate for,
        when not the host of C{server}.
    @ivar token: a L{StaticToken} or L{TokenFile}, or None (no bearer
        token: client certificates, or C{kubectl proxy}).
    @ivar client_certificate_pem: the client certificate chain, or None.
    @ivar client_key_pem: its private key, or None.
    @ivar description: where the settings came from, for messages.
    """

    server: str
    description: str
    trust_roots_pem: bytes | None = field(default=None, repr=False)
    tls_server_name: str | None = None
    token: BearerToken | None = field(default=None, repr=False)
    client_certificate_pem: bytes | None = field(default=None, repr=False)
    client_key_pem: bytes | None = field(default=None, repr=False)

    def url(self, path: str) -> str:
        """
        The URL of the API C{path} (which starts with C{/}).
        """
        return self.server + path


def read_limited(path: str, limit: int = MAX_KUBECONFIG_BYTES) -> bytes:
    """
    The bytes of a small regular file.

    Opened without blocking and refused unless it is a regular file: the
    service-account token is re-read from the gRPC loop's Kubernetes client
    as well as from the reactor's, and a FIFO (or any special file) put in
    its place must fail at once rather than stop either loop.

    @raise OSError: when it cannot be read.
    @raise ValueError: when it is not a regular file or is larger than
        C{limit}.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError("is not a regular file")
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"is larger than {limit} bytes")
    return data


def check_certificates(data: bytes, field: str) -> bytes:
    """
    Check that C{data} is one or more PEM certificates.

    @return: C{data}.
    @raise ConfigError: naming C{field} otherwise.
    """
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError:
        certificates = []
    if not certificates:
        raise ConfigError(field, "does not hold a PEM certificate")
    return data
