# -*- test-case-name: tests.test_jwt,tests.test_jwt_kube,tests.test_oidc -*-
"""
The JWT signing material: a private key (C{jwt.key}) and the JSON Web Key
Set that publishes its public half (C{jwks.json}).

L{load_jwt_material} applies Dapr's start checks (the JWKS parses, holds
keys, holds the public key of C{jwt.key} by C{--jwt-key-id} or by content,
and the signing algorithm fits the key) and returns one immutable
L{JWTMaterial}; L{generate_jwt_material} makes a new RSA-2048 pair as Dapr
does.  Pure functions of bytes: the stores read and write the files.
"""

import base64
import json
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, JWKRegistry, Key, OKPKey, RSAKey

from sentry_tx.errors import BundleError
from sentry_tx.jwt.algorithms import JWT_SIGNING_ALGORITHMS

DEFAULT_JWT_SIGNING_ALGORITHM = "RS256"
GENERATED_RSA_KEY_BITS = 2048
GENERATED_RSA_PUBLIC_EXPONENT = 65537

RSA_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
EC_ALGORITHMS = {"ES256": "secp256r1", "ES384": "secp384r1", "ES512": "secp521r1"}
EDDSA_ALGORITHM = "EdDSA"
SIGNING_ALGORITHMS = JWT_SIGNING_ALGORITHMS

MAX_JWKS_KEYS = 100
"""
The most keys a JWKS may hold; more is surely not a key set of ours.
"""

SigningKey = RSAKey | ECKey | OKPKey
"""
The joserfc keys JWT-SVIDs are signed with.
"""

_PRIVATE_JWK_MEMBERS = frozenset(("d", "p", "q", "dp", "dq", "qi", "oth", "k"))


@dataclass(frozen=True)
class JWTMaterial:
    """
    Verified JWT signing material.

    @ivar signing_key: the joserfc private key tokens are signed with.
    @ivar key_id: the C{kid} written in every token's header.
    @ivar algorithm: the JWS algorithm (C{RS256} ...).
    @ivar jwks_json: the JWKS exactly as stored (served by the OIDC server).
    @ivar key_pem: the private key's PEM as stored; never shown.
    """

    signing_key: SigningKey = field(repr=False)
    key_id: str
    algorithm: str
    jwks_json: bytes = field(repr=False)
    key_pem: bytes = field(repr=False)


def thumbprint_key_id(key: Key) -> str:
    """
    Dapr's default C{kid}: the RFC 7638 SHA-256 thumbprint of C{key}, in
    standard base64 with padding.

    @param key: a joserfc key (private or public).
    @rtype: L{str}
    """
    digest = base64.urlsafe_b64decode(key.thumbprint() + "==")
    return base64.b64encode(digest).decode("ascii")


def _key_type_name(key: PrivateKeyTypes) -> str:
    if isinstance(key, rsa.RSAPrivateKey):
        return "an RSA key"
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return f"an ECDSA {key.curve.name} key"
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "an Ed25519 key"
    return f"a {type(key).__name__}"


def algorithm_problem(private_key: PrivateKeyTypes, algorithm: str) -> str | None:
    """
    Why C{algorithm} cannot sign with C{private_key} (a cryptography key),
    in Dapr's words, or None when it can.
    """
    if algorithm in RSA_ALGORITHMS:
        if not isinstance(private_key, rsa.RSAPrivateKey):
            return (
                f"RSA algorithm {algorithm} requires an RSA key, but got"
                f" {_key_type_name(private_key)}"
            )
        return None
    if algorithm in EC_ALGORITHMS:
        if not isinstance(private_key, ec.EllipticCurvePrivateKey):
            return (
                f"ECDSA algorithm {algorithm} requires an ECDSA key, but got"
                f" {_key_type_name(private_key)}"
            )
        if private_key.curve.name != EC_ALGORITHMS[algorithm]:
            return (
                f"{algorithm} requires a {EC_ALGORITHMS[algorithm]} curve, got"
                f" {private_key.curve.name}"
            )
        return None
    if algorithm == EDDSA_ALGORITHM:
        if not isinstance(private_key, ed25519.Ed25519PrivateKey):
            return (
                "EdDSA algorithm requires an Ed25519 key, but got"
                f" {_key_type_name(private_key)}"
            )
        return None
    return f"unsupported signature algorithm: {algorithm}"


def _joserfc_key(private_key: PrivateKeyTypes) -> SigningKey | None:
    if isinstance(private_key, rsa.RSAPrivateKey):
        return RSAKey.import_key(private_key)
    if isinstance(private_key, ec.EllipticCurvePrivateKey):
        return ECKey.import_key(private_key)
    if isinstance(private_key, ed25519.Ed25519PrivateKey):
        return OKPKey.import_key(private_key)
    return None


