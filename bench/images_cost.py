"""
What stamping the container images (Dapr master #10282) costs per
certificate, in one process.

    .venv/bin/python bench/images_cost.py            # about 15 s
    .venv/bin/python bench/images_cost.py --quick    # about 3 s

Each case is run both ways, without and with the extension, in short
alternating turns (the fairest before/after on a shared machine); the
figures are the medians of the turns, in CPU microseconds per call
(this process's CPU time):

- C{build_leaf}: build and sign the leaf, with the images JSON already
  made, as the KUBERNETES validator hands it over (the pod informer makes
  the JSON once per pod event, not per certificate);
- C{issue_workload_certificate}: the same plus validity and PEM;
- the JSON itself (C{kept_images} of the pod), per pod event.

Two pods: the native-sidecar pod of the tests (daprd, an app and a helper,
with digests: about 400 bytes of JSON), and a pod of 12 containers with long
image references (about 3 KiB).  The added cost is set against the
kubernetes-mode CPU per certificate (C{--per-certificate-ms}, 1.40 ms by
default: issue 19's measurement, one process, h2load 8 x 8, fake API server
with 20 ms per review).
"""

import argparse
import datetime
import os
import re
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

# The sibling script (its directory is the script's, first on the path): for
# its description of the machine and the commit.
import pipeline_micro  # noqa: E402

from sentry_tx.ca import x509profile  # noqa: E402
from sentry_tx.ca.authority import issue_workload_certificate  # noqa: E402
from sentry_tx.config import MTLSConfig  # noqa: E402
from sentry_tx.identity.caller import CallerIdentity  # noqa: E402
from sentry_tx.identity.images import kept_images  # noqa: E402
from sentry_tx.testing.certificates import make_bundle, make_private_key  # noqa: E402
from sentry_tx.testing.container_images import pod_document, sidecar_pod  # noqa: E402

RESULTS_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")
_KUBERNETES_CPU = re.compile(
    r"CPU per signed certificate: sentry_tx.s processes ([0-9.]+) ms"
)


def recorded_kubernetes_cpu_ms(path=RESULTS_PATH):
    """
    The kubernetes-mode server CPU per certificate that the last full
    C{bench/run.py} wrote into RESULTS.md, or None when it holds none.
    """
    try:
        with open(path) as f:
            found = _KUBERNETES_CPU.search(f.read())
    except OSError:
        return None
    return float(found.group(1)) if found else None

TARGET_PERCENT = 5.0


def large_pod():
    """
    12 containers with long image references, all started.
    """
    names = [f"container-{index:02d}" for index in range(12)]
    image = "registry.example.com/team-with-a-long-name/project/{}:v1.2.3-build.456"
    digest = "sha256:" + "0123456789abcdef" * 4
    return pod_document(
        containers=[{"name": name, "image": image.format(name)} for name in names],
        container_statuses=[
            {"name": name, "imageID": f"{image.format(name).split(':')[0]}@{digest}"}
            for name in names
        ],
    )


def turn(function, calls):
    """
    CPU microseconds per call of C{calls} calls of C{function}.
    """
    start = time.process_time()
    for _ in range(calls):
        function()
    return (time.process_time() - start) / calls * 1e6


def alternate(without, with_images, turns, calls):
    """
    The medians of C{turns} alternating turns of C{calls} calls each, CPU
    microseconds per call: C{(without, with)}.
    """
    times = ([], [])
    for _ in range(turns):
        times[0].append(turn(without, calls))
        times[1].append(turn(with_images, calls))
    return statistics.median(times[0]), statistics.median(times[1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--quick", action="store_true", help="fewer, shorter turns")
    parser.add_argument(
        "--per-certificate-ms",
        type=float,
        default=None,
        help="kubernetes-mode CPU ms per certificate to compare with (default:"
        " the figure of the last full run in bench/RESULTS.md)",
    )
    args = parser.parse_args(argv)
    if args.per_certificate_ms is None:
        args.per_certificate_ms = recorded_kubernetes_cpu_ms()
    if args.per_certificate_ms is None:
        parser.error("bench/RESULTS.md records no kubernetes-mode CPU figure:"
                     " pass --per-certificate-ms")
    turns, calls = (9, 100) if args.quick else (41, 300)
    run = pipeline_micro._bench_run_module()
    print(f"machine: {run.machine_description()}")
    print(f"commit:  {run.git_commit()}")
    print(
        f"method:  median of {turns} alternating turns of {calls} calls,"
        " CPU us per call"
    )

    now = datetime.datetime.now(datetime.UTC)
    bundle = make_bundle(now=now)
    mtls = MTLSConfig()
    public_key = make_private_key().public_key()
    not_before, not_after = x509profile.leaf_validity(
        now, mtls.workload_cert_ttl, mtls.allowed_clock_skew, bundle.chain_not_after
    )
    spiffe_id = "spiffe://public/ns/default/myapp"
    rows = []
    for label, pod in (("sidecar pod", sidecar_pod()), ("12 containers", large_pod())):
        data = kept_images(pod)
        plain = CallerIdentity("public", "default", "myapp")
        stamped = CallerIdentity("public", "default", "myapp", container_images=data)
        print(f"{label}: {len(data)} bytes of JSON")
        cases = {
            "build_leaf": (
                lambda: x509profile.build_leaf(
                    bundle, public_key, spiffe_id, [], not_before, not_after
                ),
                lambda data=data: x509profile.build_leaf(
                    bundle,
                    public_key,
                    spiffe_id,
                    [],
                    not_before,
                    not_after,
                    container_images=data,
                ),
            ),
            "issue_workload_certificate": (
                lambda plain=plain: issue_workload_certificate(
                    bundle, plain, public_key, now, mtls, "default"
                ),
                lambda stamped=stamped: issue_workload_certificate(
                    bundle, stamped, public_key, now, mtls, "default"
                ),
            ),
        }
        for name, (without, with_images) in cases.items():
            before, after = alternate(without, with_images, turns, calls)
            added = after - before
            share = added / (args.per_certificate_ms * 1000) * 100
            rows.append((label, name, before, after, share))
            print(
                f"  {name:28} {before:8.1f} -> {after:8.1f} us  (+{added:.1f} us,"
                f" {share:.2f} % of {args.per_certificate_ms:.2f} ms;"
                f" target < {TARGET_PERCENT:g} %)"
            )
        event = statistics.median(
            turn(lambda pod=pod: kept_images(pod), calls) for _ in range(turns)
        )
        print(f"  {'kept_images, per pod event':28} {event:8.1f} us")
    return rows


if __name__ == "__main__":
    main()
