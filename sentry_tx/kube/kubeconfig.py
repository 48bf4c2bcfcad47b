# -*- test-case-name: tests.test_kube_kubeconfig,tests.test_kube_client -*-
"""
The connection a kubeconfig file describes (its current context: the
cluster's C{server} and CA, the user's token, token file or client
certificate), and L{cluster_connection}, the choice between it and the
in-cluster connection.

Choices where Kubernetes leaves room, all deliberate:

  - C{insecure-skip-tls-verify: true} is refused: a CA that hands out mesh
    identities on the word of a server it cannot authenticate would hand
    them to whoever answers.  Give the cluster's CA instead.
  - Plain C{http://} is accepted only for a loopback server (as
    C{kubectl proxy} serves on 127.0.0.1:8001); anywhere else it is refused.
  - C{exec} and C{auth-provider} users, and basic auth, are refused.
"""

import base64
import binascii
import ipaddress
import os
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from twisted.internet.interfaces import IReactorTime

from sentry_tx.errors import ConfigError
from sentry_tx.kube.connection import (
    TOKEN_FILE_CHECK_INTERVAL_SECONDS,
    BearerToken,
    ClusterConnection,
    StaticToken,
    TokenFile,
    check_certificates,
    is_bearer_token,
    read_limited,
)
from sentry_tx.kube.incluster import (
    KUBERNETES_SERVICE_HOST_VARIABLE,
    SERVICE_ACCOUNT_DIRECTORY,
    in_cluster_connection,
)

KUBECONFIG_VARIABLE = "KUBECONFIG"

DEFAULT_KUBECONFIG = "~/.kube/config"
"""
The default of C{--kubeconfig}; any other value is an explicit choice and
wins over the in-cluster settings.
"""

_UNSUPPORTED_USER_FIELDS = {
    "exec": "exec credential plugins are not supported",
    "auth-provider": "auth-provider plugins are not supported",
    "username": "basic authentication is not supported",
    "password": "basic authentication is not supported",
}


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_key_pair(certificate_pem: bytes, key_pem: bytes, field: str) -> None:
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


def _named_entry(
    document: dict[Any, Any], section: str, name: object, path: str
) -> dict[Any, Any]:
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


def _kubeconfig_bytes(
    entry: dict[Any, Any], name: str, base_directory: str, path: str, description: str
) -> bytes | None:
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
        return read_limited(filename)
    except (OSError, ValueError) as e:
        raise ConfigError(
            "--kubeconfig",
            f"{path}: {description} {name} {filename}: cannot be read:"
            f" {getattr(e, 'strerror', None) or e}",
        ) from None


def kubeconfig_connection(
    path: str,
    clock: IReactorTime,
    token_check_interval_seconds: float = TOKEN_FILE_CHECK_INTERVAL_SECONDS,
) -> ClusterConnection:
    """
    The settings of the current context of the kubeconfig at C{path}.

    @param path: the kubeconfig file.
    @param clock: an C{IReactorTime}, for a C{tokenFile}'s re-reads.
    @return: a L{ClusterConnection}.
    @raise ConfigError: naming C{--kubeconfig} and saying what is wrong.
    """
    try:
        raw = read_limited(path)
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
        check_certificates(
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
    token: BearerToken | None = None
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
        if not is_bearer_token(text):
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
    if certificate_pem is not None and key_pem is not None:
        field_name = f"--kubeconfig: {path}: {user_description}"
        check_certificates(certificate_pem, f"{field_name} client-certificate")
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


def _expand_home(path: str, environ: Mapping[str, str]) -> str:
    if path == "~" or path.startswith("~/"):
        home = environ.get("HOME") or os.path.expanduser("~")
        return home + path[1:]
    return path


def cluster_connection(
    kubeconfig: str | None,
    environ: Mapping[str, str],
    clock: IReactorTime,
    service_account_directory: str = SERVICE_ACCOUNT_DIRECTORY,
    token_check_interval_seconds: float = TOKEN_FILE_CHECK_INTERVAL_SECONDS,
) -> ClusterConnection:
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
