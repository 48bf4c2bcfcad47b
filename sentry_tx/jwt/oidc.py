# -*- test-case-name: tests.test_oidc,tests.test_jwt_flags -*-
"""
The OIDC discovery server (SPEC section 11, Dapr's
C{pkg/sentry/server/oidc/oidc.go}): C{GET /.well-known/openid-configuration}
and C{GET /jwks.json}, under C{--oidc-path-prefix} when set, so that a
cloud's workload identity federation can verify sentry_tx's JWT-SVIDs.

The discovery document's C{issuer} is C{--jwt-issuer}, else the request's
scheme and C{Host}; C{jwks_uri} is C{--oidc-jwks-uri}, else the JWKS path
resolved against the issuer.  C{X-Forwarded-Host} is never read: it would
let any client that reaches the server through a proxy rewrite where relying
parties fetch the keys (Dapr's fix #10027 goes further than Dapr's own
allow-list check, which still reads it; sentry_tx reads only C{Host}).

L{OIDCService} listens with the same L{GuardedSite} and L{GuardedWebService} as
healthz and metrics; over TLS (the default) it first waits for the
certificate and key files to exist, as Dapr does.
"""

import json
import re
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Protocol

from twisted.application.service import MultiService
from twisted.internet import ssl
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IProtocolFactory
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import Request

from sentry_tx.ca.files import (
    CREDENTIAL_READ_TIMEOUT_SECONDS,
    BoundedFileWork,
    FileWorkReactor,
)
from sentry_tx.ca.store import read_credential
from sentry_tx.jwt.material import JWTMaterial

if TYPE_CHECKING:
    from sentry_tx.http_listener import GuardedSite
    from sentry_tx.service import WebService

DISCOVERY_PATH = "/.well-known/openid-configuration"
JWKS_PATH = "/jwks.json"

CACHE_CONTROL = b"public, max-age=3600"

TLS_FILES_POLL_SECONDS = 5.0
"""
How often the server looks for its TLS certificate and key while they do
not exist yet (Dapr waits the same).
"""

SUBJECT_TYPES_SUPPORTED = ("public",)
RESPONSE_TYPES_SUPPORTED = ("id_token",)
SCOPES_SUPPORTED = ("openid",)
CLAIMS_SUPPORTED = ("sub", "iss", "aud", "exp", "iat", "nbf", "use")

# A Host header: a DNS name or IPv4 address, or a bracketed IPv6 address,
# with an optional port.  Anything else is refused rather than written into
# the document.
_HOST = re.compile(r"(?:[A-Za-z0-9._-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")


class MaterialHolder(Protocol):
    """
    What L{OIDCResource} publishes from: the JWT material in service (the
    L{sentry_tx.jwt.minting.JWTMinter}).
    """

    @property
    def material(self) -> JWTMaterial | None:
        """
        The material in service, or None before it is loaded.
        """


def _host_without_port(host: str) -> str:
    if host.startswith("["):
        return host[: host.index("]") + 1]
    return host.rsplit(":", 1)[0] if ":" in host else host


def comparable_host(host: str) -> str:
    """
    C{host} (a C{Host} value or an C{--oidc-allowed-hosts} entry) as the
    allow-list compares it: in lower case, since host names ignore case, and
    without the trailing dot of a fully qualified name
    (C{Oidc.Example.ORG.:443} is C{oidc.example.org:443}).
    """
    host = host.lower()
    if _HOST.fullmatch(host) is None:
        return host
    name = _host_without_port(host)
    port = host[len(name) :]
    if name.endswith(".") and not name.startswith("["):
        name = name[:-1]
    return name + port


