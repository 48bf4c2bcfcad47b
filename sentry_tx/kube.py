"""
The Kubernetes API client of kubernetes mode, and the parts of that mode.

L{KubernetesClient} talks JSON to the API server with treq over one
persistent L{HTTPConnectionPool}; it never blocks the reactor.  Where it
connects to, and how it proves who it is, is a L{ClusterConnection}, read
when the client is first used (never while twistd builds the service tree):

  - in a pod (C{$KUBERNETES_SERVICE_HOST} set and no C{--kubeconfig} given),
    C{https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT} with the
    service-account token and C{ca.crt} of L{SERVICE_ACCOUNT_DIRECTORY};
  - otherwise the current context of a kubeconfig file: the cluster's
    C{server} and C{certificate-authority(-data)}, the user's C{token},
    C{tokenFile} or C{client-certificate(-data)} with C{client-key(-data)}.

Choices where Kubernetes leaves room, all deliberate:

  - C{insecure-skip-tls-verify: true} is refused: a CA that hands out mesh
    identities on the word of a server it cannot authenticate would hand
    them to whoever answers.  Give the cluster's CA instead.
  - Plain C{http://} is accepted only for a loopback server (as
    C{kubectl proxy} serves on 127.0.0.1:8001); anywhere else it is refused.
  - A token file (in-cluster, or C{tokenFile}) is re-read when it changes:
    projected service-account tokens rotate.  It is checked at most every
    L{TOKEN_FILE_CHECK_INTERVAL_SECONDS}, and at once after a 401 (the
    request is then retried once with the new token).
  - C{exec} and C{auth-provider} users, and basic auth, are refused.
  - Redirects are never followed (the bearer token must not travel).

Every call has a deadline (L{KUBERNETES_REQUEST_TIMEOUT_SECONDS}).  Failures
come out as L{KubernetesAPIError} (the server answered with an error, with
its HTTP status and the C{Status} C{reason} and C{message}) or
L{KubernetesUnavailableError} (no usable answer: refused, reset, timed out,
TLS failure).  No message ever carries a token or a key.

Below the client: L{KubernetesConfigurationSource} (the Dapr Configuration
resource) and L{build_kubernetes_parts}, what C{tap.build_service} wires in
kubernetes mode.
"""

import base64
import binascii
import ipaddress
import json
import os
from dataclasses import dataclass, field, replace
from urllib.parse import quote, urlsplit

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import crypto
from twisted.application.service import Service
from twisted.internet import defer, ssl
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.web.client import (
    Agent,
    HTTPConnectionPool,
    RequestNotSent,
    ResponseDone,
    ResponseNeverReceived,
    _HTTP11ClientFactory,
)
from twisted.web.error import SchemeNotSupported
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import IAgentEndpointFactory, IBodyProducer, IPolicyForHTTPS
from zope.interface import implementer

import sentry_tx
from sentry_tx.config import mtls_warnings, parse_mtls
from sentry_tx.errors import ConfigError
from sentry_tx.interfaces import IConfigurationSource


SERVICE_ACCOUNT_DIRECTORY = "/var/run/secrets/kubernetes.io/serviceaccount"
"""
Where Kubernetes mounts a pod's service-account token and cluster CA.
"""

SERVICE_ACCOUNT_TOKEN_FILENAME = "token"
SERVICE_ACCOUNT_CA_FILENAME = "ca.crt"

KUBERNETES_SERVICE_HOST_VARIABLE = "KUBERNETES_SERVICE_HOST"
KUBERNETES_SERVICE_PORT_VARIABLE = "KUBERNETES_SERVICE_PORT"
KUBECONFIG_VARIABLE = "KUBECONFIG"
NAMESPACE_VARIABLE = "NAMESPACE"

DEFAULT_KUBECONFIG = "~/.kube/config"
"""
The default of C{--kubeconfig}; any other value is an explicit choice and
wins over the in-cluster settings.
"""

KUBERNETES_REQUEST_TIMEOUT_SECONDS = 5.0
"""
The deadline of one API call, from sending to the last byte of the answer
(a retry included).  Validation as a whole is also bounded by the
servicer's own timeout.
"""

KUBERNETES_CONNECT_TIMEOUT_SECONDS = 5.0
"""
The deadline of one TCP connection attempt to the API server.
"""

KUBERNETES_MAX_PERSISTENT_CONNECTIONS = 128
"""
How many idle connections to the API server the pool keeps.

Sized by Little's law: at 1000 validations/s, with two API calls each and
20 ms per call, about 2000 x 0.020 = 40 calls are in flight at any time,
each on its own HTTP/1.1 connection.  128 leaves three times that for bursts
and slower API servers before connections would be opened and closed per
call.  The pool does not cap concurrency: calls beyond it open extra
connections that are closed after use.
"""

KUBERNETES_IDLE_CONNECTION_SECONDS = 60.0
"""
How long an idle pooled connection is kept before it is closed.
"""

CLIENT_SHUTDOWN_GRACE_SECONDS = 5.0
"""
How long API calls in flight may go on when sentry_tx stops (as long as the
certificate authority's own grace period for calls in flight).
"""

MAX_KUBERNETES_RESPONSE_BYTES = 4 * 1024 * 1024
"""
The largest response body read; a bigger one is refused (no object sentry_tx
reads comes close).
"""

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

