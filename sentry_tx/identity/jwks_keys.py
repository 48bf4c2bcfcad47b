# -*- test-case-name: tests.test_jwks -*-
"""
A JSON Web Key Set's usable keys (L{KeySet}, L{key_set_from_json}) and the
check of a caller's token against them (L{verify_token}), for the JWKS
validator (L{sentry_tx.identity.jwks}).  Pure functions of their input and
C{now}; verification is joserfc's.
"""

import json
from dataclasses import dataclass, field

from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import JWKRegistry

from sentry_tx.errors import ValidationError

TOKEN_LEEWAY_SECONDS = 300
MAX_JWKS_BYTES = 1024 * 1024

VALIDATION_FAILED = "token validation failed"

_RSA_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
_EC_ALGORITHMS = {"P-256": ("ES256",), "P-384": ("ES384",), "P-521": ("ES512",)}
_OKP_ALGORITHMS = {"Ed25519": ("EdDSA",)}
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
    """

    keys: dict = field(repr=False)
    raw: bytes = field(repr=False)


def _algorithms_for(member):
    kty = member.get("kty")
    if kty == "RSA":
        allowed = _RSA_ALGORITHMS
    elif kty == "EC":
        allowed = _EC_ALGORITHMS.get(member.get("crv"), ())
    elif kty == "OKP":
        allowed = _OKP_ALGORITHMS.get(member.get("crv"), ())
    else:
        return ()
    alg = member.get("alg")
    if alg is None:
        return allowed
    return (alg,) if alg in allowed else ()


def key_set_from_json(data):
    """
    Parse a JWKS into a L{KeySet}.  Keys without a C{kid}, with a C{use}
    other than C{sig}, symmetric keys and keys whose C{alg} does not fit
    their type are left out.

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
    keys = {}
    for member in members:
        if not isinstance(member, dict):
            continue
        kid = member.get("kid")
        algorithms = _algorithms_for(member)
        if not isinstance(kid, str) or not algorithms or member.get("use", "sig") != "sig":
            continue
        public = {k: v for k, v in member.items() if k not in ("d", "p", "q", "dp", "dq", "qi", "oth")}
        try:
            key = JWKRegistry.import_key(public)
        except (JoseError, ValueError, TypeError, KeyError):
            continue
        keys[kid] = (key, algorithms)
    if not keys:
        raise ValueError("the JWKS holds no usable signing key")
    return KeySet(keys=keys, raw=bytes(data))


class UnknownKeyID(Exception):
    """
    The token names a C{kid} the key set does not hold.
    """

    def __init__(self, kid):
        super().__init__(kid)
        self.kid = kid


def verify_token(token, key_set, sentry_audience, subject, now_seconds):
    """
    Verify C{token} against C{key_set}.

    @return: None.
    @raise UnknownKeyID: when the token's C{kid} is not in the set.
    @raise ValidationError: "token validation failed: <why>".
    """

    def key_for(signature):
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
    except (ValueError, TypeError, UnicodeDecodeError) as e:
        raise ValidationError(f"{VALIDATION_FAILED}: malformed token ({type(e).__name__})") from None


def _describe(error):
    text = getattr(error, "description", None) or str(error) or type(error).__name__
    return f"{getattr(error, 'error', type(error).__name__)}: {text}"
