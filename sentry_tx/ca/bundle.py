# -*- test-case-name: tests.test_bundle,tests.test_files,tests.test_store -*-
"""
The trust bundle: trust anchors, issuer chain and issuer key.

L{load_bundle} turns the three PEM documents an operator supplies (files
C{ca.crt}, C{issuer.crt}, C{issuer.key}, or the same keys of a Kubernetes
Secret) into a verified L{TrustBundle}, or refuses them with a
L{BundleError} that names the part at fault and says what is wrong.
L{generate_bundle} makes a new root and issuer when there is nothing to load.

Loading is strict, because every workload certificate of the mesh rests on
what is loaded here:

  - anchors: every PEM block is a certificate, every certificate is
    self-signed, and there is at least one;
  - issuer chain: each certificate is signed by the next; a trailing
    self-signed root is dropped; the first is a CA that may sign
    certificates and is not self-signed; the chain leads to one of the
    anchors, and every certificate on the way is valid now;
  - key: an unencrypted private key, and the one of the first certificate
    of the chain.

Only C{#} comment lines and blank lines may appear around the PEM blocks
(read by L{sentry_tx.ca.pem}).  No message ever includes key material.
"""

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TypeVar, TypeVarTuple

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import (
    PrivateKeyTypes,
    PublicKeyTypes,
)

from sentry_tx.ca import x509profile
from sentry_tx.ca.pem import PEMBlock, certificates_pem, strict_pem_blocks
from sentry_tx.errors import BundleError

_T = TypeVar("_T")
_Arguments = TypeVarTuple("_Arguments")

DEFAULT_SOURCES = ("ca.crt", "issuer.crt", "issuer.key")
"""
The names L{load_bundle} gives the three parts in its errors by default.
"""

KEY_TYPE_ECDSA_P256 = "ecdsa-p256"
KEY_TYPE_ED25519 = "ed25519"
KEY_TYPES = (KEY_TYPE_ECDSA_P256, KEY_TYPE_ED25519)
"""
The key types L{generate_bundle} can make.
"""

_CERTIFICATE_LABEL = "CERTIFICATE"
_PRIVATE_KEY_LABELS: dict[str, type[PrivateKeyTypes] | None] = {
    "PRIVATE KEY": None,
    "EC PRIVATE KEY": ec.EllipticCurvePrivateKey,
    "RSA PRIVATE KEY": rsa.RSAPrivateKey,
}
_ENCRYPTED_KEY_LABEL = "ENCRYPTED PRIVATE KEY"
_EC_PARAMETERS_LABEL = "EC PARAMETERS"


# Certificates


def is_self_signed(cert: x509.Certificate) -> bool:
    """
    Whether C{cert} is self-signed: its issuer is its subject, and its own
    public key verifies its signature.

    @param cert: an L{x509.Certificate}.
    @return: L{bool}.
    """
    return cert.issuer == cert.subject and _is_signed_by(cert, cert)


def _is_signed_by(cert: x509.Certificate, signer: x509.Certificate) -> bool:
    """
    Whether C{signer} issued C{cert}: names match and the signature verifies.
    """
    try:
        cert.verify_directly_issued_by(signer)
    except Exception:
        # ValueError (names), InvalidSignature, TypeError and
        # UnsupportedAlgorithm (keys that cannot verify) all mean "no".
        return False
    return True


def _describe(cert: x509.Certificate, block: PEMBlock) -> str:
    """
    How an error message names a certificate: its position and subject.
    """
    subject = cert.subject.rfc4514_string() or "<empty subject>"
    return f"the certificate on line {block.line} (subject {subject!r})"


def _parse_certificates(
    data: bytes, source: str
) -> list[tuple[x509.Certificate, PEMBlock]]:
    """
    Parse every block of C{data} as a certificate.

    @return: a list of C{(certificate, block)} pairs.
    @raise BundleError: for a block that is not a certificate.
    """
    parsed = []
    for block in strict_pem_blocks(data, source):
        if block.label != _CERTIFICATE_LABEL:
            raise BundleError(
                source,
                f"line {block.line}: expected a CERTIFICATE block, found "
                f"{block.label!r}",
            )
        try:
            cert = x509.load_der_x509_certificate(block.der)
        except Exception as e:
            raise BundleError(
                source, f"line {block.line}: the certificate does not parse: {e}"
            ) from None
        parsed.append((cert, block))
    if not parsed:
        raise BundleError(source, "contains no certificate")
    return parsed


