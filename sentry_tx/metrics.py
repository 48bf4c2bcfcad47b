"""
Sentry's Prometheus metrics, with Dapr's names, and the resource serving them.

Each L{SentryMetrics} owns its own registry so that tests and several
instances in one process never share counters.
"""

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    disable_created_metrics,
    generate_latest,
)
from twisted.web.resource import NoResource, Resource

FAILURE_REASON_VALIDATOR = "validator"
FAILURE_REASON_CERT_PARSE = "cert_parse"
FAILURE_REASON_CERT_SIGN = "cert_sign"
FAILURE_REASONS = (
    FAILURE_REASON_VALIDATOR,
    FAILURE_REASON_CERT_PARSE,
    FAILURE_REASON_CERT_SIGN,
)


class SentryMetrics:
    """
    The counters and gauges sentry_tx exports.

    prometheus_client appends C{_total} to counter names itself, so the names
    below are Dapr's without it.
    """

    def __init__(self, registry=None):
        # Dapr exports no *_created series; neither do we.
        disable_created_metrics()
        if registry is None:
            registry = CollectorRegistry(auto_describe=True)
        self.registry = registry
        self.sign_request_received = Counter(
            "dapr_sentry_cert_sign_request_received",
            "The number of CSRs received.",
            registry=registry,
        )
        self.sign_success = Counter(
            "dapr_sentry_cert_sign_success",
            "The number of certificates issued successfully.",
            registry=registry,
        )
        self.sign_failure = Counter(
            "dapr_sentry_cert_sign_failure",
            "The number of errors that occurred when signing a CSR.",
            ["reason"],
            registry=registry,
        )
        for reason in FAILURE_REASONS:
            # Export every reason from the start, at zero, so that a rate()
            # over the series has a first sample.
            self.sign_failure.labels(reason=reason)
        self.servercert_issue_failed = Counter(
            "dapr_sentry_servercert_issue_failed",
            "The number of server TLS certificate issuance failures.",
            registry=registry,
        )
        self.issuercert_changed = Counter(
            "dapr_sentry_issuercert_changed",
            "The number of issuer certificate changes seen.",
            registry=registry,
        )
        self.issuercert_reload_failed = Counter(
            "dapr_sentry_issuercert_reload_failed",
            "The number of issuer credential reloads refused; the previous "
            "bundle stayed in service.",
            registry=registry,
        )
        self.issuercert_expiry_timestamp = Gauge(
            "dapr_sentry_issuercert_expiry_timestamp",
            "The unix time, in seconds, when the issuer certificate expires.",
            registry=registry,
        )
        self.rootcert_expiry_timestamp = Gauge(
            "dapr_sentry_rootcert_expiry_timestamp",
            "The unix time, in seconds, when the earliest trust anchor expires.",
            registry=registry,
        )

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
