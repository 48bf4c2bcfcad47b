"""
Certificate factories the tests share: they build what the production
profile in L{sentry_tx.ca.x509profile} never would: chains with
intermediates, CAs without keyCertSign, certificates that expired, keys of
every type and in every PEM format, CSRs with bad signatures.
"""

import base64
import enum
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Final, Literal, TypedDict, Unpack

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import NameOID

from sentry_tx.ca.bundle import TrustBundle, load_bundle
from sentry_tx.ca.pem import certificates_pem

if TYPE_CHECKING:
    from sentry_tx.identity.caller import SignRequest

TestPrivateKey = (
    ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey
)
"""
The private keys L{make_private_key} makes.
"""


FIXED_NOW = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
"""
The "now" tests inject, unless they need another.
"""

TEST_TRUST_DOMAIN = "example.org"
TEST_NAMESPACE = "dapr-system"

CA_TEST_LIFETIME = timedelta(days=365)
"""
How long factory CAs live by default, centred-ish on L{FIXED_NOW}.
"""

_KEY_FACTORIES: dict[str, Callable[[], TestPrivateKey]] = {
    "ecdsa-p192": lambda: ec.generate_private_key(ec.SECP192R1()),
    "ecdsa-p256": lambda: ec.generate_private_key(ec.SECP256R1()),
    "ecdsa-p384": lambda: ec.generate_private_key(ec.SECP384R1()),
    "ecdsa-p521": lambda: ec.generate_private_key(ec.SECP521R1()),
    "ed25519": ed25519.Ed25519PrivateKey.generate,
    "rsa-1024": lambda: rsa.generate_private_key(65537, 1024),
    "rsa-2048": lambda: rsa.generate_private_key(65537, 2048),
}

KEY_TYPES = tuple(_KEY_FACTORIES)
"""
The key types L{make_private_key} knows, including ones sentry_tx refuses
(C{ecdsa-p192}, C{rsa-1024}).
"""


class _Default(enum.Enum):
    """
    The type of L{_DEFAULT}: an enum, so that C{x is _DEFAULT} narrows.
    """

    DEFAULT = enum.auto()


_DEFAULT: Final = _Default.DEFAULT
"""
An argument not given, where None means something else.
"""


def make_private_key(key_type: str = "ecdsa-p256") -> TestPrivateKey:
    """
    A new private key.

    @param key_type: one of L{KEY_TYPES}.
    """
    return _KEY_FACTORIES[key_type]()


def default_hash(
    key: TestPrivateKey,
) -> hashes.SHA256 | hashes.SHA384 | hashes.SHA512 | None:
    """
    The hash a test certificate or CSR signed by C{key} uses (the production
    choice, but also for curves and sizes production refuses).
    """
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return None
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size > 384:
        return hashes.SHA512()
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size > 256:
        return hashes.SHA384()
    return hashes.SHA256()


def private_key_pem(
    key: TestPrivateKey, key_format: str = "pkcs8", password: bytes | None = None
) -> bytes:
    """
    The PEM of a private key.

    @param key_format: C{"pkcs8"} (C{PRIVATE KEY}), C{"sec1"} (C{EC PRIVATE
        KEY}, EC keys only) or C{"pkcs1"} (C{RSA PRIVATE KEY}, RSA keys only).
    @param password: C{bytes} to encrypt it with (C{ENCRYPTED PRIVATE KEY}
        for PKCS#8, a C{Proc-Type} header for the others), or L{None}.
    """
    private_format = {
        "pkcs8": serialization.PrivateFormat.PKCS8,
        "sec1": serialization.PrivateFormat.TraditionalOpenSSL,
        "pkcs1": serialization.PrivateFormat.TraditionalOpenSSL,
    }[key_format]
    encryption: serialization.KeySerializationEncryption = (
        serialization.NoEncryption()
        if password is None
        else serialization.BestAvailableEncryption(password)
    )
    return key.private_bytes(serialization.Encoding.PEM, private_format, encryption)


