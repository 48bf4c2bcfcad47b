# -*- test-case-name: tests.test_identity,tests.test_kube_validator,tests.test_jwks -*-
"""
Who is calling: the request as validators see it and the identity they prove
(L{caller}), the validators themselves (L{insecure}, L{kubernetes}, L{jwks}),
and the rules every one applies (L{rules}).
"""
