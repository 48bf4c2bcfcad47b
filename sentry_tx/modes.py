# -*- test-case-name: tests.test_modes,tests.test_jwks -*-
"""
What each mode adds to sentry_tx's service tree: the validators, and in
kubernetes mode the trust store, API client and informers, shared by the two
composition roots (L{sentry_tx.tap} for twistd, L{sentry_tx.serve} for a
serving copy) and imported by nothing else.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

from twisted.application.service import IService, MultiService

from sentry_tx.config import DEFAULT_NAMESPACE, MODE_KUBERNETES, SentryConfig
from sentry_tx.identity.caller import (
    VALIDATOR_INSECURE,
    VALIDATOR_JWKS,
    VALIDATOR_KUBERNETES,
)
from sentry_tx.identity.insecure import InsecureValidator
from sentry_tx.identity.jwks import jwks_validator_for
from sentry_tx.interfaces import IIdentityValidator
from sentry_tx.kube.connection import TOKEN_FILE_CHECK_INTERVAL_SECONDS
from sentry_tx.kube.incluster import SERVICE_ACCOUNT_DIRECTORY

if TYPE_CHECKING:
    # Kubernetes mode's parts are imported when kubernetes mode is built:
    # a standalone process never loads the API clients (treq's and
    # aiohttp's stacks are about 16 MiB of each serving process's memory).
    from sentry_tx.ca.kubernetes_store import KubernetesTrustStore
    from sentry_tx.identity.kubernetes import KubernetesValidator
    from sentry_tx.interfaces import IServingReactor
    from sentry_tx.kube.client import KubernetesClient
    from sentry_tx.kube.configuration import KubernetesConfigurationSource
    from sentry_tx.kube.connection import ClusterConnection


@dataclass(frozen=True)
class ValidatorSet:
    """
    The validators a mode enables.

    @ivar validators: enabled L{IIdentityValidator}s by C{TokenValidator}
        number.
    @ivar default_validator: the number used for UNKNOWN, or None.
    @ivar service: an C{IService} to start before serving and stop after
        (the Kubernetes client's connection pool, or a validator that keeps
        state, such as JWKS's key set), or None.
    """

    validators: dict[int, IIdentityValidator]
    default_validator: int | None = None
    service: IService | None = None


def build_validators(
    config: SentryConfig, reactor: IServingReactor, environ: Mapping[str, str]
) -> ValidatorSet:
    """
    The validators enabled in C{config.mode}, and the one used for UNKNOWN;
    the one choice every serving process makes.

      - kubernetes: KUBERNETES, the default, from L{build_kubernetes_parts}
        (with a Kubernetes client of the caller's own, whose connections the
        returned service closes); and JWKS beside it when C{config} (a
        caller's, resolved already) names a C{jwks} token validator (the
        twistd process adds it once the Configuration is read:
        L{sentry_tx.identity.jwks.JWKSFromConfiguration});
      - standalone: INSECURE, the default; or, when the Configuration names
        a C{jwks} token validator, JWKS only and no default (as Dapr).  The
        JWKS validator is then also the set's service.

    Nothing is opened: the Kubernetes client connects on first use.

    @param config: the L{SentryConfig}.
    @param reactor: the reactor validators run on.
    @param environ: the environment (C{KUBERNETES_SERVICE_*}, C{KUBECONFIG}).
    @return: a L{ValidatorSet}.
    @raise ConfigError: when the mode cannot be set up.
    """
    jwks = jwks_validator_for(config, reactor)
    if config.mode == MODE_KUBERNETES:
        parts = build_kubernetes_parts(config, reactor, environ)
        if jwks is None:
            return ValidatorSet(
                parts.validators, parts.default_validator, parts.service
            )
        # A config resolved already: a jwks token validator
        # beside KUBERNETES, which stays the default (as in Dapr).
        service = MultiService()
        parts.service.setServiceParent(service)
        jwks.setServiceParent(service)
        validators = dict(parts.validators)
        validators[VALIDATOR_JWKS] = jwks
        return ValidatorSet(validators, parts.default_validator, service)
    if jwks is not None:
        return ValidatorSet({VALIDATOR_JWKS: jwks}, None, jwks)
    return ValidatorSet({VALIDATOR_INSECURE: InsecureValidator()}, VALIDATOR_INSECURE)


@dataclass(frozen=True)
class KubernetesParts:
    """
    What kubernetes mode adds to sentry_tx, for C{tap.build_service}.

    @ivar trust_store: the L{ITrustStore} (Secret and ConfigMap
        C{dapr-trust-bundle}).
    @ivar validators: the enabled validators by enum number (KUBERNETES).
    @ivar default_validator: the number used for UNKNOWN (KUBERNETES).
    @ivar configuration_source: the L{IConfigurationSource} to pass to the
        certificate authority.
    @ivar client: the shared L{KubernetesClient}.
    @ivar service: the service to add to the root before the certificate
        authority: it closes the connections after the authority has
        stopped, and runs the validator's informers, which stop before the
        connections close.
    @ivar readiness: healthz sources (objects with C{ready}): the validator,
        ready once its caches have synced.
    """

    trust_store: KubernetesTrustStore
    validators: dict[int, IIdentityValidator]
    default_validator: int
    configuration_source: KubernetesConfigurationSource
    client: KubernetesClient
    service: MultiService
    readiness: tuple[KubernetesValidator, ...] = ()


def build_kubernetes_parts(
    config: SentryConfig,
    reactor: IServingReactor,
    environ: Mapping[str, str],
    service_account_directory: str = SERVICE_ACCOUNT_DIRECTORY,
    token_check_interval_seconds: float = TOKEN_FILE_CHECK_INTERVAL_SECONDS,
) -> KubernetesParts:
    """
    Build (only build: nothing is read or opened) the parts of kubernetes
    mode.  The INSECURE validator is not enabled in this mode.  Every
    serving process validates callers, so each runs its own Pod and
    Configuration informers.

    @param config: the L{SentryConfig} from the flags.
    @param reactor: the reactor.
    @param environ: the environment (C{KUBERNETES_SERVICE_*}, C{KUBECONFIG},
        C{HOME}).
    @param service_account_directory: where a pod's token and CA are.
    @return: L{KubernetesParts}.
    @raise ConfigError: when an issuer file name cannot be a Secret key.
    """
    from sentry_tx.ca.kubernetes_store import KubernetesTrustStore
    from sentry_tx.identity.admission import ReviewAdmission
    from sentry_tx.identity.kubernetes import KubernetesValidator, OnGrpcLoop
    from sentry_tx.kube.client import KubernetesClient, KubernetesClientService
    from sentry_tx.kube.configuration import KubernetesConfigurationSource
    from sentry_tx.kube.informer import (
        InformerService,
        configuration_informer,
        pod_informer,
    )
    from sentry_tx.kube.kubeconfig import cluster_connection
    from sentry_tx.kube.loop_client import LoopKubernetesClient
    from sentry_tx.server.loop import LoopClock

    environ = dict(environ)

    def load_connection() -> ClusterConnection:
        return cluster_connection(
            config.kubeconfig,
            environ,
            reactor,
            service_account_directory,
            token_check_interval_seconds,
        )

    client = KubernetesClient(reactor, load_connection)
    trust_store = KubernetesTrustStore(
        reactor,
        client,
        config.namespace or DEFAULT_NAMESPACE,
        config.trust_domain,
        config.mtls.allowed_clock_skew,
        keys=(
            os.path.basename(config.issuer_ca_filename),
            os.path.basename(config.issuer_certificate_filename),
            os.path.basename(config.issuer_key_filename),
        ),
        # Where the pod mounts the dapr-trust-bundle Secret (as Dapr's chart
        # does): the kubelet's ..data swap there says the Secret changed.
        # Only looked at, never read: the bundle comes from the API server.
        watch_directories=(
            (config.issuer_credentials,)
            if os.path.isdir(config.issuer_credentials)
            else ()
        ),
        ca_ttl=timedelta(seconds=config.ca_ttl_seconds),
    )
    pods = pod_informer(reactor, client)
    configurations = configuration_informer(reactor, client)
    # Children start in order and stop in reverse: the informers stop
    # before the client closes its connections.
    client_service = KubernetesClientService(client)
    service = MultiService()
    service.setName(client_service.name)
    client_service.setServiceParent(service)
    InformerService((pods, configurations)).setServiceParent(service)
    # The validator runs on the gRPC loop: its TokenReview (and the GET of
    # a pod or Configuration its caches lack) goes through the loop's own
    # aiohttp client, its admission runs on the loop's timers, and it reads
    # the caches the informers publish from the reactor.
    # It shares the reactor client's connection settings (read on the
    # reactor when the trust bundle is first loaded from its Secret, before
    # any call is served), so no kubeconfig or CA file is read on the loop.
    validator = KubernetesValidator(
        LoopKubernetesClient(reactor, lambda: client.connection),
        sentry_trust_domain=config.trust_domain,
        sentry_namespace=config.namespace or DEFAULT_NAMESPACE,
        audiences=config.token_audiences,
        reactor=reactor,
        pods=pods,
        configurations=configurations,
        admission=ReviewAdmission(LoopClock(reactor.seconds)),
        waits=OnGrpcLoop(reactor),
    )
    source = KubernetesConfigurationSource(
        client, on_resolved=(trust_store.use_config,)
    )
    return KubernetesParts(
        trust_store=trust_store,
        validators={VALIDATOR_KUBERNETES: validator},
        default_validator=VALIDATOR_KUBERNETES,
        configuration_source=source,
        client=client,
        service=service,
        readiness=(validator,),
    )