def certificate_pem(*certificates: x509.Certificate) -> bytes:
    """
    The PEM of C{certificates}, concatenated.
    """
    return certificates_pem(certificates)


def organization_name(organization: str) -> x509.Name:
    """
    An X.509 name of just C{O=<organization>}.
    """
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization)])


class CertificateOptions(TypedDict, total=False):
    """
    The keyword arguments of L{make_certificate} that L{make_chain} and
    L{sentry_tx.testing.rotation.reissue_chain} pass on for the issuer.
    """

    ca: bool
    path_length: int | None
    key_cert_sign: bool
    key_usage: bool
    basic_constraints: bool
    subject_key_identifier: bool
    extensions: Iterable[tuple[x509.ExtensionType, bool]]


def make_certificate(
    key: TestPrivateKey,
    subject: x509.Name | str,
    *,
    signer: x509.Certificate | None = None,
    signer_key: TestPrivateKey | None = None,
    not_before: datetime = FIXED_NOW - timedelta(days=30),
    not_after: datetime = FIXED_NOW + CA_TEST_LIFETIME,
    ca: bool = True,
    path_length: int | None = None,
    key_cert_sign: bool = True,
    key_usage: bool = True,
    basic_constraints: bool = True,
    subject_key_identifier: bool = True,
    extensions: Iterable[tuple[x509.ExtensionType, bool]] = (),
) -> x509.Certificate:
    """
    Build a test certificate, a CA by default.

    @param key: the subject's private key.
    @param subject: an L{x509.Name}, or a C{str} used as C{O=<subject>}.
    @param signer: the issuing certificate, or L{None} for self-signed.
    @param signer_key: the issuing private key (C{key} when self-signed).
    @param ca: the basic constraints' CA flag.
    @param path_length: the basic constraints' path length.
    @param key_cert_sign: whether the key usage includes keyCertSign.
    @param key_usage: whether to add a key usage extension at all.
    @param basic_constraints: whether to add basic constraints at all.
    @param subject_key_identifier: whether to add SKI (and AKI when signed
        by another certificate).
    @param extensions: more C{(extension value, critical)} pairs.
    @return: an L{x509.Certificate}.
    """
    if isinstance(subject, str):
        subject = organization_name(subject)
    if signer is None:
        signer_name, signer_key = subject, key
    else:
        signer_name = signer.subject
    if signer_key is None:
        raise ValueError("a certificate signed by another needs its signer_key")
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(signer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
    )
    if basic_constraints:
        builder = builder.add_extension(
            x509.BasicConstraints(ca=ca, path_length=path_length if ca else None),
            critical=True,
        )
    if key_usage:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=key_cert_sign,
                crl_sign=key_cert_sign,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    if subject_key_identifier:
        builder = builder.add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
        )
        if signer is not None:
            builder = builder.add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(
                    _issuer_public_key(signer)
                ),
                critical=False,
            )
    for value, critical in extensions:
        builder = builder.add_extension(value, critical=critical)
    return builder.sign(signer_key, default_hash(signer_key))


def _issuer_public_key(
    certificate: x509.Certificate,
) -> ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | rsa.RSAPublicKey:
    """
    The public key of a certificate that signs (made by L{make_certificate}
    with a key of L{make_private_key}).
    """
    key = certificate.public_key()
    if not isinstance(
        key, ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | rsa.RSAPublicKey
    ):
        raise TypeError(f"a signer with a {type(key).__name__}")
    return key


