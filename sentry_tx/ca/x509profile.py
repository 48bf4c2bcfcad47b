# -*- test-case-name: tests.test_x509profile,tests.test_bundle,tests.test_images -*-
"""
The X.509 profile of sentry_tx: the one module that builds certificates.

It builds three kinds of certificate:

  - the self-signed root of a generated trust bundle (L{build_root});
  - the issuer that root signs (L{build_issuer});
  - the short-lived workload ("leaf") certificates the issuer signs for
    every caller of C{SignCertificate}, and for sentry_tx's own gRPC server
    (L{build_leaf}).

Everything here is a pure function: the current time is always a
parameter, never read from the clock, so that tests can pin it.

L{build_leaf} is on the hot path (it runs once per request, thousands of
times a second under load): the extensions that never change are built
once at import time, and what depends only on the issuer (its name, the
authority key identifier, the signature hash, the chain's end) is prepared
once per L{sentry_tx.ca.bundle.TrustBundle} in an immutable L{LeafProfile}
(L{leaf_profile}).  The leaf is built with the C{CertificateBuilder}
constructor rather than its method chain, which copies the builder and
checks every argument again at each step.
"""

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, cast

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
    CertificateIssuerPublicKeyTypes,
    CertificatePublicKeyTypes,
    PrivateKeyTypes,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

if TYPE_CHECKING:
    from sentry_tx.ca.bundle import TrustBundle

CA_LIFETIME = timedelta(days=365)
"""
How long a generated root and issuer are valid, counted from now.
"""

SENTRY_APP_ID = "dapr-sentry"
"""
The app id in sentry_tx's own SPIFFE id and in the generated issuer's subject.
"""

CLUSTER_DOMAIN = "cluster.local"
"""
The cluster domain in sentry_tx's server DNS names (as Dapr's).
"""

SCHEDULER_REPLICAS = 3
"""
How many C{dapr-scheduler-server-<n>} DNS names a scheduler certificate gets.
"""

_EMPTY_NAME = x509.Name([])

_CA_KEY_USAGE = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=True,
    crl_sign=True,
    encipher_only=False,
    decipher_only=False,
)

_LEAF_KEY_USAGE = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=False,
    crl_sign=False,
    encipher_only=False,
    decipher_only=False,
)

_LEAF_BASIC_CONSTRAINTS = x509.BasicConstraints(ca=False, path_length=None)

_LEAF_EXTENDED_KEY_USAGE = x509.ExtendedKeyUsage(
    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
)

SignatureHash = hashes.SHA256 | hashes.SHA384 | hashes.SHA512
"""
The hashes L{signature_hash_for} chooses (what C{CertificateBuilder.sign}
accepts is a superset).
"""

_HASH_FOR_CURVE: dict[str, type[SignatureHash]] = {
    ec.SECP256R1.name: hashes.SHA256,
    ec.SECP384R1.name: hashes.SHA384,
    ec.SECP521R1.name: hashes.SHA512,
}

CONTAINER_IMAGES_OID = x509.ObjectIdentifier("1.3.6.1.4.1.57683.100.1")
"""
Dapr's container images extension (dapr/dapr #10282): under the CNCF's
enterprise number, in Dapr's sub-arc 100.
"""


