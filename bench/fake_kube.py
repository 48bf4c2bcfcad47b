"""
Run the fake Kubernetes API server
(sentry_tx.testing.kubernetes.FakeKubernetesAPI) in its own process, for the
kubernetes-mode measurements (bench/kube_storm.py).

    python bench/fake_kube.py WORKDIR DELAY_SECONDS [PODS]

It listens on 127.0.0.1 (a free port) with DELAY_SECONDS added to every
TokenReview and every single Pod GET (lists and watches are not delayed),
stores a Configuration `daprsystem` and an empty `dapr-trust-bundle` Secret
and ConfigMap in namespace `default`, and PODS pods (default 1) `myapp-0`,
`myapp-1`... (app id `myapp`, service account `myapp`) in `apps`; then it
writes WORKDIR/kubeconfig and, last, WORKDIR/fake-kube.json with the
kubeconfig path and one token per pod that the fake TokenReview accepts.
Every half second it writes WORKDIR/requests.json: the requests received so
far, by kind (tokenreview, pod-get, list, watch, other).  It runs until
killed.
"""

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

SENTRY_NAMESPACE = "default"
APP_NAMESPACE = "apps"
TRUST_BUNDLE = "dapr-trust-bundle"
COUNT_INTERVAL_SECONDS = 0.5


def _write_json(path, document):
    with open(path + ".tmp", "w") as f:
        json.dump(document, f)
    os.replace(path + ".tmp", path)


def request_counts(fake, counted):
    """
    Count the requests received since the last call into C{counted}.
    """
    requests = fake.requests
    for method, path in requests:
        if path.endswith("/tokenreviews"):
            kind = "tokenreview"
        elif method == "GET" and "/namespaces/" in path and "/pods/" in path:
            kind = "pod-get"
        elif method == "GET" and path in (
            "/api/v1/pods",
            "/apis/dapr.io/v1alpha1/configurations",
        ):
            kind = "list-or-watch"
        else:
            kind = "other"
        counted[kind] = counted.get(kind, 0) + 1
    # Keep the fake's memory flat over long runs: its log is counted here.
    del requests[:]
    fake.reviews.clear()
    return counted


def main(workdir, delay_seconds, pods):
    from twisted.internet import reactor
    from twisted.internet.task import LoopingCall

    from sentry_tx.testing.kubeconfig import write_kubeconfig
    from sentry_tx.testing.kubernetes import FakeKubernetesAPI
    from sentry_tx.testing.kubernetes_tokens import FAKE_API_TOKEN

    fake = FakeKubernetesAPI(reactor)
    fake.tokenreview_latency_seconds = delay_seconds
    fake.pod_latency_seconds = delay_seconds
    fake.start()
    fake.add_configuration(
        SENTRY_NAMESPACE, "daprsystem", {"mtls": {"workloadCertTTL": "24h"}}
    )
    fake.add_secret(SENTRY_NAMESPACE, TRUST_BUNDLE)
    fake.add_config_map(SENTRY_NAMESPACE, TRUST_BUNDLE)
    tokens = []
    for index in range(pods):
        name = f"myapp-{index}"
        fake.add_pod(APP_NAMESPACE, name, "myapp", {"dapr.io/app-id": "myapp"})
        tokens.append(fake.issue_token(APP_NAMESPACE, "myapp", name))
    kubeconfig = os.path.join(workdir, "kubeconfig")
    write_kubeconfig(kubeconfig, fake.kubeconfig())
    counted = {}

    def count():
        _write_json(
            os.path.join(workdir, "requests.json"), request_counts(fake, counted)
        )

    LoopingCall(count).start(COUNT_INTERVAL_SECONDS)
    _write_json(
        os.path.join(workdir, "fake-kube.json"),
        {
            "kubeconfig": kubeconfig,
            "token": tokens[0],
            "tokens": tokens,
            "namespace": APP_NAMESPACE,
            # For bench/chaos.py, which reads the published anchors.
            "url": fake.url,
            "api_token": FAKE_API_TOKEN,
            "ca_pem": fake.server_certificate_pem.decode("ascii"),
        },
    )
    reactor.run()


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 1)
