# -*- test-case-name: tests.test_tap,tests.test_jwt_flags,tests.test_modes -*-
"""
The twistd entry point and sentry_tx's composition root: the one place that
wires the services together (L{build_service}), for the twistd process and,
in the serving-only role, for each serving copy (L{sentry_tx.serve}).
Services only the twistd process runs are added in L{add_parent_services}.

twistd's C{ServiceMaker} reads L{Options} (L{sentry_tx.options}) and
L{makeService} from this module.  It is imported by C{twistd --help}: it
must stay light (no grpc, no cryptography, no reactor at import time), so
L{build_service} imports the parts it wires when it runs.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, cast

from sentry_tx.config import MODE_KUBERNETES, SentryConfig

# twistd's ServiceMaker reads Options here.
from sentry_tx.options import Options

if TYPE_CHECKING:
    from twisted.python.failure import Failure

    from sentry_tx.ca.kubernetes_store import KubernetesTrustStore
    from sentry_tx.ca.store import FileTrustStore
    from sentry_tx.healthz import ReadinessSource
    from sentry_tx.interfaces import (
        IConfigurationSource,
        IIdentityValidator,
        IServingReactor,
    )
    from sentry_tx.jwt.minting import JWTMinter
    from sentry_tx.jwt.oidc import OIDCService
    from sentry_tx.metrics import SentryMetrics
    from sentry_tx.rundir import PrivateDirectory
    from sentry_tx.server.service import CertificateAuthorityService, JWTPairStore
    from sentry_tx.service import SentryService


@dataclass(frozen=True)
class CopyRole:
    """
    What makes a process a serving copy (L{sentry_tx.serve}) rather than
    the twistd process.

    @ivar liveness_socket: the Unix socket its liveness check answers on.
    @ivar metrics_directory: the shared metrics directory.
    """

    liveness_socket: str
    metrics_directory: str


def build_service(
    config: SentryConfig,
    reactor: IServingReactor,
    startup_warnings: Sequence[str] = (),
    startup_notes: Sequence[str] = (),
    arguments: Sequence[str] = (),
    copy: CopyRole | None = None,
) -> SentryService:
    """
    Wire sentry_tx: the one place that chooses implementations and composes
    services, for the twistd process and, the same but serving only, for
    each serving copy.  Builds objects only; sockets, threads and fds are
    opened by the services' C{startService}.

    @param config: the L{SentryConfig}.
    @param reactor: the reactor (also the clock) every service uses.
    @param startup_warnings: messages to log once logging runs.
    @param startup_notes: information to log once logging runs.
    @param arguments: the flags sentry_tx was started with (the copies get
        the same).
    @param copy: a L{CopyRole} when building a serving copy, else None.
    @return: the root L{SentryService}.
    """
    from twisted.application.service import IService

    from sentry_tx.ca.store import FileTrustStore
    from sentry_tx.metrics import SentryMetrics, SharedMetrics
    from sentry_tx.report import SettingsReport
    from sentry_tx.server.service import CertificateAuthorityService
    from sentry_tx.service import SentryService
    from sentry_tx.watcher import IssuerWatcher

    parent = copy is None
    metrics_directory: Callable[[], str]
    if copy is None:
        root = SentryService(reactor, startup_warnings, startup_notes=startup_notes)
        from sentry_tx.rundir import PrivateDirectory
        from sentry_tx.stderr_capture import StandardErrorCapture

        # First child: grpc core's own lines (and the copies' log lines) on
        # fd 2 go through the log from the start, and it stops last.
        StandardErrorCapture(reactor).setServiceParent(root)
        directory = PrivateDirectory()
        directory.setServiceParent(root)
        metrics_directory = lambda: directory.metrics_path  # noqa: E731
    else:
        root = SentryService(reactor)
        role = copy
        metrics_directory = lambda: role.metrics_directory  # noqa: E731
    metrics = SentryMetrics()
    SharedMetrics(metrics, metrics_directory).setServiceParent(root)
    configuration_source: IConfigurationSource | None = None
    readiness: tuple[ReadinessSource, ...] = ()
    trust_store: FileTrustStore | KubernetesTrustStore
    validators: dict[int, IIdentityValidator]
    default_validator: int | None
    if config.mode == MODE_KUBERNETES:
        from sentry_tx.modes import build_kubernetes_parts

        # Every serving process's validator watches Pods and Configurations.
        kubernetes = build_kubernetes_parts(config, reactor, os.environ)
        # Added before the authority, so that it stops after it: the API
        # client's connections close once nothing uses them.
        kubernetes.service.setServiceParent(root)
        trust_store = kubernetes.trust_store
        validators = dict(kubernetes.validators)
        default_validator = kubernetes.default_validator
        from sentry_tx.identity.jwks import JWKSFromConfiguration

        # The Configuration is read as the authority starts; a jwks token
        # validator it names is added to the validators then (before the
        # servicer is built) and runs as this service's child.  Added
        # before the authority, so that it stops after it.
        jwks = JWKSFromConfiguration(
            kubernetes.configuration_source, reactor, validators
        )
        jwks.setServiceParent(root)
        configuration_source = jwks
        readiness = (*kubernetes.readiness, jwks)
    else:
        trust_store = FileTrustStore(
            reactor,
            config.ca_path,
            config.issuer_certificate_path,
            config.issuer_key_path,
            config.trust_domain,
            config.namespace,
            config.mtls.allowed_clock_skew,
            ca_ttl=timedelta(seconds=config.ca_ttl_seconds),
        )
        from sentry_tx.modes import build_validators

        chosen = build_validators(config, reactor, os.environ)
        validators = chosen.validators
        default_validator = chosen.default_validator
    # Validators that keep state (the JWKS key set) run as services, before
    # the authority, and healthz waits for them to be ready.
    readiness_sources: list[ReadinessSource] = []
    for validator in validators.values():
        if IService.providedBy(validator):
            validator.setServiceParent(root)
            # A validator that runs as a service says when it is ready.
            readiness_sources.append(cast("ReadinessSource", validator))
    jwt_minter = None
    jwt_store: JWTPairStore | None = None
    if config.jwt_enabled:
        from sentry_tx.jwt.minting import JWTMinter
        from sentry_tx.jwt.store import FileJWTStore

        jwt_minter = JWTMinter(config.jwt_issuer or None, config.jwt_ttl_seconds)
        if config.mode == MODE_KUBERNETES:
            from sentry_tx.jwt.kubernetes_store import KubernetesJWTStore

            jwt_store = KubernetesJWTStore.for_config(
                reactor, kubernetes.client, config
            )
        else:
            jwt_store = FileJWTStore(
                reactor,
                config.jwt_key_path,
                config.jwks_path,
                config.jwt_signing_algorithm,
                config.jwt_key_id or None,
            )
    if parent:
        # Resolves the Configuration (kubernetes mode) and logs, once, the
        # TTL, skew and validators in effect.
        configuration_source = SettingsReport(
            configuration_source, validators, default_validator
        )
        from sentry_tx.listen import PortCheck

        # A gRPC port in use: one line naming --port, before anything binds it.
        PortCheck("--port", config.listen_address, config.port).setServiceParent(root)
    # The same authority in every serving process: the twistd process may
    # generate the bundle and JWT pair and counts the process-wide events;
    # a copy only loads.
    authority = CertificateAuthorityService(
        config,
        reactor,
        trust_store,
        validators,
        default_validator,
        metrics,
        on_start_failure=root.fatal,
        configuration_source=configuration_source,
        reuse_port=config.workers > 1 or not parent,
        jwt_minter=jwt_minter,
        jwt_store=jwt_store,
        primary=parent,
    )
    authority.setServiceParent(root)
    # After the authority: it starts once the authority is starting and
    # stops before it.  Every process watches what it serves; the twistd
    # process alone counts the changes.
    watch_directories = watched_directories(trust_store, jwt_store)
    if watch_directories:
        IssuerWatcher(
            authority, watch_directories, reactor, metrics if parent else None
        ).setServiceParent(root)
    if copy is not None:
        from twisted.application.internet import UNIXServer

        from sentry_tx.server.liveness import liveness_site

        UNIXServer(
            copy.liveness_socket, liveness_site(authority, reactor), mode=0o600
        ).setServiceParent(root)
        return root
    add_parent_services(
        root,
        config,
        reactor,
        authority,
        metrics,
        directory,
        arguments,
        trust_store,
        jwt_minter,
        (*readiness, *readiness_sources),
    )
    return root


def add_parent_services(
    root: SentryService,
    config: SentryConfig,
    reactor: IServingReactor,
    authority: CertificateAuthorityService,
    metrics: SentryMetrics,
    directory: PrivateDirectory,
    arguments: Sequence[str],
    trust_store: FileTrustStore | KubernetesTrustStore,
    jwt_minter: JWTMinter | None,
    readiness: tuple[ReadinessSource, ...],
) -> None:
    """
    The services only the twistd process runs, after its authority: the
    serving copies and their supervision, the expiry checks, healthz,
    metrics, OIDC and the CA's renewal (of C{trust_store}).  A new
    parent-only service goes here.
    """
    from sentry_tx.expiry import ExpiryChecker
    from sentry_tx.healthz import healthz_root
    from sentry_tx.http_listener import http_listener
    from sentry_tx.metrics import metrics_root
    from sentry_tx.server.copies import ServingCopies

    # With --workers 1, no copies: the same code.
    copies = ServingCopies(
        authority, reactor, directory, arguments, config.workers - 1, metrics
    )
    copies.setServiceParent(root)
    oidc = None
    if config.oidc_enabled and jwt_minter is not None:
        # Dapr's healthz waits for the OIDC listener too.
        oidc = build_oidc_service(config, reactor, jwt_minter, root.fatal)
        readiness = (*readiness, oidc)
    ExpiryChecker(authority, reactor, metrics).setServiceParent(root)
    # Automatic CA renewal, in the twistd process only: serving copies take
    # the renewed credentials by watching them.
    from sentry_tx.ca.renewal_service import CARenewalService, renewal_store_for

    CARenewalService(
        renewal_store_for(reactor, trust_store), authority, reactor, metrics, root.fatal
    ).setServiceParent(root)
    # Every HTTP listener comes from http_listener: request deadline and
    # connection cap (sentry_tx.http_listener).
    http_listener(
        "healthz",
        config.healthz_port,
        healthz_root(
            authority,
            *readiness,
            detail=copies.describe,
        ),
        reactor,
        interface=config.healthz_listen_address,
    ).setServiceParent(root)
    if config.enable_metrics:
        http_listener(
            "metrics",
            config.metrics_port,
            metrics_root(metrics),
            reactor,
            interface=config.metrics_listen_address,
        ).setServiceParent(root)
    if oidc is not None:
        oidc.setServiceParent(root)


def watched_directories(*stores: object) -> tuple[str, ...]:
    """
    The directories whose changes may change what C{stores} load (the
    bundle's, then the JWT pair's), each once.
    """
    directories: list[str] = []
    for store in stores:
        for directory in getattr(store, "watch_directories", ()):
            if directory not in directories:
                directories.append(directory)
    return tuple(directories)


def build_oidc_service(
    config: SentryConfig,
    reactor: IServingReactor,
    jwt_minter: JWTMinter,
    on_start_failure: Callable[[Failure], object],
) -> OIDCService:
    """
    The OIDC discovery server, served as healthz and metrics are (the
    request deadline and connection cap of L{sentry_tx.http_listener}),
    inside TLS when it is on.
    """
    from sentry_tx.http_listener import GuardedSite, GuardedWebService
    from sentry_tx.jwt.oidc import OIDCResource, OIDCService

    tls = config.oidc_server_tls_enabled
    site = GuardedSite(
        OIDCResource(
            jwt_minter,
            config.jwt_issuer or None,
            config.oidc_jwks_uri or None,
            config.oidc_path_prefix,
            config.oidc_allowed_hosts,
            "https" if tls else "http",
        ),
        reactor,
        label="oidc",
    )
    return OIDCService(
        reactor,
        lambda factory: GuardedWebService(
            "oidc",
            config.oidc_server_listen_port,
            factory,
            reactor,
            interface=config.oidc_server_listen_address,
            flag="--oidc-server-listen-port",
        ),
        site,
        tls_files=(
            (config.oidc_server_tls_cert_file, config.oidc_server_tls_key_file)
            if tls
            else None
        ),
        on_start_failure=on_start_failure,
    )


def makeService(options: Options) -> SentryService:
    """
    The twistd entry point: build sentry_tx's service tree from parsed
    L{Options}.
    """
    from twisted.internet import reactor

    if options.sentry_config is None:
        raise ValueError("makeService needs parsed Options")
    return build_service(
        options.sentry_config,
        # Twisted types its global reactor as the few interfaces every
        # platform has; the reactors twistd runs on Linux provide these.
        cast("IServingReactor", reactor),
        options.startup_warnings,
        getattr(options, "startup_notes", ()),
        arguments=getattr(options, "arguments", ()),
    )
