# -*- test-case-name: tests.test_ipc,tests.test_metrics_export,tests.test_workers -*-
"""
What a worker pool's parent and its worker processes say to each other.

The parent (L{sentry_tx.server.workers}) talks AMP to each worker
(L{sentry_tx.server.worker}) over the worker's stdin and stdout.  Only the
parent asks:

  - L{Start}: serve this configuration and trust bundle; answer the port
    bound.
  - L{Reload}: swap in this configuration and trust bundle.
  - L{Counters}: the sign counters counted since the last L{Counters} (or
    L{Stop}) answer.
  - L{Stop}: stop serving (calls in flight have the grace period), answer
    the last counts, then exit.

This module also holds how a L{SentryConfig} and a L{TrustBundle} cross the
pipe.  The bundle crosses as its three PEM documents; the issuer key's PEM
is sent only on the pipe to a worker, and is never logged nor put in an
error text.
"""

import json
from dataclasses import fields
from datetime import timedelta

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from twisted.protocols import amp

from sentry_tx.ca.bundle import TrustBundle
from sentry_tx.config import MTLSConfig, SentryConfig, TokenValidatorConfig

WORKER_MODULE = "sentry_tx.server.worker"
"""
What C{python -m} runs to start a worker.
"""

AMP_VALUE_MAX_BYTES = amp.MAX_VALUE_LENGTH
"""
The longest value one AMP key may carry.
"""

LONG_BYTES_MAX_BYTES = 16 * 1024 * 1024
"""
The longest value a L{LongBytes} argument accepts (a bundle file may be up
to 1 MiB; see L{sentry_tx.ca.store.MAX_BUNDLE_FILE_BYTES}).
"""

_ONE_MICROSECOND = timedelta(microseconds=1)


class WorkerRefused(Exception):
    """
    A worker could not do what it was asked.  The message says why, for an
    operator; it never holds key material.
    """


