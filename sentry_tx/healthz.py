"""
The health endpoint: C{GET /healthz} answers 503 until the authority is ready
(bundle loaded, gRPC listening), then 200.  Other paths are 404.
"""

from twisted.web.resource import NoResource, Resource

HEALTHY = b"ok\n"
UNHEALTHY = b"not ready\n"


class HealthzResource(Resource):
    """
    Reports the readiness of an L{ICertificateAuthority}.
    """

    def __init__(self, authority):
        super().__init__()
        self._authority = authority

    def getChild(self, path, request):
        # /healthz/ is /healthz; anything below it does not exist.
        if path == b"":
            return self
        return NoResource()

    def render_GET(self, request):
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        if self._authority.ready:
            request.setResponseCode(200)
            return HEALTHY
        request.setResponseCode(503)
        return UNHEALTHY


def healthz_root(authority):
    """
    A web root with only C{/healthz}.
    """
    root = Resource()
    root.putChild(b"healthz", HealthzResource(authority))
    return root