def der_octet_string(data: bytes) -> bytes:
    """
    The DER encoding of an OCTET STRING holding C{data}.
    """
    length = len(data)
    if length < 0x80:
        header = bytes((0x04, length))
    else:
        size = length.to_bytes((length.bit_length() + 7) // 8, "big")
        header = bytes((0x04, 0x80 | len(size))) + size
    return header + data


def container_images_extension(
    images_json: bytes,
) -> x509.Extension[x509.UnrecognizedExtension]:
    """
    The non-critical extension that stamps a workload's container images:
    L{CONTAINER_IMAGES_OID}, valued a DER OCTET STRING of C{images_json}
    (the bytes of L{sentry_tx.identity.images.marshal}), as Dapr's
    C{images.Extension}.
    """
    value = x509.UnrecognizedExtension(
        CONTAINER_IMAGES_OID, der_octet_string(images_json)
    )
    return x509.Extension(CONTAINER_IMAGES_OID, False, value)


MIN_RSA_KEY_BITS = 2048
"""
The smallest RSA key sentry_tx signs with or signs for.
"""


def signature_hash_for(private_key: PrivateKeyTypes) -> SignatureHash | None:
    """
    The hash a certificate signed by C{private_key} uses.

    ECDSA P-256 signs with SHA-256, P-384 with SHA-384, P-521 with SHA-512;
    RSA with SHA-256 (PKCS#1 v1.5); Ed25519 takes no separate hash.

    @param private_key: a private key object from C{cryptography}.
    @return: a C{hashes.HashAlgorithm} instance, or L{None} for Ed25519.
    @raise ValueError: for any other key type or curve, or RSA below
        L{MIN_RSA_KEY_BITS}.
    """
    if isinstance(private_key, ec.EllipticCurvePrivateKey):
        hash_type = _HASH_FOR_CURVE.get(private_key.curve.name)
        if hash_type is None:
            raise ValueError(f"unsupported elliptic curve {private_key.curve.name}")
        return hash_type()
    if isinstance(private_key, ed25519.Ed25519PrivateKey):
        return None
    if isinstance(private_key, rsa.RSAPrivateKey):
        if private_key.key_size < MIN_RSA_KEY_BITS:
            raise ValueError(
                f"RSA key of {private_key.key_size} bits is too small "
                f"(at least {MIN_RSA_KEY_BITS})"
            )
        return hashes.SHA256()
    raise ValueError(f"unsupported key type {type(private_key).__name__}")


def spiffe_id(trust_domain: str, namespace: str, app_id: str) -> str:
    """
    The SPIFFE id of an app, as Dapr spells it.

    @return: C{"spiffe://<trust_domain>/ns/<namespace>/<app_id>"}.
    """
    return f"spiffe://{trust_domain}/ns/{namespace}/{app_id}"


def control_plane_dns_names(
    app_id: str, namespace: str, own_namespace: str, trust_domain: str
) -> list[str]:
    """
    The DNS names Dapr adds to a control-plane service's certificate.

    They are added only for a caller in sentry_tx's own namespace: an app
    elsewhere that calls itself C{dapr-operator} gets none.

    @param app_id: the caller's app id.
    @param namespace: the caller's namespace.
    @param own_namespace: sentry_tx's namespace (C{$NAMESPACE}).
    @param trust_domain: the trust domain of the caller's certificate.
    @return: a list of DNS names, possibly empty.
    """
    if namespace != own_namespace:
        return []
    if app_id == "dapr-injector":
        return [f"dapr-sidecar-injector.{namespace}.svc"]
    if app_id == "dapr-operator":
        return [f"dapr-webhook.{namespace}.svc"]
    if app_id == "dapr-scheduler":
        return [
            f"dapr-scheduler-server-{index}.dapr-scheduler-server."
            f"{namespace}.svc.{trust_domain}"
            for index in range(SCHEDULER_REPLICAS)
        ]
    return []


def server_dns_names(namespace: str) -> list[str]:
    """
    The DNS names of sentry_tx's own gRPC server certificate.

    C{cluster.local} alone is there because older sidecars dial with that
    server name.

    @param namespace: sentry_tx's namespace.
    @return: a list of DNS names.
    """
    return [
        SENTRY_APP_ID,
        f"{SENTRY_APP_ID}.{namespace}.svc",
        f"{SENTRY_APP_ID}.{namespace}.svc.{CLUSTER_DOMAIN}",
        CLUSTER_DOMAIN,
    ]


def leaf_validity(
    now: datetime,
    ttl: timedelta,
    allowed_clock_skew: timedelta,
    chain_not_after: datetime,
) -> tuple[datetime, datetime]:
    """
    The validity period of a workload certificate.

    It starts C{allowed_clock_skew} before C{now} (a caller whose clock is a
    little behind still accepts it) and lasts C{ttl} from C{now}, but it never
    outlives the issuer chain (unlike Dapr, whose bug 8557 is to issue past
    it).

    Both are truncated to whole seconds, as X.509 stores them, so that the
    returned NotAfter equals the certificate's (and C{valid_until}).

    @param now: an aware L{datetime.datetime}.
    @param ttl: the workload certificate TTL, a L{timedelta}.
    @param allowed_clock_skew: a L{timedelta}.
    @param chain_not_after: the earliest NotAfter of the issuer chain.
    @return: C{(not_before, not_after)}, aware.
    """
    not_before = now - allowed_clock_skew
    not_after = min(now + ttl, chain_not_after)
    return not_before.replace(microsecond=0), not_after.replace(microsecond=0)


def _ca_builder(
    subject: x509.Name,
    issuer: x509.Name,
    public_key: CertificateIssuerPublicKeyTypes,
    now: datetime,
    allowed_clock_skew: timedelta,
    path_length: int | None,
    lifetime: timedelta,
) -> x509.CertificateBuilder:
    """
    What a generated root and issuer share: validity, serial, basic
    constraints, key usage and subject key identifier (every root and issuer
    sentry_tx makes carries one, so that verifiers tell renewed roots of
    the same subject apart by key identifier).
    """
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - allowed_clock_skew)
        .not_valid_after(now + lifetime)
        .add_extension(
            x509.BasicConstraints(ca=True, path_length=path_length), critical=True
        )
        .add_extension(_CA_KEY_USAGE, critical=True)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False
        )
    )


