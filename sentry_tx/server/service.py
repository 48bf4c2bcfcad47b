"""
The certificate authority service: it owns the trust bundle in service and the
grpcio server, and is the L{ICertificateAuthority} the rest of sentry_tx talks
to.

Every grpcio call that blocks (bind and start, graceful stop) runs in the
reactor's thread pool through C{deferToThreadPool}; bundle swaps happen on the
reactor thread, as a single attribute assignment that worker threads read
once per call.
"""

from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone

import grpc
from twisted.application.service import Service
from twisted.internet.defer import fail, inlineCallbacks
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from zope.interface import implementer

from sentry_tx._proto import sentry_pb2_grpc
from sentry_tx.interfaces import ICertificateAuthority
from sentry_tx.server.serial import SerialReloads
from sentry_tx.server.servicer import CAServicer
from sentry_tx.server.tls import ServerCredentials, issue_server_certificate

# Transport limits (see SECURITY.md).
MAX_REQUEST_BYTES = 64 * 1024
MAX_RESPONSE_BYTES = 64 * 1024
GRPC_WORKER_THREADS = 32
MAX_CONCURRENT_RPCS = 1024
MAX_CONCURRENT_STREAMS_PER_CONNECTION = 100
MAX_CONNECTION_IDLE_MILLISECONDS = 5 * 60 * 1000
KEEPALIVE_TIME_MILLISECONDS = 2 * 60 * 60 * 1000
KEEPALIVE_TIMEOUT_MILLISECONDS = 20 * 1000
MIN_CLIENT_PING_INTERVAL_MILLISECONDS = 5 * 60 * 1000

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


def grpc_server_options(reuse_port=False):
    """
    The channel arguments of the gRPC server: size, stream and connection
    limits.

    @param reuse_port: share the port with other processes of this user
        (worker processes); off otherwise, so that a second sentry_tx on the
        same port fails to bind instead of silently sharing it.
    """
    return [
        ("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
        ("grpc.max_send_message_length", MAX_RESPONSE_BYTES),
        ("grpc.max_concurrent_streams", MAX_CONCURRENT_STREAMS_PER_CONNECTION),
        ("grpc.max_connection_idle_ms", MAX_CONNECTION_IDLE_MILLISECONDS),
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MILLISECONDS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MILLISECONDS),
        (
            "grpc.http2.min_recv_ping_interval_without_data_ms",
            MIN_CLIENT_PING_INTERVAL_MILLISECONDS,
        ),
        ("grpc.so_reuseport", 1 if reuse_port else 0),
    ]


def listen_target(address, port):
    """
    The grpcio address for C{address} (all interfaces when empty) and C{port}.
    """
    if not address:
        address = "[::]"
    elif ":" in address and not address.startswith("["):
        address = f"[{address}]"
    return f"{address}:{port}"


