# -*- test-case-name: tests.test_csr -*-
"""
Reading the certificate signing request of a C{SignCertificate} call.

Only the CSR's public key is used (section 7 of the spec): its subject,
SANs and extensions are ignored.  The checks and their messages are Dapr's,
since callers read them:

  - no PEM block, or a block that is neither C{CERTIFICATE REQUEST} nor
    C{CERTIFICATE} (old sidecars use the latter label for a CSR):
    C{invalid certificate signing request};
  - DER that does not parse:
    C{failed to parse certificate signing request: <detail>};
  - a signature that does not verify: C{invalid signature};
  - a key other than ECDSA P-256/P-384/P-521, Ed25519 or RSA of at least
    2048 bits: C{unsupported public key}.

Text before the PEM block (C{#} comments or anything else) is skipped; only
the first block counts.

This runs once per call, so it takes the short way when it can: a request in
the exact shape Go's C{pem.EncodeToMemory} writes (one C{CERTIFICATE
REQUEST} block, base64 lines, nothing around it) is read by
C{load_pem_x509_csr}; anything else (the C{CERTIFICATE} label, comment lines,
and every refusal, so that the messages stay exact) by the bundle module's
PEM reader.  The signature is checked with the public key's C{verify}, which
does what C{is_signature_valid} does without loading the key a second time.
"""

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import SignatureAlgorithmOID

from sentry_tx.ca.pem import PEMBlock, PEMError, iter_pem_blocks
from sentry_tx.ca.x509profile import MIN_RSA_KEY_BITS
from sentry_tx.errors import CSRError

CSR_LABELS = frozenset({"CERTIFICATE REQUEST", "CERTIFICATE"})
"""
The PEM labels a CSR may come under.
"""

SUPPORTED_CURVES = frozenset(
    {ec.SECP256R1.name, ec.SECP384R1.name, ec.SECP521R1.name}
)
"""
The elliptic curves of the ECDSA keys sentry_tx certifies.
"""

INVALID_CSR = "invalid certificate signing request"
PARSE_FAILED_PREFIX = "failed to parse certificate signing request: "
INVALID_SIGNATURE = "invalid signature"
UNSUPPORTED_PUBLIC_KEY = "unsupported public key"


_CANONICAL_BEGIN = b"-----BEGIN CERTIFICATE REQUEST-----\n"
_CANONICAL_END = b"\n-----END CERTIFICATE REQUEST-----\n"
_BASE64_LINES = (
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=\n"
)


def is_canonical_csr_pem(data: bytes) -> bool:
    """
    Whether C{data} is one C{CERTIFICATE REQUEST} block and nothing else:
    the BEGIN line first, the END line last, only base64 and newlines
    between.

    For such a document C{load_pem_x509_csr} and L{_first_block} read the
    same block and the same DER, so the short way cannot accept what the
    long way refuses (a C{NEW CERTIFICATE REQUEST} label, a CSR after some
    other block, base64 with spaces) or read a different CSR.
    """
    return (
        data.startswith(_CANONICAL_BEGIN)
        and data.endswith(_CANONICAL_END)
        and len(data) > len(_CANONICAL_BEGIN) + len(_CANONICAL_END)
        and not data[len(_CANONICAL_BEGIN) : -len(_CANONICAL_END)].translate(
            None, _BASE64_LINES
        )
    )


def _load_csr(data: bytes) -> x509.CertificateSigningRequest:
    """
    The CSR in C{data}.

    @raise CSRError: with Dapr's message, when there is no CSR block or its
        DER does not parse.
    """
    if is_canonical_csr_pem(data):
        try:
            return x509.load_pem_x509_csr(data)
        except Exception:
            # ValueError, InvalidVersion, ...: the long way below says why,
            # with the message callers expect.
            pass
    block = _first_block(data)
    if block is None or block.label not in CSR_LABELS:
        raise CSRError(INVALID_CSR)
    try:
        return x509.load_der_x509_csr(block.der)
    except Exception as e:
        raise CSRError(f"{PARSE_FAILED_PREFIX}{e}") from None