@dataclass(frozen=True)
class CertificateChain:
    """
    A root, optional intermediates and an issuer, with their keys.

    @ivar root: the self-signed root.
    @ivar intermediates: CA certificates between issuer and root, the one
        nearest the issuer first.
    @ivar issuer: the certificate that signs leaves.
    """

    root: x509.Certificate
    root_key: TestPrivateKey = field(repr=False)
    intermediates: tuple[x509.Certificate, ...]
    intermediate_keys: tuple[TestPrivateKey, ...] = field(repr=False)
    issuer: x509.Certificate
    issuer_key: TestPrivateKey = field(repr=False)

    @property
    def anchors_pem(self) -> bytes:
        """
        The root's PEM, as C{ca.crt}.
        """
        return certificate_pem(self.root)

    def issuer_chain_pem(self, include_root: bool = False) -> bytes:
        """
        The issuer chain's PEM, as C{issuer.crt}: issuer, intermediates and,
        if asked, the root at the end.
        """
        certificates = [self.issuer, *self.intermediates]
        if include_root:
            certificates.append(self.root)
        return certificate_pem(*certificates)

    def issuer_key_pem(
        self, key_format: str = "pkcs8", password: bytes | None = None
    ) -> bytes:
        """
        The issuer key's PEM, as C{issuer.key}; see L{private_key_pem}.
        """
        return private_key_pem(self.issuer_key, key_format, password)

    def load(self, now: datetime = FIXED_NOW) -> TrustBundle:
        """
        Load this chain with L{load_bundle}.

        @return: a L{sentry_tx.ca.bundle.TrustBundle}.
        """
        return load_bundle(
            self.anchors_pem, self.issuer_chain_pem(), self.issuer_key_pem(), now
        )

    def write(self, directory: str, include_root: bool = False) -> tuple[str, ...]:
        """
        Write C{ca.crt}, C{issuer.crt} and C{issuer.key} into C{directory}
        (which must exist).

        @return: the three paths.
        """
        contents = (
            ("ca.crt", self.anchors_pem),
            ("issuer.crt", self.issuer_chain_pem(include_root)),
            ("issuer.key", self.issuer_key_pem()),
        )
        paths: list[str] = []
        for name, data in contents:
            path = os.path.join(directory, name)
            with open(path, "wb") as f:
                f.write(data)
            paths.append(path)
        os.chmod(paths[2], 0o600)
        return tuple(paths)


def make_chain(
    key_type: str = "ecdsa-p256",
    *,
    issuer_key_type: str | None = None,
    intermediates: int = 0,
    not_before: datetime = FIXED_NOW - timedelta(days=30),
    not_after: datetime = FIXED_NOW + CA_TEST_LIFETIME,
    issuer_not_before: datetime | Literal[_Default.DEFAULT] = _DEFAULT,
    issuer_not_after: datetime | Literal[_Default.DEFAULT] = _DEFAULT,
    trust_domain: str = TEST_TRUST_DOMAIN,
    **issuer_options: Unpack[CertificateOptions],
) -> CertificateChain:
    """
    Make a root, C{intermediates} intermediate CAs and an issuer.

    @param key_type: the key type of every certificate (L{KEY_TYPES}).
    @param issuer_key_type: the issuer's key type, if different.
    @param not_before: when the root and intermediates start.
    @param not_after: when the root and intermediates end.
    @param issuer_not_before: when the issuer starts (default C{not_before}).
    @param issuer_not_after: when the issuer ends (default C{not_after}).
    @param issuer_options: more keyword arguments of L{make_certificate} for
        the issuer (C{ca=False}, C{key_cert_sign=False}, ...).
    @return: a L{CertificateChain}.
    """
    root_key = make_private_key(key_type)
    root = make_certificate(
        root_key, trust_domain, not_before=not_before, not_after=not_after
    )
    signer, signer_key = root, root_key
    chain: list[tuple[x509.Certificate, TestPrivateKey]] = []
    for index in range(intermediates):
        key = make_private_key(key_type)
        cert = make_certificate(
            key,
            f"{trust_domain} intermediate {index}",
            signer=signer,
            signer_key=signer_key,
            not_before=not_before,
            not_after=not_after,
        )
        chain.insert(0, (cert, key))
        signer, signer_key = cert, key
    issuer_key = make_private_key(issuer_key_type or key_type)
    issuer_options.setdefault("path_length", 0)
    issuer = make_certificate(
        issuer_key,
        f"spiffe://{trust_domain}/ns/{TEST_NAMESPACE}/dapr-sentry",
        signer=signer,
        signer_key=signer_key,
        not_before=not_before if issuer_not_before is _DEFAULT else issuer_not_before,
        not_after=not_after if issuer_not_after is _DEFAULT else issuer_not_after,
        **issuer_options,
    )
    return CertificateChain(
        root=root,
        root_key=root_key,
        intermediates=tuple(cert for cert, _ in chain),
        intermediate_keys=tuple(key for _, key in chain),
        issuer=issuer,
        issuer_key=issuer_key,
    )


