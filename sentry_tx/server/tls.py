# -*- test-case-name: tests.test_tls -*-
"""
sentry_tx's own server certificate, issued from the bundle in service, and the
grpcio credentials that serve it.

grpcio asks the fetcher for a new configuration at each TLS handshake; a
renewed certificate is handed to it once, and the listener stays open.
"""

import threading
from datetime import datetime

import grpc
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
)

from sentry_tx.ca import x509profile
from sentry_tx.ca.bundle import TrustBundle
from sentry_tx.config import MTLSConfig

SERVER_APP_ID = "dapr-sentry"


def issue_server_certificate(
    bundle: TrustBundle,
    trust_domain: str,
    namespace: str,
    now: datetime,
    mtls: MTLSConfig,
) -> tuple[bytes, bytes, datetime, datetime]:
    """
    Issue sentry_tx's serving certificate from C{bundle}.

    @return: C{(key_pem, chain_pem, not_before, not_after)}; the chain is the
        leaf followed by the issuer chain.  C{key_pem} goes to grpcio only.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    not_before, not_after = x509profile.leaf_validity(
        now, mtls.workload_cert_ttl, mtls.allowed_clock_skew, bundle.chain_not_after
    )
    leaf = x509profile.build_leaf(
        bundle,
        key.public_key(),
        x509profile.spiffe_id(trust_domain, namespace, SERVER_APP_ID),
        x509profile.server_dns_names(namespace),
        not_before,
        not_after,
    )
    key_pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    chain_pem = leaf.public_bytes(Encoding.PEM) + bundle.issuer_chain_pem
    return key_pem, chain_pem, not_before, not_after


class ServerCredentials:
    """
    Dynamic grpcio server credentials whose certificate can be replaced while
    the server runs.  Client certificates are not asked for.
    """

    def __init__(self, key_pem: bytes, chain_pem: bytes) -> None:
        self._lock = threading.Lock()
        self._pending: grpc.ServerCertificateConfiguration | None = None
        self.credentials = grpc.dynamic_ssl_server_credentials(
            _configuration(key_pem, chain_pem),
            # grpcio keeps the current configuration when the fetcher
            # returns None; types-grpcio's stub leaves None out.
            self._fetch,  # type: ignore[arg-type]
            require_client_authentication=False,
        )

    def replace(self, key_pem: bytes, chain_pem: bytes) -> None:
        """
        Serve C{chain_pem} from the next handshake on.
        """
        configuration = _configuration(key_pem, chain_pem)
        with self._lock:
            self._pending = configuration

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        # Called by grpcio's threads at each handshake: None keeps the
        # current configuration.
        with self._lock:
            configuration, self._pending = self._pending, None
        return configuration


def _configuration(
    key_pem: bytes, chain_pem: bytes
) -> grpc.ServerCertificateConfiguration:
    return grpc.ssl_server_certificate_configuration([(key_pem, chain_pem)])
