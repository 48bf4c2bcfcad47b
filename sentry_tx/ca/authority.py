# -*- test-case-name: tests.test_images,tests.test_kube_validator -*-
"""
The authority that signs: from a validated identity and a CSR's public key to
the workload certificate, its chain and the trust anchors (SPEC section 7).
"""

from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.hazmat.primitives.serialization import Encoding

from sentry_tx.ca import x509profile
from sentry_tx.errors import IssuerExpiredError

if TYPE_CHECKING:
    from sentry_tx.ca.bundle import TrustBundle
    from sentry_tx.config import MTLSConfig
    from sentry_tx.identity.caller import CallerIdentity


@dataclass(frozen=True)
class IssuedCertificate:
    """
    What SignCertificate answers with.

    @ivar certificate_chain_pem: the leaf PEM followed by the issuer chain
        (self-signed certificates left out).
    @ivar trust_anchors_pem: the PEM of every trust anchor.
    @ivar not_after: the leaf's NotAfter (aware, UTC).
    """

    certificate_chain_pem: bytes
    trust_anchors_pem: bytes
    not_after: datetime


def issue_workload_certificate(
    bundle: "TrustBundle",
    identity: "CallerIdentity",
    public_key: CertificatePublicKeyTypes,
    now: datetime,
    mtls: "MTLSConfig",
    own_namespace: str,
) -> IssuedCertificate:
    """
    Sign a workload certificate for C{identity}.

    @param bundle: the L{sentry_tx.ca.bundle.TrustBundle} in service.
    @param identity: the validated L{sentry_tx.identity.caller.CallerIdentity};
        its container images (KUBERNETES only) are stamped when it has any.
    @param public_key: the CSR's public key (already checked).
    @param now: aware UTC L{datetime}.
    @param mtls: the L{sentry_tx.config.MTLSConfig} (TTL and skew).
    @param own_namespace: sentry_tx's own namespace, for control-plane DNS
        names.
    @raise IssuerExpiredError: when the issuer chain is no longer valid.
    """
    chain_not_after = x509profile.leaf_profile(bundle).chain_not_after
    if now >= chain_not_after:
        raise IssuerExpiredError()
    not_before, not_after = x509profile.leaf_validity(
        now, mtls.workload_cert_ttl, mtls.allowed_clock_skew, chain_not_after
    )
    dns_names = x509profile.control_plane_dns_names(
        identity.app_id, identity.namespace, own_namespace, identity.trust_domain
    )
    leaf = x509profile.build_leaf(
        bundle,
        public_key,
        identity.spiffe_id,
        dns_names,
        not_before,
        not_after,
        container_images=identity.container_images,
    )
    return IssuedCertificate(
        certificate_chain_pem=leaf.public_bytes(Encoding.PEM) + bundle.issuer_chain_pem,
        trust_anchors_pem=bundle.anchors_pem,
        not_after=not_after,
    )
