# -*- test-case-name: tests.test_metrics_export,tests.test_monitoring,tests.test_web -*-
"""
Sentry's Prometheus metrics, with Dapr's names, and the resource serving them.

Each L{SentryMetrics} owns its own registry so that tests and several
instances in one process never share counters; every serving process
shares its counts with the others through C{prometheus_client}'s
multiprocess mode (L{SentryMetrics.share}).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Final, Literal

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
    values,
)
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from twisted.application.service import Service
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, NoResource, Resource

if TYPE_CHECKING:
    from sentry_tx.ca.bundle import TrustBundle

MULTIPROC_DIRECTORY_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"

FAILURE_REASON_VALIDATOR = "validator"
FAILURE_REASON_CERT_PARSE = "cert_parse"
FAILURE_REASON_CERT_SIGN = "cert_sign"
FAILURE_REASONS = (
    FAILURE_REASON_VALIDATOR,
    FAILURE_REASON_CERT_PARSE,
    FAILURE_REASON_CERT_SIGN,
)


OUTCOME_SUCCESS = "success"
SIGN_OUTCOMES = (OUTCOME_SUCCESS,) + FAILURE_REASONS
"""
The C{outcome} label of L{SIGN_DURATION_NAME}: success, or the failure
reason.
"""

SIGN_DURATION_NAME = "dapr_sentry_cert_sign_duration_seconds"

SIGN_DURATION_BUCKETS_SECONDS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
"""
Upper bounds of the signing latency buckets: an INSECURE signature takes
about a millisecond, a KUBERNETES one two API round trips, and validation
gives up after 10 s.
"""

_SIGN_DURATION_HELP = (
    "Time from the arrival of a SignCertificate call to its answer, in"
    " seconds, by outcome: success, or the failure reason (validator,"
    " cert_parse, cert_sign)."
)


class SignTimer:
    """
    One call being timed; L{done} records it under its outcome, once.
    """

    def __init__(self, metrics: SentryMetrics, monotonic: Callable[[], float]) -> None:
        self._metrics = metrics
        self._monotonic = monotonic
        self._started = monotonic()
        self._done = False

    def done(self, outcome: str) -> None:
        if not self._done:
            self._done = True
            self._metrics.sign_durations[outcome].observe(
                self._monotonic() - self._started
            )


PROCESS_WIDE: Final[Literal["livesum"]] = "livesum"
"""
The multiprocess mode of a gauge that one process owns (the twistd
process): every other process holds it at zero, so the sum is the owner's
value, and a dead process's zero is dropped.
"""


class SentryMetrics:
    """
    The counters and gauges sentry_tx exports, the signing latency
    histogram, and the process's own C{process_*} metrics.

    At first every metric counts in this process's memory (tests).  Once
    L{share} is called (every serving process does so at start), they
    count in files of a directory shared by every serving process, and
    C{registry} sums them over all processes (C{prometheus_client}'s
    multiprocess mode): a process killed at any time leaves its counts.

    Which process counts what: each counts its own SignCertificate calls
    and server certificates; the twistd process alone counts the
    process-wide events (C{issuercert_changed_total},
    C{issuercert_reload_failed_total}), sets the expiry gauges and the
    serving processes, and counts restarts.

    prometheus_client appends C{_total} to counter names itself, so the names
    below are Dapr's without it.

    @ivar registry: the registry C{/metrics} serves.
    @param monotonic: the clock signing latency is measured with (seconds,
        monotonic); tests pass a fake.
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        # Dapr exports no *_created series; neither do we.
        disable_created_metrics()
        if registry is None:
            registry = CollectorRegistry(auto_describe=True)
        self.registry = registry
        self.directory: str | None = None
        self._monotonic = monotonic
        # process_cpu_seconds_total, process_resident_memory_bytes,
        # process_open_fds, process_start_time_seconds ... of this process
        # (with serving copies: of the twistd process).
        ProcessCollector(registry=registry)
        self._define(registry)

    def _define(self, registry: CollectorRegistry | None) -> None:
        """
        Make every metric, registered in C{registry} (None: in none).  A
        new metric goes here; a labelled one makes its label values here
        too, so that it exists at zero from the start.
        """
        self.sign_duration = Histogram(
            SIGN_DURATION_NAME,
            _SIGN_DURATION_HELP,
            ["outcome"],
            buckets=SIGN_DURATION_BUCKETS_SECONDS,
            registry=registry,
        )
        # Looked up once here, not at every call.
        self.sign_durations = {
            outcome: self.sign_duration.labels(outcome=outcome)
            for outcome in SIGN_OUTCOMES
        }
        self.sign_request_received = Counter(
            "dapr_sentry_cert_sign_request_received",
            "SignCertificate calls received (certificate signing requests),"
            " whatever their outcome.",
            registry=registry,
        )
        self.sign_success = Counter(
            "dapr_sentry_cert_sign_success",
            "Workload certificates signed and returned to the caller.",
            registry=registry,
        )
        self.sign_failure = Counter(
            "dapr_sentry_cert_sign_failure",
            "SignCertificate calls refused, by reason: validator (the caller"
            " or the request did not pass validation), cert_parse (the CSR"
            " was unusable), cert_sign (signing failed).",
            ["reason"],
            registry=registry,
        )
        for reason in FAILURE_REASONS:
            # Export every reason from the start, at zero, so that a rate()
            # over the series has a first sample.
            self.sign_failure.labels(reason=reason)
        self.servercert_issue_failed = Counter(
            "dapr_sentry_servercert_issue_failed",
            "Failures to issue or renew sentry_tx's own gRPC server TLS"
            " certificate.",
            registry=registry,
        )
        self.issuercert_changed = Counter(
            "dapr_sentry_issuercert_changed",
            "Changes seen in the issuer credential files, each followed by"
            " one reload.",
            registry=registry,
        )
        self.issuercert_reload_failed = Counter(
            "dapr_sentry_issuercert_reload_failed",
            "Changed trust bundles refused at reload; the previous bundle"
            " stayed in service.",
            registry=registry,
        )
        self.issuercert_expiry_timestamp = Gauge(
            "dapr_sentry_issuercert_expiry_timestamp",
            "The unix time, in seconds, at which the issuer certificate in"
            " service expires.",
            registry=registry,
            multiprocess_mode=PROCESS_WIDE,
        )
        self.rootcert_expiry_timestamp = Gauge(
            "dapr_sentry_rootcert_expiry_timestamp",
            "The unix time, in seconds, at which the earliest trust anchor in"
            " service expires.",
            registry=registry,
            multiprocess_mode=PROCESS_WIDE,
        )
        self.serving_processes = Gauge(
            "dapr_sentry_serving_processes",
            "Processes serving gRPC now: the twistd process and the copies"
            " that answer their liveness checks.",
            registry=registry,
            multiprocess_mode=PROCESS_WIDE,
        )
        self.serving_process_restarts = Counter(
            "dapr_sentry_serving_process_restarts",
            "Serving copies started again after they ended or stopped"
            " answering their liveness checks.",
            registry=registry,
        )
        # Automatic CA renewal (sentry_tx.ca.renewal_service), the names of
        # Dapr's PR #10290; set by the twistd process, which alone renews.
        self.ca_renewal = Counter(
            "dapr_sentry_ca_renewal",
            "Automatic CA renewals: a new root appended to the trust anchors"
            " and a pending issuer written.",
            registry=registry,
        )
        self.ca_switchover = Counter(
            "dapr_sentry_ca_switchover",
            "Switches of the signing issuer to a renewed one.",
            registry=registry,
        )
        self.ca_renewal_pending = Gauge(
            "dapr_sentry_ca_renewal_pending",
            "1 while a renewed issuer waits for its switch, else 0.",
            registry=registry,
            multiprocess_mode=PROCESS_WIDE,
        )
        self.ca_switchover_timestamp = Gauge(
            "dapr_sentry_ca_switchover_timestamp",
            "The unix time, in seconds, at which the pending renewed issuer"
            " takes over; 0 when no renewal is pending.",
            registry=registry,
            multiprocess_mode=PROCESS_WIDE,
        )

    def share(
        self, directory: str, process_identifier: Callable[[], int] = os.getpid
    ) -> None:
        """
        Count from now on in files under C{directory}, with every other
        serving process; C{registry} then serves the sums over all of them
        (and this process's C{process_*} metrics).

        @param process_identifier: names this process's files (tests give
            two instances in one process different names).
        """
        saved_class = values.ValueClass
        saved_directory = os.environ.get(MULTIPROC_DIRECTORY_VARIABLE)
        # prometheus_client reads both when a value is made: set them while
        # this process's metrics are made, and put them back after.
        values.ValueClass = values.MultiProcessValue(process_identifier)
        os.environ[MULTIPROC_DIRECTORY_VARIABLE] = directory
        try:
            self._define(None)
        finally:
            values.ValueClass = saved_class
            if saved_directory is None:
                del os.environ[MULTIPROC_DIRECTORY_VARIABLE]
            else:
                os.environ[MULTIPROC_DIRECTORY_VARIABLE] = saved_directory
        registry = CollectorRegistry(auto_describe=True)
        MultiProcessCollector(registry, path=directory)
        ProcessCollector(registry=registry)
        self.registry = registry
        self.directory = directory

    def forget_process(self, pid: int) -> None:
        """
        Drop the gauges of a serving process that ended (its counters stay
        in the sums).
        """
        if self.directory is not None:
            mark_process_dead(pid, self.directory)

    def record_renewal(
        self, renewed: bool, switched: bool, switch_at: datetime | None
    ) -> None:
        """
        Count a renewal or a switch, and publish the pending switch time
        (an aware datetime, or None when nothing is pending).
        """
        if renewed:
            self.ca_renewal.inc()
        if switched:
            self.ca_switchover.inc()
        self.ca_renewal_pending.set(0 if switch_at is None else 1)
        self.ca_switchover_timestamp.set(
            0 if switch_at is None else switch_at.timestamp()
        )

    def sign_timer(self) -> SignTimer:
        """
        Start timing one SignCertificate call; call C{done(outcome)} on the
        result when it is answered.
        """
        return SignTimer(self, self._monotonic)

    def record_bundle(self, bundle: TrustBundle) -> None:
        """
        Publish the expiry times of a bundle that has gone into service.
        """
        self.issuercert_expiry_timestamp.set(
            bundle.issuer.not_valid_after_utc.timestamp()
        )
        self.rootcert_expiry_timestamp.set(bundle.roots_not_after.timestamp())