def parse_jwks(jwks_bytes: bytes, source: str) -> list[tuple[dict[str, Any], Key]]:
    """
    Parse a JWKS document into joserfc keys.

    @param jwks_bytes: the JSON text.
    @param source: the file or Secret key it came from, for errors.
    @return: a list of C{(member dict, joserfc key)}, in document order;
        keys whose C{use} is not C{sig} are left out.
    @raise BundleError: naming C{source} when it is not a JWKS, is empty,
        or holds private key material.
    """
    try:
        document = json.loads(jwks_bytes)
    except (ValueError, UnicodeDecodeError) as e:
        raise BundleError(source, f"failed to parse JWKS: not JSON: {e}") from None
    keys = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(keys, list):
        raise BundleError(
            source, "failed to parse JWKS: expected an object with a 'keys' list"
        )
    if not keys:
        raise BundleError(source, "JWKS doesn't contain any keys")
    if len(keys) > MAX_JWKS_KEYS:
        raise BundleError(
            source, f"JWKS holds {len(keys)} keys; at most {MAX_JWKS_KEYS} are read"
        )
    parsed: list[tuple[dict[str, Any], Key]] = []
    for index, member in enumerate(keys):
        if not isinstance(member, dict):
            raise BundleError(
                source, f"failed to parse JWKS: key {index} is not an object"
            )
        if member.get("use", "sig") != "sig":
            continue
        private = sorted(_PRIVATE_JWK_MEMBERS.intersection(member))
        if private:
            raise BundleError(
                source,
                f"JWKS key {index} holds private or secret key material"
                f" ({', '.join(private)}); a JWKS is published and must hold"
                " public keys only",
            )
        try:
            key = JWKRegistry.import_key(member)
        except (JoseError, ValueError, TypeError, KeyError) as e:
            raise BundleError(
                source, f"failed to parse JWKS: key {index}: {e}"
            ) from None
        parsed.append((member, key))
    return parsed


def load_jwt_material(
    key_pem: bytes,
    jwks_bytes: bytes,
    algorithm: str,
    key_id: str | None,
    sources: tuple[str, str],
) -> JWTMaterial:
    """
    Verify a JWT key and its JWKS as Dapr does at start.

    @param key_pem: the private key (PEM: PKCS#8, PKCS#1 or SEC1).
    @param jwks_bytes: the JWKS JSON.
    @param algorithm: C{--jwt-signing-algorithm}.
    @param key_id: C{--jwt-key-id}, or None.
    @param sources: C{(key source, jwks source)}, the file paths or Secret
        keys named in errors.
    @return: a L{JWTMaterial}.
    @raise BundleError: naming the source at fault and what is wrong.
    """
    key_source, jwks_source = sources
    try:
        private_key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as e:
        raise BundleError(
            key_source, f"failed to decode JWT signing key: {e}"
        ) from None
    signing_key = _joserfc_key(private_key)
    if signing_key is None:
        raise BundleError(
            key_source,
            f"failed to decode JWT signing key: {_key_type_name(private_key)}"
            " cannot sign JWTs (use RSA, ECDSA P-256/384/521 or Ed25519)",
        )
    problem = algorithm_problem(private_key, algorithm)
    if problem is not None:
        raise BundleError(
            key_source,
            f"JWT signing key is incompatible with algorithm {algorithm}: {problem}",
        )
    own_thumbprint = signing_key.thumbprint()
    found = False
    key_id_found = False
    matched_kid = None
    for member, key in parse_jwks(jwks_bytes, jwks_source):
        matches = key.thumbprint() == own_thumbprint
        if key_id is not None:
            if member.get("kid") != key_id:
                continue
            key_id_found = True
        if matches:
            found = True
            matched_kid = member.get("kid")
            break
    if not found:
        if key_id is not None and not key_id_found:
            problem = f"JWKS doesn't contain a key with user-provided key ID {key_id!r}"
        elif key_id is not None:
            problem = (
                f"JWKS contains a key with user-provided key ID {key_id!r} but the"
                " key content doesn't match the signing key"
            )
        else:
            problem = (
                "JWKS doesn't contain a matching public key for the JWT signing key"
            )
        raise BundleError(jwks_source, f"failed to verify JWKS: {problem}")
    return JWTMaterial(
        signing_key=signing_key,
        key_id=_signing_key_id(key_id, matched_kid, signing_key),
        algorithm=algorithm,
        jwks_json=bytes(jwks_bytes),
        key_pem=bytes(key_pem),
    )


def _signing_key_id(
    key_id: str | None, matched_kid: object, signing_key: SigningKey
) -> str:
    """
    The kid tokens are signed with: C{--jwt-key-id}; else the kid of the
    JWKS key that holds the signing key (so that relying parties find it
    there; Dapr would use the thumbprint even then); else the thumbprint.
    """
    if key_id is not None:
        return key_id
    if isinstance(matched_kid, str) and matched_kid:
        return matched_kid
    return thumbprint_key_id(signing_key)


def generate_jwt_material(
    algorithm: str = DEFAULT_JWT_SIGNING_ALGORITHM, key_id: str | None = None
) -> tuple[bytes, bytes]:
    """
    A new RSA-2048 key and its JWKS, as Dapr generates them.

    @param algorithm: the JWKS key's C{alg}; an RSA algorithm.
    @param key_id: the JWKS key's C{kid}; None for the thumbprint.

    @return: C{(key_pem, jwks_json)}: the PKCS#8 PEM and the JWKS bytes
        (one key with C{kty}, C{n}, C{e}, C{kid}, C{alg} C{RS256} and
        C{use} C{sig}).
    @raise ValueError: when C{algorithm} is not an RSA algorithm.
    """
    if algorithm not in RSA_ALGORITHMS:
        raise ValueError(f"generated JWT keys are RSA keys; {algorithm} needs another")
    private_key = rsa.generate_private_key(
        public_exponent=GENERATED_RSA_PUBLIC_EXPONENT, key_size=GENERATED_RSA_KEY_BITS
    )
    key_pem = private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    key = RSAKey.import_key(private_key)
    public = key.as_dict(private=False)
    member = {
        "kty": "RSA",
        "n": public["n"],
        "e": public["e"],
        "kid": key_id if key_id is not None else thumbprint_key_id(key),
        "alg": algorithm,
        "use": "sig",
    }
    jwks_json = json.dumps({"keys": [member]}, separators=(",", ":")).encode("ascii")
    return key_pem, jwks_json