def build_root(
    key: CertificateIssuerPrivateKeyTypes,
    trust_domain: str,
    now: datetime,
    allowed_clock_skew: timedelta,
    lifetime: timedelta = CA_LIFETIME,
) -> x509.Certificate:
    """
    Build the self-signed root of a generated trust bundle.

    Subject C{O=<trust domain>}; CA without a path length limit;
    keyCertSign, cRLSign and digitalSignature; valid from C{now} minus the
    skew for C{lifetime} (L{CA_LIFETIME} unless C{--ca-ttl} says otherwise).

    @param key: the root's private key.
    @param trust_domain: sentry_tx's trust domain.
    @param now: an aware L{datetime.datetime}.
    @param allowed_clock_skew: a L{timedelta}.
    @return: the root certificate.
    """
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain)])
    builder = _ca_builder(
        name,
        name,
        key.public_key(),
        now,
        allowed_clock_skew,
        path_length=None,
        lifetime=lifetime,
    )
    return builder.sign(key, signature_hash_for(key))


def build_issuer(
    issuer_public_key: CertificateIssuerPublicKeyTypes,
    root_cert: x509.Certificate,
    root_key: CertificateIssuerPrivateKeyTypes,
    trust_domain: str,
    namespace: str,
    now: datetime,
    allowed_clock_skew: timedelta,
    lifetime: timedelta = CA_LIFETIME,
) -> x509.Certificate:
    """
    Build the issuer certificate of a generated trust bundle, signed by the
    root.

    Subject C{O=spiffe://<trust domain>/ns/<namespace>/dapr-sentry}; CA with
    path length 0 (it signs only workload certificates); the same usages as
    the root; valid from C{now} minus the skew for C{lifetime}; an
    authority key identifier naming the root.

    @param issuer_public_key: the issuer's public key.
    @param root_cert: the root certificate, from L{build_root}.
    @param root_key: the root's private key.
    @return: the issuer certificate.
    """
    subject = x509.Name(
        [
            x509.NameAttribute(
                NameOID.ORGANIZATION_NAME,
                spiffe_id(trust_domain, namespace, SENTRY_APP_ID),
            )
        ]
    )
    builder = _ca_builder(
        subject,
        root_cert.subject,
        issuer_public_key,
        now,
        allowed_clock_skew,
        path_length=0,
        lifetime=lifetime,
    ).add_extension(authority_key_identifier_for(root_cert), critical=False)
    return builder.sign(root_key, signature_hash_for(root_key))


def authority_key_identifier_for(
    issuer_cert: x509.Certificate,
) -> x509.AuthorityKeyIdentifier:
    """
    The authority key identifier of certificates C{issuer_cert} signs.

    It repeats the issuer's subject key identifier when it has one (so the
    two match byte for byte), and is computed from its public key otherwise.

    @param issuer_cert: the signing certificate.
    @return: an L{x509.AuthorityKeyIdentifier}.
    """
    try:
        ski = issuer_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    except x509.ExtensionNotFound:
        # A certificate that signs has a key that can sign (what
        # CertificateIssuerPublicKeyTypes names); X25519/X448 cannot.
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(
            cast(CertificateIssuerPublicKeyTypes, issuer_cert.public_key())
        )
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski.value)


