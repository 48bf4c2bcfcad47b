# -*- test-case-name: tests.test_kube_loop_client -*-
"""
The Kubernetes API client of the hot path: the calls the KUBERNETES
validator makes for every SignCertificate (the TokenReview, and the rare GET
of a Pod or Configuration its caches lack), made with aiohttp on the gRPC
loop that needs their answers, so that no call hops to the reactor and back.

Everything else that talks to the API server (informers, Secrets,
ConfigMaps, the Configuration) stays on treq and the reactor
(L{sentry_tx.kube.client}): those calls are few and long-lived, and the
reactor is where their results are used.  Measured (issue 19), per
TokenReview round trip with 64 in flight: treq through the bridge 448 us of
CPU, aiohttp on the loop 175 us.

The guarantees are L{sentry_tx.kube.client.KubernetesClient}'s: the same
L{ClusterConnection} (the API server's CA, the client certificate, the bearer
token re-read when its file rotates, and once more after a 401), a deadline
for each call from sending to the last byte, a bounded body, redirects never
followed, one connection pool reused by every call, and the same errors:
L{KubernetesAPIError} for an error answer, L{KubernetesUnavailableError} for
no usable answer, L{ConfigError} when the settings cannot be read.

Its pool lives on the loop it is first used on; when that loop stops (its
pending tasks are cancelled), the pool is closed.  A client used on a newer
loop (the certificate authority restarted) opens a new pool there.
"""

import asyncio
import json
import os
import ssl
import tempfile
from collections.abc import Callable
from typing import Any

import aiohttp
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

import sentry_tx
from sentry_tx.errors import ConfigError
from sentry_tx.kube.client import (
    KUBERNETES_CONNECT_TIMEOUT_SECONDS,
    KUBERNETES_IDLE_CONNECTION_SECONDS,
    KUBERNETES_REQUEST_TIMEOUT_SECONDS,
    MAX_KUBERNETES_RESPONSE_BYTES,
)
from sentry_tx.kube.connection import ClusterConnection
from sentry_tx.kube.errors import KubernetesUnavailableError, json_answer

LOOP_CLIENT_MAX_CONNECTIONS = 128
"""
The most connections the loop's pool opens to the API server at once (calls
beyond wait for one): twice the TokenReviews admitted per process
(L{sentry_tx.identity.admission.MAX_TOKEN_REVIEWS_IN_FLIGHT}), leaving room
for the GETs of pods the cache has not seen yet.
"""

_READ_CHUNK_BYTES = 64 * 1024

_USER_AGENT = f"sentry_tx/{sentry_tx.__version__}"


def cluster_ssl_context(connection: ClusterConnection) -> ssl.SSLContext:
    """
    The client TLS context for the API server of C{connection}: its CA (or
    the system's roots, which C{create_default_context} loads when given no
    C{cadata}), the server's name checked, and the client
    certificate when it has one.
    """
    context = ssl.create_default_context(
        cadata=(
            connection.trust_roots_pem.decode("ascii")
            if connection.trust_roots_pem is not None
            else None
        )
    )
    certificate_pem = connection.client_certificate_pem
    key_pem = connection.client_key_pem
    if certificate_pem is not None and key_pem is not None:
        # ssl loads a key pair from files only: a private directory, removed
        # at once.
        with tempfile.TemporaryDirectory(prefix="sentry-kube-") as directory:
            certificate_path = os.path.join(directory, "client.crt")
            key_path = os.path.join(directory, "client.key")
            for path, data in (
                (certificate_path, certificate_pem),
                (key_path, key_pem),
            ):
                descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(descriptor, "wb") as f:
                    f.write(data)
            context.load_cert_chain(certificate_path, key_path)
    return context