_ERROR_BODY_EXCERPT_CHARACTERS = 200

_USER_AGENT = f"sentry_tx/{sentry_tx.__version__}".encode("ascii")

_UNSUPPORTED_USER_FIELDS = {
    "exec": "exec credential plugins are not supported",
    "auth-provider": "auth-provider plugins are not supported",
    "username": "basic authentication is not supported",
    "password": "basic authentication is not supported",
}


class KubernetesError(Exception):
    """
    A call to the Kubernetes API failed.
    """


class KubernetesAPIError(KubernetesError):
    """
    The API server answered a call with an error.

    @ivar status: the HTTP status code (C{404}).
    @ivar reason: the C{reason} of the C{Status} it sent (C{"NotFound"}), or
        the HTTP reason phrase when the body was not a C{Status}.
    @ivar message: the C{Status} message (C{'secrets "x" not found'}), or an
        excerpt of the body.
    @ivar method: the HTTP method of the call.
    @ivar path: the API path of the call.
    """

    def __init__(self, status, reason, message, method="", path=""):
        self.status = status
        self.reason = reason
        self.message = message
        self.method = method
        self.path = path
        where = f"{method} {path}: " if method else ""
        super().__init__(
            f"{where}HTTP {status} {reason or 'error'}"
            + (f": {message}" if message else "")
        )

    @property
    def is_not_found(self):
        """
        Whether the object does not exist (404).
        """
        return self.status == 404

    @property
    def is_conflict(self):
        """
        Whether the call lost a race (409: a stale C{resourceVersion}, or an
        object that already exists).
        """
        return self.status == 409

    @property
    def is_transient(self):
        """
        Whether retrying later may succeed (429 or 5xx).
        """
        return self.status == 429 or self.status >= 500


class KubernetesUnavailableError(KubernetesError):
    """
    No usable answer came from the API server: the connection failed, was
    cut, timed out, or its TLS could not be verified.
    """


def _is_bearer_token(token):
    """
    Whether C{token} can go in an C{Authorization: Bearer} header: printable
    ASCII without spaces.
    """
    return bool(token) and all("!" <= character <= "~" for character in token)


class StaticToken:
    """
    A bearer token that never changes (C{token} in a kubeconfig).
    """

    def __init__(self, token):
        self._token = token

    def current(self):
        """
        The token.
        """
        return self._token

    def refresh(self):
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
        path,
        clock,
        check_interval_seconds=TOKEN_FILE_CHECK_INTERVAL_SECONDS,
        field="token",
    ):
        self.path = path
        self._clock = clock
        self._check_interval_seconds = check_interval_seconds
        self._field = field
        self._checked_at = clock.seconds()
        self._signature = None
        token = self._read()
        if isinstance(token, Exception):
            raise ConfigError(self._field, f"{path}: {token}")
        self._token = token

    def current(self):
        """
        The token, re-read first if the file changed since the last check
        and the check interval has passed.
        """
        now = self._clock.seconds()
        if now - self._checked_at >= self._check_interval_seconds:
            self._checked_at = now
            self._reload_if_changed()
        return self._token

    def refresh(self):
        """
        Check the file now (after the API server refused the token).

        @return: whether a different token was read.
        """
        self._checked_at = self._clock.seconds()
        previous = self._token
        self._reload_if_changed(force=True)
        return self._token != previous

    def _file_signature(self):
        status = os.stat(self.path)
        return (status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns)

    def _reload_if_changed(self, force=False):
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

    def _read(self):
        """
        The token in the file, or the exception saying why there is none.
        """
        try:
            signature = self._file_signature()
            data = _read_limited(self.path)
        except OSError as e:
            return OSError(f"cannot be read: {e.strerror or e}")
        except ValueError as e:
            return e
        token = data.decode("latin-1").strip()
        if not token:
            return ValueError("is empty")
        if not _is_bearer_token(token):
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
    trust_roots_pem: bytes = field(default=None, repr=False)
    tls_server_name: str = None
    token: object = field(default=None, repr=False)
    client_certificate_pem: bytes = field(default=None, repr=False)
    client_key_pem: bytes = field(default=None, repr=False)

    def url(self, path):
        """
        The URL of the API C{path} (which starts with C{/}).
        """
        return self.server + path


def _read_limited(path, limit=MAX_KUBECONFIG_BYTES):
    """
    The bytes of a small file.

    @raise OSError: when it cannot be read.
    @raise ValueError: when it is larger than C{limit}.
    """
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"is larger than {limit} bytes")
    return data


def _is_loopback(host):
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_certificates(data, field):
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


def _check_key_pair(certificate_pem, key_pem, field):
    """
    Check that C{key_pem} is an unencrypted private key and that it belongs
    to the first certificate of C{certificate_pem}.

    @raise ConfigError: naming C{field} otherwise (never quoting the key).
    """
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        raise ConfigError(field, "is not an unencrypted PEM private key") from None
    certificate = x509.load_pem_x509_certificates(certificate_pem)[0]
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*spki) != certificate.public_key().public_bytes(
        *spki
    ):
        raise ConfigError(field, "does not belong to the client certificate")