class OIDCResource(Resource):
    """
    The two OIDC documents.

    @param minter: the L{JWTMinter} whose material's JWKS and algorithm are
        published (read at each request, so a rotated key shows at once).
    @param issuer: C{--jwt-issuer}, or None.
    @param jwks_uri: C{--oidc-jwks-uri}, or None.
    @param path_prefix: C{--oidc-path-prefix} normalised (C{/a/b}), or C{""}.
    @param allowed_hosts: C{--oidc-allowed-hosts}; empty means any host,
        C{*} too.  Compared without case and without a trailing dot
        (L{comparable_host}).
    @param scheme: C{https} or C{http}, for a derived issuer.
    """

    isLeaf = True

    def __init__(
        self,
        minter: MaterialHolder,
        issuer: str | None,
        jwks_uri: str | None,
        path_prefix: str,
        allowed_hosts: Iterable[str],
        scheme: str,
    ) -> None:
        super().__init__()
        self._minter = minter
        self._issuer = issuer
        self._jwks_uri = jwks_uri
        allowed_hosts = tuple(allowed_hosts)
        self._any_host = not allowed_hosts or "*" in allowed_hosts
        self._allowed_hosts = frozenset(comparable_host(h) for h in allowed_hosts)
        self._scheme = scheme
        self.discovery_path = (path_prefix + DISCOVERY_PATH).encode("ascii")
        self.jwks_path = (path_prefix + JWKS_PATH).encode("ascii")

    def render(self, request: Request) -> bytes:
        path = request.path
        if path not in (self.discovery_path, self.jwks_path):
            return self._error(request, 404, b"404 page not found\n")
        if request.method != b"GET":
            request.setHeader(b"allow", b"GET")
            return self._error(request, 405, b"Method not allowed\n")
        host = (request.getHeader(b"host") or b"").decode("latin-1").strip()
        if not self._host_allowed(host):
            # Logged, at a bounded rate, by the GuardedSite serving this.
            return self._error(request, 403, b"Forbidden: unauthorized domain\n")
        material = self._minter.material
        if material is None:
            return self._error(request, 404, b"JWKS not available\n")
        if path == self.jwks_path:
            return self._json(request, material.jwks_json)
        if not _HOST.fullmatch(host) and (
            self._issuer is None or self._jwks_uri is None
        ):
            return self._error(request, 400, b"Invalid host\n")
        document = self.discovery_document(host, material.algorithm)
        return self._json(request, json.dumps(document).encode("utf-8") + b"\n")

    def discovery_document(self, host: str, algorithm: str) -> dict[str, object]:
        """
        The discovery document for a request to C{host}.
        """
        issuer = self._issuer or f"{self._scheme}://{host}"
        if self._jwks_uri is not None:
            jwks_uri = self._jwks_uri
        else:
            base = re.match(r"[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*", issuer)
            origin = base.group(0) if base else f"{self._scheme}://{host}"
            jwks_uri = origin + self.jwks_path.decode("ascii")
        return {
            "issuer": issuer,
            "jwks_uri": jwks_uri,
            "response_types_supported": list(RESPONSE_TYPES_SUPPORTED),
            "subject_types_supported": list(SUBJECT_TYPES_SUPPORTED),
            "id_token_signing_alg_values_supported": [algorithm],
            "scopes_supported": list(SCOPES_SUPPORTED),
            "claims_supported": list(CLAIMS_SUPPORTED),
        }

    def _host_allowed(self, host: str) -> bool:
        if self._any_host:
            return True
        host = comparable_host(host)
        return host in self._allowed_hosts or (
            _HOST.fullmatch(host) is not None
            and _host_without_port(host) in self._allowed_hosts
        )

    @staticmethod
    def _json(request: Request, body: bytes) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", CACHE_CONTROL)
        return body

    @staticmethod
    def _error(request: Request, code: int, body: bytes) -> bytes:
        request.setResponseCode(code)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return body


