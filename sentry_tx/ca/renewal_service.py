# -*- test-case-name: tests.test_renewal_service -*-
"""
Automatic CA renewal as a service of the twistd process:
L{CARenewalService} runs the steps L{sentry_tx.ca.renewal.plan} chooses,
on the reactor's clock, through an L{IRenewalStore} (files or the Secret).

Only the twistd process runs it (it is wired in L{sentry_tx.tap} alone);
serving copies see the credentials change and reload them.  After each step
this process's authority reloads too, and so does a replica's that finds
the stored credentials differ from the ones it serves (another replica
wrote them).

It looks again when the plan says (the renewal time, the switch time, an
anchor's expiry), at least every L{MAX_WAIT_SECONDS}, and after a failure
in L{RETRY_SECONDS}; it never dies of its own exception.
"""

from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Protocol, cast

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorThreads, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from sentry_tx.ca.files import FileWorkReactor
from sentry_tx.ca.renewal import (
    ACTION_APPEND,
    ACTION_FINISH_SWITCH,
    ACTION_OFF,
    ACTION_RENEW,
    ACTION_SWITCH,
    ACTION_WAIT,
    RenewalSettings,
    RenewalState,
    Step,
    StepResult,
    check_settings,
    renewal_due,
    switch_time,
)
from sentry_tx.errors import BundleError, ConfigError
from sentry_tx.interfaces import IRenewalStore

if TYPE_CHECKING:
    from sentry_tx.ca.bundle import TrustBundle
    from sentry_tx.ca.kubernetes_store import KubernetesTrustStore
    from sentry_tx.ca.store import FileTrustStore
    from sentry_tx.config import SentryConfig
    from sentry_tx.metrics import SentryMetrics

MAX_WAIT_SECONDS = 3600.0
"""
The longest the service waits before it reads the credentials again, even
when nothing is due (another replica, or the operator, may have changed
them).
"""

RETRY_SECONDS = 60.0
"""
How soon a step that failed (an unreadable file, an API error) is tried
again.
"""

BUNDLE_WAIT_SECONDS = 1.0
"""
How soon the service looks again while the authority has no bundle yet.
"""

MAX_STEPS_IN_A_ROW = 8
"""
Writing steps taken back to back before the service waits
L{RETRY_SECONDS}: a plan that never rests is a bug, not a reason to spin.
"""


def _der(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.DER)


class RenewedAuthority(Protocol):
    """
    What L{CARenewalService} needs of the authority it renews for: an
    L{sentry_tx.interfaces.ICertificateAuthority} that also shows the
    configuration it serves with.
    """

    @property
    def bundle(self) -> "TrustBundle | None":
        """
        The trust bundle in service, or None before start.
        """

    @property
    def config(self) -> "SentryConfig":
        """
        The configuration in service.
        """

    def restart(self, config: "SentryConfig") -> Deferred[None]:
        """
        Reload the trust bundle and swap it in.
        """