def in_cluster_connection(
    environ,
    clock,
    service_account_directory=SERVICE_ACCOUNT_DIRECTORY,
    token_check_interval_seconds=TOKEN_FILE_CHECK_INTERVAL_SECONDS,
):
    """
    The settings of a pod: the API server at
    C{$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT}, the token and CA
    of the mounted service account.

    @param environ: the environment.
    @param clock: an C{IReactorTime}, for the token file's re-reads.
    @param service_account_directory: where the token and C{ca.crt} are.
    @return: a L{ClusterConnection}.
    @raise ConfigError: when a variable or file is missing or wrong.
    """
    host = environ.get(KUBERNETES_SERVICE_HOST_VARIABLE, "")
    port = environ.get(KUBERNETES_SERVICE_PORT_VARIABLE, "")
    if not host or not port:
        raise ConfigError(
            f"${KUBERNETES_SERVICE_HOST_VARIABLE}",
            f"in-cluster mode needs both ${KUBERNETES_SERVICE_HOST_VARIABLE} and"
            f" ${KUBERNETES_SERVICE_PORT_VARIABLE} (or give --kubeconfig)",
        )
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(
            f"${KUBERNETES_SERVICE_PORT_VARIABLE}", f"not a port number: {port!r}"
        )
    if ":" in host:
        host = f"[{host}]"
    ca_path = os.path.join(service_account_directory, SERVICE_ACCOUNT_CA_FILENAME)
    try:
        ca_pem = _read_limited(ca_path)
    except (OSError, ValueError) as e:
        raise ConfigError(
            ca_path, f"cannot be read: {getattr(e, 'strerror', None) or e}"
        ) from None
    token_path = os.path.join(service_account_directory, SERVICE_ACCOUNT_TOKEN_FILENAME)
    return ClusterConnection(
        server=f"https://{host}:{int(port)}",
        description=f"in-cluster service account ({service_account_directory})",
        trust_roots_pem=_check_certificates(ca_pem, ca_path),
        token=TokenFile(
            token_path, clock, token_check_interval_seconds, field=token_path
        ),
    )


def _named_entry(document, section, name, path):
    """
    The C{section} entry (C{cluster}, C{user}, C{context} mapping) named
    C{name} in a kubeconfig.

    @raise ConfigError: when there is none.
    """
    key = section[:-1]  # clusters -> cluster
    entries = document.get(section) or []
    if not isinstance(entries, list):
        raise ConfigError("--kubeconfig", f"{path}: {section} must be a list")
    for entry in entries:
        if isinstance(entry, dict) and entry.get("name") == name:
            value = entry.get(key) or {}
            if not isinstance(value, dict):
                raise ConfigError(
                    "--kubeconfig", f"{path}: {key} {name!r} must be a mapping"
                )
            return value
    raise ConfigError("--kubeconfig", f"{path}: no {key} named {name!r}")


def _kubeconfig_bytes(entry, name, base_directory, path, description):
    """
    The contents of C{name} or C{name-data} (base64) of a kubeconfig entry,
    or None when neither is set.  A relative file name is relative to the
    kubeconfig's directory, as kubectl reads it.

    @raise ConfigError: when the file cannot be read or the data is not
        base64.
    """
    data = entry.get(f"{name}-data")
    if data:
        try:
            return base64.b64decode(str(data), validate=True)
        except (binascii.Error, ValueError):
            raise ConfigError(
                "--kubeconfig", f"{path}: {description} {name}-data is not base64"
            ) from None
    filename = entry.get(name)
    if not filename:
        return None
    filename = os.path.join(base_directory, os.path.expanduser(str(filename)))
    try:
        return _read_limited(filename)
    except (OSError, ValueError) as e:
        raise ConfigError(
            "--kubeconfig",
            f"{path}: {description} {name} {filename}: cannot be read:"
            f" {getattr(e, 'strerror', None) or e}",
        ) from None


