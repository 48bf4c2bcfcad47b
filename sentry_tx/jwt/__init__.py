"""
JWT-SVIDs (SPEC section 11): the signing material (L{material}), where it is
kept (L{store}, L{kubernetes_store}), minting tokens into SignCertificate
responses (L{minting}) and the OIDC discovery server (L{oidc}).

JOSE work goes through joserfc (see README, "JWT-SVIDs and OIDC"); nothing
here encodes or verifies a JWS by hand.
"""

# Light constants, read by sentry_tx.options (which must not import cryptography).

JWT_SIGNING_ALGORITHMS = (
    "RS256",
    "RS384",
    "RS512",
    "PS256",
    "PS384",
    "PS512",
    "ES256",
    "ES384",
    "ES512",
    "EdDSA",
)
"""
The algorithms C{--jwt-signing-algorithm} takes, as Dapr's.
"""