def is_signature_valid(
    csr: x509.CertificateSigningRequest, key: CertificatePublicKeyTypes
) -> bool:
    """
    Whether the CSR's signature verifies with its own public key.

    The answer is C{csr.is_signature_valid}'s: the key must be of the type
    the signature algorithm names (ECDSA, Ed25519, or RSA with PKCS#1 v1.5
    or PSS, as the CSR's algorithm and parameters say), and C{verify} is
    called as cryptography itself calls it, but with C{key} already loaded.
    Any other pairing (DSA, Ed448, an ECDSA key under an RSA algorithm) is
    left to C{is_signature_valid}.

    @param csr: an L{x509.CertificateSigningRequest}.
    @param key: C{csr.public_key()}.
    @return: L{bool}.
    """
    try:
        parameters = csr.signature_algorithm_parameters
        if isinstance(key, ec.EllipticCurvePublicKey):
            if isinstance(parameters, ec.ECDSA):
                key.verify(csr.signature, csr.tbs_certrequest_bytes, parameters)
                return True
        elif isinstance(key, ed25519.Ed25519PublicKey):
            if csr.signature_algorithm_oid == SignatureAlgorithmOID.ED25519:
                key.verify(csr.signature, csr.tbs_certrequest_bytes)
                return True
        elif isinstance(key, rsa.RSAPublicKey):
            hash_algorithm = csr.signature_hash_algorithm
            if (
                isinstance(parameters, (padding.PKCS1v15, padding.PSS))
                and hash_algorithm is not None
            ):
                key.verify(
                    csr.signature,
                    csr.tbs_certrequest_bytes,
                    parameters,
                    hash_algorithm,
                )
                return True
    except InvalidSignature:
        return False
    except Exception:
        # Parameters cryptography cannot read, or a key that cannot verify
        # with them: the slow check below decides, as it always did.
        pass
    try:
        return csr.is_signature_valid
    except Exception:
        return False


def _first_block(data: bytes) -> PEMBlock | None:
    """
    The first PEM block of C{data}, or L{None} if there is no well-formed one.
    """
    try:
        return next(iter_pem_blocks(data, strict=False), None)
    except PEMError:
        return None


def is_supported_public_key(key: CertificatePublicKeyTypes) -> bool:
    """
    Whether sentry_tx certifies C{key}: ECDSA on P-256, P-384 or P-521,
    Ed25519, or RSA of at least L{MIN_RSA_KEY_BITS} bits.

    @param key: a public key object from C{cryptography}.
    @return: L{bool}.
    """
    if isinstance(key, ec.EllipticCurvePublicKey):
        return key.curve.name in SUPPORTED_CURVES
    if isinstance(key, ed25519.Ed25519PublicKey):
        return True
    if isinstance(key, rsa.RSAPublicKey):
        return key.key_size >= MIN_RSA_KEY_BITS
    return False


def parse_csr(data: object) -> CertificatePublicKeyTypes:
    """
    Parse and check a PEM certificate signing request.

    Whatever C{data} holds, the only exception this raises is L{CSRError}.

    @param data: the request's C{certificate_signing_request}, C{bytes}.
    @return: the CSR's public key.
    @raise CSRError: with the message to send to the caller.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise CSRError(INVALID_CSR)
    csr = _load_csr(bytes(data))
    try:
        key = csr.public_key()
    except Exception:
        # A key cryptography cannot even load (an unknown algorithm, an
        # exotic curve): there is nothing to verify the signature with.
        raise CSRError(UNSUPPORTED_PUBLIC_KEY) from None
    if not is_signature_valid(csr, key):
        raise CSRError(INVALID_SIGNATURE)
    if not is_supported_public_key(key):
        raise CSRError(UNSUPPORTED_PUBLIC_KEY)
    return key