class CARenewalService(Service):
    """
    Renew the CA when due, switch when the time comes.

    @param store: the L{IRenewalStore}.
    @param authority: the L{ICertificateAuthority}: its C{config} gives the
        settings (once its start has resolved the Configuration), its
        C{bundle} what is in service, and C{restart} reloads it.
    @param clock: an L{IReactorTime}.
    @param metrics: the L{SentryMetrics} with the renewal metrics, or None.
    @param on_fatal: called with a L{Failure} when the settings are refused
        (kubernetes mode learns the Configuration only at start).
    """

    name = "ca-renewal"
    _log = Logger()

    def __init__(
        self,
        store: IRenewalStore,
        authority: RenewedAuthority,
        clock: IReactorTime,
        metrics: "SentryMetrics | None" = None,
        on_fatal: Callable[[Failure], object] | None = None,
        max_wait_seconds: float = MAX_WAIT_SECONDS,
        retry_seconds: float = RETRY_SECONDS,
    ) -> None:
        self._store = store
        self._authority = authority
        self._clock = clock
        self._metrics = metrics
        self._on_fatal = on_fatal
        self._max_wait_seconds = max_wait_seconds
        self._retry_seconds = retry_seconds
        self._call: IDelayedCall | None = None
        self._announced = False
        self._steps_in_a_row = 0
        self.last_result: StepResult | None = None

    # IService

    def startService(self) -> None:
        super().startService()
        self._schedule(0)

    def stopService(self) -> None:
        super().stopService()
        call, self._call = self._call, None
        if call is not None and call.active():
            call.cancel()

    # The loop

    def _schedule(self, seconds: float) -> None:
        if not self.running:
            return
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = self._clock.callLater(max(0.0, seconds), self.run_once)

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self._clock.seconds(), UTC)

    def run_once(self) -> Deferred[None] | None:
        """
        Take one step now.  Never raises.

        @return: a Deferred that fires when the step is over (None when
            there is nothing to do yet).
        """
        self._call = None
        if self._authority.bundle is None:
            self._schedule(BUNDLE_WAIT_SECONDS)
            return None
        config = self._authority.config
        settings = RenewalSettings.from_config(config)
        if not settings.enabled:
            # Nothing is read, nothing is written.
            self._log.info("automatic CA renewal is off: --ca-renewal-enabled is false")
            if self._metrics is not None:
                self._metrics.record_renewal(False, False, None)
            return None
        if not self._announced:
            try:
                check_settings(settings)
            except ConfigError as e:
                self._announced = True
                failure = Failure(e)
                if self._on_fatal is not None:
                    self._on_fatal(failure)
                else:
                    self._log.error(
                        "automatic CA renewal refused: {error}", error=str(e)
                    )
                return None
        now = self._now()
        d: Deferred[StepResult] | None
        try:
            d = self._store.step(now, settings)
        except Exception:
            d = None
            failure = Failure()
        if d is None:
            self._failed(failure)
            return None
        return d.addCallback(self._stepped, now, settings, config).addErrback(
            self._failed
        )

    def _failed(self, failure: Failure) -> None:
        if failure.check(BundleError):
            # A refused file or an API error: its message says it all.
            self._log.error(
                "automatic CA renewal: the step failed; trying again in"
                " {seconds} s: {error}",
                seconds=self._retry_seconds,
                error=failure.getErrorMessage(),
            )
        else:
            self._log.failure(
                "automatic CA renewal: the step failed; trying again in {seconds} s",
                failure,
                seconds=self._retry_seconds,
            )
        self._schedule(self._retry_seconds)

    def _stepped(
        self,
        result: StepResult,
        now: datetime,
        settings: RenewalSettings,
        config: "SentryConfig",
    ) -> None:
        self.last_result = result
        step, state = result.step, result.state
        if not self._announced:
            self._announced = True
            self._announce(step, state, settings)
        switch_at = step.switch_at
        if result.written:
            self._steps_in_a_row += 1
            switch_at = self._report_write(result, settings)
        else:
            self._steps_in_a_row = 0
        if self._metrics is not None:
            self._metrics.record_renewal(
                result.written and step.action == ACTION_RENEW,
                result.written and step.action in (ACTION_SWITCH, ACTION_FINISH_SWITCH),
                switch_at,
            )
        if result.written or self._differs(state):
            self._reload(config)
        if step.action == ACTION_OFF:
            if settings.enabled:
                self._schedule(self._max_wait_seconds)
            return
        if result.written:
            if self._steps_in_a_row >= MAX_STEPS_IN_A_ROW:
                self._steps_in_a_row = 0
                self._schedule(self._retry_seconds)
            else:
                self._schedule(0)
            return
        if step.action == ACTION_WAIT:
            if step.at is None:
                raise ValueError("a wait step without its time")
            delay = (step.at - now).total_seconds()
            self._schedule(min(delay, self._max_wait_seconds))
        else:
            # Another writer won the race: read again at once.
            self._schedule(0)

    def _differs(self, state: RenewalState) -> bool:
        bundle = self._authority.bundle
        if bundle is None:
            return False
        return [_der(c) for c in bundle.anchors] != [
            _der(c) for c in state.anchors
        ] or _der(bundle.issuer) != _der(state.issuer)

    def _reload(self, config: "SentryConfig") -> None:
        d = self._authority.restart(config)
        d.addErrback(
            lambda failure: self._log.failure(
                "automatic CA renewal: reloading the renewed credentials failed",
                failure,
            )
        )

    def _announce(
        self, step: Step, state: RenewalState, settings: RenewalSettings
    ) -> None:
        if step.action == ACTION_OFF:
            self._log.info("automatic CA renewal is off: {reason}", reason=step.reason)
            return
        self._log.info(
            "automatic CA renewal is on: the bundle is in the shape sentry_tx"
            " generates; renewal at {threshold} of the issuer's life"
            " ({due}), --ca-ttl {ttl}, propagation grace {grace}",
            threshold=settings.threshold,
            due=renewal_due(state.issuer, settings.threshold).isoformat(),
            ttl=int(settings.ca_ttl.total_seconds()),
            grace=settings.describe_grace(),
        )
        if step.switch_at is not None:
            self._log.warn(
                "a CA renewal is pending: the issuer switches to the new root"
                " at {switch_at}; restart workloads before then so their"
                " sidecars trust the new root",
                switch_at=step.switch_at.isoformat(),
            )

    def _report_write(
        self, result: StepResult, settings: RenewalSettings
    ) -> datetime | None:
        """
        Log what a step wrote; return the pending switch time after it.
        """
        step, state = result.step, result.state
        description = self._store.description
        if step.action in (ACTION_RENEW, ACTION_APPEND):
            root: x509.Certificate | None
            switch_at: datetime | None
            if result.renewed is not None:
                root = result.renewed.root
                switch_at = switch_time(state.issuer, result.renewed.issuer, settings)
            else:
                root = state.next_root
                switch_at = step.switch_at
            if root is None or switch_at is None:
                raise ValueError(f"a {step.action} step without its root or switch")
            self._log.warn(
                "renewed the CA: appended a new root (valid until {not_after})"
                " to the trust anchors in {store}; the issuer switches to it at"
                " {switch_at}: restart workloads before then so their sidecars"
                " trust the new root",
                not_after=root.not_valid_after_utc.isoformat(),
                store=description,
                switch_at=switch_at.isoformat(),
            )
            return switch_at
        if step.action in (ACTION_SWITCH, ACTION_FINISH_SWITCH):
            self._log.info(
                "switched the CA issuer to the renewed one in {store} ({reason})",
                store=description,
                reason=step.reason,
            )
            return None
        self._log.info(
            "dropped expired roots from the trust anchors in {store}",
            store=description,
        )
        return step.switch_at


def renewal_store_for(
    reactor: IReactorThreads,
    trust_store: "FileTrustStore | KubernetesTrustStore",
) -> IRenewalStore:
    """
    The L{IRenewalStore} over C{trust_store}'s credentials: its files, or
    its Secret.

    @param reactor: the reactor, which provides L{IReactorThreads} and
        L{IReactorTime} both (no one type says so; the file store's
        L{FileWorkReactor} needs the clock).
    """
    from sentry_tx.ca.store import FileTrustStore

    if isinstance(trust_store, FileTrustStore):
        from sentry_tx.ca.renewal_files import FileRenewalStore

        return FileRenewalStore(cast(FileWorkReactor, reactor), trust_store)
    from sentry_tx.ca.kubernetes_renewal import KubernetesRenewalStore

    return KubernetesRenewalStore(reactor, trust_store)


__all__ = [
    "CARenewalService",
    "MAX_WAIT_SECONDS",
    "RETRY_SECONDS",
    "renewal_store_for",
]
