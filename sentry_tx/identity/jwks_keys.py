# -*- test-case-name: tests.test_jwks -*-
"""
A JSON Web Key Set's usable keys (L{KeySet}, L{key_set_from_json}) and the
check of a caller's token against them (L{verify_token}), for the JWKS
validator (L{sentry_tx.identity.jwks}).  Pure functions of their input and
C{now}; verification is joserfc's.
"""

import base64
import binascii
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import GuestProtocol, JWKRegistry, Key

from sentry_tx.errors import ValidationError

TOKEN_LEEWAY_SECONDS = 300
MAX_TOKEN_LIFETIME_SECONDS = 24 * 3600
"""
The longest lifetime a token may have: C{exp - iat}, or C{exp - now} when it
has no C{iat} (then the issuer's clock may run ahead by
L{TOKEN_LEEWAY_SECONDS}).  Dapr's sidecars ask for 24 h or less; a token
valid for a year is a stolen-token risk, not a workload.
"""
MIN_RSA_KEY_BITS = 2048
"""
RSA keys of a key set with a shorter modulus are left out of it (with a
warning); the rest of the set stays usable.
"""
MAX_JWKS_BYTES = 1024 * 1024

VALIDATION_FAILED = "token validation failed"

_RSA_ALGORITHMS: tuple[str, ...] = (
    "RS256",
    "RS384",
    "RS512",
    "PS256",
    "PS384",
    "PS512",
)
_EC_ALGORITHMS: dict[str, tuple[str, ...]] = {
    "P-256": ("ES256",),
    "P-384": ("ES384",),
    "P-521": ("ES512",),
}
_OKP_ALGORITHMS: dict[str, tuple[str, ...]] = {"Ed25519": ("EdDSA",)}
ASYMMETRIC_ALGORITHMS = (
    _RSA_ALGORITHMS
    + tuple(a for each in _EC_ALGORITHMS.values() for a in each)
    + ("EdDSA",)
)
"""
Every algorithm a token may use; HMAC and C{none} are never among them.
"""


@dataclass(frozen=True)
class KeySet:
    """
    A verified, immutable key set: the usable keys by C{kid}.

    @ivar keys: C{kid} to C{(joserfc key, allowed algorithms)}.
    @ivar raw: the JSON it came from.
    @ivar weak_kids: the C{kid}s of RSA keys left out for being shorter
        than L{MIN_RSA_KEY_BITS}.
    """

    keys: dict[str, tuple[Key, tuple[str, ...]]] = field(repr=False)
    raw: bytes = field(repr=False)
    weak_kids: tuple[str, ...] = ()


def _algorithms_for(member: Mapping[str, Any]) -> tuple[str, ...]:
    kty = member.get("kty")
    # A curve that is not a string (a list from the key server) fits none.
    crv = member.get("crv")
    curve = crv if isinstance(crv, str) else ""
    if kty == "RSA":
        allowed = _RSA_ALGORITHMS
    elif kty == "EC":
        allowed = _EC_ALGORITHMS.get(curve, ())
    elif kty == "OKP":
        allowed = _OKP_ALGORITHMS.get(curve, ())
    else:
        return ()
    alg = member.get("alg")
    if alg is None:
        return allowed
    return (alg,) if alg in allowed else ()


def _rsa_modulus_bits(member: Mapping[str, Any]) -> int:
    """
    The length in bits of an RSA JWK's modulus C{n} (0 when it is not
    base64url), read before joserfc imports the key (which would warn
    about a short one on its own).
    """
    n = member.get("n")
    if not isinstance(n, str):
        return 0
    try:
        modulus = base64.urlsafe_b64decode(n + "=" * (-len(n) % 4))
    except (binascii.Error, ValueError):
        return 0
    return int.from_bytes(modulus, "big").bit_length()


