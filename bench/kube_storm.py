"""
Kubernetes-mode measurements of sentry_tx, against the fake API server
(bench/fake_kube.py) in its own process:

- signed/s at 64 in flight with 20 ms added to each TokenReview and Pod GET
  (h2load), CPU milliseconds per certificate for sentry_tx and for the fake
  API server, and API requests per certificate;
- storms, as in a node drain or a rollout: many callers at once, each with
  one call and its own deadline (a grpc.aio client in its own process);
  for each: certificates, each status code's count, the slowest answer,
  the answers later than min(caller's deadline, validation timeout), the
  server's peak RSS, and API requests per certificate.

    .venv/bin/python bench/kube_storm.py [--quick] [--workers N]

bench/run.py calls it for its kubernetes-mode section.
"""

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

VALIDATION_TIMEOUT_SECONDS = 10.0
"""
sentry_tx's validation timeout (sentry_tx.server.servicer): no caller should
wait longer than this, or than its own deadline.
"""

ANSWER_TOLERANCE_SECONDS = 0.5
"""
How much later than min(deadline, validation timeout) an answer may come
and still count as in time: transport and this client's own scheduling on a
shared 2-core machine.
"""

STORMS = (
    # name, callers, pods, seconds per TokenReview, caller deadlines (cycled)
    ("storm 1", 300, 60, 1.0, (30.0,)),
    ("storm 2", 2000, 60, 4.0, (5.0, 30.0)),
)
QUICK_STORMS = (("storm 1 (quick)", 100, 20, 1.0, (30.0,)),)

CALLS_PER_CHANNEL = 50
"""
Callers sharing one HTTP/2 connection in the storm client (sentry_tx allows
100 streams per connection).
"""


class FakeAPI:
    """
    bench/fake_kube.py in its own process.
    """

    def __init__(self, workdir, delay_seconds, pods):
        self.dir = tempfile.mkdtemp(dir=workdir)
        self.process = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "fake_kube.py"), self.dir,
             str(delay_seconds), str(pods)],
            stdout=subprocess.DEVNULL,
            stderr=open(os.path.join(self.dir, "fake.log"), "wb"),
        )
        info_path = os.path.join(self.dir, "fake-kube.json")
        deadline = time.monotonic() + 30
        while not os.path.exists(info_path):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"the fake API server did not start (see {self.dir}/fake.log)"
                )
            time.sleep(0.05)
        with open(info_path) as f:
            self.info = json.load(f)

    def requests(self):
        """
        The requests received so far, by kind (written every 0.5 s).
        """
        time.sleep(0.6)
        try:
            with open(os.path.join(self.dir, "requests.json")) as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}

    def anchors_pem(self):
        """
        The trust anchors sentry_tx published in the ConfigMap
        dapr-trust-bundle (what a sidecar is given to trust).
        """
        import base64
        import ssl
        import urllib.request

        import yaml

        with open(self.info["kubeconfig"]) as f:
            kubeconfig = yaml.safe_load(f)
        cluster = kubeconfig["clusters"][0]["cluster"]
        context = ssl.create_default_context(
            cadata=base64.b64decode(cluster["certificate-authority-data"]).decode()
        )
        request = urllib.request.Request(
            cluster["server"]
            + "/api/v1/namespaces/default/configmaps/dapr-trust-bundle",
            headers={
                "Authorization": "Bearer " + kubeconfig["users"][0]["user"]["token"]
            },
        )
        with urllib.request.urlopen(request, context=context, timeout=10) as response:
            return json.load(response)["data"]["ca.crt"].encode()

    def cpu_seconds(self):
        from run import process_cpu_seconds

        return process_cpu_seconds(self.process.pid)

    def stop(self):
        self.process.kill()
        self.process.wait()


