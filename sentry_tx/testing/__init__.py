"""
Test support shipped with sentry_tx, as Twisted ships
C{twisted.internet.testing}: certificate factories, clocks, verified fakes of
sentry_tx's interfaces (checked by C{tests/test_testing.py}), a fake
Kubernetes API server and misbehaving HTTP/2 clients, for sentry_tx's tests,
its benchmarks and users' own tests.  Nothing here is used in production.
"""
