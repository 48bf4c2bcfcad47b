"""
JWT-SVIDs checked as a relying party checks them: with PyJWT (the C{test}
extra), independently of joserfc, which sentry_tx signs with.
"""


def verified_claims(jwks_json, token, audience, issuer=None, algorithms=("RS256",)):
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
    options = {} if issuer is None else {"issuer": issuer}
    return jwt.decode(
        token, key_set[kid].key, algorithms=list(algorithms), audience=audience, **options
    )
