# -*- test-case-name: tests.test_jwt,tests.test_jwt_flags -*-
"""
The JWS algorithms JWT-SVIDs may be signed with: light constants, read by
L{sentry_tx.options}, which must not import cryptography.
"""


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