def _start_server(workdir, fake, workers):
    from run import Server

    server = Server(
        tempfile.mkdtemp(dir=workdir), workers,
        extra=["--mode", "kubernetes", "--kubeconfig", fake.info["kubeconfig"],
               "--config", "daprsystem"],
        env={"NAMESPACE": "default"},
    )
    server.start()
    return server


def _requests_per_certificate(before, after, signed):
    if not signed:
        return None
    return {
        kind: (after.get(kind, 0) - before.get(kind, 0)) / signed
        for kind in sorted(set(after) | set(before))
    }


def _format_requests(per_certificate):
    if not per_certificate:
        return "n/a"
    total = sum(per_certificate.values())
    parts = ", ".join(
        f"{kind} {value:.2f}" for kind, value in per_certificate.items() if value
    )
    return f"{total:.2f} ({parts})"


def kubernetes_rate(workdir, seconds, delay_seconds, workers, repeats, use_h2load):
    """
    signed/s, p50, p99 and failures at 64 in flight in kubernetes mode,
    with `delay_seconds` added to each TokenReview and Pod GET, CPU per
    certificate for sentry_tx and the fake API server, and API requests per
    certificate.

    @return: (row, None), or (None, the reason it was not measured).
    """
    from run import grpc_frame, h2load_run, sign_request

    from sentry_tx._proto import sentry_pb2

    if not use_h2load:
        return None, "needs h2load (apt-get install nghttp2-client)"
    try:
        fake = FakeAPI(workdir, delay_seconds, 1)
    except RuntimeError as e:
        return None, str(e)
    server = None
    try:
        server = _start_server(workdir, fake, workers)
        body_path = os.path.join(server.workdir, "request.grpc")
        with open(body_path, "wb") as f:
            f.write(grpc_frame(sign_request(
                token_validator=sentry_pb2.SignCertificateRequest.KUBERNETES,
                namespace=fake.info["namespace"], token=fake.info["token"],
            )))
        before, requests_before = server.metrics(), fake.requests()
        cpu_before, fake_before = server.cpu_seconds(), fake.cpu_seconds()
        runs = [
            h2load_run(server, 64, seconds, body_path, server.workdir)
            for _ in range(repeats)
        ]
        cpu, fake_cpu = (
            server.cpu_seconds() - cpu_before,
            fake.cpu_seconds() - fake_before,
        )
        after, requests_after = server.metrics(), fake.requests()
        key = "dapr_sentry_cert_sign_success_total"
        failed = sum(
            after.get(k, 0) - before.get(k, 0)
            for k in after if k.startswith("dapr_sentry_cert_sign_failure_total")
        )
        signed = int(after.get(key, 0) - before.get(key, 0))
        return dict(
            rate=statistics.median(r[0] for r in runs),
            p50=statistics.median(r[1] for r in runs),
            p99=statistics.median(r[2] for r in runs),
            calls=sum(r[3] for r in runs),
            signed=signed,
            cpu_ms=1000 * cpu / signed if signed else None,
            fake_cpu_ms=1000 * fake_cpu / signed if signed else None,
            failed=int(failed),
            workers=workers,
            api_requests=_requests_per_certificate(
                requests_before, requests_after, signed
            ),
        ), None
    finally:
        if server is not None:
            server.stop()
        fake.stop()


# The storm client (run in its own process)


