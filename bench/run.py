"""
sentry_tx's benchmark: start sentry_tx, drive SignCertificate over TLS, and
print (and write to bench/RESULTS.md) what was measured and how.

    .venv/bin/python bench/run.py            # full run, several minutes
    .venv/bin/python bench/run.py --quick    # smoke run, under 60 s

It measures, in one run on this machine:

- the bare issue pipeline (parse CSR, verify, build, sign, PEM) in one
  process on one core;
- signed certificates/s, p50 and p99 latency at 1, 16 and 64 calls in flight
  (h2load with a pre-encoded gRPC body where h2load is installed, else a
  multi-process Python grpc client), for each worker count asked for;
- the ratio of served/s at 64 in flight to the bare pipeline;
- the server's peak RSS (VmHWM summed over its processes);
- time from exec to healthz 200;
- time from an issuer file swap to the first certificate from the new
  issuer, and the calls that failed meanwhile;
- in kubernetes mode, against the fake API server with a delay added to each
  TokenReview and Pod GET: signed/s at 64 in flight.

Every figure is a median over repeated measurements taken in this run; the
machine is shared, so compare ratios taken in the same run, not single
times across runs.
"""

import argparse
import datetime
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from sentry_tx._proto import sentry_pb2  # noqa: E402
from sentry_tx.testing import (  # noqa: E402
    GrpcTestClient,
    certificate_pem,
    make_certificate,
    make_chain,
    make_csr,
    make_private_key,
    private_key_pem,
)

SIGN_PATH = "/dapr.proto.sentry.v1.CA/SignCertificate"
IN_FLIGHT = (1, 16, 64)
# h2load: connections x streams per connection for each in-flight count.
H2LOAD_SHAPES = {1: (1, 1), 16: (4, 4), 64: (8, 8)}
READY_TIMEOUT_SECONDS = 30.0


# Machine and environment


def machine_description():
    """
    CPU model, cores, memory, OS and versions, as one line.
    """
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    memory = ""
    try:
        with open("/proc/meminfo") as f:
            kib = int(f.readline().split()[1])
            memory = f", {kib / 1024 / 1024:.0f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    import cryptography
    import grpc
    import twisted

    return (
        f"{model}, {os.cpu_count()} cores{memory}; {platform.platform()}; "
        f"Python {platform.python_version()}, grpcio {grpc.__version__}, "
        f"cryptography {cryptography.__version__}, Twisted {twisted.__version__}"
    )