def _may_sign_certificates(cert: x509.Certificate) -> str | None:
    """
    Why C{cert} may not sign certificates, or L{None} if it may: it must have
    basic constraints with CA true and, when it has a key usage, keyCertSign.
    """
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    except x509.ExtensionNotFound:
        return "has no basic constraints (it must be a CA)"
    except Exception as e:
        return f"has unreadable extensions: {e}"
    if not constraints.value.ca:
        return "is not a CA (basic constraints CA:FALSE)"
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
    except x509.ExtensionNotFound:
        return None
    if not usage.value.key_cert_sign:
        return "may not sign certificates (key usage lacks keyCertSign)"
    return None


def _path_length(cert: x509.Certificate) -> int | None:
    """
    The path length constraint of a CA certificate, or L{None} for none.
    """
    try:
        return cert.extensions.get_extension_for_class(
            x509.BasicConstraints
        ).value.path_length
    except x509.ExtensionNotFound:
        return None


def _validity_problem(cert: x509.Certificate, now: datetime) -> str | None:
    """
    Why C{cert} is not valid at C{now}, or L{None} if it is.
    """
    if now > cert.not_valid_after_utc:
        return f"expired at {cert.not_valid_after_utc.isoformat()}"
    if now < cert.not_valid_before_utc:
        return f"is not valid before {cert.not_valid_before_utc.isoformat()}"
    return None


def _load_anchors(data: bytes, source: str) -> tuple[x509.Certificate, ...]:
    """
    Parse and check the trust anchors.

    @return: a tuple of self-signed certificates, at least one.
    """
    parsed = _parse_certificates(data, source)
    for cert, block in parsed:
        if not is_self_signed(cert):
            raise BundleError(
                source,
                f"{_describe(cert, block)} is not self-signed; trust anchors "
                f"must be root certificates",
            )
    return tuple(cert for cert, _ in parsed)


def _load_issuer_chain(
    data: bytes,
    anchors: Sequence[x509.Certificate],
    now: datetime,
    source: str,
    anchors_source: str,
) -> tuple[x509.Certificate, ...]:
    """
    Parse the issuer chain and verify it up to one of C{anchors} at C{now}.

    @return: the chain as a tuple, issuer first, without a trailing
        self-signed root.
    """
    parsed = _parse_certificates(data, source)
    if len(parsed) > 1 and is_self_signed(parsed[-1][0]):
        parsed = parsed[:-1]
    issuer, issuer_block = parsed[0]
    if is_self_signed(issuer):
        raise BundleError(
            source,
            f"{_describe(issuer, issuer_block)} is self-signed; the issuer must "
            f"be signed by a root in {anchors_source}",
        )
    problem = _may_sign_certificates(issuer)
    if problem is not None:
        raise BundleError(
            source, f"the issuer, {_describe(issuer, issuer_block)}, {problem}"
        )

    for position, ((cert, block), (signer, signer_block)) in enumerate(
        zip(parsed, parsed[1:], strict=False)
    ):
        if not _is_signed_by(cert, signer):
            raise BundleError(
                source,
                f"the chain is broken: {_describe(cert, block)} is not signed "
                f"by the next one, {_describe(signer, signer_block)}",
            )
        problem = _may_sign_certificates(signer)
        if problem is not None:
            raise BundleError(source, f"{_describe(signer, signer_block)} {problem}")
        limit = _path_length(signer)
        # Below signer: position + 1 CA certificates, then the leaf.
        if limit is not None and limit < position + 1:
            raise BundleError(
                source,
                f"{_describe(signer, signer_block)} allows {limit} intermediate "
                f"CA(s) below it, the chain has {position + 1}",
            )

    for cert, block in parsed:
        problem = _validity_problem(cert, now)
        if problem is not None:
            raise BundleError(source, f"{_describe(cert, block)} {problem}")

    top, top_block = parsed[-1]
    anchor = _find_anchor(
        top, top_block, len(parsed), anchors, now, source, anchors_source
    )
    if anchor is None:
        raise BundleError(
            source,
            f"the chain does not lead to any root in {anchors_source}: "
            f"{_describe(top, top_block)} is signed by none of them",
        )
    return tuple(cert for cert, _ in parsed)


