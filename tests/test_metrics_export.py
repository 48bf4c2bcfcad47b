"""
Tests for what the metrics port exports beyond Dapr's counters: the signing
latency histogram (observed by the servicer, summed exactly over worker
processes), the process metrics, and a HELP text for every metric.
"""

import os

from prometheus_client.parser import text_string_to_metric_families
from twisted.trial.unittest import SynchronousTestCase

from sentry_tx.identity.caller import VALIDATOR_INSECURE as INSECURE
from sentry_tx.metrics import (
    SIGN_DURATION_BUCKETS_SECONDS,
    SIGN_DURATION_NAME,
    SentryMetrics,
    metrics_root,
)
from sentry_tx.server.servicer import CAServicer, Refusal
from sentry_tx.testing.authority import FakeCertificateAuthority, FakeValidator
from sentry_tx.testing.certificates import FIXED_NOW, make_bundle, sign_request
from sentry_tx.testing.clocks import ImmediateReactor
from sentry_tx.testing.grpc_client import run_now
from sentry_tx.testing.rendering import render


class FakeMonotonic:
    """
    A monotonic clock that moves only when told, and by C{step} on every
    read when set.
    """

    def __init__(self, step=0.0):
        self.now = 100.0
        self.step = step

    def __call__(self):
        value = self.now
        self.now += self.step
        return value


def _samples(metrics):
    """
    The exposition of C{metrics}, parsed: C{{(sample name, labels): value}}
    and the families.
    """
    _, body = render(metrics_root(metrics), b"/metrics")
    families = list(text_string_to_metric_families(body.decode()))
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in families
        for sample in family.samples
    }
    return samples, families


def _bucket(outcome, bound):
    return (
        SIGN_DURATION_NAME + "_bucket",
        tuple(sorted({"le": bound, "outcome": outcome}.items())),
    )


class SignDurationTests(SynchronousTestCase):
    """
    C{dapr_sentry_cert_sign_duration_seconds}, by outcome.
    """

    def test_servicer_observes_outcomes(self):
        """
        The servicer times each call from its start to its answer: a signed
        certificate under C{success}, a refusal under its reason.
        """
        clock = FakeMonotonic(step=0.003)
        metrics = SentryMetrics(monotonic=clock)
        servicer = CAServicer(
            ImmediateReactor(FIXED_NOW.timestamp()),
            FakeCertificateAuthority(make_bundle()),
            {INSECURE: FakeValidator(INSECURE, needs_reactor=False)},
            INSECURE,
            metrics,
        )
        deadline = FIXED_NOW.timestamp() + 10

        def sign(request):
            return run_now(servicer.sign(request, deadline))

        sign(sign_request())
        self.assertRaises(Refusal, sign, sign_request(csr=b"not a CSR"))
        samples, _ = _samples(metrics)
        count = SIGN_DURATION_NAME + "_count"
        self.assertEqual(samples[(count, (("outcome", "success"),))], 1)
        self.assertEqual(samples[(count, (("outcome", "cert_parse"),))], 1)
        self.assertEqual(samples[(count, (("outcome", "validator"),))], 0)
        # Each call read the clock twice, 3 ms apart.
        self.assertAlmostEqual(
            samples[(SIGN_DURATION_NAME + "_sum", (("outcome", "success"),))], 0.003
        )
        self.assertEqual(samples[_bucket("success", "0.0025")], 0)
        self.assertEqual(samples[_bucket("success", "0.005")], 1)
        self.assertEqual(samples[_bucket("success", "+Inf")], 1)

    def test_buckets_cumulative(self):
        """
        Buckets are cumulative and inclusive of their bound; C{_count} is the
        +Inf bucket.
        """
        metrics = SentryMetrics()
        for seconds in (0.001, 0.001, 0.2, 30.0):
            metrics.sign_duration.labels(outcome="success").observe(seconds)
        samples, _ = _samples(metrics)
        self.assertEqual(samples[_bucket("success", "0.001")], 2)
        self.assertEqual(samples[_bucket("success", "0.25")], 3)
        self.assertEqual(samples[_bucket("success", "10.0")], 3)
        self.assertEqual(samples[_bucket("success", "+Inf")], 4)
        self.assertEqual(
            samples[(SIGN_DURATION_NAME + "_count", (("outcome", "success"),))], 4
        )

    def test_processes_sum_exactly(self):
        """
        Serving processes sharing a metrics directory add up, in any of
        them, to the counts and histogram one process observing every call
        would have; a process that is gone (killed) leaves its counts.
        """
        import itertools

        directory = self.mktemp()
        os.mkdir(directory)
        names = itertools.count(1)
        processes = []
        for _ in range(3):
            metrics = SentryMetrics()
            name = next(names)
            metrics.share(directory, process_identifier=lambda name=name: name)
            processes.append(metrics)
        reader, first, second = processes
        single = SentryMetrics()
        observations = [
            (first, "success", 0.0011),
            (second, "success", 0.0042),
            (first, "validator", 0.7),
            (second, "cert_sign", 12.5),
        ]
        for process, outcome, seconds in observations:
            for metrics in (process, single):
                metrics.sign_duration.labels(outcome=outcome).observe(seconds)
                metrics.sign_success.inc()
        del first, second, processes
        shared, _ = _samples(reader)
        alone, _ = _samples(single)
        for key, value in alone.items():
            if key[0].startswith(SIGN_DURATION_NAME) and not key[0].endswith("_sum"):
                self.assertEqual(shared[key], value, key)
        self.assertEqual(
            reader.registry.get_sample_value("dapr_sentry_cert_sign_success_total"), 4
        )

    def test_bucket_bounds(self):
        """
        The buckets span a millisecond signature to the 10 s validation
        limit, in increasing order.
        """
        self.assertEqual(
            list(SIGN_DURATION_BUCKETS_SECONDS), sorted(SIGN_DURATION_BUCKETS_SECONDS)
        )
        self.assertLessEqual(SIGN_DURATION_BUCKETS_SECONDS[0], 0.001)
        self.assertEqual(SIGN_DURATION_BUCKETS_SECONDS[-1], 10.0)


class ExportedMetricsTests(SynchronousTestCase):
    """
    The families on the metrics port.
    """

    def test_process_metrics(self):
        """
        Prometheus' process metrics are exported.
        """
        samples, _ = _samples(SentryMetrics())
        names = {name for name, _ in samples}
        for name in (
            "process_cpu_seconds_total",
            "process_resident_memory_bytes",
            "process_open_fds",
            "process_start_time_seconds",
        ):
            self.assertIn(name, names)

    def test_every_metric_has_help(self):
        """
        Every family has a HELP text that is a sentence, not its name; each
        of sentry_tx's says what it counts or measures in words of its own.
        """
        _, families = _samples(SentryMetrics())
        self.assertGreater(len(families), 10)
        texts = set()
        for family in families:
            self.assertGreater(len(family.documentation.split()), 3, family.name)
            self.assertNotEqual(family.documentation, family.name)
            texts.add(family.documentation)
        self.assertEqual(len(texts), len(families))