def git_commit():
    """
    The commit being measured (with +dirty when the tree has changes).
    """
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT, capture_output=True, text=True, check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            # The benchmark's own outputs do not make the measured code dirty.
            ["git", "status", "--porcelain", "--untracked-files=no", "--",
             ".", ":!bench/RESULTS.md", ":!bench/results.png"],
            cwd=ROOT, capture_output=True, text=True, check=True,
        ).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def free_port():
    """
    A port free on 127.0.0.1 now (the server binds it right after).
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The bare pipeline


def bare_pipeline_rate(seconds):
    """
    Certificates/s of parse + verify + build + sign + PEM in this process,
    on one core: the median of three timed loops.
    """
    from sentry_tx.ca.authority import issue_workload_certificate
    from sentry_tx.ca.bundle import generate_bundle
    from sentry_tx.ca.csr import parse_csr
    from sentry_tx.config import MTLSConfig
    from sentry_tx.identity import CallerIdentity

    now = datetime.datetime.now(datetime.timezone.utc)
    bundle = generate_bundle(
        "cluster.local", "default", now, datetime.timedelta(minutes=15)
    ).bundle
    _, csr = make_csr()
    identity = CallerIdentity("public", "default", "myapp")
    mtls = MTLSConfig()

    def once():
        issue_workload_certificate(
            bundle, identity, parse_csr(csr), now, mtls, "default"
        )

    for _ in range(200):
        once()
    rates = []
    for _ in range(3):
        count, start = 0, time.perf_counter()
        deadline = start + seconds / 3
        while time.perf_counter() < deadline:
            once()
            count += 1
        rates.append(count / (time.perf_counter() - start))
    return statistics.median(rates)


# The server under test


class Server:
    """
    sentry_tx started as `twistd -n sentry` on free loopback ports, with a
    bundle written into a temporary directory (or generated there).
    """

    def __init__(self, workdir, workers, extra=(), env=None, generate=True):
        self.workdir = workdir
        self.credentials = os.path.join(workdir, "credentials")
        self.chain = None
        if not generate:
            # A bundle whose root key the benchmark keeps, so that it can
            # rotate the issuer under the same root as an operator would.
            now = datetime.datetime.now(datetime.timezone.utc)
            self.chain = make_chain(
                trust_domain="localhost",
                not_before=now - datetime.timedelta(days=1),
                not_after=now + datetime.timedelta(days=30),
            )
            os.makedirs(self.credentials, mode=0o700)
            self.chain.write(self.credentials)
        self.port = free_port()
        self.healthz_port = free_port()
        self.metrics_port = free_port()
        self.workers = workers
        self.extra = list(extra)
        self.env = dict(os.environ, PYTHONPATH=ROOT, **(env or {}))
        self.env.pop("KUBERNETES_SERVICE_HOST", None)
        self.process = None
        self.log = None

    def start(self):
        """
        Exec twistd; return the seconds from exec to healthz 200.
        """
        self.log = open(os.path.join(self.workdir, "server.log"), "ab")
        argv = [
            sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
            "-n", "--pidfile=", "sentry",
            "--config", os.path.join(self.workdir, "missing.yaml"),
            "--issuer-credentials", self.credentials,
            "--listen-address", "127.0.0.1", "--port", str(self.port),
            "--healthz-listen-address", "127.0.0.1",
            "--healthz-port", str(self.healthz_port),
            "--metrics-listen-address", "127.0.0.1",
            "--metrics-port", str(self.metrics_port),
            "--log-level", "warn",
        ]
        if self.workers > 1:
            argv += ["--workers", str(self.workers)]
        argv += self.extra
        started = time.perf_counter()
        self.process = subprocess.Popen(
            argv, stdout=self.log, stderr=subprocess.STDOUT, env=self.env, cwd=self.workdir
        )
        url = f"http://127.0.0.1:{self.healthz_port}/healthz"
        while time.perf_counter() - started < READY_TIMEOUT_SECONDS:
            if self.process.poll() is not None:
                raise RuntimeError(f"sentry_tx exited with {self.process.returncode}; see {self.log.name}")
            try:
                with urllib.request.urlopen(url, timeout=1) as response:
                    if response.status == 200:
                        return time.perf_counter() - started
            except OSError:
                pass
            time.sleep(0.005)
        raise RuntimeError("sentry_tx did not become ready")

    def anchors_pem(self):
        with open(os.path.join(self.credentials, "ca.crt"), "rb") as f:
            return f.read()

    def metrics(self):
        """
        The metrics page as {series: value}.
        """
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
        values = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                values[name] = float(value)
        return values

    def peak_rss_mib(self):
        """
        VmHWM summed over the server process and its children, in MiB.
        """
        pids = [self.process.pid]
        try:
            children = subprocess.run(
                ["pgrep", "-P", str(self.process.pid)], capture_output=True, text=True
            ).stdout.split()
            pids += [int(p) for p in children]
        except OSError:
            pass
        total_kib = 0
        for pid in pids:
            try:
                with open(f"/proc/{pid}/status") as f:
                    for line in f:
                        if line.startswith("VmHWM:"):
                            total_kib += int(line.split()[1])
            except OSError:
                pass
        return total_kib / 1024

    def cpu_seconds(self):
        """
        User + system CPU seconds used so far by the server process and its
        children (worker processes).
        """
        pids = [self.process.pid]
        try:
            pids += [int(p) for p in subprocess.run(
                ["pgrep", "-P", str(self.process.pid)], capture_output=True, text=True
            ).stdout.split()]
        except OSError:
            pass
        return sum(process_cpu_seconds(pid) for pid in pids)

    def stop(self):
        """
        SIGTERM; return the exit status (killed after 15 s).
        """
        if self.process is None or self.process.poll() is not None:
            return None
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()
        finally:
            self.log.close()


def process_cpu_seconds(pid):
    """
    User + system CPU seconds of one live process (0 if it is gone).
    """
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# Load generators


def grpc_frame(message):
    """
    A gRPC length-prefixed message (uncompressed).
    """
    body = message.SerializeToString()
    return b"\x00" + len(body).to_bytes(4, "big") + body


def sign_request(token_validator=sentry_pb2.SignCertificateRequest.INSECURE, **fields):
    """
    A SignCertificate request with a real P-256 CSR.
    """
    _, csr = make_csr()
    values = dict(id="myapp", namespace="default", certificate_signing_request=csr)
    values.update(fields)
    return sentry_pb2.SignCertificateRequest(token_validator=token_validator, **values)


def h2load_run(server, in_flight, seconds, body_path, workdir):
    """
    Drive the server with h2load; return (signed/s, p50 ms, p99 ms, sent).
    Success is checked against sentry_tx's own counters by the caller
    (h2load sees HTTP status 200 even for a gRPC error).
    """
    connections, streams = H2LOAD_SHAPES[in_flight]
    log_path = os.path.join(workdir, f"h2load-{in_flight}.log")
    argv = [
        "h2load", "-c", str(connections), "-m", str(streams),
        "-D", f"{max(1, int(round(seconds)))}s", "--warm-up-time", "1s",
        "-H", "content-type: application/grpc", "-H", "te: trailers",
        "-d", body_path, "--log-file", log_path,
        f"https://127.0.0.1:{server.port}{SIGN_PATH}",
    ]
    output = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    rate = None
    for line in output.splitlines():
        if line.startswith("finished in"):
            rate = float(line.split(",")[1].split()[0])
    latencies = []
    with open(log_path) as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3 and parts[1] == "200":
                latencies.append(int(parts[2]) / 1000.0)
    latencies.sort()
    return rate, percentile(latencies, 50), percentile(latencies, 99), len(latencies)


def _python_client_worker(target, anchors_pem, request_bytes, threads, seconds, queue):
    client = GrpcTestClient(target, anchors_pem)
    request = sentry_pb2.SignCertificateRequest.FromString(request_bytes)
    latencies, failures = [], [0]
    deadline = time.perf_counter() + seconds
    lock = threading.Lock()

    def loop():
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            try:
                client.sign(request)
            except Exception:
                with lock:
                    failures[0] += 1
                continue
            with lock:
                latencies.append((time.perf_counter() - start) * 1000)

    workers = [threading.Thread(target=loop) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    client.close()
    queue.put((latencies, failures[0]))


def python_client_run(server, in_flight, seconds, request=None):
    """
    Drive the server with processes of blocking grpc clients sending
    C{request} (a fresh INSECURE one by default); return (signed/s, p50 ms,
    p99 ms, sent).
    """
    import multiprocessing

    processes = min(in_flight, max(1, os.cpu_count() or 1))
    threads = max(1, in_flight // processes)
    queue = multiprocessing.Queue()
    request_bytes = (request or sign_request()).SerializeToString()
    started = time.perf_counter()
    procs = [
        multiprocessing.Process(
            target=_python_client_worker,
            args=(f"127.0.0.1:{server.port}", server.anchors_pem(), request_bytes,
                  threads, seconds, queue),
        )
        for _ in range(processes)
    ]
    for p in procs:
        p.start()
    results = [queue.get() for _ in procs]
    for p in procs:
        p.join()
    elapsed = time.perf_counter() - started
    latencies = sorted(l for r in results for l in r[0])
    return len(latencies) / elapsed, percentile(latencies, 50), percentile(latencies, 99), len(latencies)


def percentile(sorted_values, p):
    """
    The p-th percentile (nearest rank) of sorted values, or None.
    """
    if not sorted_values:
        return None
    rank = max(1, int(round(p / 100.0 * len(sorted_values))))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def throughput(server, seconds, workdir, use_h2load, repeats):
    """
    For each in-flight count: medians over `repeats` runs of signed/s, p50
    and p99, and the failures sentry_tx counted.
    """
    body_path = os.path.join(workdir, "request.grpc")
    with open(body_path, "wb") as f:
        f.write(grpc_frame(sign_request()))
    rows = {}
    for in_flight in IN_FLIGHT:
        runs = []
        before = server.metrics()
        cpu_before = server.cpu_seconds()
        for _ in range(repeats):
            if use_h2load:
                runs.append(h2load_run(server, in_flight, seconds, body_path, workdir))
            else:
                runs.append(python_client_run(server, in_flight, seconds))
        cpu = server.cpu_seconds() - cpu_before
        time.sleep(1.5)  # let worker counters reach the parent
        after = server.metrics()
        failed = sum(
            after.get(k, 0) - before.get(k, 0)
            for k in after if k.startswith("dapr_sentry_cert_sign_failure_total")
        )
        signed = after.get("dapr_sentry_cert_sign_success_total", 0) - before.get(
            "dapr_sentry_cert_sign_success_total", 0)
        rows[in_flight] = dict(
            cpu_ms=1000 * cpu / signed if signed else None,
            rate=statistics.median(r[0] for r in runs),
            p50=statistics.median(r[1] for r in runs),
            p99=statistics.median(r[2] for r in runs),
            calls=sum(r[3] for r in runs),
            failed=int(failed),
        )
    return rows


# Issuer rotation under load


def reload_visibility(server, swaps, seconds_per_swap):
    """
    Sign continuously from 4 threads; swap the issuer files `swaps` times.
    Return (median seconds from swap to the first certificate of the new
    issuer, failed calls in all).
    """
    from cryptography import x509

    anchors = server.anchors_pem()
    clients = [GrpcTestClient(f"127.0.0.1:{server.port}", anchors) for _ in range(4)]
    request = sign_request()
    state = dict(failed=0, seen={}, stop=False)
    lock = threading.Lock()

    def loop(client):
        while not state["stop"]:
            try:
                reply = client.sign(request)
            except Exception:
                with lock:
                    state["failed"] += 1
                continue
            leaf = x509.load_pem_x509_certificates(reply.workload_certificate)[0]
            aki = leaf.extensions.get_extension_for_class(
                x509.AuthorityKeyIdentifier
            ).value.key_identifier
            with lock:
                state["seen"].setdefault(aki, time.monotonic())

    threads = [threading.Thread(target=loop, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    delays = []
    try:
        for _ in range(swaps):
            # A new issuer key and certificate under the same root: what an
            # operator's rotation looks like. Written beside the files, then
            # renamed into place (key first).
            now = datetime.datetime.now(datetime.timezone.utc)
            key = make_private_key("ecdsa-p256")
            issuer = make_certificate(
                key,
                "spiffe://localhost/ns/default/dapr-sentry",
                signer=server.chain.root,
                signer_key=server.chain.root_key,
                not_before=now - datetime.timedelta(hours=1),
                not_after=now + datetime.timedelta(days=30),
                path_length=0,
            )
            new_aki = issuer.extensions.get_extension_for_class(
                x509.SubjectKeyIdentifier
            ).value.digest
            for name, data in (("issuer.key", private_key_pem(key)),
                               ("issuer.crt", certificate_pem(issuer))):
                staging = os.path.join(server.credentials, f".{name}.new")
                with open(staging, "wb") as f:
                    f.write(data)
                os.chmod(staging, 0o600)
                if name == "issuer.key":
                    swapped = time.monotonic()
                os.replace(staging, os.path.join(server.credentials, name))
            deadline = swapped + seconds_per_swap
            while time.monotonic() < deadline:
                with lock:
                    if new_aki in state["seen"]:
                        delays.append(state["seen"][new_aki] - swapped)
                        break
                time.sleep(0.01)
            else:
                delays.append(float("inf"))
    finally:
        state["stop"] = True
        for t in threads:
            t.join()
        for c in clients:
            c.close()
    return statistics.median(delays), state["failed"]


# Kubernetes mode: bench/kube_storm.py (the rate at 20 ms and the storms).


# Report


def plot(results, path):
    """
    Throughput and p99 against in-flight calls, one line per worker count;
    False when matplotlib is missing.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for workers, result in results.items():
        xs = list(result["throughput"])
        left.plot(xs, [result["throughput"][x]["rate"] for x in xs], marker="o",
                  label=f"{workers} process(es)")
        right.plot(xs, [result["throughput"][x]["p99"] for x in xs], marker="o",
                   label=f"{workers} process(es)")
    left.set_xlabel("calls in flight")
    left.set_ylabel("signed certificates / s")
    left.set_xscale("log", base=2)
    right.set_xlabel("calls in flight")
    right.set_ylabel("p99 latency (ms)")
    right.set_xscale("log", base=2)
    right.axhline(25, linestyle="--", color="grey", label="target p99 25 ms")
    left.legend()
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


