# -*- test-case-name: tests.test_metrics_export,tests.test_monitoring,tests.test_web -*-
"""
Sentry's Prometheus metrics, with Dapr's names, and the resource serving them.

Each L{SentryMetrics} owns its own registry so that tests and several
instances in one process never share counters.
"""

import threading
import time
from bisect import bisect_left

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import HistogramMetricFamily
from twisted.web.resource import NoResource, Resource

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

_NANOSECONDS_PER_SECOND = 1_000_000_000


class SignDurationHistogram:
    """
    The latency of SignCertificate calls, by outcome, as a Prometheus
    histogram whose every figure is an integer (bucket counts, and the sum
    in nanoseconds), so that worker processes' histograms add up in the
    parent exactly, as the counters do.

    Observed from gRPC threads: every change holds a lock.
    """

    def __init__(self, buckets=SIGN_DURATION_BUCKETS_SECONDS):
        self.buckets = tuple(buckets)
        self._lock = threading.Lock()
        # Per outcome: a count per bucket (not cumulative; the last is +Inf)
        # and the sum of the observations in nanoseconds.
        self._counts = {
            outcome: [0] * (len(self.buckets) + 1) for outcome in SIGN_OUTCOMES
        }
        self._sums_ns = {outcome: 0 for outcome in SIGN_OUTCOMES}

    def observe(self, outcome, seconds):
        """
        Count one call of C{outcome} that took C{seconds}.
        """
        index = bisect_left(self.buckets, seconds)
        nanoseconds = max(0, round(seconds * _NANOSECONDS_PER_SECOND))
        with self._lock:
            self._counts[outcome][index] += 1
            self._sums_ns[outcome] += nanoseconds

    def snapshot(self):
        """
        C{{outcome: (bucket counts, sum in nanoseconds)}}, the counts per
        bucket (not cumulative).
        """
        with self._lock:
            return {
                outcome: (tuple(counts), self._sums_ns[outcome])
                for outcome, counts in self._counts.items()
            }

    def add(self, outcome, counts, sum_ns):
        """
        Add another process's growth: C{counts} per bucket (as
        L{snapshot}'s) and C{sum_ns} nanoseconds.
        """
        if len(counts) != len(self.buckets) + 1:
            raise ValueError("bucket counts do not match the buckets")
        with self._lock:
            mine = self._counts.setdefault(outcome, [0] * (len(self.buckets) + 1))
            for index, count in enumerate(counts):
                mine[index] += count
            self._sums_ns[outcome] = self._sums_ns.get(outcome, 0) + sum_ns

    def describe(self):
        return [HistogramMetricFamily(SIGN_DURATION_NAME, _SIGN_DURATION_HELP, labels=["outcome"])]

    def collect(self):
        family = HistogramMetricFamily(
            SIGN_DURATION_NAME, _SIGN_DURATION_HELP, labels=["outcome"]
        )
        for outcome, (counts, sum_ns) in sorted(self.snapshot().items()):
            cumulative, buckets = 0, []
            for bound, count in zip(self.buckets + (float("inf"),), counts):
                cumulative += count
                bucket = "+Inf" if bound == float("inf") else repr(bound)
                buckets.append((bucket, cumulative))
            family.add_metric([outcome], buckets, sum_ns / _NANOSECONDS_PER_SECOND)
        yield family


_SIGN_DURATION_HELP = (
    "Time from the arrival of a SignCertificate call to its answer, in"
    " seconds, by outcome: success, or the failure reason (validator,"
    " cert_parse, cert_sign)."
)


class SignTimer:
    """
    One call being timed; L{done} records it under its outcome, once.
    """

    def __init__(self, histogram, monotonic):
        self._histogram = histogram
        self._monotonic = monotonic
        self._started = monotonic()
        self._done = False

    def done(self, outcome):
        if not self._done:
            self._done = True
            self._histogram.observe(outcome, self._monotonic() - self._started)


class SentryMetrics:
    """
    The counters and gauges sentry_tx exports, the signing latency
    histogram, and the process's own C{process_*} metrics.

    prometheus_client appends C{_total} to counter names itself, so the names
    below are Dapr's without it.

    @param monotonic: the clock signing latency is measured with (seconds,
        monotonic); tests pass a fake.
    """

    def __init__(self, registry=None, monotonic=time.monotonic):
        # Dapr exports no *_created series; neither do we.
        disable_created_metrics()
        if registry is None:
            registry = CollectorRegistry(auto_describe=True)
        self.registry = registry
        self._monotonic = monotonic
        # process_cpu_seconds_total, process_resident_memory_bytes,
        # process_open_fds, process_start_time_seconds ... of this process
        # (with worker processes: of the twistd process).
        ProcessCollector(registry=registry)
        self.sign_duration = SignDurationHistogram()
        registry.register(self.sign_duration)
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
        )
        self.rootcert_expiry_timestamp = Gauge(
            "dapr_sentry_rootcert_expiry_timestamp",
            "The unix time, in seconds, at which the earliest trust anchor in"
            " service expires.",
            registry=registry,
        )

    def sign_timer(self):
        """
        Start timing one SignCertificate call; call C{done(outcome)} on the
        result when it is answered.
        """
        return SignTimer(self.sign_duration, self._monotonic)

    def record_bundle(self, bundle):
        """
        Publish the expiry times of a bundle that has gone into service.
        """
        self.issuercert_expiry_timestamp.set(bundle.issuer.not_valid_after_utc.timestamp())
        self.rootcert_expiry_timestamp.set(bundle.roots_not_after.timestamp())


def metrics_root(metrics):
    """
    A web root serving the Prometheus text at C{/metrics} and at C{/}; other
    paths are 404.
    """
    return _MetricsResource(metrics.registry)


class _MetricsResource(Resource):
    """
    The Prometheus text exposition of one registry.

    Rendered on the reactor thread: a dozen series take microseconds, and
    prometheus_client's own Twisted resource would import the global reactor
    and hop to a thread pool for nothing.
    """

    def __init__(self, registry):
        super().__init__()
        self._registry = registry

    def getChild(self, path, request):
        if path in (b"", b"metrics") and not request.postpath:
            return self
        return NoResource()

    def render_GET(self, request):
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode("ascii"))
        return generate_latest(self._registry)
