# -*- test-case-name: tests.test_kube_client -*-
"""
The TLS policy of the Kubernetes client: the cluster's CA as the only
trust root, the API server's name checked, and the client certificate of the
connection when it has one.
"""

from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import crypto
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from sentry_tx.kube.connection import ClusterConnection


@implementer(IPolicyForHTTPS)
class ClusterTLSPolicy:
    """
    The TLS client options for the API server: its CA (or the system's
    roots), the expected server name, and the client certificate if any.

    @param connection: the L{ClusterConnection}.
    """

    def __init__(self, connection: ClusterConnection) -> None:
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
        self._client_certificate: ssl.PrivateCertificate | None = None
        self._extra_options: dict[str, Any] = {}
        # A kubeconfig gives both or neither (kube.kubeconfig checks it).
        if (
            connection.client_certificate_pem is not None
            and connection.client_key_pem is not None
        ):
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
        self._options: dict[tuple[bytes, int], IOpenSSLClientConnectionCreator] = {}

    def creatorForNetloc(
        self, hostname: bytes, port: int
    ) -> IOpenSSLClientConnectionCreator:
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