def kubeconfig_connection(
    path, clock, token_check_interval_seconds=TOKEN_FILE_CHECK_INTERVAL_SECONDS
):
    """
    The settings of the current context of the kubeconfig at C{path}.

    @param path: the kubeconfig file.
    @param clock: an C{IReactorTime}, for a C{tokenFile}'s re-reads.
    @return: a L{ClusterConnection}.
    @raise ConfigError: naming C{--kubeconfig} and saying what is wrong.
    """
    try:
        raw = _read_limited(path)
    except (OSError, ValueError) as e:
        raise ConfigError(
            "--kubeconfig",
            f"{path}: cannot be read: {getattr(e, 'strerror', None) or e}",
        ) from None
    try:
        document = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(
            "--kubeconfig", f"{path}: not valid YAML ({' '.join(str(e).split())})"
        ) from None
    if not isinstance(document, dict):
        raise ConfigError("--kubeconfig", f"{path}: not a kubeconfig mapping")
    context_name = document.get("current-context")
    if not context_name:
        raise ConfigError("--kubeconfig", f"{path}: no current-context")
    context = _named_entry(document, "contexts", context_name, path)
    cluster_name = context.get("cluster")
    if not cluster_name:
        raise ConfigError(
            "--kubeconfig", f"{path}: context {context_name!r} names no cluster"
        )
    cluster = _named_entry(document, "clusters", cluster_name, path)
    user_name = context.get("user")
    user = _named_entry(document, "users", user_name, path) if user_name else {}
    base_directory = os.path.dirname(os.path.abspath(path))
    description = f"kubeconfig {path}, context {context_name!r}"

    server = str(cluster.get("server") or "").rstrip("/")
    parts = urlsplit(server)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ConfigError(
            "--kubeconfig",
            f"{path}: cluster {cluster_name!r} server {server!r} is not an"
            " https:// URL",
        )
    if parts.scheme == "http" and not _is_loopback(parts.hostname):
        raise ConfigError(
            "--kubeconfig",
            f"{path}: cluster {cluster_name!r} server {server!r}: plain http://"
            " is accepted only on loopback (kubectl proxy); use https://",
        )
    if parts.query or parts.fragment:
        raise ConfigError(
            "--kubeconfig",
            f"{path}: cluster {cluster_name!r} server {server!r} has a query or"
            " fragment",
        )
    if cluster.get("insecure-skip-tls-verify"):
        raise ConfigError(
            "--kubeconfig",
            f"{path}: cluster {cluster_name!r} sets insecure-skip-tls-verify,"
            " which sentry_tx refuses: it would accept identities vouched for"
            " by a server it cannot authenticate; give certificate-authority"
            " or certificate-authority-data instead",
        )
    trust_roots_pem = _kubeconfig_bytes(
        cluster,
        "certificate-authority",
        base_directory,
        path,
        f"cluster {cluster_name!r}",
    )
    if trust_roots_pem is not None:
        _check_certificates(
            trust_roots_pem,
            f"--kubeconfig: {path}: cluster {cluster_name!r} certificate-authority",
        )

    for name, problem in _UNSUPPORTED_USER_FIELDS.items():
        if user.get(name):
            raise ConfigError(
                "--kubeconfig",
                f"{path}: user {user_name!r}: {problem} (use token, tokenFile,"
                " or client-certificate and client-key)",
            )
    token = None
    if user.get("tokenFile"):
        # As client-go: a token file wins over an inline token.
        token_path = os.path.join(
            base_directory, os.path.expanduser(str(user["tokenFile"]))
        )
        token = TokenFile(
            token_path,
            clock,
            token_check_interval_seconds,
            field=f"--kubeconfig: {path}: user {user_name!r} tokenFile",
        )
    elif user.get("token"):
        text = str(user["token"]).strip()
        if not _is_bearer_token(text):
            raise ConfigError(
                "--kubeconfig",
                f"{path}: user {user_name!r} token is not a bearer token"
                " (spaces or non-ASCII)",
            )
        token = StaticToken(text)
    user_description = f"user {user_name!r}"
    certificate_pem = _kubeconfig_bytes(
        user, "client-certificate", base_directory, path, user_description
    )
    key_pem = _kubeconfig_bytes(
        user, "client-key", base_directory, path, user_description
    )
    if (certificate_pem is None) != (key_pem is None):
        raise ConfigError(
            "--kubeconfig",
            f"{path}: {user_description} needs both client-certificate and"
            " client-key, or neither",
        )
    if certificate_pem is not None:
        field_name = f"--kubeconfig: {path}: {user_description}"
        _check_certificates(certificate_pem, f"{field_name} client-certificate")
        _check_key_pair(certificate_pem, key_pem, f"{field_name} client-key")
    return ClusterConnection(
        server=server,
        description=description,
        trust_roots_pem=trust_roots_pem,
        tls_server_name=cluster.get("tls-server-name") or None,
        token=token,
        client_certificate_pem=certificate_pem,
        client_key_pem=key_pem,
    )


def _expand_home(path, environ):
    if path == "~" or path.startswith("~/"):
        home = environ.get("HOME") or os.path.expanduser("~")
        return home + path[1:]
    return path


def cluster_connection(
    kubeconfig,
    environ,
    clock,
    service_account_directory=SERVICE_ACCOUNT_DIRECTORY,
    token_check_interval_seconds=TOKEN_FILE_CHECK_INTERVAL_SECONDS,
):
    """
    Choose and read the connection settings.

    An explicit C{--kubeconfig} (any value but L{DEFAULT_KUBECONFIG}) wins;
    then, in a pod (C{$KUBERNETES_SERVICE_HOST} set), the in-cluster
    settings; then the first file of C{$KUBECONFIG}; then
    C{~/.kube/config}.

    @param kubeconfig: the C{--kubeconfig} flag.
    @param environ: the environment.
    @param clock: an C{IReactorTime}.
    @return: a L{ClusterConnection}.
    @raise ConfigError: when the chosen settings are missing or wrong.
    """
    if kubeconfig and kubeconfig != DEFAULT_KUBECONFIG:
        return kubeconfig_connection(
            _expand_home(kubeconfig, environ), clock, token_check_interval_seconds
        )
    if environ.get(KUBERNETES_SERVICE_HOST_VARIABLE):
        return in_cluster_connection(
            environ, clock, service_account_directory, token_check_interval_seconds
        )
    paths = [p for p in environ.get(KUBECONFIG_VARIABLE, "").split(os.pathsep) if p]
    path = paths[0] if paths else DEFAULT_KUBECONFIG
    return kubeconfig_connection(
        _expand_home(path, environ), clock, token_check_interval_seconds
    )


