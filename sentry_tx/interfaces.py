# -*- test-case-name: tests.test_testing -*-
"""
The seams of sentry_tx, as zope interfaces.

Each interface has one real implementation and one verified fake in
L{sentry_tx.testing}; both are checked with C{verifyObject}.
"""

from datetime import datetime
from typing import TYPE_CHECKING

from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface

if TYPE_CHECKING:
    from sentry_tx.ca.bundle import TrustBundle
    from sentry_tx.ca.renewal import RenewalSettings, StepResult
    from sentry_tx.config import SentryConfig
    from sentry_tx.identity.caller import CallerIdentity, SignRequest


class ICertificateAuthority(Interface):
    """
    The certificate authority: it owns the current trust bundle and the gRPC
    server that answers C{dapr.proto.sentry.v1.CA/SignCertificate}.
    """

    ready = Attribute(
        "True once a trust bundle is loaded and the gRPC server listens."
    )
    bundle = Attribute(
        "The L{sentry_tx.ca.bundle.TrustBundle} in service, or None before start."
    )

    def start(config: "SentryConfig") -> "Deferred[None]":
        """
        Load (or generate) the trust bundle and start serving.

        @param config: a L{sentry_tx.config.SentryConfig}.
        @return: a Deferred that fires when the server listens; it fails if the
            authority is already running or the bundle cannot be loaded.
        """

    def stop() -> "Deferred[None]":
        """
        Stop taking calls, let calls in flight finish for a bounded grace
        period, and release the port.

        @return: a Deferred that fires when the server has stopped.
        """

    def restart(config: "SentryConfig") -> "Deferred[None]":
        """
        Reload the trust bundle and swap it in without closing the listener.
        Calls are serialised: a restart asked for while one runs is coalesced
        into one more run after it.

        @return: a Deferred that fires when the new bundle is in service, or
            fails (leaving the old bundle in service) when it is refused.
        """


class ITrustStore(Interface):
    """
    Where the trust bundle (anchors, issuer chain, issuer key) lives.
    """

    watch_directories = Attribute(
        "Directories whose changes may change the bundle (a tuple of bytes "
        "or str paths); empty for stores that are not file-backed."
    )

    def load_or_generate(now: datetime) -> "Deferred[TrustBundle]":
        """
        Load the bundle; when none of its three parts exists, generate one,
        store it and return it.  Never overwrites existing parts.

        @param now: an aware L{datetime.datetime} (UTC).
        @return: Deferred firing with a L{TrustBundle}, or failing with
            L{sentry_tx.errors.BundleError}.
        """

    def load(now: datetime) -> "Deferred[TrustBundle]":
        """
        Load and verify the bundle; never generates.

        @return: Deferred firing with a L{TrustBundle}, or failing with
            L{sentry_tx.errors.BundleError}.
        """


class IIdentityValidator(Interface):
    """
    Proves who a caller of SignCertificate is.
    """

    name = Attribute(
        "The C{TokenValidator} enum number this validator answers to "
        "(1 INSECURE, 2 KUBERNETES, 3 JWKS)."
    )

    needs_reactor = Attribute(
        "True when C{validate} waits on I/O through the reactor (it is then "
        "called on the reactor thread and the gRPC loop awaits it); "
        "False when it is pure computation on the request, called inline on "
        "the gRPC loop, whose Deferred has fired when C{validate} returns."
    )

    def validate(
        request: "SignRequest", deadline: float | None = None
    ) -> "Deferred[CallerIdentity]":
        """
        Check the caller and the common request rules.

        Called on the reactor thread when C{needs_reactor} is true, else
        inline on the gRPC loop (it must not block).

        @param request: a L{sentry_tx.identity.caller.SignRequest}.
        @param deadline: the absolute time, on the reactor's clock
            (C{reactor.seconds()}), by which the answer must come: the
            earlier of the client's deadline and the call's arrival plus
            L{sentry_tx.server.servicer.VALIDATION_TIMEOUT_SECONDS}.  A
            validator that waits must give up by then; the servicer cancels
            its Deferred at that time.
        @return: Deferred firing with a L{sentry_tx.identity.caller.CallerIdentity},
            or failing with L{sentry_tx.errors.ValidationError} whose message
            is sent to the caller as PERMISSION_DENIED,
            L{sentry_tx.errors.ValidatorUnavailableError} (UNAVAILABLE) or
            L{sentry_tx.errors.ValidatorOverloadedError} (RESOURCE_EXHAUSTED
            with C{grpc-retry-pushback-ms}).
        """


class IConfigurationSource(Interface):
    """
    Where the Dapr Configuration comes from at start: the file read while
    options were parsed (standalone), or the API server (kubernetes).
    """

    def resolve(config: "SentryConfig") -> "Deferred[SentryConfig]":
        """
        Complete C{config} with the Configuration's C{spec.mtls}.

        @param config: a L{sentry_tx.config.SentryConfig} built from flags.
        @return: Deferred firing with the completed L{SentryConfig}, or
            failing with L{sentry_tx.errors.ConfigError}.
        """


class IRenewalStore(Interface):
    """
    Where automatic CA renewal reads the stored credentials and writes its
    steps (L{sentry_tx.ca.renewal}): files, or the Kubernetes Secret.
    """

    description = Attribute("What the store holds, as messages name it.")

    def step(now: datetime, settings: "RenewalSettings") -> "Deferred[StepResult]":
        """
        Read the credentials, plan the next step at C{now} and, when it
        writes, write it (a store whose write loses a race reads again and
        plans again).

        @param now: an aware L{datetime.datetime}.
        @param settings: a L{sentry_tx.ca.renewal.RenewalSettings}.
        @return: Deferred firing with a L{sentry_tx.ca.renewal.StepResult},
            or failing with L{sentry_tx.errors.BundleError}.
        """


if TYPE_CHECKING:
    from twisted.internet.interfaces import (
        IReactorCore,
        IReactorFDSet,
        IReactorPluggableNameResolver,
        IReactorProcess,
        IReactorTCP,
        IReactorThreads,
        IReactorTime,
        IReactorUNIX,
    )

    from sentry_tx.identity.jwks import IJWKSReactor

    class IServingReactor(
        IJWKSReactor,
        IReactorCore,
        IReactorTime,
        IReactorThreads,
        IReactorFDSet,
        IReactorTCP,
        IReactorUNIX,
        IReactorProcess,
        IReactorPluggableNameResolver,
    ):
        """
        For the type checker only (as Twisted's own C{_IReactorCommon}): the
        parts of the reactor sentry_tx's composition roots hand to their
        services.  Every reactor C{twistd} runs on Linux provides them all;
        a service that needs less takes the narrower interface.
        """
