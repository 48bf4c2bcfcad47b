# -*- test-case-name: tests.test_bundle,tests.test_csr,tests.test_store -*-
"""
The certificate authority's own material and work: the trust bundle (loaded,
generated, verified), where it is kept (files, Kubernetes Secret), the CSR
checks, and the X.509 profile every issued certificate follows.
"""