def _find_anchor(
    top: x509.Certificate,
    top_block: PEMBlock,
    chain_length: int,
    anchors: Sequence[x509.Certificate],
    now: datetime,
    source: str,
    anchors_source: str,
) -> x509.Certificate | None:
    """
    The anchor that signed C{top}, the last certificate of the issuer chain.

    @return: the anchor, or L{None} if no anchor signed C{top}.
    @raise BundleError: when the anchors that signed C{top} cannot be used
        (expired, not a CA, path length too small).
    """
    refusal = None
    for anchor in anchors:
        if not _is_signed_by(top, anchor):
            continue
        problem = _may_sign_certificates(anchor)
        if problem is None:
            limit = _path_length(anchor)
            if limit is not None and limit < chain_length:
                problem = (
                    f"allows {limit} intermediate CA(s) below it, "
                    f"the chain has {chain_length}"
                )
        if problem is None:
            problem = _validity_problem(anchor, now)
        if problem is None:
            return anchor
        subject = anchor.subject.rfc4514_string()
        refusal = BundleError(
            anchors_source,
            f"the root {subject!r} that signed the issuer chain of "
            f"{source} {problem}",
        )
    if refusal is not None:
        raise refusal
    return None


# Keys


def _public_key_der(key: PublicKeyTypes) -> bytes:
    """
    The DER SubjectPublicKeyInfo of a public key, for comparing keys.
    """
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _load_private_key(data: bytes, source: str) -> PrivateKeyTypes:
    """
    Parse the issuer key: one unencrypted SEC1, PKCS#1 or PKCS#8 PEM block
    (an C{EC PARAMETERS} block, as C{openssl ecparam -genkey} writes, is
    skipped).

    Messages never quote the key or the parser's error about it.

    @return: a private key object.
    """
    keys = []
    for block in strict_pem_blocks(data, source):
        if block.label == _EC_PARAMETERS_LABEL:
            continue
        if block.label == _ENCRYPTED_KEY_LABEL or any(
            name.lower() == "proc-type" and "ENCRYPTED" in value.upper()
            for name, value in block.headers
        ):
            raise BundleError(
                source,
                f"line {block.line}: the private key is encrypted; sentry_tx "
                f"needs it unencrypted (protect the file with its mode 0600 "
                f"instead)",
            )
        if block.label not in _PRIVATE_KEY_LABELS:
            raise BundleError(
                source,
                f"line {block.line}: expected a private key (EC PRIVATE KEY, "
                f"RSA PRIVATE KEY or PRIVATE KEY), found {block.label!r}",
            )
        keys.append(block)
    if not keys:
        raise BundleError(source, "contains no private key")
    if len(keys) > 1:
        raise BundleError(
            source, f"contains {len(keys)} private keys; it must hold exactly one"
        )
    (block,) = keys
    try:
        key = serialization.load_der_private_key(block.der, password=None)
    except TypeError:
        raise BundleError(
            source,
            f"line {block.line}: the private key is encrypted; sentry_tx needs "
            f"it unencrypted",
        ) from None
    except Exception:
        raise BundleError(
            source, f"line {block.line}: the {block.label} block does not parse"
        ) from None
    expected_type = _PRIVATE_KEY_LABELS[block.label]
    if expected_type is not None and not isinstance(key, expected_type):
        raise BundleError(
            source,
            f"line {block.line}: the {block.label} block holds an "
            f"{_key_kind(key)} key",
        )
    return key


def _key_kind(key: PrivateKeyTypes) -> str:
    """
    A short name of a key's type, for messages.
    """
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return f"ECDSA {key.curve.name}"
    if isinstance(key, rsa.RSAPrivateKey):
        return f"RSA {key.key_size}-bit"
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "Ed25519"
    return type(key).__name__


# The bundle