@implementer(IPolicyForHTTPS)
class ClusterTLSPolicy:
    """
    The TLS client options for the API server: its CA (or the system's
    roots), the expected server name, and the client certificate if any.

    @param connection: the L{ClusterConnection}.
    """

    def __init__(self, connection):
        if connection.trust_roots_pem is not None:
            roots = [
                ssl.Certificate.loadPEM(
                    certificate.public_bytes(serialization.Encoding.PEM)
                )
                for certificate in x509.load_pem_x509_certificates(
                    connection.trust_roots_pem
                )
            ]
            self._trust_root = ssl.trustRootFromCertificates(roots)
        else:
            self._trust_root = ssl.platformTrust()
        self._client_certificate = None
        self._extra_options = {}
        if connection.client_certificate_pem is not None:
            chain = x509.load_pem_x509_certificates(connection.client_certificate_pem)
            self._client_certificate = ssl.PrivateCertificate.fromCertificateAndKeyPair(
                ssl.Certificate.loadPEM(
                    chain[0].public_bytes(serialization.Encoding.PEM)
                ),
                ssl.KeyPair.load(connection.client_key_pem, crypto.FILETYPE_PEM),
            )
            if chain[1:]:
                self._extra_options["extraCertChain"] = [
                    crypto.X509.from_cryptography(certificate)
                    for certificate in chain[1:]
                ]
        self._server_name = connection.tls_server_name
        self._options = {}

    def creatorForNetloc(self, hostname, port):
        """
        The connection creator for C{hostname}, verified against the cluster
        CA (cached per host and port).
        """
        key = (hostname, port)
        if key not in self._options:
            name = self._server_name or hostname.decode("ascii").strip("[]")
            self._options[key] = ssl.optionsForClientTLS(
                name,
                trustRoot=self._trust_root,
                clientCertificate=self._client_certificate,
                extraCertificateOptions=dict(self._extra_options),
            )
        return self._options[key]


class _BoundedBody(Protocol):
    """
    Collects a response body into C{finished}; a body larger than C{limit}
    bytes is read to its end but not kept, and fails the call.
    """

    def __init__(self, finished, limit):
        self._finished = finished
        self._limit = limit
        self._size = 0
        self._chunks = []

    def dataReceived(self, data):
        self._size += len(data)
        if self._size > self._limit:
            self._chunks = []
        else:
            self._chunks.append(data)

    def connectionLost(self, reason):
        # Fired after the pool has taken the connection back (Twisted returns
        # a quiescent connection to its pool before ending the body).
        finished, self._finished = self._finished, None
        if finished is None:
            return
        if self._size > self._limit:
            finished.errback(
                KubernetesUnavailableError(
                    f"the response is larger than {self._limit} bytes"
                )
            )
        elif reason.check(ResponseDone, PotentialDataLoss):
            finished.callback(b"".join(self._chunks))
        else:
            finished.errback(reason)

    def abort(self):
        """
        Give up on the body (the call was cancelled): the connection is
        closed, never reused.
        """
        self._finished = None
        if self.transport is not None:
            self.transport.stopProducing()


def _read_body(response, limit):
    """
    The body of C{response}; cancelling the Deferred closes the connection.
    """
    finished = Deferred(lambda d: protocol.abort())
    protocol = _BoundedBody(finished, limit)
    response.deliverBody(protocol)
    return finished


class _CallState:
    """
    What one call's retries must know: whether its deadline has passed.
    """

    expired = False
    timeout_seconds = 0.0
    max_response_bytes = 0


def _describe_failure(failure):
    """
    A transport failure in a few words (the first reason of Twisted's
    wrapper exceptions, which carry a list of them).
    """
    value = failure.value
    reasons = getattr(value, "reasons", None)
    if reasons:
        inner = reasons[0]
        detail = inner.getErrorMessage() or type(inner.value).__name__
        return f"{type(value).__name__}: {detail}"
    return f"{type(value).__name__}: {failure.getErrorMessage()}".rstrip(": ")


def _api_error(status, phrase, body, method, path):
    """
    The L{KubernetesAPIError} for an error answer: the C{Status} object's
    reason and message when the body is one.
    """
    reason = (
        phrase.decode("latin-1") if isinstance(phrase, bytes) else str(phrase or "")
    )
    message = ""
    try:
        document = json.loads(body)
    except ValueError:
        document = None
    if isinstance(document, dict) and document.get("kind") == "Status":
        reason = str(document.get("reason") or reason)
        message = str(document.get("message") or "")
    else:
        excerpt = body[:_ERROR_BODY_EXCERPT_CHARACTERS].decode("utf-8", "replace")
        message = " ".join(excerpt.split())
    return KubernetesAPIError(status, reason, message, method, path)


@implementer(IBodyProducer)
class _BytesProducer:
    """
    A request body already in memory, written at once (treq's default
    producer would schedule the write through the global cooperator).
    """

    def __init__(self, data):
        self._data = data
        self.length = len(data)

    def startProducing(self, consumer):
        consumer.write(self._data)
        return defer.succeed(None)

    def pauseProducing(self):
        pass

    def resumeProducing(self):
        pass

    def stopProducing(self):
        pass