@dataclass(frozen=True)
class LeafProfile:
    """
    What every leaf signed with one bundle shares, prepared once.

    @ivar bundle: the L{sentry_tx.ca.bundle.TrustBundle} it was prepared
        from (compared by identity).
    @ivar issuer_name: the issuer name of the leaves.
    @ivar extensions: the extensions after the SAN, in order: basic
        constraints, key usage, extended key usage, authority key
        identifier (a tuple of L{x509.Extension}).
    @ivar chain_not_after: the earliest NotAfter of the issuer chain
        (aware, UTC).
    """

    bundle: "TrustBundle"
    issuer_name: x509.Name
    extensions: tuple[x509.Extension[x509.ExtensionType], ...]
    chain_not_after: datetime

    @classmethod
    def for_bundle(cls, bundle: "TrustBundle") -> "LeafProfile":
        """
        Prepare the profile of C{bundle}'s leaves.
        """
        return cls(
            bundle=bundle,
            issuer_name=bundle.issuer_name,
            extensions=(
                x509.Extension(
                    _LEAF_BASIC_CONSTRAINTS.oid, True, _LEAF_BASIC_CONSTRAINTS
                ),
                x509.Extension(_LEAF_KEY_USAGE.oid, True, _LEAF_KEY_USAGE),
                x509.Extension(
                    _LEAF_EXTENDED_KEY_USAGE.oid, False, _LEAF_EXTENDED_KEY_USAGE
                ),
                x509.Extension(
                    bundle.authority_key_identifier.oid,
                    False,
                    bundle.authority_key_identifier,
                ),
            ),
            chain_not_after=bundle.chain_not_after,
        )


_last_leaf_profile: LeafProfile | None = None
"""
The L{LeafProfile} of the bundle used last.  A bundle swap publishes a new
bundle object, so one slot compared by identity is enough; the profile is
immutable, so a thread that reads a stale slot still gets a consistent one.
"""


def leaf_profile(bundle: "TrustBundle") -> LeafProfile:
    """
    The L{LeafProfile} of C{bundle}, prepared at its first use.

    @param bundle: a L{sentry_tx.ca.bundle.TrustBundle}.
    @return: a L{LeafProfile} whose C{bundle} is C{bundle}.
    """
    global _last_leaf_profile
    profile = _last_leaf_profile
    if profile is None or profile.bundle is not bundle:
        profile = _last_leaf_profile = LeafProfile.for_bundle(bundle)
    return profile


def _naive_utc(moment: datetime) -> datetime:
    # What CertificateBuilder's setters store: UTC without a tzinfo.
    if moment.tzinfo is None:
        return moment
    # A tzinfo whose utcoffset() is None counts as UTC, as cryptography's.
    return moment.replace(tzinfo=None) - (moment.utcoffset() or timedelta())


def build_leaf(
    bundle: "TrustBundle",
    public_key: CertificatePublicKeyTypes,
    spiffe_id: str,
    dns_names: Iterable[str],
    not_before: datetime,
    not_after: datetime,
    container_images: bytes = b"",
) -> x509.Certificate:
    """
    Build and sign a workload certificate.

    Subject empty; a critical subject alternative name with the SPIFFE id
    (URI) and C{dns_names}; basic constraints CA:FALSE (critical); key usage
    digitalSignature (critical); extended key usage serverAuth and
    clientAuth; the bundle's authority key identifier; last, when
    C{container_images} is not empty, L{container_images_extension}; a
    random positive serial; signed by the bundle's issuer key with the hash
    that key calls for.

    @param bundle: the L{sentry_tx.ca.bundle.TrustBundle} in service.
    @param public_key: the caller's public key (from its CSR).
    @param spiffe_id: the certificate's SPIFFE id (a C{str} URI).
    @param dns_names: DNS names to add (an iterable of C{str}).
    @param not_before: an aware L{datetime.datetime}.
    @param not_after: an aware L{datetime.datetime}, from L{leaf_validity}.
    @param container_images: the JSON bytes of the caller's container
        images (L{sentry_tx.identity.caller.CallerIdentity}), or C{b""}.
    @return: the certificate.
    @raise ValueError: if C{not_after} is before C{not_before}.
    """
    if not_after < not_before:
        raise ValueError("the leaf's NotAfter is before its NotBefore")
    profile = leaf_profile(bundle)
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(spiffe_id)]
    names.extend(x509.DNSName(name) for name in dns_names)
    san = x509.SubjectAlternativeName(names)
    extensions = [x509.Extension(san.oid, True, san), *profile.extensions]
    if container_images:
        extensions.append(container_images_extension(container_images))
    builder = x509.CertificateBuilder(
        issuer_name=profile.issuer_name,
        subject_name=_EMPTY_NAME,
        public_key=public_key,
        serial_number=x509.random_serial_number(),
        not_valid_before=_naive_utc(not_before),
        not_valid_after=_naive_utc(not_after),
        extensions=extensions,
    )
    # TrustBundle types these as any private key and any hash; it builds
    # them with signature_hash_for, which accepts only signing keys and
    # returns only a SignatureHash (or None).
    return builder.sign(
        cast(CertificateIssuerPrivateKeyTypes, bundle.issuer_key),
        cast("SignatureHash | None", bundle.signature_hash),
    )