async def _storm_client(target, anchors_pem, tokens, callers, deadlines, namespace):
    import grpc
    from run import sign_request

    from sentry_tx._proto import sentry_pb2, sentry_pb2_grpc

    channels = [
        grpc.aio.secure_channel(
            target,
            grpc.ssl_channel_credentials(root_certificates=anchors_pem),
            # Each channel its own connection, as each sidecar has (grpc
            # shares one between channels of the same target by default).
            options=[("grpc.ssl_target_name_override", "dapr-sentry.default.svc"),
                     ("grpc.enable_retries", 0),
                     ("grpc.use_local_subchannel_pool", 1)],
        )
        for _ in range((callers + CALLS_PER_CHANNEL - 1) // CALLS_PER_CHANNEL)
    ]
    for channel in channels:
        await asyncio.wait_for(channel.channel_ready(), 30)
    stubs = [sentry_pb2_grpc.CAStub(channel) for channel in channels]
    template = sign_request(
        token_validator=sentry_pb2.SignCertificateRequest.KUBERNETES,
        namespace=namespace,
    )
    start = asyncio.Event()

    async def caller(index):
        request = sentry_pb2.SignCertificateRequest()
        request.CopyFrom(template)
        request.token = tokens[index % len(tokens)]
        deadline = deadlines[index % len(deadlines)]
        await start.wait()
        began = time.monotonic()
        try:
            await stubs[index % len(stubs)].SignCertificate(request, timeout=deadline)
            code, pushback, details = "OK", None, ""
        except grpc.aio.AioRpcError as e:
            code, details = e.code().name, e.details()
            pushback = dict(e.trailing_metadata() or ()).get("grpc-retry-pushback-ms")
        return code, time.monotonic() - began, deadline, pushback, details

    tasks = [asyncio.ensure_future(caller(i)) for i in range(callers)]
    await asyncio.sleep(0.1)
    start.set()
    results = await asyncio.gather(*tasks)
    for channel in channels:
        await channel.close()
    return results


def storm_client_main(argv):
    target, anchors_path, info_path, callers, deadlines, out = argv
    with open(anchors_path, "rb") as f:
        anchors_pem = f.read()
    with open(info_path) as f:
        info = json.load(f)
    results = asyncio.run(_storm_client(
        target, anchors_pem, info["tokens"], int(callers),
        [float(d) for d in deadlines.split(",")], info["namespace"],
    ))
    with open(out, "w") as f:
        json.dump(results, f)


def storm(workdir, name, callers, pods, delay_seconds, deadlines, workers):
    """
    One storm against a fresh sentry_tx and fake API server.

    @return: a row (dict) of what was measured.
    """
    fake = FakeAPI(workdir, delay_seconds, pods)
    server = None
    try:
        server = _start_server(workdir, fake, workers)
        anchors_path = os.path.join(server.workdir, "anchors.pem")
        with open(anchors_path, "wb") as f:
            f.write(fake.anchors_pem())
        out = os.path.join(server.workdir, "storm.json")
        requests_before = fake.requests()
        cpu_before, fake_before = server.cpu_seconds(), fake.cpu_seconds()
        began = time.monotonic()
        subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--storm-client",
             f"127.0.0.1:{server.port}", anchors_path,
             os.path.join(fake.dir, "fake-kube.json"), str(callers),
             ",".join(str(d) for d in deadlines), out],
            check=True, timeout=120,
        )
        wall = time.monotonic() - began
        cpu, fake_cpu = (
            server.cpu_seconds() - cpu_before,
            fake.cpu_seconds() - fake_before,
        )
        requests_after = fake.requests()
        # A copy whose loop the storm kept busy past its liveness checks
        # would be killed and started again: counted here.
        restarts = server.metrics().get("dapr_sentry_serving_process_restarts_total")
        with open(out) as f:
            results = json.load(f)
        codes = {}
        late = 0
        pushbacks = 0
        for code, seconds, deadline, pushback, _ in results:
            codes[code] = codes.get(code, 0) + 1
            if (
                seconds
                > min(deadline, VALIDATION_TIMEOUT_SECONDS) + ANSWER_TOLERANCE_SECONDS
            ):
                late += 1
            if pushback is not None:
                pushbacks += 1
        signed = codes.get("OK", 0)
        return dict(
            name=name,
            callers=callers,
            pods=pods,
            delay=delay_seconds,
            deadlines=deadlines,
            codes=codes,
            signed=signed,
            slowest=max(r[1] for r in results),
            slowest_ok=max((r[1] for r in results if r[0] == "OK"), default=None),
            late=late,
            pushbacks=pushbacks,
            rss=server.peak_rss_mib(),
            restarts=restarts,
            api_requests=_requests_per_certificate(
                requests_before, requests_after, signed
            ),
            workers=workers,
            results=results,
            wall=wall,
            cpu=cpu,
            fake_cpu=fake_cpu,
        )
    finally:
        if server is not None:
            server.stop()
        fake.stop()