@implementer(IAgentEndpointFactory)
class _ClusterEndpointFactory:
    """
    The endpoints to the API server, made once per scheme, host and port
    rather than for every request (Twisted's default factory re-encodes the
    host name each time).

    @param reactor: the reactor to connect with.
    @param policy: the L{IPolicyForHTTPS} of C{https} endpoints.
    @param connect_timeout_seconds: the deadline of one connection attempt.
    """

    def __init__(self, reactor, policy, connect_timeout_seconds):
        self._reactor = reactor
        self._policy = policy
        self._connect_timeout_seconds = connect_timeout_seconds
        self._endpoints = {}

    def endpointForURI(self, uri):
        """
        The (cached) endpoint for C{uri}: TCP for C{http}, TLS over TCP for
        C{https}.
        """
        key = (uri.scheme, uri.host, uri.port)
        endpoint = self._endpoints.get(key)
        if endpoint is None:
            if uri.scheme not in (b"http", b"https"):
                raise SchemeNotSupported(f"unsupported scheme: {uri.scheme!r}")
            endpoint = HostnameEndpoint(
                self._reactor, uri.host, uri.port, timeout=self._connect_timeout_seconds
            )
            if uri.scheme == b"https":
                endpoint = wrapClientTLS(
                    self._policy.creatorForNetloc(uri.host, uri.port), endpoint
                )
            self._endpoints[key] = endpoint
        return endpoint


class _QuietHTTP11ClientFactory(_HTTP11ClientFactory):
    """
    Twisted's HTTP/1.1 connection factory, without the "Starting factory"
    log line for every new connection (dozens under load).
    """

    noisy = False


class _QuietConnectionPool(HTTPConnectionPool):
    """
    A persistent connection pool that opens connections quietly.
    """

    _factory = _QuietHTTP11ClientFactory


