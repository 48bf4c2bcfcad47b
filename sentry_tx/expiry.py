# -*- test-case-name: tests.test_expiry,tests.test_root -*-
"""
The expiry check: warn in time that a root or the issuer runs out.

L{ExpiryChecker} looks at the trust bundle in service at start and then every
L{EXPIRY_CHECK_INTERVAL_SECONDS}.  For each trust anchor the issuer chain
leads to (not a root a renewal has replaced or appended) and each
certificate of the issuer chain it logs a warning when the certificate
expires within L{EXPIRY_WARNING_DAYS}, and an error once it has expired.  It
also sets the expiry gauges, so that they stay right whatever happens to the
bundle.

The authority loads its bundle asynchronously after the services started,
so the run at start usually finds none yet; until one is in service the
checker looks again every L{BUNDLE_WAIT_SECONDS}, so that the first check
really happens at start.

A periodic job that raised would stop its L{LoopingCall} for good; this one
logs its own failures and runs again at the next interval.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from cryptography.x509 import Certificate
from twisted.application.service import Service
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from sentry_tx.interfaces import ICertificateAuthority

if TYPE_CHECKING:
    from sentry_tx.metrics import SentryMetrics

EXPIRY_CHECK_INTERVAL_SECONDS = 3600.0
"""
How often the bundle in service is checked.
"""

EXPIRY_WARNING_DAYS = 30
"""
A certificate that expires within this many days is warned about.
"""

BUNDLE_WAIT_SECONDS = 1.0
"""
How soon a run that found no bundle in service (the authority is still
loading it at start) looks again, rather than an hour later.
"""

_SECONDS_PER_HOUR = 3600
_SECONDS_PER_DAY = 24 * _SECONDS_PER_HOUR

ROLE_ROOT = "root"
ROLE_ISSUER = "issuer"
ROLE_INTERMEDIATE = "intermediate"


def _days_and_hours(delta: timedelta) -> tuple[int, int]:
    """
    Whole days and remaining whole hours of a non-negative L{timedelta}.
    """
    seconds = int(delta.total_seconds())
    days, rest = divmod(seconds, _SECONDS_PER_DAY)
    return days, rest // _SECONDS_PER_HOUR


class ExpiryChecker(Service):
    """
    Check, at start and then hourly, how long the roots and the issuer of the
    bundle in service have left.
    """

    name = "expiry-checker"
    _log = Logger()

    def __init__(
        self,
        authority: ICertificateAuthority,
        clock: IReactorTime,
        metrics: SentryMetrics | None = None,
    ) -> None:
        """
        @param authority: the L{ICertificateAuthority} whose C{bundle} (read
            at every run; L{None} until one is loaded) is checked.
        @param clock: an L{IReactorTime}: it runs the L{LoopingCall} and says
            what time it is.
        @param metrics: a L{SentryMetrics} whose expiry gauges are set at
            every run, or L{None}.
        """
        self._authority = authority
        self._clock = clock
        self._metrics = metrics
        self._loop: LoopingCall | None = None
        self._bundle_wait: IDelayedCall | None = None

    # IService

    def startService(self) -> None:
        """
        Check now, then every L{EXPIRY_CHECK_INTERVAL_SECONDS}.
        """
        super().startService()
        self._loop = LoopingCall(self.check)
        self._loop.clock = self._clock
        d = self._loop.start(EXPIRY_CHECK_INTERVAL_SECONDS, now=True)
        d.addErrback(
            lambda failure: self._log.failure("the expiry check stopped", failure)
        )

    def stopService(self) -> None:
        """
        Stop checking.
        """
        super().stopService()
        loop, self._loop = self._loop, None
        if loop is not None and loop.running:
            loop.stop()
        wait, self._bundle_wait = self._bundle_wait, None
        if wait is not None and wait.active():
            wait.cancel()

    # The check

    def check(self) -> None:
        """
        Check the bundle in service once.  Never raises: a failure is logged
        and the next run comes as planned.
        """
        try:
            self._check()
        except Exception:
            self._log.failure(
                "the certificate expiry check failed; it runs again in {interval} s",
                interval=EXPIRY_CHECK_INTERVAL_SECONDS,
            )

    def _check(self) -> None:
        bundle = self._authority.bundle
        if bundle is None:
            if self.running and self._bundle_wait is None:
                self._bundle_wait = self._clock.callLater(
                    BUNDLE_WAIT_SECONDS, self._bundle_waited
                )
            return
        now = datetime.fromtimestamp(self._clock.seconds(), UTC)
        # The roots the issuer chain leads to: after a renewal, the old root
        # (replaced, left to expire) and the new one are in the anchors too.
        for anchor in bundle.active_anchors:
            self._check_certificate(anchor, ROLE_ROOT, now)
        for position, certificate in enumerate(bundle.issuer_chain):
            role = ROLE_ISSUER if position == 0 else ROLE_INTERMEDIATE
            self._check_certificate(certificate, role, now)
        if self._metrics is not None:
            self._metrics.record_bundle(bundle)

    def _bundle_waited(self) -> None:
        self._bundle_wait = None
        self.check()

    def _check_certificate(
        self, certificate: Certificate, role: str, now: datetime
    ) -> None:
        """
        Log a warning if C{certificate} expires within L{EXPIRY_WARNING_DAYS}
        of C{now}, an error if it has expired by C{now}.

        @param role: L{ROLE_ROOT}, L{ROLE_ISSUER} or L{ROLE_INTERMEDIATE}.
        """
        not_after = certificate.not_valid_after_utc
        subject = certificate.subject.rfc4514_string()
        if now > not_after:
            days, hours = _days_and_hours(now - not_after)
            self._log.error(
                "certificate has expired: the {role} certificate {subject} "
                "expired {days} days and {hours} hours ago, at {not_after}; "
                "replace the trust bundle",
                role=role,
                subject=subject,
                days=days,
                hours=hours,
                not_after=not_after.isoformat(),
            )
        elif not_after - now <= timedelta(days=EXPIRY_WARNING_DAYS):
            days, hours = _days_and_hours(not_after - now)
            self._log.warn(
                "certificate expires in {days} days and {hours} hours: the "
                "{role} certificate {subject}, at {not_after}; replace the "
                "trust bundle before then",
                role=role,
                subject=subject,
                days=days,
                hours=hours,
                not_after=not_after.isoformat(),
            )


__all__ = [
    "BUNDLE_WAIT_SECONDS",
    "EXPIRY_CHECK_INTERVAL_SECONDS",
    "EXPIRY_WARNING_DAYS",
    "ExpiryChecker",
]
