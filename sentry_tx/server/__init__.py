# -*- test-case-name: tests.test_servicer,tests.test_grpc,tests.test_workers -*-
"""
Serving SignCertificate over gRPC: the servicer, the grpc.aio server on its
own loop thread, the server's TLS, and the serving copies that share its
port (their supervision and liveness check).
"""