class LongBytes(amp.Argument):
    """
    A C{bytes} argument of any length up to L{LONG_BYTES_MAX_BYTES}: AMP
    caps one value at 64 KiB, so the value is split over the keys
    C{<name>.0}, C{<name>.1}, ..., and C{<name>} holds how many there are.
    An optional one that is None is not sent, and arrives as None.
    """

    def to_bytes(self, value):
        """
        The bytes sent for C{value}.
        """
        if not isinstance(value, bytes):
            raise TypeError(f"must be bytes, not {type(value).__name__}")
        return value

    def from_bytes(self, data):
        """
        The value received as C{data}.
        """
        return data

    def toBox(self, name, strings, objects, proto):
        value = self.retrieve(objects, name.decode("ascii"), proto)
        if value is None and self.optional:
            return
        value = self.to_bytes(value)
        if len(value) > LONG_BYTES_MAX_BYTES:
            raise ValueError(
                f"{name!r} is {len(value)} bytes long; at most"
                f" {LONG_BYTES_MAX_BYTES} can be sent"
            )
        chunks = [
            value[offset : offset + AMP_VALUE_MAX_BYTES]
            for offset in range(0, len(value), AMP_VALUE_MAX_BYTES)
        ]
        strings[name] = str(len(chunks)).encode("ascii")
        for index, chunk in enumerate(chunks):
            strings[_chunk_key(name, index)] = chunk

    def fromBox(self, name, strings, objects, proto):
        if self.optional and name not in strings:
            objects[name.decode("ascii")] = None
            return
        count = int(strings[name])
        if not 0 <= count <= -(-LONG_BYTES_MAX_BYTES // AMP_VALUE_MAX_BYTES):
            raise ValueError(f"{name!r} claims {count} chunks")
        objects[name.decode("ascii")] = self.from_bytes(
            b"".join(strings[_chunk_key(name, index)] for index in range(count))
        )


class LongUnicode(LongBytes):
    """
    A C{str} argument of any length, sent as UTF-8 like L{LongBytes}.
    """

    def to_bytes(self, value):
        if not isinstance(value, str):
            raise TypeError(f"must be str, not {type(value).__name__}")
        return value.encode("utf-8")

    def from_bytes(self, data):
        return data.decode("utf-8")


def _chunk_key(name, index):
    return name + b"." + str(index).encode("ascii")


_BUNDLE_ARGUMENTS = [
    (b"config_json", LongUnicode()),
    (b"anchors_pem", LongBytes()),
    (b"chain_pem", LongBytes()),
    (b"key_pem", LongBytes()),
    # The JWT signing key and its JWKS (--jwt-enabled), as stored: the
    # parent loaded and checked them; absent when JWTs are off.
    (b"jwt_key_pem", LongBytes(optional=True)),
    (b"jwks_json", LongBytes(optional=True)),
]

_COUNTS_RESPONSE = [
    (b"received", amp.Integer()),
    (b"success", amp.Integer()),
    (b"failures", amp.AmpList([(b"reason", amp.Unicode()), (b"count", amp.Integer())])),
    (b"servercert_issue_failed", amp.Integer()),
    # The signing latency histogram's growth, per outcome: counts per
    # bucket and the sum in nanoseconds (integers, so that sums are exact).
    (
        b"sign_durations",
        amp.AmpList(
            [
                (b"outcome", amp.Unicode()),
                (b"buckets", amp.ListOf(amp.Integer())),
                (b"sum_ns", amp.Integer()),
            ],
            optional=True,
        ),
    ),
]


class Start(amp.Command):
    """
    Serve C{config} (its C{listen_address} and C{port}, with SO_REUSEPORT)
    with the bundle given as PEM.  Answers the port bound.
    """

    arguments = _BUNDLE_ARGUMENTS
    response = [(b"port", amp.Integer())]
    errors = {WorkerRefused: b"REFUSED"}


class Reload(amp.Command):
    """
    Put C{config} and the bundle given as PEM in service without closing the
    listener.  Answers once the new bundle signs.
    """

    arguments = _BUNDLE_ARGUMENTS
    response = []
    errors = {WorkerRefused: b"REFUSED"}


class Counters(amp.Command):
    """
    The sign counters counted since the previous L{Counters} or L{Stop}
    answer (see L{CounterDeltas}).
    """

    arguments = []
    response = _COUNTS_RESPONSE
    errors = {WorkerRefused: b"REFUSED"}


class Stop(amp.Command):
    """
    Stop serving: take no new calls, give calls in flight the grace period,
    then answer the last counts (as L{Counters}) and exit.
    """

    arguments = []
    response = _COUNTS_RESPONSE
    errors = {WorkerRefused: b"REFUSED"}


# The configuration


def config_to_json(config):
    """
    Encode a L{SentryConfig} as JSON text for L{Start} and L{Reload}.

    Durations are whole microseconds (exactly what a L{timedelta} holds);
    tuples are lists.

    @param config: a L{SentryConfig}.
    @return: L{str}.
    """
    document = {}
    for each in fields(SentryConfig):
        value = getattr(config, each.name)
        if isinstance(value, MTLSConfig):
            value = _mtls_to_document(value)
        elif isinstance(value, tuple):
            value = list(value)
        document[each.name] = value
    return json.dumps(document, sort_keys=True)


def config_from_json(text):
    """
    Decode what L{config_to_json} encoded.

    @param text: L{str}.
    @return: a L{SentryConfig}.
    @raise ValueError: if C{text} is not a whole, well-typed configuration.
    """
    document = json.loads(text)
    if not isinstance(document, dict):
        raise ValueError("a configuration must be a JSON object")
    expected = {each.name: each for each in fields(SentryConfig)}
    if set(document) != set(expected):
        missing = sorted(set(expected) - set(document))
        unknown = sorted(set(document) - set(expected))
        raise ValueError(f"configuration fields missing {missing}, unknown {unknown}")
    values = {}
    for name, value in document.items():
        kind = expected[name].type
        if kind is MTLSConfig:
            value = _mtls_from_document(value)
        elif kind is tuple:
            value = tuple(_checked(name, value, list))
        else:
            _checked(name, value, kind)
        values[name] = value
    return SentryConfig(**values)


def _checked(name, value, kind):
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"configuration field {name} must be {kind.__name__}")
    return value


def _mtls_to_document(mtls):
    return {
        "workload_cert_ttl_microseconds": mtls.workload_cert_ttl // _ONE_MICROSECOND,
        "allowed_clock_skew_microseconds": mtls.allowed_clock_skew // _ONE_MICROSECOND,
        "token_validators": [
            {
                "name": validator.name,
                "options": [list(pair) for pair in validator.options],
            }
            for validator in mtls.token_validators
        ],
    }


def _mtls_from_document(document):
    _checked("mtls", document, dict)
    validators = _checked("mtls.token_validators", document["token_validators"], list)
    return MTLSConfig(
        workload_cert_ttl=timedelta(
            microseconds=_checked(
                "mtls.workload_cert_ttl",
                document["workload_cert_ttl_microseconds"],
                int,
            )
        ),
        allowed_clock_skew=timedelta(
            microseconds=_checked(
                "mtls.allowed_clock_skew",
                document["allowed_clock_skew_microseconds"],
                int,
            )
        ),
        token_validators=tuple(
            TokenValidatorConfig(
                name=_checked("mtls.token_validators.name", each["name"], str),
                options=tuple(
                    (key, value)
                    for key, value in _checked(
                        "mtls.token_validators.options", each["options"], list
                    )
                ),
            )
            for each in validators
        ),
    )