class OIDCService(MultiService):
    """
    The OIDC listener, a child of sentry_tx's MultiService.

    Plain HTTP: its L{WebService} is a child from the start.  TLS: at start
    it waits for the certificate and key files (looking every
    L{TLS_FILES_POLL_SECONDS}), reads them in a thread through the
    credential reader, then adds and starts the L{WebService}, wrapped in
    TLS.  Stopping stops the listener as healthz's and metrics' stop.

    @param web_service_factory: called with the Twisted factory to serve
        (the site, or the site wrapped in TLS); returns the L{WebService}
        (tap.py builds it as it builds healthz and metrics).
    @param site: the L{GuardedSite} of an L{OIDCResource}.
    @param tls_files: C{(certificate path, key path)}, or None for HTTP.
    @param on_start_failure: called with a Failure when the TLS files cannot
        be used or the port cannot be bound.
    @param file_work: the L{BoundedFileWork} that reads the TLS files (a
        daemon thread with a time bound by default).
    """

    name = "oidc"
    _log = Logger()

    def __init__(
        self,
        reactor: FileWorkReactor,
        web_service_factory: Callable[[IProtocolFactory], "WebService"],
        site: "GuardedSite",
        tls_files: tuple[str, str] | None = None,
        on_start_failure: Callable[[Failure], object] | None = None,
        file_work: BoundedFileWork | None = None,
    ) -> None:
        super().__init__()
        self._reactor = reactor
        self._file_work = (
            file_work if file_work is not None else BoundedFileWork(reactor)
        )
        self._web_service_factory = web_service_factory
        self._site = site
        self._tls_files = tls_files
        self._on_start_failure = on_start_failure
        self._poll: IDelayedCall | None = None
        self.web_service: WebService | None = None
        if tls_files is None:
            self.web_service = web_service_factory(site)
            self.web_service.setServiceParent(self)

    @property
    def ready(self) -> bool:
        """
        Whether the listener is bound.
        """
        return self.web_service is not None and bool(self.web_service.running)

    def startService(self) -> None:
        super().startService()
        if self._tls_files is not None and self.web_service is None:
            self._look_for_tls_files()

    def stopService(self) -> Deferred[None] | None:
        if self._poll is not None and self._poll.active():
            self._poll.cancel()
        self._poll = None
        stopped: Deferred[None] | None = super().stopService()
        return stopped

    def _look_for_tls_files(self) -> None:
        self._poll = None
        if not self.running:
            return
        d = self._file_work.run(
            "the OIDC TLS files", CREDENTIAL_READ_TIMEOUT_SECONDS, self._read_tls_files
        )
        d.addCallback(self._serve_tls)
        d.addErrback(self._failed)

    def _read_tls_files(self) -> tuple[bytes, bytes] | None:
        import os

        assert self._tls_files is not None
        certificate_path, key_path = self._tls_files
        if not (os.path.exists(certificate_path) and os.path.exists(key_path)):
            return None
        return (
            read_credential(certificate_path),
            read_credential(key_path, is_key=True),
        )

    def _serve_tls(self, pems: tuple[bytes, bytes] | None) -> None:
        if not self.running:
            return
        assert self._tls_files is not None
        if pems is None:
            self._log.warn(
                "waiting for the OIDC TLS certificate and key files to be"
                " available: {certificate}, {key}",
                certificate=self._tls_files[0],
                key=self._tls_files[1],
            )
            self._poll = self._reactor.callLater(
                TLS_FILES_POLL_SECONDS, self._look_for_tls_files
            )
            return
        certificate_pem, key_pem = pems
        options = tls_options(certificate_pem, key_pem, self._tls_files)
        self.web_service = self._web_service_factory(
            TLSMemoryBIOFactory(options, False, self._site)
        )
        self.web_service.setServiceParent(self)
        self._log.info(
            "loaded the OIDC TLS certificate from {certificate}",
            certificate=self._tls_files[0],
        )

    def _failed(self, failure: Failure) -> None:
        if self._on_start_failure is not None:
            self._on_start_failure(failure)
        else:
            self._log.failure("the OIDC server cannot start", failure)


def tls_options(
    certificate_pem: bytes, key_pem: bytes, sources: tuple[str, str]
) -> ssl.CertificateOptions:
    """
    Server TLS options (TLS 1.2 or later) from a PEM chain and key.

    @raise BundleError: naming the file that does not load.
    """
    from OpenSSL import crypto

    from sentry_tx.errors import BundleError

    blocks = re.findall(
        rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----",
        certificate_pem,
        re.S,
    )
    if not blocks:
        raise BundleError(sources[0], "holds no PEM certificate")
    try:
        certificate = ssl.Certificate.loadPEM(blocks[0])
        key = ssl.KeyPair.load(key_pem, crypto.FILETYPE_PEM)
        chain = [ssl.Certificate.loadPEM(block).original for block in blocks[1:]]
        options = ssl.CertificateOptions(
            privateKey=key.original,
            certificate=certificate.original,
            extraCertChain=chain,
            raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
        )
        options.getContext()  # checks that the key matches the certificate
        return options
    except Exception as e:
        raise BundleError(
            f"{sources[0]}, {sources[1]}",
            f"failed to load TLS certificate and key: {type(e).__name__}",
        ) from None
