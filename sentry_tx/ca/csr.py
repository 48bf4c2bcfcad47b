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
"""

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from sentry_tx.ca.bundle import PEMError, iter_pem_blocks
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


def _first_block(data):
    """
    The first PEM block of C{data}, or L{None} if there is no well-formed one.
    """
    try:
        return next(iter_pem_blocks(data, strict=False), None)
    except PEMError:
        return None


def is_supported_public_key(key):
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


def parse_csr(data):
    """
    Parse and check a PEM certificate signing request.

    Whatever C{data} holds, the only exception this raises is L{CSRError}.

    @param data: the request's C{certificate_signing_request}, C{bytes}.
    @return: the CSR's public key.
    @raise CSRError: with the message to send to the caller.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise CSRError(INVALID_CSR)
    block = _first_block(bytes(data))
    if block is None or block.label not in CSR_LABELS:
        raise CSRError(INVALID_CSR)
    try:
        csr = x509.load_der_x509_csr(block.der)
    except Exception as e:
        raise CSRError(f"{PARSE_FAILED_PREFIX}{e}") from None
    try:
        key = csr.public_key()
    except Exception:
        # A key cryptography cannot even load (an unknown algorithm, an
        # exotic curve): there is nothing to verify the signature with.
        raise CSRError(UNSUPPORTED_PUBLIC_KEY) from None
    try:
        signature_valid = csr.is_signature_valid
    except Exception:
        signature_valid = False
    if not signature_valid:
        raise CSRError(INVALID_SIGNATURE)
    if not is_supported_public_key(key):
        raise CSRError(UNSUPPORTED_PUBLIC_KEY)
    return key