TARGET_SERVED_TO_BARE = 0.5
TARGET_P99_MS = 25.0
TARGET_READY_SECONDS = 1.5
TARGET_RELOAD_SECONDS = 2.5
TARGET_RSS_MIB = 120.0
TARGET_KUBERNETES_PER_SECOND = 1000.0


def judge_targets(results, bare, kube_row):
    """
    Each target of issue 5 against this run's figures: rows of (target,
    processes, measured, met).
    """
    rows = []
    for workers, result in results.items():
        at_64 = result["throughput"][64]
        ratio = at_64["rate"] / bare
        rows.append((f"served/s at 64 in flight >= {TARGET_SERVED_TO_BARE} x bare pipeline",
                     workers, f"{ratio:.2f} x", ratio >= TARGET_SERVED_TO_BARE))
        rows.append((f"p99 <= {TARGET_P99_MS:g} ms at 64 in flight", workers,
                     f"{fmt(at_64['p99'], 1)} ms",
                     at_64["p99"] is not None and at_64["p99"] <= TARGET_P99_MS))
        rows.append((f"exec to healthz 200 <= {TARGET_READY_SECONDS} s", workers,
                     f"{result['ready']:.2f} s", result["ready"] <= TARGET_READY_SECONDS))
        if "reload" in result:
            delay, failed = result["reload"]
            rows.append((f"issuer swap visible <= {TARGET_RELOAD_SECONDS} s, 0 failed calls",
                         workers, f"{fmt(delay, 2)} s, {failed} failed",
                         delay <= TARGET_RELOAD_SECONDS and failed == 0))
        rows.append((f"peak RSS <= {TARGET_RSS_MIB:g} MB (all processes)", workers,
                     f"{result['rss']:.0f} MiB", result["rss"] <= TARGET_RSS_MIB))
    if kube_row:
        rows.append((f"kubernetes mode >= {TARGET_KUBERNETES_PER_SECOND:,.0f} signed/s (20 ms API)",
                     kube_row["workers"], f"{kube_row['rate']:,.0f}/s",
                     kube_row["rate"] >= TARGET_KUBERNETES_PER_SECOND and kube_row["failed"] == 0))
    return rows


