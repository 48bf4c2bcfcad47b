"""
Kubeconfig files for tests: a self-signed API server certificate and the
kubeconfig document that trusts it.
"""

import base64
import ipaddress
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import yaml
from cryptography import x509
from cryptography.x509.oid import NameOID

from sentry_tx.testing.certificates import (
    TestPrivateKey,
    make_certificate,
    make_private_key,
)


def make_self_signed_server_certificate(
    hosts: Iterable[str] = ("127.0.0.1", "localhost"),
) -> tuple[x509.Certificate, TestPrivateKey]:
    """
    A self-signed TLS server certificate for C{hosts} (IP addresses and DNS
    names), valid around the current time.

    @return: C{(certificate, private_key)}.
    """
    key = make_private_key("ecdsa-p256")
    now = datetime.now(UTC)
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    certificate = make_certificate(
        key,
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fake-kube-apiserver")]),
        not_before=now - timedelta(hours=1),
        not_after=now + timedelta(days=1),
        ca=False,
        key_cert_sign=False,
        extensions=((x509.SubjectAlternativeName(names), False),),
    )
    return certificate, key


def kubeconfig_document(
    server: str,
    cluster: Mapping[str, object] | None = None,
    user: Mapping[str, object] | None = None,
    context: str = "fake",
) -> dict[str, Any]:
    """
    A kubeconfig with one cluster, one user and one current context.

    @param server: the cluster's C{server} URL.
    @param cluster: more fields of the cluster (C{certificate-authority},
        ...); C{bytes} values of C{*-data} fields are base64-encoded.
    @param user: the user's fields (C{token}, C{tokenFile},
        C{client-certificate-data}, ...), likewise.
    """

    def encoded(fields: Mapping[str, object] | None) -> dict[str, object]:
        return {
            name: (
                base64.b64encode(value).decode("ascii")
                if isinstance(value, bytes)
                else value
            )
            for name, value in (fields or {}).items()
        }

    return {
        "apiVersion": "v1",
        "kind": "Config",
        "current-context": context,
        "clusters": [
            {
                "name": f"{context}-cluster",
                "cluster": {"server": server, **encoded(cluster)},
            }
        ],
        "users": [{"name": f"{context}-user", "user": encoded(user)}],
        "contexts": [
            {
                "name": context,
                "context": {"cluster": f"{context}-cluster", "user": f"{context}-user"},
            }
        ],
    }


def write_kubeconfig(path: str, document: Mapping[str, Any]) -> str:
    """
    Write a kubeconfig document (see L{kubeconfig_document}) as YAML.

    @return: C{path}.
    """
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(document, f)
    return path