# The trust bundle


def bundle_to_pems(bundle):
    """
    The three PEM documents of a bundle, for L{Start} and L{Reload}.

    @param bundle: a L{TrustBundle}.
    @return: C{(anchors_pem, chain_pem, key_pem)}; the key is unencrypted
        PKCS#8.  Send it to a worker and nowhere else.
    """
    key_pem = bundle.issuer_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return bundle.anchors_pem, bundle.issuer_chain_pem, key_pem


def bundle_from_pems(anchors_pem, chain_pem, key_pem):
    """
    Rebuild the L{TrustBundle} the parent sent with L{bundle_to_pems}.

    The parent loaded and verified it (L{sentry_tx.ca.bundle.load_bundle});
    it is rebuilt here without checking it again, so that a worker started
    after its issuer expired serves (and refuses calls with
    FAILED_PRECONDITION) exactly as the single-process authority keeps
    doing with that bundle.

    @raise ValueError: if a document does not parse; the message names the
        document and never quotes the key.
    """
    try:
        anchors = x509.load_pem_x509_certificates(anchors_pem)
    except ValueError:
        raise ValueError("the trust anchors do not parse") from None
    try:
        chain = x509.load_pem_x509_certificates(chain_pem)
    except ValueError:
        raise ValueError("the issuer chain does not parse") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        raise ValueError("the issuer key does not parse") from None
    return TrustBundle.from_certificates(anchors, chain, key)


# The counters


class CounterDeltas:
    """
    The worker's side of L{Counters}: how much each sign counter of a
    L{SentryMetrics} grew since the previous L{take}.

    @param metrics: the worker's L{SentryMetrics}.
    """

    def __init__(self, metrics):
        self._metrics = metrics
        self._reported_totals = {}
        self._reported_failures = {}
        self._reported_durations = {}

    def take(self):
        """
        The growth since the previous call, as the L{Counters} response.
        """
        metrics = self._metrics
        totals = {
            "received": _total(metrics.sign_request_received),
            "success": _total(metrics.sign_success),
            "servercert_issue_failed": _total(metrics.servercert_issue_failed),
        }
        failures = {
            sample.labels["reason"]: int(sample.value)
            for metric in metrics.sign_failure.collect()
            for sample in metric.samples
            if sample.name.endswith("_total")
        }
        answer = {
            name: value - self._reported_totals.get(name, 0)
            for name, value in totals.items()
        }
        answer["failures"] = [
            {"reason": reason, "count": count - self._reported_failures.get(reason, 0)}
            for reason, count in sorted(failures.items())
            if count != self._reported_failures.get(reason, 0)
        ]
        self._reported_totals, self._reported_failures = totals, failures
        durations = metrics.sign_duration.snapshot()
        answer["sign_durations"] = []
        for outcome, (counts, sum_ns) in sorted(durations.items()):
            old_counts, old_sum_ns = self._reported_durations.get(
                outcome, ((0,) * len(counts), 0)
            )
            grown = [new - old for new, old in zip(counts, old_counts)]
            if any(grown) or sum_ns != old_sum_ns:
                answer["sign_durations"].append(
                    {"outcome": outcome, "buckets": grown, "sum_ns": sum_ns - old_sum_ns}
                )
        self._reported_durations = durations
        return answer


def _total(counter):
    """
    The value of an unlabelled prometheus_client counter, as an L{int}.
    """
    for metric in counter.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total"):
                return int(sample.value)
    return 0


def add_counter_deltas(metrics, answer):
    """
    The parent's side of L{Counters} and L{Stop}: add a worker's counts to
    the parent's L{SentryMetrics}, so that its C{/metrics} shows the sum of
    every worker, monotonic across worker restarts.

    @param metrics: the parent's L{SentryMetrics}.
    @param answer: a L{Counters} or L{Stop} response.
    """
    for counter, count in (
        (metrics.sign_request_received, answer["received"]),
        (metrics.sign_success, answer["success"]),
        (metrics.servercert_issue_failed, answer["servercert_issue_failed"]),
    ):
        if count > 0:
            counter.inc(count)
    for failure in answer["failures"]:
        if failure["count"] > 0:
            metrics.sign_failure.labels(reason=failure["reason"]).inc(failure["count"])
    for durations in answer.get("sign_durations") or ():
        metrics.sign_duration.add(
            durations["outcome"], durations["buckets"], durations["sum_ns"]
        )