@dataclass(frozen=True)
class TrustBundle:
    """
    A verified trust bundle, ready to sign with.

    Build one with L{TrustBundle.from_certificates} (or L{load_bundle}); the
    derived fields are computed there once, since L{x509profile.build_leaf}
    uses them for every certificate.

    @ivar anchors: the trust anchors, self-signed roots, at least one.
    @ivar issuer_chain: the issuer chain, issuer first, without a trailing
        self-signed root.
    @ivar issuer_key: the private key of C{issuer_chain[0]}; never shown.
    @ivar anchors_pem: the PEM of all anchors (C{trust_chain_certificates}).
    @ivar issuer_chain_pem: the PEM of C{issuer_chain} (sent after a leaf).
    @ivar authority_key_identifier: the AKI of certificates the issuer signs.
    @ivar signature_hash: the hash the issuer key signs with, L{None} for
        Ed25519.
    @ivar issuer_name: the issuer's subject, the issuer name of its leaves.
    """

    anchors: tuple[x509.Certificate, ...]
    issuer_chain: tuple[x509.Certificate, ...]
    issuer_key: PrivateKeyTypes = field(repr=False)
    anchors_pem: bytes = field(repr=False)
    issuer_chain_pem: bytes = field(repr=False)
    authority_key_identifier: x509.AuthorityKeyIdentifier
    signature_hash: hashes.HashAlgorithm | None
    issuer_name: x509.Name = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "issuer_name", self.issuer_chain[0].subject)

    @classmethod
    def from_certificates(
        cls,
        anchors: Iterable[x509.Certificate],
        issuer_chain: Iterable[x509.Certificate],
        issuer_key: PrivateKeyTypes,
    ) -> "TrustBundle":
        """
        Build a bundle from parts that are already verified, computing the
        derived fields.

        @param anchors: a sequence of root certificates.
        @param issuer_chain: a sequence of certificates, issuer first.
        @param issuer_key: the issuer's private key.
        @raise ValueError: if the issuer key is of a type sentry_tx cannot
            sign with.
        """
        anchor_certificates = tuple(anchors)
        chain = tuple(issuer_chain)
        return cls(
            anchors=anchor_certificates,
            issuer_chain=chain,
            issuer_key=issuer_key,
            anchors_pem=certificates_pem(anchor_certificates),
            issuer_chain_pem=certificates_pem(chain),
            authority_key_identifier=x509profile.authority_key_identifier_for(
                chain[0]
            ),
            signature_hash=x509profile.signature_hash_for(issuer_key),
        )

    @property
    def issuer(self) -> x509.Certificate:
        """
        The issuer certificate, the one that signs workload certificates.
        """
        return self.issuer_chain[0]

    @property
    def chain_not_after(self) -> datetime:
        """
        The earliest NotAfter of the issuer chain (aware, UTC): no workload
        certificate may outlive it.
        """
        return min(cert.not_valid_after_utc for cert in self.issuer_chain)

    @property
    def active_anchors(self) -> tuple[x509.Certificate, ...]:
        """
        The anchors the issuer chain leads to (usually one): after a
        renewal C{anchors} also holds the old root, already replaced, and
        the new one, not yet in use; expiry figures follow these.
        """
        top = self.issuer_chain[-1]
        chained = tuple(root for root in self.anchors if _is_signed_by(top, root))
        return chained or self.anchors

    @property
    def roots_not_after(self) -> datetime:
        """
        The earliest NotAfter of the L{active_anchors} (aware, UTC).
        """
        return min(cert.not_valid_after_utc for cert in self.active_anchors)


def _checked(
    source: str,
    function: Callable[[*_Arguments], _T],
    *args: *_Arguments,
    quote_error: bool = True,
) -> _T:
    """
    Call C{function(*args)}, turning any error other than L{BundleError}
    (a certificate C{cryptography} parses but cannot fully decode, say) into
    a L{BundleError} naming C{source}.

    @param quote_error: whether the message may include the error's text
        (not for the key, whose parser's messages are not ours to vouch for).
    """
    try:
        return function(*args)
    except BundleError:
        raise
    except Exception as e:
        detail = f"{type(e).__name__}: {e}" if quote_error else type(e).__name__
        raise BundleError(source, f"cannot be used ({detail})") from None


