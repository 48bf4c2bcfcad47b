"""
Run the fake Kubernetes API server (sentry_tx.testing.FakeKubernetesAPI) in
its own process, for bench/run.py's kubernetes-mode measurement.

    python bench/fake_kube.py WORKDIR DELAY_SECONDS

It listens on 127.0.0.1 (a free port) with DELAY_SECONDS added to every
TokenReview and every Pod GET, stores a Configuration `daprsystem` and an
empty `dapr-trust-bundle` Secret and ConfigMap in namespace `default`, and a
pod `myapp-0` (app id `myapp`, service account `myapp`) in `apps`; then it
writes WORKDIR/kubeconfig and, last, WORKDIR/fake-kube.json with the
kubeconfig path and a token the fake TokenReview accepts for that pod.  It
runs until killed.
"""

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

SENTRY_NAMESPACE = "default"
APP_NAMESPACE = "apps"
TRUST_BUNDLE = "dapr-trust-bundle"


def main(workdir, delay_seconds):
    from twisted.internet import reactor

    from sentry_tx.testing import FAKE_API_TOKEN, FakeKubernetesAPI, write_kubeconfig

    fake = FakeKubernetesAPI(reactor)
    fake.tokenreview_latency_seconds = delay_seconds
    fake.pod_latency_seconds = delay_seconds
    fake.start()
    fake.add_configuration(SENTRY_NAMESPACE, "daprsystem", {"mtls": {"workloadCertTTL": "24h"}})
    fake.add_secret(SENTRY_NAMESPACE, TRUST_BUNDLE)
    fake.add_config_map(SENTRY_NAMESPACE, TRUST_BUNDLE)
    fake.add_pod(APP_NAMESPACE, "myapp-0", "myapp", {"dapr.io/app-id": "myapp"})
    token = fake.issue_token(APP_NAMESPACE, "myapp", "myapp-0")
    kubeconfig = os.path.join(workdir, "kubeconfig")
    write_kubeconfig(kubeconfig, fake.kubeconfig())
    info = os.path.join(workdir, "fake-kube.json")
    with open(info + ".tmp", "w") as f:
        json.dump(
            {
                "kubeconfig": kubeconfig,
                "token": token,
                "namespace": APP_NAMESPACE,
                # For bench/chaos.py, which reads the published anchors.
                "url": fake.url,
                "api_token": FAKE_API_TOKEN,
                "ca_pem": fake.server_certificate_pem.decode("ascii"),
            },
            f,
        )
    os.replace(info + ".tmp", info)
    reactor.run()


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]))
