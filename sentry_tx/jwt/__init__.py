# -*- test-case-name: tests.test_jwt,tests.test_oidc,tests.test_jwt_kube -*-
"""
JWT-SVIDs (SPEC section 11): the algorithms they may be signed with
(L{algorithms}), the signing material (L{material}), where it is kept
(L{store}, L{kubernetes_store}), minting tokens into SignCertificate
responses (L{minting}) and the OIDC discovery server (L{oidc}).

JOSE work goes through joserfc (see README, "JWT-SVIDs and OIDC"); nothing
here encodes or verifies a JWS by hand.
"""