class LoopKubernetesClient:
    """
    A JSON client of the Kubernetes API on the asyncio loop it is called
    on (see the module docstring).  Use it from that loop only.

    Nothing is read or opened when it is built: the connection settings are
    read, and the pool opened, on first use.

    @param reactor: the clock of the token file's checks (read from the
        loop: only its C{seconds}).
    @param connection_loader: a callable of no arguments returning the
        L{ClusterConnection}; it may raise L{ConfigError}, which every call
        then fails with.
    @param request_timeout_seconds: the deadline of a call that gives none.
    @param max_response_bytes: the largest response read.
    @param max_connections: the pool's limit.
    """

    _log = Logger()

    def __init__(
        self,
        reactor: IReactorTime,
        connection_loader: Callable[[], ClusterConnection],
        request_timeout_seconds: float = KUBERNETES_REQUEST_TIMEOUT_SECONDS,
        max_response_bytes: int = MAX_KUBERNETES_RESPONSE_BYTES,
        max_connections: int = LOOP_CLIENT_MAX_CONNECTIONS,
    ) -> None:
        self.reactor = reactor
        self._connection_loader = connection_loader
        self._request_timeout_seconds = request_timeout_seconds
        self._max_response_bytes = max_response_bytes
        self._max_connections = max_connections
        self._connection: ClusterConnection | None = None
        self._ssl: ssl.SSLContext | None = None
        self._session: aiohttp.ClientSession | None = None
        self._session_loop: asyncio.AbstractEventLoop | None = None
        self._keeper: asyncio.Task[None] | None = None
        self.pools_opened = 0

    @property
    def connection(self) -> ClusterConnection:
        """
        The L{ClusterConnection} in use, reading it on first use.

        @raise ConfigError: when the settings are missing or wrong.
        """
        if self._connection is None:
            connection = self._connection_loader()
            try:
                self._ssl = (
                    cluster_ssl_context(connection)
                    if connection.server.startswith("https:")
                    else None
                )
            except (ssl.SSLError, OSError, ValueError) as e:
                raise ConfigError(
                    "kubeconfig",
                    f"{connection.description}: the TLS settings cannot be used: {e}",
                ) from None
            self._connection = connection
        return self._connection

    def _pool(self) -> aiohttp.ClientSession:
        """
        The session (connection pool) of the running loop, opened on first
        use there, and closed when that loop stops.
        """
        loop = asyncio.get_running_loop()
        if self._session is not None and self._session_loop is loop:
            return self._session
        connector = aiohttp.TCPConnector(
            limit=self._max_connections,
            limit_per_host=self._max_connections,
            keepalive_timeout=KUBERNETES_IDLE_CONNECTION_SECONDS,
            ssl=self._ssl if self._ssl is not None else False,
        )
        session = aiohttp.ClientSession(
            connector=connector,
            headers={"Accept": "application/json", "User-Agent": _USER_AGENT},
            json_serialize=json.dumps,
            # Proxies and netrc from the environment are never used: the
            # bearer token goes to the API server only.
            trust_env=False,
            auto_decompress=False,
            skip_auto_headers=("Accept-Encoding",),
        )
        self._session, self._session_loop = session, loop
        self.pools_opened += 1
        self._keeper = loop.create_task(_close_when_cancelled(session))
        return session

    async def close(self) -> None:
        """
        Close the pool now (on its loop).  Later calls open a new one.
        """
        keeper, self._keeper = self._keeper, None
        self._session = self._session_loop = None
        if keeper is not None:
            keeper.cancel()
            try:
                await keeper
            except asyncio.CancelledError:
                pass

    async def get(
        self,
        path: str,
        timeout_seconds: float | None = None,
        max_response_bytes: int | None = None,
    ) -> Any:
        """
        C{GET path}; the decoded JSON object.
        """
        return await self.request(
            "GET",
            path,
            timeout_seconds=timeout_seconds,
            max_response_bytes=max_response_bytes,
        )

    async def create(
        self,
        path: str,
        body: object,
        retry_lost_response: bool = False,
        timeout_seconds: float | None = None,
    ) -> Any:
        """
        C{POST path} with the JSON C{body}; the decoded JSON answer.

        @param retry_lost_response: resend once when the connection was cut
            before an answer came (a TokenReview passes False: never
            resent).
        """
        return await self.request(
            "POST",
            path,
            body,
            retry_lost_response=retry_lost_response,
            timeout_seconds=timeout_seconds,
        )

    async def request(
        self,
        method: str,
        path: str,
        body: object = None,
        retry_lost_response: bool = False,
        timeout_seconds: float | None = None,
        max_response_bytes: int | None = None,
    ) -> Any:
        """
        Make one API call, within C{timeout_seconds} from now (the client's
        request timeout by default), headers and body included.

        @return: the decoded JSON object of a 2xx answer.
        @raise KubernetesAPIError: for an error answer.
        @raise KubernetesUnavailableError: for no usable answer in time.
        @raise ConfigError: when the connection settings cannot be read.
        """
        connection = self.connection
        if timeout_seconds is None:
            timeout_seconds = self._request_timeout_seconds
        limit = max_response_bytes or self._max_response_bytes
        data = None if body is None else json.dumps(body).encode("utf-8")
        try:
            async with asyncio.timeout(max(0.0, timeout_seconds)):
                return await self._request(
                    connection, method, path, data, retry_lost_response, limit
                )
        except TimeoutError:
            raise KubernetesUnavailableError(
                f"{method} {path}: no answer within {timeout_seconds:g} s"
            ) from None
        except (aiohttp.ClientError, OSError, ValueError) as e:
            raise KubernetesUnavailableError(
                f"{method} {path}: {type(e).__name__}: {e}".rstrip(": ")
            ) from None

    async def _request(
        self,
        connection: ClusterConnection,
        method: str,
        path: str,
        data: bytes | None,
        retry_lost_response: bool,
        limit: int,
    ) -> Any:
        session = self._pool()
        lost_response_retries = 1 if retry_lost_response else 0
        token_retries = 1
        url = connection.url(path)
        while True:
            headers: dict[str, str] = {}
            if data is not None:
                headers["Content-Type"] = "application/json"
            if connection.token is not None:
                headers["Authorization"] = "Bearer " + connection.token.current()
            try:
                async with session.request(
                    method,
                    url,
                    data=data,
                    headers=headers,
                    allow_redirects=False,
                    server_hostname=connection.tls_server_name,
                    timeout=aiohttp.ClientTimeout(
                        total=None, sock_connect=KUBERNETES_CONNECT_TIMEOUT_SECONDS
                    ),
                ) as response:
                    status, reason = response.status, response.reason
                    body = await _read_bounded(response, limit)
            except aiohttp.ServerDisconnectedError:
                if lost_response_retries:
                    lost_response_retries -= 1
                    continue
                raise
            if status == 401 and token_retries and connection.token is not None:
                # The token may have rotated since the last check: re-read
                # it, and try once more if it changed.
                token_retries -= 1
                if connection.token.refresh():
                    continue
            return json_answer(status, reason or "", body, method, path)


async def _read_bounded(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """
    The body of C{response}, at most C{limit} bytes.

    @raise KubernetesUnavailableError: for a larger body (the connection is
        closed, not read to its end).
    """
    length = response.content_length
    if length is not None and length > limit:
        response.close()
        raise KubernetesUnavailableError(f"the response is larger than {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = await response.content.read(_READ_CHUNK_BYTES)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > limit:
            response.close()
            raise KubernetesUnavailableError(
                f"the response is larger than {limit} bytes"
            )
        chunks.append(chunk)


async def _close_when_cancelled(session: aiohttp.ClientSession) -> None:
    """
    Hold C{session} open until this task is cancelled (the loop stops, or
    the client is closed), then close it.
    """
    try:
        await asyncio.get_running_loop().create_future()
    finally:
        await session.close()
