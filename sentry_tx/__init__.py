# -*- test-case-name: tests.test_architecture -*-
"""
sentry_tx: the Dapr certificate authority (Sentry) as a Twisted service.
"""

__version__ = "0.1.0"