class ChainOptions(CertificateOptions, total=False):
    """
    The keyword arguments of L{make_chain}.
    """

    issuer_key_type: str | None
    intermediates: int
    not_before: datetime
    not_after: datetime
    issuer_not_before: datetime | Literal[_Default.DEFAULT]
    issuer_not_after: datetime | Literal[_Default.DEFAULT]
    trust_domain: str


def make_bundle(
    key_type: str = "ecdsa-p256",
    now: datetime = FIXED_NOW,
    **chain_options: Unpack[ChainOptions],
) -> TrustBundle:
    """
    A loaded L{sentry_tx.ca.bundle.TrustBundle} of a new L{make_chain}.
    """
    return make_chain(key_type, **chain_options).load(now)


def make_csr(
    key: str | TestPrivateKey = "ecdsa-p256",
    label: str = "CERTIFICATE REQUEST",
    corrupt_signature: bool = False,
) -> tuple[TestPrivateKey, bytes]:
    """
    A certificate signing request and the key it is for.

    Its subject and SAN are deliberately unlike what sentry_tx puts in a
    certificate (they must be ignored).

    @param key: a key type of L{KEY_TYPES} (a new key of that type is made)
        or a private key.
    @param label: the PEM label; old sidecars use C{"CERTIFICATE"}.
    @param corrupt_signature: flip a bit of the signature so that it does
        not verify.
    @return: C{(private_key, csr_pem)}.
    """
    if isinstance(key, str):
        key = make_private_key(key)
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ignored")]))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("ignored.example")]),
            critical=False,
        )
        .sign(key, default_hash(key))
    )
    der = csr.public_bytes(serialization.Encoding.DER)
    if corrupt_signature:
        # The signature is the last field of the DER; its last byte is part
        # of the signature value whatever the algorithm.
        der = der[:-1] + bytes([der[-1] ^ 0x01])
    return key, pem_encode(label, der)


def pem_encode(label: str, der: bytes) -> bytes:
    """
    Wrap C{der} in a PEM block labelled C{label}.

    @param label: a C{str}, like C{"CERTIFICATE"}.
    @param der: C{bytes}.
    @return: C{bytes}.
    """
    body = base64.encodebytes(der).replace(b"\n", b"")
    lines = [body[i : i + 64] for i in range(0, len(body), 64)]
    return (
        f"-----BEGIN {label}-----\n".encode("ascii")
        + b"".join(line + b"\n" for line in lines)
        + f"-----END {label}-----\n".encode("ascii")
    )


def public_key_der(key: CertificatePublicKeyTypes) -> bytes:
    """
    The SubjectPublicKeyInfo DER of C{key}'s public key (C{key} is a public
    key), to compare keys by value.
    """
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def flip_bit(data: bytes, at: int, bit: int = 0) -> bytes:
    """
    C{data} with one bit changed: bit C{bit} of the byte at C{at}.
    """
    return data[:at] + bytes([data[at] ^ (1 << bit)]) + data[at + 1 :]


def sign_request(**fields: Any) -> "SignRequest":
    """
    A well-formed L{sentry_tx.identity.caller.SignRequest} for C{myapp} in
    C{default} (default validator, no token, no audiences), with C{fields}
    replaced.
    """
    from sentry_tx.identity.caller import SignRequest

    values: dict[str, Any] = dict(
        id="myapp",
        token="",
        trust_domain="",
        namespace="default",
        csr=make_csr()[1],
        token_validator=0,
    )
    values.update(fields)
    return SignRequest(**values)
