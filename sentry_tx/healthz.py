# -*- test-case-name: tests.test_healthcheck,tests.test_http_listener -*-
"""
The health endpoint: C{GET /healthz} answers 503 until the authority is ready
(bundle loaded, gRPC listening) and every other readiness source is too (for
example a validator's cache or key set), then 200.  Other paths are 404.
"""

from collections.abc import Callable
from typing import Protocol

from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, NoResource, Resource

HEALTHY = b"ok\n"
UNHEALTHY = b"not ready\n"


class ReadinessSource(Protocol):
    """
    What healthz reads of a readiness source: whether it is ready now.
    """

    @property
    def ready(self) -> bool:
        """
        True once the source can serve.
        """


class HealthzResource(Resource):
    """
    Reports the readiness of an L{ICertificateAuthority} and of any other
    sources: objects with a boolean C{ready} attribute, read at each probe.
    """

    def __init__(
        self,
        authority: ReadinessSource,
        *sources: ReadinessSource,
        detail: Callable[[], str] | None = None,
    ) -> None:
        super().__init__()
        self._sources = (authority, *sources)
        self._detail = detail

    def getChild(self, path: bytes, request: IRequest) -> IResource:
        # /healthz/ is /healthz; anything below it does not exist.
        if path == b"":
            return self
        return NoResource()

    def render_GET(self, request: IRequest) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        if all(source.ready for source in self._sources):
            request.setResponseCode(200)
            if self._detail is not None:
                return HEALTHY + self._detail().encode("utf-8")
            return HEALTHY
        request.setResponseCode(503)
        return UNHEALTHY


def healthz_root(
    authority: ReadinessSource,
    *sources: ReadinessSource,
    detail: Callable[[], str] | None = None,
) -> Resource:
    """
    A web root with only C{/healthz}, healthy when C{authority} and every
    one of C{sources} is ready.

    @param detail: returns more lines for a healthy answer's body (how many
        serving processes serve), or None.
    """
    root = Resource()
    root.putChild(b"healthz", HealthzResource(authority, *sources, detail=detail))
    return root