def key_set_from_json(data: bytes) -> KeySet:
    """
    Parse a JWKS into a L{KeySet}.  Keys without a C{kid}, with a C{use}
    other than C{sig}, symmetric keys, keys whose C{alg} does not fit
    their type and RSA keys under L{MIN_RSA_KEY_BITS} are left out.

    @param data: the JSON bytes.
    @raise ValueError: when C{data} is not a JWKS or holds no usable key.
    """
    if len(data) > MAX_JWKS_BYTES:
        raise ValueError(f"the JWKS is larger than {MAX_JWKS_BYTES} bytes")
    try:
        document = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"failed to parse JWKS: {e}") from None
    members = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(members, list):
        raise ValueError("failed to parse JWKS: expected an object with a 'keys' list")
    keys: dict[str, tuple[Key, tuple[str, ...]]] = {}
    weak_kids: list[str] = []
    for member in members:
        if not isinstance(member, dict):
            continue
        kid = member.get("kid")
        algorithms = _algorithms_for(member)
        if (
            not isinstance(kid, str)
            or not algorithms
            or member.get("use", "sig") != "sig"
        ):
            continue
        if member.get("kty") == "RSA" and _rsa_modulus_bits(member) < MIN_RSA_KEY_BITS:
            weak_kids.append(kid)
            continue
        public = {
            k: v
            for k, v in member.items()
            if k not in ("d", "p", "q", "dp", "dq", "qi", "oth")
        }
        try:
            key = JWKRegistry.import_key(public)
        except (JoseError, ValueError, TypeError, KeyError):
            continue
        keys[kid] = (key, algorithms)
    if not keys:
        weak = (
            f" ({len(weak_kids)} RSA keys under {MIN_RSA_KEY_BITS} bits left out)"
            if weak_kids
            else ""
        )
        raise ValueError(f"the JWKS holds no usable signing key{weak}")
    return KeySet(keys=keys, raw=bytes(data), weak_kids=tuple(weak_kids))


class UnknownKeyID(Exception):
    """
    The token names a C{kid} the key set does not hold.
    """

    def __init__(self, kid: str) -> None:
        super().__init__(kid)
        self.kid = kid


def verify_token(
    token: str | bytes,
    key_set: KeySet,
    sentry_audience: str,
    subject: str,
    now_seconds: float,
) -> None:
    """
    Verify C{token} against C{key_set}.

    @return: None.
    @raise UnknownKeyID: when the token's C{kid} is not in the set.
    @raise ValidationError: "token validation failed: <why>".
    """

    def key_for(signature: GuestProtocol) -> Key:
        header = signature.headers()
        kid = header.get("kid")
        if not isinstance(kid, str):
            raise ValidationError(f"{VALIDATION_FAILED}: the token has no kid")
        entry = key_set.keys.get(kid)
        if entry is None:
            raise UnknownKeyID(kid)
        key, algorithms = entry
        if header.get("alg") not in algorithms:
            raise ValidationError(
                f"{VALIDATION_FAILED}: algorithm {header.get('alg')!r} does not"
                f" fit key {kid!r}"
            )
        return key

    try:
        decoded = jwt.decode(token, key_for, algorithms=ASYMMETRIC_ALGORITHMS)
        registry = jwt.JWTClaimsRegistry(
            now=int(now_seconds),
            leeway=TOKEN_LEEWAY_SECONDS,
            aud={"essential": True, "value": sentry_audience},
            sub={"essential": True, "value": subject},
            exp={"essential": True},
        )
        registry.validate(decoded.claims)
    except (ValidationError, UnknownKeyID):
        raise
    except JoseError as e:
        raise ValidationError(f"{VALIDATION_FAILED}: {_describe(e)}") from None
    except Exception as e:
        # The token is the caller's: whatever the parser raises on it
        # (RecursionError for JSON nested thousands deep, ValueError,
        # TypeError ...) is a refusal, not an error of ours.
        raise ValidationError(
            f"{VALIDATION_FAILED}: malformed token ({type(e).__name__})"
        ) from None
    _check_lifetime(decoded.claims, now_seconds)


def _check_lifetime(claims: Mapping[str, Any], now_seconds: float) -> None:
    """
    Refuse a token living longer than L{MAX_TOKEN_LIFETIME_SECONDS} (see
    there); C{exp}, and C{iat} when present, are numbers by now.
    """
    exp = claims["exp"]
    iat = claims.get("iat")
    if iat is not None:
        lifetime, basis, allowed = exp - iat, "exp - iat", MAX_TOKEN_LIFETIME_SECONDS
    else:
        lifetime, basis = exp - now_seconds, "exp - now"
        allowed = MAX_TOKEN_LIFETIME_SECONDS + TOKEN_LEEWAY_SECONDS
    if lifetime > allowed:
        raise ValidationError(
            f"{VALIDATION_FAILED}: the token's lifetime ({basis}) is longer than"
            f" the {MAX_TOKEN_LIFETIME_SECONDS} s allowed"
        )


def _describe(error: Exception) -> str:
    text = getattr(error, "description", None) or str(error) or type(error).__name__
    return f"{getattr(error, 'error', type(error).__name__)}: {text}"