def describe_rate(row):
    from run import fmt, process_label

    return (
        f"kubernetes mode, {process_label(row['workers'])} process(es), 20 ms added to "
        "each "
        f"TokenReview and Pod GET, 64 in flight: {row['rate']:,.0f} signed/s  "
        f"p50 {fmt(row['p50'], 2)} ms  p99 {fmt(row['p99'], 2)} ms  "
        f"failed {row['failed']} of {row['calls']:,}  "
        f"CPU per cert: sentry_tx {fmt(row['cpu_ms'], 2)} ms, "
        f"fake API server {fmt(row['fake_cpu_ms'], 2)} ms; "
        f"API requests per cert: {_format_requests(row['api_requests'])}"
    )


def _restarts(count):
    """
    The restart count as printed: C{n/a} when sentry_tx did not report it.
    """
    return "n/a" if count is None else f"{count:.0f}"


def describe_storm(row):
    from run import process_label

    codes = ", ".join(f"{code} {count}" for code, count in sorted(row["codes"].items()))
    return (
        f"{row['name']}: {row['callers']} callers of {row['pods']} pods, "
        f"{row['delay']:g} s per TokenReview, deadlines "
        f"{'/'.join(f'{d:g}' for d in row['deadlines'])} s, "
        f"{process_label(row['workers'])} process(es): {row['signed']} certificates "
        f"({100 * row['signed'] / row['callers']:.0f} %); codes: {codes}; "
        f"slowest answer {row['slowest']:.2f} s (slowest certificate "
        f"{row['slowest_ok'] or 0:.2f} s); answers later than min(deadline, "
        f"{VALIDATION_TIMEOUT_SECONDS:g} s) + {ANSWER_TOLERANCE_SECONDS:g} s: "
        f"{row['late']}; "
        f"refusals with grpc-retry-pushback-ms: {row['pushbacks']}; peak RSS "
        f"{row['rss']:.0f} MiB; serving processes restarted: "
        f"{_restarts(row.get('restarts'))}; "
        f"API requests per cert: {_format_requests(row['api_requests'])}; "
        f"CPU over the storm's {row['wall']:.1f} s: sentry_tx {row['cpu']:.1f} s, "
        f"fake API server {row['fake_cpu']:.1f} s"
    )


def storms(workdir, workers, quick=False):
    """
    Run the storms; return their rows.
    """
    rows = []
    for name, callers, pods, delay, deadlines in (QUICK_STORMS if quick else STORMS):
        rows.append(storm(workdir, name, callers, pods, delay, deadlines, workers))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="one short rate run, one small storm"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="serving processes (default: sentry_tx's own default, one per core)",
    )
    parser.add_argument("--seconds", type=float, default=None)
    parser.add_argument("--skip-rate", action="store_true")
    parser.add_argument("--skip-storms", action="store_true")
    args = parser.parse_args(argv)
    import shutil

    seconds = args.seconds or (3.0 if args.quick else 8.0)
    with tempfile.TemporaryDirectory(prefix="sentry-kube-bench-") as workdir:
        if not args.skip_rate:
            row, reason = kubernetes_rate(
                workdir, seconds, 0.020, args.workers, 1 if args.quick else 3,
                bool(shutil.which("h2load")),
            )
            print(
                describe_rate(row)
                if row
                else f"kubernetes mode: not measured ({reason})"
            )
        if not args.skip_storms:
            for row in storms(workdir, args.workers, args.quick):
                print(describe_storm(row))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--storm-client":
        storm_client_main(sys.argv[2:])
    else:
        sys.exit(main())