def fmt(value, digits=1):
    if value is None:
        return "n/a"
    if value == float("inf"):
        return "not seen"
    return f"{value:,.{digits}f}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run, under 60 s")
    parser.add_argument("--workers", default="1,2",
                        help="comma-separated worker counts to measure (default 1,2)")
    parser.add_argument("--seconds", type=float, default=None,
                        help="duration of each load run (default 8, quick 2)")
    parser.add_argument("--client", choices=("auto", "h2load", "python"), default="auto")
    parser.add_argument("--write", default=None,
                        help="write RESULTS.md and results.png here (default bench/, not in --quick)")
    args = parser.parse_args(argv)

    seconds = args.seconds or (2.0 if args.quick else 8.0)
    repeats = 1 if args.quick else 3
    workers_list = [int(w) for w in args.workers.split(",")]
    if args.quick:
        workers_list = workers_list[:1]
    use_h2load = args.client == "h2load" or (args.client == "auto" and shutil.which("h2load"))
    client = "h2load (pre-encoded gRPC body, TLS)" if use_h2load else "multi-process Python grpc client"
    started = datetime.datetime.now(datetime.timezone.utc)
    commit = git_commit()

    print(f"machine: {machine_description()}")
    print(f"commit: {commit}; date: {started:%Y-%m-%d %H:%M} UTC; client: {client}")
    print(f"each load run: {seconds:g} s, {repeats} run(s) per point, medians quoted")

    bare = bare_pipeline_rate(3.0 if args.quick else 6.0)
    print(f"bare pipeline, one process, one core: {bare:,.0f} certificates/s")

    results = {}
    with tempfile.TemporaryDirectory(prefix="sentry-bench-") as workdir:
        for workers in workers_list:
            result = results[workers] = {}
            ready = []
            for attempt in range(1 if args.quick else 3):
                server = Server(tempfile.mkdtemp(dir=workdir), workers,
                                generate=attempt < (0 if args.quick else 2))
                try:
                    ready.append(server.start())
                finally:
                    if attempt < (0 if args.quick else 2):
                        server.stop()
            result["ready"] = statistics.median(ready)
            try:
                result["throughput"] = throughput(server, seconds, server.workdir, use_h2load, repeats)
                if not args.quick:
                    result["reload"] = reload_visibility(server, 3, 10.0)
                result["rss"] = server.peak_rss_mib()
            finally:
                result["exit"] = server.stop()
            print(f"\n{workers} process(es) serving gRPC: ready in {result['ready']:.2f} s; "
                  f"peak RSS {result['rss']:.0f} MiB")
            for in_flight, row in result["throughput"].items():
                print(f"  {in_flight:>3} in flight: {row['rate']:8,.0f} signed/s  "
                      f"p50 {fmt(row['p50'], 2)} ms  p99 {fmt(row['p99'], 2)} ms  "
                      f"failed {row['failed']} of {row['calls']:,}  "
                      f"server CPU {fmt(row['cpu_ms'], 2)} ms/cert")
            print(f"  served/bare at 64 in flight: {result['throughput'][64]['rate'] / bare:.2f}")
            if "reload" in result:
                delay, failed = result["reload"]
                print(f"  issuer swap -> first new certificate: {fmt(delay, 2)} s; failed calls {failed}")
        if not args.quick:
            kube_workers = max(workers_list)
            import kube_storm

            kube, reason = kube_storm.kubernetes_rate(
                workdir, seconds, 0.020, kube_workers, repeats, use_h2load
            )
            results["kubernetes"] = (kube, reason)
            print("\n" + (kube_storm.describe_rate(kube) if kube
                          else f"kubernetes mode: not measured ({reason})"))
            results["storms"] = kube_storm.storms(workdir, kube_workers)
            for row in results["storms"]:
                print(kube_storm.describe_storm(row))
            from jwt_cost import jwt_cost, report_lines

            results["jwt"] = report_lines(jwt_cost(workdir, seconds, repeats, use_h2load))
            print("\n" + "\n".join(results["jwt"]))

    if args.quick and not args.write:
        return 0
    out = args.write or HERE
    write_report(out, results, bare, started, commit, client, seconds, repeats)
    return 0


