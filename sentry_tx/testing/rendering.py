# -*- test-case-name: tests.test_web,tests.test_monitoring -*-
"""
A web resource's answer to one GET, through treq's in-memory HTTP
(L{treq.testing.StubTreq}): no socket, no reactor.

Moved here from C{tests.test_web} so that the tests of every resource
(healthz, metrics, JWKS, monitoring) share it without importing one
another.
"""

from __future__ import annotations

from typing import Any

from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.web.resource import IResource


def render(root: IResource, path: bytes) -> tuple[int, bytes]:
    """
    GET C{path} of C{root} through treq's in-memory HTTP: (status, body).
    """
    # StubTreq copies treq's request functions onto itself at run time,
    # out of the type checker's sight.
    stub: Any = StubTreq(root)
    d = stub.get("http://sentry.test" + path.decode())
    stub.flush()
    response = _result(d)
    body = stub.content(response)
    stub.flush()
    code: int = response.code
    content: bytes = _result(body)
    return code, content


def _result(d: Deferred[Any]) -> Any:
    """
    The result a flushed Deferred already has; its failure raised.
    """
    results: list[Any] = []
    d.addBoth(results.append)
    [result] = results
    if isinstance(result, Failure):
        result.raiseException()
    return result