def load_bundle(
    anchors_pem: bytes,
    issuer_chain_pem: bytes,
    issuer_key_pem: bytes,
    now: datetime,
    sources: tuple[str, str, str] = DEFAULT_SOURCES,
) -> TrustBundle:
    """
    Load and verify a trust bundle.

    @param anchors_pem: the trust anchors (C{ca.crt}), PEM C{bytes}.
    @param issuer_chain_pem: the issuer chain (C{issuer.crt}), PEM C{bytes}.
    @param issuer_key_pem: the issuer key (C{issuer.key}), PEM C{bytes}.
    @param now: an aware L{datetime.datetime}: the chain must be valid then.
    @param sources: how errors name the three parts: paths or Secret keys.
    @return: a L{TrustBundle}.
    @raise BundleError: whose C{source} is the element of C{sources} naming
        the part at fault.
    """
    if now.tzinfo is None:
        raise ValueError("now must be an aware datetime")
    anchors_source, chain_source, key_source = sources
    anchors = _checked(anchors_source, _load_anchors, anchors_pem, anchors_source)
    chain = _checked(
        chain_source,
        _load_issuer_chain,
        issuer_chain_pem,
        anchors,
        now,
        chain_source,
        anchors_source,
    )
    key = _checked(
        key_source, _load_private_key, issuer_key_pem, key_source, quote_error=False
    )
    if _public_key_der(key.public_key()) != _public_key_der(chain[0].public_key()):
        raise BundleError(
            key_source,
            f"the private key does not belong to the issuer certificate "
            f"(subject {chain[0].subject.rfc4514_string()!r}) in {chain_source}",
        )
    try:
        return TrustBundle.from_certificates(anchors, chain, key)
    except ValueError as e:
        raise BundleError(key_source, f"cannot sign with this key: {e}") from None


# Generation


@dataclass(frozen=True)
class GeneratedBundle:
    """
    A newly generated trust bundle and the three PEM documents to store.

    The root's private key is not kept anywhere: it was used once, to sign
    the issuer.

    @ivar bundle: the L{TrustBundle}.
    @ivar anchors_pem: the root, for C{ca.crt}.
    @ivar issuer_chain_pem: the issuer, for C{issuer.crt}.
    @ivar issuer_key_pem: the issuer key, PKCS#8 PEM, for C{issuer.key}.
    """

    bundle: TrustBundle
    anchors_pem: bytes
    issuer_chain_pem: bytes
    issuer_key_pem: bytes = field(repr=False)


def _generate_private_key(
    key_type: str,
) -> ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey:
    """
    A new private key of C{key_type}, one of L{KEY_TYPES}.
    """
    if key_type == KEY_TYPE_ECDSA_P256:
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == KEY_TYPE_ED25519:
        return ed25519.Ed25519PrivateKey.generate()
    raise ValueError(f"unknown key type {key_type!r}; expected one of {KEY_TYPES}")


def generate_bundle(
    trust_domain: str,
    namespace: str,
    now: datetime,
    allowed_clock_skew: timedelta,
    key_type: str = KEY_TYPE_ECDSA_P256,
    lifetime: timedelta = x509profile.CA_LIFETIME,
) -> GeneratedBundle:
    """
    Generate a root and an issuer for C{trust_domain}.

    @param trust_domain: sentry_tx's trust domain (the root's subject).
    @param namespace: sentry_tx's namespace (in the issuer's subject).
    @param now: an aware L{datetime.datetime}.
    @param allowed_clock_skew: how far before C{now} both start, L{timedelta}.
    @param key_type: L{KEY_TYPE_ECDSA_P256} or L{KEY_TYPE_ED25519}.
    @param lifetime: how long both last from C{now} (C{--ca-ttl}).
    @return: a L{GeneratedBundle}.
    @raise ValueError: for an unknown C{key_type}.
    """
    root_key = _generate_private_key(key_type)
    issuer_key = _generate_private_key(key_type)
    root = x509profile.build_root(
        root_key, trust_domain, now, allowed_clock_skew, lifetime
    )
    issuer = x509profile.build_issuer(
        issuer_key.public_key(),
        root,
        root_key,
        trust_domain,
        namespace,
        now,
        allowed_clock_skew,
        lifetime,
    )
    bundle = TrustBundle.from_certificates((root,), (issuer,), issuer_key)
    return GeneratedBundle(
        bundle=bundle,
        anchors_pem=bundle.anchors_pem,
        issuer_chain_pem=bundle.issuer_chain_pem,
        issuer_key_pem=issuer_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )


__all__ = [
    "DEFAULT_SOURCES",
    "GeneratedBundle",
    "KEY_TYPES",
    "TrustBundle",
    "generate_bundle",
    "is_self_signed",
    "load_bundle",
]