def write_report(out, results, bare, started, commit, client, seconds, repeats):
    kube = results.pop("kubernetes", (None, "not measured"))
    jwt_lines = results.pop("jwt", [])
    storm_rows = results.pop("storms", [])
    png = plot(results, os.path.join(out, "results.png"))
    lines = [
        "# sentry_tx benchmark results",
        "",
        f"Written by `bench/run.py` on {started:%Y-%m-%d %H:%M} UTC at commit {commit}.",
        "",
        f"- Machine: {machine_description()}.",
        f"- Load: {client}, every request a real P-256 CSR signed for real; "
        f"{seconds:g} s per run, {repeats} runs per point, medians quoted.",
        "- Server and load generator share the machine's cores.",
        "",
        f"Bare issue pipeline (parse CSR, verify, build, sign, PEM), one process, one core: "
        f"**{bare:,.0f} certificates/s**.",
        "",
        "| processes | in flight | signed/s | p50 ms | p99 ms | failed | served/bare | server CPU ms per certificate |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for workers, result in results.items():
        for in_flight, row in result["throughput"].items():
            lines.append(
                f"| {workers} | {in_flight} | {row['rate']:,.0f} | {fmt(row['p50'], 2)} | "
                f"{fmt(row['p99'], 2)} | {row['failed']} of {row['calls']:,} | {row['rate'] / bare:.2f} | "
                f"{fmt(row['cpu_ms'], 2)} |"
            )
    lines += ["", "| processes | exec to healthz 200 | peak RSS (all processes) | swap to new issuer | failed calls in swaps |",
              "|---|---|---|---|---|"]
    for workers, result in results.items():
        delay, failed = result.get("reload", (None, None))
        lines.append(f"| {workers} | {result['ready']:.2f} s | {result['rss']:.0f} MiB | "
                     f"{fmt(delay, 2)} s | {failed} |")
    kube_row, reason = kube
    if kube_row:
        lines += ["", f"Kubernetes mode ({kube_row['workers']} process(es)), fake API server in its own "
                  f"process with 20 ms added to each TokenReview and Pod GET, 64 in flight: "
                  f"**{kube_row['rate']:,.0f} signed/s**, p50 {fmt(kube_row['p50'], 2)} ms, "
                  f"p99 {fmt(kube_row['p99'], 2)} ms, failed {kube_row['failed']} of {kube_row['calls']:,}. "
                  f"CPU per signed certificate: sentry_tx's processes {fmt(kube_row['cpu_ms'], 2)} ms, "
                  f"the fake API server {fmt(kube_row['fake_cpu_ms'], 2)} ms; the bare pipeline needs "
                  f"{1000 / bare:.2f} ms."]
    else:
        lines += ["", f"Kubernetes mode: not measured ({reason})."]
    if storm_rows:
        import kube_storm

        lines += ["", "Storms (bench/kube_storm.py):", ""]
        lines += [f"- {kube_storm.describe_storm(row)}" for row in storm_rows]
    lines += ["", "## Targets (issue 5), judged from the figures above", "",
              "| target | processes | measured | met |", "|---|---|---|---|"]
    for target, processes, measured, met in judge_targets(results, bare, kube_row):
        lines.append(f"| {target} | {processes} | {measured} | {'yes' if met else '**no**'} |")
    if png:
        lines += ["", "![throughput and p99 against calls in flight](results.png)"]
    if jwt_lines:
        lines += [""] + jwt_lines
    with open(os.path.join(out, "RESULTS.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"\nwrote {os.path.join(out, 'RESULTS.md')}" + (" and results.png" if png else ""))


if __name__ == "__main__":
    sys.exit(main())