class KubernetesClient:
    """
    A JSON client of the Kubernetes API, on treq and one persistent
    connection pool.  Use it on the reactor thread only.

    Nothing is opened when it is built: the connection settings are read,
    and the pool made, on first use (after twistd has forked).

    @param reactor: the reactor (connections, deadlines, the token clock).
    @param connection_loader: a callable of no arguments returning the
        L{ClusterConnection}; it may raise L{ConfigError}, which every call
        then fails with.
    @param request_timeout_seconds: the deadline of one call.
    @param max_persistent_connections: the pool's idle connections.
    @param max_response_bytes: the largest response read.
    """

    _log = Logger()

    def __init__(
        self,
        reactor,
        connection_loader,
        request_timeout_seconds=KUBERNETES_REQUEST_TIMEOUT_SECONDS,
        max_persistent_connections=KUBERNETES_MAX_PERSISTENT_CONNECTIONS,
        max_response_bytes=MAX_KUBERNETES_RESPONSE_BYTES,
    ):
        self._reactor = reactor
        self._connection_loader = connection_loader
        self._request_timeout_seconds = request_timeout_seconds
        self._max_persistent_connections = max_persistent_connections
        self._max_response_bytes = max_response_bytes
        self._connection = None
        self._pool = None
        self._http = None
        self._in_flight = set()
        self._draining = []
        self._grace_timer = None
        self._closed = False

    @property
    def reactor(self):
        """
        The reactor the client runs on (also the clock of its deadlines).
        """
        return self._reactor

    @property
    def connection(self):
        """
        The L{ClusterConnection} in use, reading it on first use.

        @raise ConfigError: when the settings are missing or wrong.
        """
        if self._connection is None:
            self._connection = self._connection_loader()
            self._log.info(
                "Kubernetes API server {server} ({description})",
                server=self._connection.server,
                description=self._connection.description,
            )
        return self._connection

    def _client(self):
        if self._http is None:
            import treq.client

            connection = self.connection
            pool = _QuietConnectionPool(self._reactor, persistent=True)
            pool.maxPersistentPerHost = self._max_persistent_connections
            pool.cachedConnectionTimeout = KUBERNETES_IDLE_CONNECTION_SECONDS
            pool.retryAutomatically = True
            agent = Agent.usingEndpointFactory(
                self._reactor,
                _ClusterEndpointFactory(
                    self._reactor,
                    ClusterTLSPolicy(connection),
                    KUBERNETES_CONNECT_TIMEOUT_SECONDS,
                ),
                pool=pool,
            )
            self._pool = pool
            self._http = treq.client.HTTPClient(
                agent, data_to_body_producer=_BytesProducer
            )
        return self._http

    # The calls.

    def get(self, path, timeout_seconds=None, max_response_bytes=None):
        """
        C{GET path}.

        @param timeout_seconds: this call's deadline, when not the client's.
        @param max_response_bytes: the largest answer read for this call (a
            list page), when not the client's.
        @return: Deferred firing with the decoded JSON object.
        """
        return self.request(
            "GET",
            path,
            timeout_seconds=timeout_seconds,
            max_response_bytes=max_response_bytes,
        )

    def create(self, path, body, retry_lost_response=False, timeout_seconds=None):
        """
        C{POST path} with the JSON C{body}.

        @param retry_lost_response: resend once when the connection was cut
            before an answer came (for calls without side effects, like a
            TokenReview; a pooled connection the server had just closed).
        @param timeout_seconds: this call's deadline, when not the client's.
        """
        return self.request(
            "POST", path, body, retry_lost_response, timeout_seconds=timeout_seconds
        )

    def replace(self, path, body):
        """
        C{PUT path} with the JSON C{body} (a conditional update when it
        carries C{metadata.resourceVersion}).
        """
        return self.request("PUT", path, body)

    def request(
        self,
        method,
        path,
        body=None,
        retry_lost_response=False,
        timeout_seconds=None,
        max_response_bytes=None,
    ):
        """
        Make one API call.

        @param method: C{"GET"}, C{"POST"}, C{"PUT"}.
        @param path: the API path, from C{/api} or C{/apis}.
        @param body: a JSON-serialisable object, or None.
        @param timeout_seconds: the deadline of this call (a validation
            passes what is left of its own); the client's by default.
        @return: Deferred firing with the decoded JSON object of a 2xx
            answer, or failing with L{KubernetesAPIError},
            L{KubernetesUnavailableError} or L{ConfigError}.
        """
        if self._closed:
            return defer.fail(
                KubernetesUnavailableError(f"{method} {path}: the client is closed")
            )
        try:
            self._client()
        except ConfigError:
            return defer.fail()
        data = None if body is None else json.dumps(body).encode("utf-8")
        state = _CallState()
        if timeout_seconds is None:
            timeout_seconds = self._request_timeout_seconds
        state.timeout_seconds = timeout_seconds
        state.max_response_bytes = max_response_bytes or self._max_response_bytes
        d = self._request(method, path, data, retry_lost_response, state)
        self._in_flight.add(d)

        def expire():
            state.expired = True
            d.cancel()

        deadline = self._reactor.callLater(max(0.0, timeout_seconds), expire)

        def finish(result):
            self._in_flight.discard(d)
            if deadline.active():
                deadline.cancel()
            if self._draining and not self._in_flight and not self._closed:
                # Let the callbacks of this call start the caller's next
                # call before deciding that nothing is in flight.
                self._reactor.callLater(0, self._drained)
            return result

        d.addBoth(finish)
        d.addErrback(self._translate_failure, method, path, state)
        return d

    @inlineCallbacks
    def _request(self, method, path, data, retry_lost_response, state):
        lost_response_retries = 1 if retry_lost_response else 0
        token_retries = 1
        while True:
            try:
                response = yield self._send(method, path, data)
            except (ResponseNeverReceived, RequestNotSent):
                if lost_response_retries and not (state.expired or self._closed):
                    lost_response_retries -= 1
                    continue
                raise
            body = yield _read_body(response, state.max_response_bytes)
            token = self.connection.token
            if response.code == 401 and token_retries and token is not None:
                # The token may have rotated since the last check: re-read
                # it, and try once more if it changed.  Nothing was done
                # with a request the server did not authenticate.
                token_retries -= 1
                if token.refresh():
                    continue
            if not 200 <= response.code < 300:
                raise _api_error(response.code, response.phrase, body, method, path)
            try:
                document = json.loads(body)
            except ValueError:
                document = None
            if not isinstance(document, dict):
                raise KubernetesAPIError(
                    response.code,
                    "InvalidResponse",
                    "the answer is not a JSON object",
                    method,
                    path,
                )
            return document

    def _send(self, method, path, data):
        connection = self.connection
        headers = {
            b"Accept": [b"application/json"],
            b"User-Agent": [_USER_AGENT],
        }
        if data is not None:
            headers[b"Content-Type"] = [b"application/json"]
        if connection.token is not None:
            headers[b"Authorization"] = [
                b"Bearer " + connection.token.current().encode("ascii")
            ]
        return self._http.request(
            method,
            connection.url(path),
            data=data,
            headers=headers,
            allow_redirects=False,
            unbuffered=True,
            reactor=self._reactor,
        )

    def open_stream(self, path, timeout_seconds=None):
        """
        C{GET path} for a streamed answer (a watch): fires with the treq
        response once its headers have come, for the caller to read with
        C{deliverBody} under its own bounds; an answer that is not 2xx is
        read (bounded) and fails the Deferred as L{request} does.

        @param timeout_seconds: how long the headers may take; the client's
            request timeout by default.
        @return: Deferred firing with the response; cancelling it closes the
            connection.
        """
        if self._closed:
            return defer.fail(
                KubernetesUnavailableError(f"GET {path}: the client is closed")
            )
        try:
            self._client()
        except ConfigError:
            return defer.fail()
        state = _CallState()
        state.timeout_seconds = (
            self._request_timeout_seconds if timeout_seconds is None else timeout_seconds
        )

        @inlineCallbacks
        def opened():
            response = yield self._send("GET", path, None)
            if not 200 <= response.code < 300:
                body = yield _read_body(response, self._max_response_bytes)
                raise _api_error(response.code, response.phrase, body, "GET", path)
            return response

        d = opened()

        def expire():
            state.expired = True
            d.cancel()

        deadline = self._reactor.callLater(max(0.0, state.timeout_seconds), expire)

        def finish(result):
            if deadline.active():
                deadline.cancel()
            return result

        d.addBoth(finish)
        d.addErrback(self._translate_failure, "GET", path, state)
        return d

    def _translate_failure(self, failure, method, path, state):
        if state.expired:
            raise KubernetesUnavailableError(
                f"{method} {path}: no answer within {state.timeout_seconds:g} s"
            )
        if failure.check(KubernetesError, ConfigError):
            return failure
        if self._closed:
            raise KubernetesUnavailableError(f"{method} {path}: the client was closed")
        raise KubernetesUnavailableError(
            f"{method} {path}: {_describe_failure(failure)}"
        )

    def close(self, grace_seconds=0.0):
        """
        Close the client: calls in flight get up to C{grace_seconds} to
        finish (new calls are still made meanwhile, so that a validation in
        flight can make its next call), then the rest are cancelled, later
        calls refused, and the pooled connections closed.

        @param grace_seconds: how long calls in flight may go on.
        @return: Deferred firing when the connections are closed.
        """
        closed = Deferred()
        if self._closed and not self._draining:
            closed.callback(None)
            return closed
        first = not self._draining
        self._draining.append(closed)
        if first:
            if self._in_flight and grace_seconds > 0:
                self._grace_timer = self._reactor.callLater(
                    grace_seconds, self._drained, True
                )
            else:
                self._drained(True)
        return closed

    def _drained(self, give_up=False):
        """
        Finish closing once nothing is in flight, or when C{give_up}.
        """
        if self._closed or (self._in_flight and not give_up):
            return
        if self._grace_timer is not None and self._grace_timer.active():
            self._grace_timer.cancel()
        self._closed = True
        for d in list(self._in_flight):
            d.cancel()
        closing = (
            self._pool.closeCachedConnections() if self._pool else defer.succeed(None)
        )

        def notify(_):
            waiters, self._draining = self._draining, []
            for waiter in waiters:
                waiter.callback(None)

        closing.addCallback(notify)


