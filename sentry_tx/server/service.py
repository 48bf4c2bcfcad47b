# -*- test-case-name: tests.test_ca_service,tests.test_grpc,tests.test_tls -*-
"""
The certificate authority service: it owns the trust bundle in service and the
C{grpc.aio} server, and is the L{ICertificateAuthority} the rest of sentry_tx
talks to.

The server runs on the gRPC loop (L{sentry_tx.server.loop.GrpcLoop}), a
thread this service starts when it starts and joins when it stops; binding,
starting and the graceful stop run there as coroutines, so the reactor never
waits for grpcio.  A start or a reload is one L{prepare} (bundle, JWT pair
and server certificate loaded and checked, without side effects) and one
swap on the reactor thread: the immutable L{InService} that calls read once
each, the server credentials of the next handshakes, the JWT pair.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import grpc
from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, inlineCallbacks, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from sentry_tx.errors import ListenError
from sentry_tx.interfaces import ICertificateAuthority
from sentry_tx.listen import check_port_free
from sentry_tx.server.loop import GrpcLoop
from sentry_tx.server.servicer import (
    REQUEST_ARRIVAL_TIMEOUT_SECONDS,
    CAServicer,
    InService,
    rpc_handler,
)
from sentry_tx.server.tls import ServerCredentials, issue_server_certificate

if TYPE_CHECKING:
    from sentry_tx.ca.bundle import TrustBundle
    from sentry_tx.config import SentryConfig
    from sentry_tx.interfaces import (
        IConfigurationSource,
        IIdentityValidator,
        IServingReactor,
        ITrustStore,
    )
    from sentry_tx.jwt.material import JWTMaterial
    from sentry_tx.jwt.minting import JWTMinter
    from sentry_tx.metrics import SentryMetrics

_T = TypeVar("_T")

ServerCertificate = tuple[bytes, bytes, datetime, datetime]
"""
What L{issue_server_certificate} gives: C{(key_pem, chain_pem, not_before,
not_after)}.
"""


class JWTPairStore(Protocol):
    """
    Where the JWT signing key and JWKS are loaded from (files, or a Secret).
    """

    def load_or_generate(self, now: datetime) -> Deferred[JWTMaterial]:
        """
        Load the pair; generate and store it when none exists.
        """

    def load(self, now: datetime) -> Deferred[JWTMaterial]:
        """
        Load and check the pair; never generates.
        """

# Transport limits (SECURITY.md lists them; tests/test_limits.py pins them).
# Every gRPC caller is untrusted until validated, so each of these bounds
# what one caller can make sentry_tx hold.

MAX_REQUEST_BYTES = 64 * 1024
"""
The largest request message; a bigger one is refused by the transport with
RESOURCE_EXHAUSTED before any of sentry_tx's code sees it.
"""

MAX_RESPONSE_BYTES = 4 * 1024 * 1024
"""
The largest response message: the leaf, the issuer chain and the anchors.
Only the leaf's public key comes from the caller (and it fits in a request);
the rest is the operator's bundle, whose files may each be up to 1 MiB
(L{sentry_tx.ca.store.MAX_BUNDLE_FILE_BYTES}), so this is not a defence but
room: a bundle that loads must never make every answer fail.
"""

MAX_CONCURRENT_RPCS = 1024
"""
Calls open at once in one serving process, over all connections (including
calls whose request has not arrived yet, for at most
L{REQUEST_ARRIVAL_TIMEOUT_SECONDS}); one more is refused at once with
RESOURCE_EXHAUSTED, so a flood costs at most this many requests of memory.
"""

MAX_CONCURRENT_STREAMS_PER_CONNECTION = 100
"""
HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS: open streams per connection; a stream
beyond it is reset with REFUSED_STREAM.
"""

MAX_CONNECTION_IDLE_MILLISECONDS = 5 * 60 * 1000
"""
A connection without a call for this long is closed with GOAWAY.
"""

SERVER_HANDSHAKE_TIMEOUT_MILLISECONDS = 20 * 1000
"""
A connection that has not finished its TLS and HTTP/2 handshakes this long
after it was accepted is closed (a socket that never speaks costs nothing
for longer).
"""

KEEPALIVE_TIME_MILLISECONDS = 2 * 60 * 60 * 1000
"""
How often the server pings an idle client to check the connection.
"""

KEEPALIVE_TIMEOUT_MILLISECONDS = 20 * 1000
"""
How long the server waits for the answer to its ping before closing.
"""

MIN_CLIENT_PING_INTERVAL_MILLISECONDS = 5 * 60 * 1000
"""
The shortest interval between a client's pings that is not abuse, while it
has calls in flight.
"""

PERMIT_CLIENT_PINGS_WITHOUT_CALLS = False
"""
Whether a client may ping a connection without calls; when not, such pings
count as abuse too (gRPC then allows one per two hours).
"""

MAX_PING_STRIKES = 2
"""
Abusive pings tolerated per connection; the next one gets GOAWAY
ENHANCE_YOUR_CALM "too_many_pings" and the connection is closed.
"""

# The minimum TLS version (1.2) is not here: grpcio 1.85 has no server option
# or credential argument for it; gRPC core's SSL server credentials default to
# TLS 1.2 minimum, which tests/test_tls.py pins.

GRPC_PORT_FLAG = "--port"

SHUTDOWN_GRACE_SECONDS = 5.0
SERVER_CERT_RETRY_SECONDS = 60.0


class AlreadyRunningError(Exception):
    """
    C{start} was called on an authority that is running.
    """


class NotRunningError(Exception):
    """
    C{restart} was called on an authority that is not running.
    """


MAX_TCP_READ_BUFFER_BYTES = 256 * 1024
"""
The most grpc core reads from one connection at once
(C{grpc.experimental.tcp_max_read_buffer_size}; its default is megabytes).
This is what bounds the HTTP/2 CONTINUATION flood (a header block that never
ends): with large reads, grpcio 1.85 grew by ~260 MiB in 8 s under 4 such
connections, and the metadata size limits did not stop it; with 256 KiB
reads it grew by ~6.5 MiB on 8 connections in 8 s (64 KiB: ~4.7 MiB).
Not 64 KiB: under the 2,000-caller storm (bench/kube_storm.py, 50 calls
per connection arriving at once) 64 KiB reads made grpc core cancel a few
calls (1 to 8 CANCELLED per run, three runs), which no caller may get
because of load; 256 KiB and 1 MiB gave none (two runs each).
"""


def grpc_server_options(
    reuse_port: bool = False,
    max_concurrent_streams_per_connection: int = MAX_CONCURRENT_STREAMS_PER_CONNECTION,
    max_connection_idle_milliseconds: int = MAX_CONNECTION_IDLE_MILLISECONDS,
    server_handshake_timeout_milliseconds: int = (
        SERVER_HANDSHAKE_TIMEOUT_MILLISECONDS
    ),
) -> list[tuple[str, int]]:
    """
    The channel arguments of the gRPC server: size, stream, connection,
    ping and read-buffer limits.

    @param reuse_port: share the port with other processes of this user
        (serving copies); off otherwise, so that a second sentry_tx on the
        same port fails to bind instead of silently sharing it.
    @param max_concurrent_streams_per_connection: see
        L{MAX_CONCURRENT_STREAMS_PER_CONNECTION}; the other limits keyword
        arguments likewise default to their constants (tests make them
        small).
    """
    return [
        ("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
        ("grpc.max_send_message_length", MAX_RESPONSE_BYTES),
        ("grpc.max_concurrent_streams", max_concurrent_streams_per_connection),
        ("grpc.max_connection_idle_ms", max_connection_idle_milliseconds),
        ("grpc.server_handshake_timeout_ms", server_handshake_timeout_milliseconds),
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MILLISECONDS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MILLISECONDS),
        (
            "grpc.http2.min_recv_ping_interval_without_data_ms",
            MIN_CLIENT_PING_INTERVAL_MILLISECONDS,
        ),
        (
            "grpc.keepalive_permit_without_calls",
            1 if PERMIT_CLIENT_PINGS_WITHOUT_CALLS else 0,
        ),
        ("grpc.http2.max_ping_strikes", MAX_PING_STRIKES),
        ("grpc.so_reuseport", 1 if reuse_port else 0),
        ("grpc.experimental.tcp_max_read_buffer_size", MAX_TCP_READ_BUFFER_BYTES),
    ]


def listen_target(address: str, port: int | None) -> str:
    """
    The grpcio address for C{address} (all interfaces when empty) and C{port}.
    """
    if not address:
        address = "[::]"
    elif ":" in address and not address.startswith("["):
        address = f"[{address}]"
    return f"{address}:{port}"


@dataclass(frozen=True)
class Prepared:
    """
    Everything one serving process serves with, loaded and checked, not yet
    in service: L{CertificateAuthorityService} swaps it in whole.

    @ivar bundle: the L{TrustBundle}.
    @ivar config: the L{SentryConfig}.
    @ivar server_key_pem: the server certificate's key (to grpcio only).
    @ivar server_chain_pem: the server certificate and the issuer chain.
    @ivar server_not_after: when the server certificate expires.
    @ivar jwt_material: the L{JWTMaterial}, or None when JWTs are off.
    """

    bundle: TrustBundle
    config: SentryConfig
    server_key_pem: bytes = field(repr=False)
    server_chain_pem: bytes
    server_not_after: datetime
    jwt_material: JWTMaterial | None = field(default=None, repr=False)


@implementer(ICertificateAuthority)
class CertificateAuthorityService(Service):
    """
    The CA as a child of sentry_tx's MultiService: in the twistd process
    and, the same, in every serving copy.  A start or a reload is one
    L{prepare} and one L{_swap}; a reload that fails any check changes
    nothing.

    @ivar port: the gRPC port actually bound, once started.
    @ivar config: the L{SentryConfig} in service.

    @param trust_store: the L{ITrustStore} the bundle is loaded from.
    @param validators: enabled L{IIdentityValidator}s by enum number.
    @param default_validator: the number used for UNKNOWN, or None.
    @param on_start_failure: called with the Failure when C{startService}'s
        start fails (the root service makes it fatal).
    @param configuration_source: an L{IConfigurationSource} that completes
        the config at start, or None when the config is complete already.
    @param reuse_port: bind with SO_REUSEPORT (several serving processes
        sharing the port).
    @param jwt_minter: the L{sentry_tx.jwt.minting.JWTMinter} that fills
        the responses' JWTs, or None when JWTs are off.
    @param jwt_store: where the JWT pair is loaded from (a
        L{sentry_tx.jwt.store.FileJWTStore} or Kubernetes JWT store), with
        C{jwt_minter}.
    @param primary: the twistd process's authority, whose start may generate
        a missing bundle and JWT pair, and which alone counts
        C{issuercert_reload_failed} and sets the expiry gauges (once, not
        once per process); a serving copy's only loads.
    @param max_concurrent_rpcs: see L{MAX_CONCURRENT_RPCS}; this and the
        other transport limits (and C{request_arrival_timeout_seconds}, see
        L{REQUEST_ARRIVAL_TIMEOUT_SECONDS}) default to their constants and
        are parameters only so that tests can make them small.
    @param grpc_loop_factory: builds the L{GrpcLoop} from the reactor
        (tests with a fake reactor pass a synchronous one).
    """

    name = "ca"
    _log = Logger()

    def __init__(
        self,
        config: SentryConfig,
        reactor: IServingReactor,
        trust_store: ITrustStore,
        validators: Mapping[int, IIdentityValidator],
        default_validator: int | None,
        metrics: SentryMetrics,
        on_start_failure: Callable[[Failure], object] | None = None,
        configuration_source: IConfigurationSource | None = None,
        reuse_port: bool = False,
        max_concurrent_rpcs: int = MAX_CONCURRENT_RPCS,
        max_concurrent_streams_per_connection: int = (
            MAX_CONCURRENT_STREAMS_PER_CONNECTION
        ),
        max_connection_idle_milliseconds: int = MAX_CONNECTION_IDLE_MILLISECONDS,
        server_handshake_timeout_milliseconds: int = (
            SERVER_HANDSHAKE_TIMEOUT_MILLISECONDS
        ),
        jwt_minter: JWTMinter | None = None,
        request_arrival_timeout_seconds: float = REQUEST_ARRIVAL_TIMEOUT_SECONDS,
        grpc_loop_factory: Callable[[IServingReactor], GrpcLoop] = GrpcLoop,
        jwt_store: JWTPairStore | None = None,
        primary: bool = True,
    ) -> None:
        self._jwt_minter = jwt_minter
        self._jwt_store = jwt_store
        self._primary = primary
        self.config = config
        self._grpc_loop_factory = grpc_loop_factory
        self._request_arrival_timeout_seconds = request_arrival_timeout_seconds
        self._reuse_port = reuse_port
        self._max_concurrent_rpcs = max_concurrent_rpcs
        self._max_concurrent_streams_per_connection = (
            max_concurrent_streams_per_connection
        )
        self._max_connection_idle_milliseconds = max_connection_idle_milliseconds
        self._server_handshake_timeout_milliseconds = (
            server_handshake_timeout_milliseconds
        )
        self._configuration_source = configuration_source
        self.bundle: TrustBundle | None = None
        self.in_service: InService | None = None
        self.ready = False
        self.port: int | None = None
        self._reactor = reactor
        self._trust_store = trust_store
        self._validators = validators
        self._default_validator = default_validator
        self._metrics = metrics
        self._on_start_failure = on_start_failure
        self._server: grpc.aio.Server | None = None
        self._servicer: CAServicer | None = None
        self._grpc_loop: GrpcLoop | None = None
        self._credentials: ServerCredentials | None = None
        self._renewal: IDelayedCall | None = None
        self._started = False
        # A Deferred while a start runs, fired (never failed) when it ends.
        self._starting: Deferred[None] | None = None
        # Reload requests not yet served: their Deferreds, and the config of
        # the latest; the loop serving them, while it runs.
        self._reload_waiters: list[Deferred[None]] = []
        self._reload_config: SentryConfig | None = None
        self._reloading = False
        self._serving_waiters: list[Deferred[None]] = []

    # IService

    def startService(self) -> None:
        super().startService()
        d = self.start(self.config)
        d.addErrback(self._start_failed)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return self.stop()

    def _start_failed(self, failure: Failure) -> None:
        if self._on_start_failure is not None:
            self._on_start_failure(failure)
        else:
            self._log.failure("certificate authority failed to start", failure)

    def when_serving(self) -> Deferred[None]:
        """
        A Deferred that fires with None once the gRPC server listens (at
        once when it does already); it never fails.
        """
        d: Deferred[None] = Deferred()
        if self.ready:
            d.callback(None)
        else:
            self._serving_waiters.append(d)
        return d

    def loop_round_trip(self) -> Deferred[None]:
        """
        A Deferred that fires once the gRPC loop has run one coroutine: the
        liveness check of this process (a stuck loop never answers).

        @raise NotRunningError: when no gRPC loop runs.
        """
        if self._grpc_loop is None or not self.ready:
            return fail(NotRunningError("the certificate authority is not serving"))
        return self._grpc_loop.run(_round_trip)

    # ICertificateAuthority

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self._reactor.seconds(), UTC)

    def _issue_server_certificate(
        self, bundle: TrustBundle, config: SentryConfig
    ) -> Deferred[ServerCertificate]:
        """
        Issue sentry_tx's serving certificate from C{bundle}, in a thread.

        @return: Deferred firing with C{(key_pem, chain_pem, not_before,
            not_after)}.
        """
        return self._in_thread(
            issue_server_certificate,
            bundle,
            config.trust_domain,
            config.namespace,
            self._now(),
            config.mtls,
        )

    def _in_thread(self, f: Callable[..., _T], *args: object) -> Deferred[_T]:
        return deferToThreadPool(
            self._reactor, self._reactor.getThreadPool(), f, *args
        )

    @inlineCallbacks
    def prepare(
        self, config: SentryConfig, first: bool = False
    ) -> Generator[Deferred[Any], Any, Prepared | None]:
        """
        Load and check everything this process serves with, without side
        effects: the bundle, the JWT pair (when JWTs are on) and a new
        server certificate issued from the bundle.

        @param first: the start's load (which may generate a missing bundle
            and JWT pair, in the twistd process); a reload only loads.
        @return: Deferred firing with a L{Prepared}, or with None when a
            reload finds what is in service already; or failing with the
            first check that failed.
        """
        now = self._now()
        generate = first and self._primary
        store = self._trust_store
        bundle = yield (store.load_or_generate(now) if generate else store.load(now))
        material = None
        if self._jwt_store is not None:
            jwt_store = self._jwt_store
            material = yield (
                jwt_store.load_or_generate(now) if generate else jwt_store.load(now)
            )
        if (
            not first
            and _same_bundle(bundle, self.bundle)
            and (
                material is None
                or (self._jwt_minter is not None and self._jwt_minter.serves(material))
            )
        ):
            # The files were touched but say the same (for example the
            # store's own writes when it generated them): no new server
            # certificate to issue.
            return None
        key_pem, chain_pem, _, not_after = yield self._issue_server_certificate(
            bundle, config
        )
        return Prepared(bundle, config, key_pem, chain_pem, not_after, material)

    def _swap(self, prepared: Prepared) -> None:
        """
        Put C{prepared} in service: the bundle a call reads (one immutable
        L{InService}), the server certificate of the next handshakes, the
        JWT pair.  Nothing here can fail.
        """
        self.config = prepared.config
        self.bundle = prepared.bundle
        self.in_service = InService(prepared.bundle, prepared.config)
        if self._credentials is None:
            self._credentials = ServerCredentials(
                prepared.server_key_pem, prepared.server_chain_pem
            )
        else:
            self._credentials.replace(
                prepared.server_key_pem, prepared.server_chain_pem
            )
        if prepared.jwt_material is not None and self._jwt_minter is not None:
            self._jwt_minter.install(prepared.jwt_material)
        if self._primary:
            self._metrics.record_bundle(prepared.bundle)
        self._schedule_renewal(prepared.server_not_after)

    def start(self, config: SentryConfig) -> Deferred[None]:
        if self._started:
            return fail(AlreadyRunningError("the certificate authority is running"))
        self._started = True
        self.config = config
        starting: Deferred[None] = Deferred()
        self._starting = starting
        d = self._start(config)
        d.addErrback(self._reset_after_failed_start)

        def start_ended(result: _T) -> _T:
            self._starting = None
            starting.callback(None)
            return result

        return d.addBoth(start_ended)

    def _reset_after_failed_start(self, failure: Failure) -> Failure:
        self._started = False
        return failure

    @inlineCallbacks
    def _start(self, config: SentryConfig) -> Generator[Deferred[Any], Any, None]:
        if self._configuration_source is not None:
            config = yield self._configuration_source.resolve(config)
            self.config = config
        prepared = yield self.prepare(config, first=True)
        self._swap(prepared)
        grpc_loop = self._grpc_loop = self._grpc_loop_factory(self._reactor)
        grpc_loop.start()
        try:
            self._server, self.port = yield grpc_loop.run(self._serve, config)
        except BaseException:
            self._grpc_loop = None
            self._cancel_renewal()
            yield grpc_loop.stop()
            raise
        self.ready = True
        bundle = prepared.bundle
        self._log.info(
            "gRPC server listening on {target}; issuer {issuer} valid until"
            " {not_after}",
            target=listen_target(config.listen_address, self.port),
            issuer=bundle.issuer.subject.rfc4514_string(),
            not_after=bundle.issuer.not_valid_after_utc.isoformat(),
        )
        waiters, self._serving_waiters = self._serving_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    async def _serve(self, config: SentryConfig) -> tuple[grpc.aio.Server, int]:
        # On the gRPC loop: grpc.aio binds its server to the running loop.
        if not self._reuse_port:
            # A port in use becomes one line naming --port, not grpc core's.
            # (With SO_REUSEPORT the root's PortCheck has checked it before
            # any process bound it.)
            check_port_free(GRPC_PORT_FLAG, config.listen_address, config.port)
        servicer = CAServicer(
            self._reactor,
            self,
            self._validators,
            self._default_validator,
            self._metrics,
            jwt_minter=self._jwt_minter,
            request_arrival_timeout_seconds=self._request_arrival_timeout_seconds,
        )
        self._servicer = servicer
        server = grpc.aio.server(
            options=grpc_server_options(
                self._reuse_port,
                self._max_concurrent_streams_per_connection,
                self._max_connection_idle_milliseconds,
                self._server_handshake_timeout_milliseconds,
            ),
            maximum_concurrent_rpcs=self._max_concurrent_rpcs,
        )
        server.add_generic_rpc_handlers((rpc_handler(servicer),))
        target = listen_target(config.listen_address, config.port)
        # _swap made them before the server is served.
        assert self._credentials is not None
        try:
            port = server.add_secure_port(target, self._credentials.credentials)
        except RuntimeError as e:
            await server.stop(None)
            raise ListenError(
                GRPC_PORT_FLAG, config.port, config.listen_address, str(e)
            ) from None
        await server.start()
        return server, port

    def stop(self) -> Deferred[None]:
        self.ready = False
        self._cancel_renewal()
        server, grpc_loop = self._server, self._grpc_loop
        self._server = self._grpc_loop = None
        self._started = False
        if grpc_loop is None:
            return succeed(None)
        d: Deferred[None]
        if server is not None and self._servicer is not None:
            self._log.info(
                "stopping gRPC server; calls in flight have {grace} s to finish",
                grace=SHUTDOWN_GRACE_SECONDS,
            )
            d = grpc_loop.run(_drain, server, self._servicer)
        else:
            d = succeed(None)
        d.addErrback(
            lambda failure: self._log.failure(
                "the gRPC server did not stop cleanly", failure
            )
        )
        return d.addBoth(lambda _: grpc_loop.stop())

    def restart(self, config: SentryConfig | None) -> Deferred[None]:
        """
        Reload: one L{prepare} and one swap.  Reloads never run side by
        side: those asked for while one runs (or while the start runs) are
        served by one more run after it, with the latest config.
        """
        if not self._started:
            return fail(NotRunningError("the certificate authority is not running"))
        waiter: Deferred[None] = Deferred()
        self._reload_waiters.append(waiter)
        self._reload_config = config
        if not self._reloading:
            self._serve_reloads()
        return waiter

    @inlineCallbacks
    def _serve_reloads(self) -> Generator[Deferred[Any], Any, None]:
        self._reloading = True
        try:
            if self._starting is not None:
                # Never beside the first load, nor with a config the start
                # has not resolved yet.
                yield self._starting
            while self._reload_waiters:
                waiters, self._reload_waiters = self._reload_waiters, []
                if not self._started:
                    failure = Failure(
                        NotRunningError("the certificate authority is not running")
                    )
                    for waiter in waiters:
                        waiter.errback(failure)
                    continue
                try:
                    yield self._reload(self._reload_config)
                except Exception:
                    failure = Failure()
                    for waiter in waiters:
                        waiter.errback(failure)
                else:
                    for waiter in waiters:
                        waiter.callback(None)
        finally:
            self._reloading = False

    @inlineCallbacks
    def _reload(
        self, config: SentryConfig | None
    ) -> Generator[Deferred[Any], Any, None]:
        # Resolved at start; a reload keeps the resolved Configuration (it
        # is not re-read, as in Dapr).
        config = self.config if config is None else config
        try:
            prepared = yield self.prepare(config)
        except Exception as e:
            if self._primary:
                self._metrics.issuercert_reload_failed.inc()
            self._log.error(
                "issuer credentials refused; the previous bundle stays in"
                " service: {error}",
                error=str(e),
            )
            raise
        if not self._started:
            return
        if prepared is None:
            # prepare() found the bundle in service the same: there is one.
            assert self.bundle is not None
            self.config = config
            self.in_service = InService(self.bundle, config)
            self._log.info("issuer credentials unchanged")
            return
        self._swap(prepared)
        self._log.info(
            "issuer credentials reloaded; issuer {issuer} valid until {not_after}",
            issuer=prepared.bundle.issuer.subject.rfc4514_string(),
            not_after=prepared.bundle.issuer.not_valid_after_utc.isoformat(),
        )

    # Server certificate renewal, at half its life.

    def _cancel_renewal(self) -> None:
        if self._renewal is not None and self._renewal.active():
            self._renewal.cancel()
        self._renewal = None

    def _schedule_renewal(self, not_after: datetime) -> None:
        self._cancel_renewal()
        remaining = (not_after - self._now()).total_seconds()
        self._renewal = self._reactor.callLater(
            max(remaining / 2, 1.0), self._renew_server_certificate
        )

    def _renew_server_certificate(self) -> Deferred[None]:
        self._renewal = None
        bundle, config = self.bundle, self.config
        # Scheduled only by _swap, once a bundle is in service.
        assert bundle is not None
        d = self._issue_server_certificate(bundle, config)

        def superseded() -> bool:
            # A swap (a reload) or a stop while the certificate was being
            # issued: the swap put a newer certificate in service and
            # scheduled its own renewal, so this one is dropped.
            return self.bundle is not bundle or not self._started

        def renewed(result: ServerCertificate) -> None:
            if superseded():
                return
            key_pem, chain_pem, _, not_after = result
            if self._credentials is not None:
                self._credentials.replace(key_pem, chain_pem)
                self._schedule_renewal(not_after)
            self._log.info("server certificate renewed")

        def failed(failure: Failure) -> None:
            self._metrics.servercert_issue_failed.inc()
            self._log.failure(
                "failed to renew the server certificate; retrying in {seconds} s",
                failure,
                seconds=SERVER_CERT_RETRY_SECONDS,
            )
            if not superseded():
                self._cancel_renewal()
                self._renewal = self._reactor.callLater(
                    SERVER_CERT_RETRY_SECONDS, self._renew_server_certificate
                )

        return d.addCallbacks(renewed, failed)


async def _round_trip() -> None:
    """
    Nothing, on the gRPC loop: that it ran is the answer.
    """


async def _drain(server: grpc.aio.Server, servicer: CAServicer) -> None:
    """
    On the gRPC loop: refuse calls that start from now on with UNAVAILABLE,
    let calls in flight finish for up to L{SHUTDOWN_GRACE_SECONDS} in all,
    then stop the server (with what is left of the grace).
    """
    loop = asyncio.get_running_loop()
    started = loop.time()
    await servicer.drain(SHUTDOWN_GRACE_SECONDS)
    await server.stop(max(0.0, SHUTDOWN_GRACE_SECONDS - (loop.time() - started)))


def _same_bundle(new: TrustBundle, old: TrustBundle | None) -> bool:
    """
    Whether two bundles have the same anchors, issuer chain and issuer key.
    """
    return (
        old is not None
        and new.anchors_pem == old.anchors_pem
        and new.issuer_chain_pem == old.issuer_chain_pem
        and new.issuer_key.public_key() == old.issuer_key.public_key()
    )
