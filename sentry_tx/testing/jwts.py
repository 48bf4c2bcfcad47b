"""
JWT-SVIDs checked as a relying party checks them: with PyJWT (the C{test}
extra), independently of joserfc, which sentry_tx signs with.
"""

from collections.abc import Sequence
from typing import Any


def verified_claims(
    jwks_json: bytes | str,
    token: str,
    audience: str | Sequence[str] | None,
    issuer: str | None = None,
    algorithms: Sequence[str] = ("RS256",),
) -> dict[str, Any]:
    """
    The claims of C{token}, verified with the key of the JWKS C{jwks_json}
    that its header's C{kid} names.

    @param jwks_json: the JWKS (L{bytes} or L{str}), as sentry_tx publishes it.
    @raise jwt.InvalidTokenError: when the token does not verify.
    """
    import jwt

    if isinstance(jwks_json, bytes):
        jwks_json = jwks_json.decode()
    key_set = jwt.PyJWKSet.from_json(jwks_json)
    kid = jwt.get_unverified_header(token)["kid"]
    claims: dict[str, Any] = jwt.decode(
        token,
        key_set[kid].key,
        algorithms=list(algorithms),
        audience=audience,
        issuer=issuer,
    )
    return claims
