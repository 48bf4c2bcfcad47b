# -*- test-case-name: tests.test_tap,tests.test_jwt_flags,tests.test_modes -*-
"""
The twistd entry point and sentry_tx's composition root: the one place that
wires the services together (L{build_service}).

twistd's C{ServiceMaker} reads L{Options} (L{sentry_tx.options}) and
L{makeService} from this module.  It is imported by C{twistd --help}: it
must stay light (no grpc, no cryptography, no reactor at import time), so
L{build_service} imports the parts it wires when it runs.
"""

import os

from sentry_tx.config import MODE_KUBERNETES
# twistd's ServiceMaker reads Options here.
from sentry_tx.options import Options  # noqa: F401


def build_service(config, reactor, startup_warnings=(), startup_notes=()):
    """
    Wire sentry_tx: the one place that chooses implementations and composes
    services.  Builds objects only; sockets, threads and fds are opened by
    the services' C{startService}.

    @param config: the L{SentryConfig}.
    @param reactor: the reactor (also the clock) every service uses.
    @param startup_warnings: messages to log once logging runs.
    @param startup_notes: information to log once logging runs.
    @return: the root L{SentryService}.
    """
    from twisted.application.service import IService

    from sentry_tx.ca.store import FileTrustStore
    from sentry_tx.expiry import ExpiryChecker
    from sentry_tx.healthz import healthz_root
    from sentry_tx.http_listener import http_listener
    from sentry_tx.listen import PortCheck
    from sentry_tx.metrics import SentryMetrics, metrics_root
    from sentry_tx.report import SettingsReport
    from sentry_tx.server.service import CertificateAuthorityService
    from sentry_tx.server.workers import WorkerPoolAuthority
    from sentry_tx.service import SentryService
    from sentry_tx.stderr_capture import StandardErrorCapture
    from sentry_tx.watcher import IssuerWatcher

    root = SentryService(reactor, startup_warnings, startup_notes=startup_notes)
    # First child: grpc core's own lines on fd 2 go through the log from
    # the start, and it stops last, after worker processes.
    StandardErrorCapture(reactor).setServiceParent(root)
    metrics = SentryMetrics()
    configuration_source = None
    readiness = ()
    if config.mode == MODE_KUBERNETES:
        from sentry_tx.modes import build_kubernetes_parts

        # This process serves gRPC too (with or without worker processes),
        # so its validator watches Pods and Configurations as each
        # worker's does.
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
        )
        from sentry_tx.modes import build_validators

        chosen = build_validators(config, reactor, os.environ)
        validators = chosen.validators
        default_validator = chosen.default_validator
    # Validators that keep state (the JWKS key set) run as services, before
    # the authority, and healthz waits for them to be ready.
    readiness_sources = []
    for validator in validators.values():
        if IService.providedBy(validator):
            validator.setServiceParent(root)
            readiness_sources.append(validator)
    jwt_minter = None
    if config.jwt_enabled:
        from sentry_tx.jwt.minting import JWTMinter
        from sentry_tx.jwt.store import FileJWTStore, JWTTrustStore

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
        trust_store = JWTTrustStore(trust_store, jwt_store, jwt_minter)
    # Resolves the Configuration (kubernetes mode) and logs, once, the TTL,
    # skew and validators in effect.
    configuration_source = SettingsReport(
        configuration_source, validators, default_validator
    )
    # A gRPC port in use: one line naming --port, before anything binds it.
    PortCheck("--port", config.listen_address, config.port).setServiceParent(root)
    if config.workers > 1:
        # gRPC in this process and N - 1 worker processes sharing the port;
        # each worker builds its own validators (sentry_tx.server.worker),
        # this process keeps the bundle, the watch, health and metrics.
        def local_authority(local_config, local_store):
            return CertificateAuthorityService(
                local_config,
                reactor,
                local_store,
                validators,
                default_validator,
                metrics,
                reuse_port=True,
                jwt_minter=jwt_minter,
            )

        authority = WorkerPoolAuthority(
            config,
            reactor,
            trust_store,
            metrics,
            config.workers - 1,
            on_start_failure=root.fatal,
            configuration_source=configuration_source,
            local_factory=local_authority,
            jwt_minter=jwt_minter,
        )
    else:
        authority = CertificateAuthorityService(
            config,
            reactor,
            trust_store,
            validators,
            default_validator,
            metrics,
            on_start_failure=root.fatal,
            configuration_source=configuration_source,
            jwt_minter=jwt_minter,
        )
    authority.setServiceParent(root)
    oidc = None
    if config.oidc_enabled and jwt_minter is not None:
        # Dapr's healthz waits for the OIDC listener too.
        oidc = build_oidc_service(config, reactor, jwt_minter, root.fatal)
        readiness_sources.append(oidc)
    # After the authority: they start once it is starting and stop before it.
    if trust_store.watch_directories:
        IssuerWatcher(
            authority, trust_store.watch_directories, reactor, metrics
        ).setServiceParent(root)
    ExpiryChecker(authority, reactor, metrics).setServiceParent(root)
    # Every HTTP listener comes from http_listener: request deadline and
    # connection cap (sentry_tx.http_listener).
    http_listener(
        "healthz",
        config.healthz_port,
        healthz_root(authority, *readiness, *readiness_sources),
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
    return root


def build_oidc_service(config, reactor, jwt_minter, on_start_failure):
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


def makeService(options):
    """
    The twistd entry point: build sentry_tx's service tree from parsed
    L{Options}.
    """
    from twisted.internet import reactor

    return build_service(
        options.sentry_config,
        reactor,
        options.startup_warnings,
        getattr(options, "startup_notes", ()),
    )