class SharedMetrics(Service):
    """
    Makes L{SentryMetrics} count in the directory shared by every serving
    process, at start (never at build: the directory is made then).

    @param directory: returns the directory once started (the twistd
        process's L{sentry_tx.rundir.PrivateDirectory}, or a copy's
        C{PROMETHEUS_MULTIPROC_DIR}).
    """

    def __init__(
        self, metrics: SentryMetrics, directory: Callable[[], str]
    ) -> None:
        self._metrics = metrics
        self._directory = directory

    def startService(self) -> None:
        super().startService()
        self._metrics.share(self._directory())


def metrics_root(metrics: SentryMetrics) -> Resource:
    """
    A web root serving the Prometheus text at C{/metrics} and at C{/}; other
    paths are 404.
    """
    return _MetricsResource(metrics)


class _MetricsResource(Resource):
    """
    The Prometheus text exposition of one registry.

    Rendered on the reactor thread: a dozen series take microseconds, and
    prometheus_client's own Twisted resource would import the global reactor
    and hop to a thread pool for nothing.
    """

    def __init__(self, metrics: SentryMetrics) -> None:
        super().__init__()
        self._metrics = metrics

    def getChild(self, path: bytes, request: IRequest) -> IResource:
        if path in (b"", b"metrics") and not request.postpath:
            return self
        return NoResource()

    def render_GET(self, request: IRequest) -> bytes:
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode("ascii"))
        return generate_latest(self._metrics.registry)