class KubernetesClientService(Service):
    """
    Closes the L{KubernetesClient} when sentry_tx stops, once the calls in
    flight have finished (within L{CLIENT_SHUTDOWN_GRACE_SECONDS}): the
    certificate authority stops at the same time and lets the validations in
    flight finish, which may still need the API.

    @param client: the L{KubernetesClient}.
    """

    name = "kubernetes-client"

    def __init__(self, client):
        self.client = client

    def stopService(self):
        super().stopService()
        return self.client.close(grace_seconds=CLIENT_SHUTDOWN_GRACE_SECONDS)


TOKEN_REVIEW_PATH = "/apis/authentication.k8s.io/v1/tokenreviews"


def core_path(namespace, plural, name=None):
    """
    The path of a core (C{v1}) resource collection, or of one object.

    @param namespace: the namespace.
    @param plural: C{"pods"}, C{"secrets"}, C{"configmaps"}.
    @param name: the object's name, or None for the collection.
    """
    path = f"/api/v1/namespaces/{quote(namespace, safe='')}/{plural}"
    return path if name is None else f"{path}/{quote(name, safe='')}"


def configuration_path(namespace, name):
    """
    The path of the Dapr C{Configuration} C{name} in C{namespace}.
    """
    return (
        f"/apis/dapr.io/v1alpha1/namespaces/{quote(namespace, safe='')}"
        f"/configurations/{quote(name, safe='')}"
    )


@implementer(IConfigurationSource)
class KubernetesConfigurationSource:
    """
    Reads C{spec.mtls} from the Dapr C{Configuration} named by C{--config}
    in sentry_tx's namespace.  A missing resource, an API error and a wrong
    field all stop the start with a L{ConfigError}: running on defaults the
    operator did not choose would hide the fault.

    @param client: the L{KubernetesClient}.
    @param on_resolved: callables given the completed L{SentryConfig} (the
        trust store takes the clock skew for a generated bundle from it).
    """

    _log = Logger()

    def __init__(self, client, on_resolved=()):
        self._client = client
        self._on_resolved = tuple(on_resolved)

    @inlineCallbacks
    def resolve(self, config):
        """
        Complete C{config} with the resource's C{spec.mtls}.

        @return: Deferred firing with the new L{SentryConfig}, or failing
            with L{ConfigError}.
        """
        name, namespace = config.config, config.namespace
        source = f"Configuration {namespace}/{name}"
        try:
            document = yield self._client.get(configuration_path(namespace, name))
        except KubernetesAPIError as e:
            if e.is_not_found:
                raise ConfigError(
                    "--config",
                    f"{source} not found (create it, or name another with"
                    f" --config): HTTP {e.status} {e.reason}",
                ) from None
            raise ConfigError("--config", f"cannot read {source}: {e}") from None
        except KubernetesUnavailableError as e:
            raise ConfigError("--config", f"cannot read {source}: {e}") from None
        mtls = parse_mtls(document, source)
        for warning in mtls_warnings(document, source):
            # Not "warning": legacy observers take that key for a Python
            # warnings.warn() event.
            self._log.warn("{configuration_warning}", configuration_warning=warning)
        resolved = replace(config, mtls=mtls)
        self._log.info(
            "read {source}: workload certificates live {ttl}, clock skew {skew}",
            source=source,
            ttl=str(mtls.workload_cert_ttl),
            skew=str(mtls.allowed_clock_skew),
        )
        for callback in self._on_resolved:
            callback(resolved)
        return resolved
