# -*- test-case-name: tests.test_jwt,tests.test_jwks,tests.test_jwt_kube -*-
"""
Public JWKs and their RFC 7638 thumbprints made independently of sentry_tx's
own code (with PyJWT, the C{test} extra, and with RFC 7638 directly), so
that no test only checks the code against itself; and a few RSA keys made
once per test run.

Moved here from C{tests.test_jwt} so that the JWT, JWKS and process tests
share them without importing one another.
"""

from __future__ import annotations

import base64
import hashlib
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

SigningKey = (
    rsa.RSAPrivateKey
    | ec.EllipticCurvePrivateKey
    | ed25519.Ed25519PrivateKey
    | ed448.Ed448PrivateKey
)
"""
The private keys L{jwk_member} describes: a JWT signing key's types.
"""


def _b64url_uint(number: int) -> str:
    data = number.to_bytes((number.bit_length() + 7) // 8, "big")
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def rfc7638_kid(public_key: rsa.RSAPublicKey) -> str:
    """
    Dapr's kid for an RSA public key, computed from RFC 7638 directly:
    standard padded base64 of SHA-256 over the canonical JSON of e, kty, n.
    """
    numbers = public_key.public_numbers()
    canonical = (
        f'{{"e":"{_b64url_uint(numbers.e)}","kty":"RSA",'
        f'"n":"{_b64url_uint(numbers.n)}"}}'
    ).encode("ascii")
    return base64.b64encode(hashlib.sha256(canonical).digest()).decode("ascii")


def jwk_member(private_key: SigningKey, **extra: Any) -> dict[str, Any]:
    """
    The public JWK of C{private_key}, made with PyJWT.
    """
    import jwt as pyjwt

    member: dict[str, Any]
    if isinstance(private_key, rsa.RSAPrivateKey):
        member = pyjwt.algorithms.RSAAlgorithm.to_jwk(
            private_key.public_key(), as_dict=True
        )
    elif isinstance(private_key, ec.EllipticCurvePrivateKey):
        member = pyjwt.algorithms.ECAlgorithm.to_jwk(
            private_key.public_key(), as_dict=True
        )
    else:
        member = pyjwt.algorithms.OKPAlgorithm.to_jwk(
            private_key.public_key(), as_dict=True
        )
    member.update(extra)
    return member


_RSA_KEYS: list[rsa.RSAPrivateKey] = []


def rsa_key(index: int = 0) -> rsa.RSAPrivateKey:
    """
    One of a few RSA-2048 keys made once for the whole test run.
    """
    while len(_RSA_KEYS) <= index:
        _RSA_KEYS.append(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    return _RSA_KEYS[index]