@implementer(ICertificateAuthority)
class CertificateAuthorityService(Service):
    """
    The CA as a child of sentry_tx's MultiService.

    @ivar port: the gRPC port actually bound, once started.
    @ivar config: the L{SentryConfig} in service.

    @param trust_store: the L{ITrustStore} the bundle is loaded from.
    @param validators: enabled L{IIdentityValidator}s by enum number.
    @param default_validator: the number used for UNKNOWN, or None.
    @param on_start_failure: called with the Failure when C{startService}'s
        start fails (the root service makes it fatal).
    @param configuration_source: an L{IConfigurationSource} that completes
        the config at start, or None when the config is complete already.
    @param reuse_port: bind with SO_REUSEPORT (worker processes sharing
        the port).
    """

    name = "ca"
    _log = Logger()

    def __init__(
        self,
        config,
        reactor,
        trust_store,
        validators,
        default_validator,
        metrics,
        on_start_failure=None,
        configuration_source=None,
        reuse_port=False,
    ):
        self.config = config
        self._reuse_port = reuse_port
        self._configuration_source = configuration_source
        self.bundle = None
        self.ready = False
        self.port = None
        self._reactor = reactor
        self._trust_store = trust_store
        self._validators = validators
        self._default_validator = default_validator
        self._metrics = metrics
        self._on_start_failure = on_start_failure
        self._server = None
        self._executor = None
        self._credentials = None
        self._renewal = None
        self._started = False
        self._reloads = SerialReloads(self._reload)

    # IService

    def startService(self):
        super().startService()
        d = self.start(self.config)
        d.addErrback(self._start_failed)

    def stopService(self):
        super().stopService()
        return self.stop()

    def _start_failed(self, failure):
        if self._on_start_failure is not None:
            self._on_start_failure(failure)
        else:
            self._log.failure("certificate authority failed to start", failure)

    # ICertificateAuthority

    def _now(self):
        return datetime.fromtimestamp(self._reactor.seconds(), timezone.utc)

    def _in_thread(self, f, *args):
        return deferToThreadPool(self._reactor, self._reactor.getThreadPool(), f, *args)

    def start(self, config):
        if self._started:
            return fail(AlreadyRunningError("the certificate authority is running"))
        self._started = True
        self.config = config
        d = self._start(config)
        d.addErrback(self._reset_after_failed_start)
        return d

    def _reset_after_failed_start(self, failure):
        self._started = False
        return failure

    @inlineCallbacks
    def _start(self, config):
        if self._configuration_source is not None:
            config = yield self._configuration_source.resolve(config)
            self.config = config
        bundle = yield self._trust_store.load_or_generate(self._now())
        key_pem, chain_pem, _, not_after = yield self._in_thread(
            issue_server_certificate,
            bundle,
            config.trust_domain,
            config.namespace,
            self._now(),
            config.mtls,
        )
        self._install(bundle)
        self._credentials = ServerCredentials(key_pem, chain_pem)
        yield self._in_thread(self._start_grpc, config)
        self._schedule_renewal(not_after)
        self.ready = True
        self._log.info(
            "gRPC server listening on {target}; issuer {issuer} valid until {not_after}",
            target=listen_target(config.listen_address, self.port),
            issuer=bundle.issuer.subject.rfc4514_string(),
            not_after=bundle.issuer.not_valid_after_utc.isoformat(),
        )

    def _start_grpc(self, config):
        # In a thread: binding and starting block.
        servicer = CAServicer(
            self._reactor,
            self,
            self._validators,
            self._default_validator,
            self._metrics,
        )
        executor = ThreadPoolExecutor(
            max_workers=GRPC_WORKER_THREADS, thread_name_prefix="sentry-grpc"
        )
        server = grpc.server(
            executor,
            options=grpc_server_options(self._reuse_port),
            maximum_concurrent_rpcs=MAX_CONCURRENT_RPCS,
        )
        sentry_pb2_grpc.add_CAServicer_to_server(servicer, server)
        try:
            port = server.add_secure_port(
                listen_target(config.listen_address, config.port),
                self._credentials.credentials,
            )
        except RuntimeError as e:
            executor.shutdown(wait=False)
            raise RuntimeError(
                f"cannot listen on {listen_target(config.listen_address, config.port)}: {e}"
            ) from None
        server.start()
        self._server, self._executor, self.port = server, executor, port

    def stop(self):
        self.ready = False
        if self._renewal is not None and self._renewal.active():
            self._renewal.cancel()
        self._renewal = None
        server, executor = self._server, self._executor
        self._server = self._executor = None
        self._started = False
        if server is None:
            return self._in_thread(lambda: None)
        self._log.info(
            "stopping gRPC server; calls in flight have {grace} s to finish",
            grace=SHUTDOWN_GRACE_SECONDS,
        )
        return self._in_thread(self._stop_grpc, server, executor)

    @staticmethod
    def _stop_grpc(server, executor):
        server.stop(SHUTDOWN_GRACE_SECONDS).wait()
        executor.shutdown(wait=False, cancel_futures=True)

    def restart(self, config):
        if not self._started:
            return fail(NotRunningError("the certificate authority is not running"))
        return self._reloads.request(config)

    @inlineCallbacks
    def _reload(self, config):
        try:
            bundle = yield self._trust_store.load(self._now())
            key_pem, chain_pem, _, not_after = yield self._in_thread(
                issue_server_certificate,
                bundle,
                config.trust_domain,
                config.namespace,
                self._now(),
                config.mtls,
            )
        except Exception as e:
            self._metrics.issuercert_reload_failed.inc()
            self._log.error(
                "issuer credentials refused; the previous bundle stays in service: {error}",
                error=str(e),
            )
            raise
        self.config = config
        self._install(bundle)
        if self._credentials is not None:
            self._credentials.replace(key_pem, chain_pem)
        self._schedule_renewal(not_after)
        self._log.info(
            "issuer credentials reloaded; issuer {issuer} valid until {not_after}",
            issuer=bundle.issuer.subject.rfc4514_string(),
            not_after=bundle.issuer.not_valid_after_utc.isoformat(),
        )

    def _install(self, bundle):
        self.bundle = bundle
        self._metrics.record_bundle(bundle)

    # Server certificate renewal, at half its life.

    def _schedule_renewal(self, not_after):
        if self._renewal is not None and self._renewal.active():
            self._renewal.cancel()
        remaining = (not_after - self._now()).total_seconds()
        self._renewal = self._reactor.callLater(
            max(remaining / 2, 1.0), self._renew_server_certificate
        )

    def _renew_server_certificate(self):
        self._renewal = None
        bundle, config = self.bundle, self.config
        d = self._in_thread(
            issue_server_certificate,
            bundle,
            config.trust_domain,
            config.namespace,
            self._now(),
            config.mtls,
        )

        def renewed(result):
            key_pem, chain_pem, _, not_after = result
            if self._credentials is not None and self._started:
                self._credentials.replace(key_pem, chain_pem)
                self._schedule_renewal(not_after)
            self._log.info("server certificate renewed")

        def failed(failure):
            self._metrics.servercert_issue_failed.inc()
            self._log.failure(
                "failed to renew the server certificate; retrying in {seconds} s",
                failure,
                seconds=SERVER_CERT_RETRY_SECONDS,
            )
            if self._started:
                self._renewal = self._reactor.callLater(
                    SERVER_CERT_RETRY_SECONDS, self._renew_server_certificate
                )

        d.addCallbacks(renewed, failed)
        return d
