"""
sentry_tx's benchmark: start sentry_tx, drive SignCertificate over TLS, and
print (and write to bench/RESULTS.md) what was measured and how.

    .venv/bin/python bench/run.py            # full run, several minutes
    .venv/bin/python bench/run.py --quick    # smoke run, under 60 s
    .venv/bin/python bench/run.py --sidecars-only [--rounds 3] [--seconds 8]
                                 # the sidecar pattern only (bench/sidecars.py),
                                 # rewrites its section of RESULTS.md, keeps the rest

Flags: --workers (process counts), --seconds (each load run), --client
(auto/h2load/python), --go (the yardstick's binary; default
bench/.go-sentryref when present, else built there), --no-go, --no-kubernetes,
--no-sidecars, --sidecars-only, --rounds (sidecar rounds), --write (where
RESULTS.md goes).

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
  TokenReview and Pod GET: signed/s at 64 in flight;
- the Go yardstick (../shared/go-sentryref, built here when Go can be
  installed, or given with --go) under the same load, and sentry_tx's ratios
  to it: signed/s at 64 in flight, mean and p99 latency, CPU ms per
  certificate;
- the sidecar pattern (issue 19, bench/sidecars.py): the yardstick's
  C{-sidecars} load (a new TLS connection per certificate) against sentry_tx
  and the yardstick, standalone and in kubernetes mode against the
  yardstick's fake API server (20 ms per TokenReview), alternated rounds;
- the hosting alternative issue 9 asked for (Twisted's asyncio reactor with
  grpc.aio on the same loop, bench/hosting.py) against the hosting sentry_tx
  runs (grpc.aio on its own loop thread), one process each.

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
from sentry_tx.testing.certificates import (  # noqa: E402
    certificate_pem,
    make_certificate,
    make_chain,
    make_csr,
    make_private_key,
    private_key_pem,
)
from sentry_tx.testing.grpc_client import GrpcTestClient  # noqa: E402

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
    from sentry_tx.identity.caller import CallerIdentity

    now = datetime.datetime.now(datetime.UTC)
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
            now = datetime.datetime.now(datetime.UTC)
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
        if self.workers is not None:
            argv += ["--workers", str(self.workers)]
        argv += self.extra
        started = time.perf_counter()
        self.process = subprocess.Popen(
            argv,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=self.workdir,
        )
        url = f"http://127.0.0.1:{self.healthz_port}/healthz"
        while time.perf_counter() - started < READY_TIMEOUT_SECONDS:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"sentry_tx exited with {self.process.returncode}; see "
                    f"{self.log.name}"
                )
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

    def peak_rss_mib(self, per_process=False):
        """
        VmHWM summed over the server process and its children (or, with
        C{per_process}, the largest of them), in MiB.
        """
        pids = [self.process.pid]
        try:
            children = subprocess.run(
                ["pgrep", "-P", str(self.process.pid)], capture_output=True, text=True
            ).stdout.split()
            pids += [int(p) for p in children]
        except OSError:
            pass
        peaks_kib = []
        for pid in pids:
            try:
                with open(f"/proc/{pid}/status") as f:
                    for line in f:
                        if line.startswith("VmHWM:"):
                            peaks_kib.append(int(line.split()[1]))
            except OSError:
                pass
        if per_process:
            return max(peaks_kib, default=0) / 1024
        return sum(peaks_kib) / 1024

    def cpu_seconds(self):
        """
        User + system CPU seconds used so far by the server process and its
        children (worker processes).
        """
        return process_tree_cpu_seconds(self.process.pid)

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


def process_tree_cpu_seconds(pid):
    """
    User + system CPU seconds used so far by process C{pid} and its live
    children (a server's worker processes).
    """
    pids = [pid]
    try:
        pids += [int(p) for p in subprocess.run(
            ["pgrep", "-P", str(pid)], capture_output=True, text=True
        ).stdout.split()]
    except OSError:
        pass
    return sum(process_cpu_seconds(p) for p in pids)


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


H2LOAD_WARM_UP_SECONDS = 1.0


def h2load_run(server, in_flight, seconds, body_path, workdir):
    """
    Drive the server with h2load; return (signed/s, p50 ms, p99 ms, sent,
    mean ms, server CPU ms per answered call).  Success is checked against
    sentry_tx's own counters by the caller (h2load sees HTTP status 200 even
    for a gRPC error).  CPU is the server's (its processes') over h2load's
    measured window, after its warm-up, divided by the calls h2load counted
    in that window: the same measure for sentry_tx and the Go yardstick.
    """
    connections, streams = H2LOAD_SHAPES[in_flight]
    log_path = os.path.join(workdir, f"h2load-{in_flight}.log")
    argv = [
        "h2load", "-c", str(connections), "-m", str(streams),
        "-D", f"{max(1, int(round(seconds)))}s",
        "--warm-up-time", f"{H2LOAD_WARM_UP_SECONDS:g}s",
        "-H", "content-type: application/grpc", "-H", "te: trailers",
        "-d", body_path, "--log-file", log_path,
        f"https://127.0.0.1:{server.port}{SIGN_PATH}",
    ]
    h2load = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    time.sleep(H2LOAD_WARM_UP_SECONDS)
    cpu_before = server.cpu_seconds()
    output, _ = h2load.communicate()
    cpu = server.cpu_seconds() - cpu_before
    if h2load.returncode != 0:
        raise subprocess.CalledProcessError(h2load.returncode, argv, output)
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
    mean = statistics.fmean(latencies) if latencies else None
    cpu_ms = 1000 * cpu / len(latencies) if latencies else None
    return (
        rate,
        percentile(latencies, 50),
        percentile(latencies, 99),
        len(latencies),
        mean,
        cpu_ms,
    )


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
    latencies = sorted(latency for r in results for latency in r[0])
    mean = statistics.fmean(latencies) if latencies else None
    return (
        len(latencies) / elapsed,
        percentile(latencies, 50),
        percentile(latencies, 99),
        len(latencies),
        mean,
        None,
    )


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
        after = server.metrics()
        failed = sum(
            after.get(k, 0) - before.get(k, 0)
            for k in after if k.startswith("dapr_sentry_cert_sign_failure_total")
        )
        signed = after.get("dapr_sentry_cert_sign_success_total", 0) - before.get(
            "dapr_sentry_cert_sign_success_total", 0)
        window_cpu = [r[5] for r in runs if r[5] is not None]
        rows[in_flight] = dict(
            cpu_ms=(statistics.median(window_cpu) if window_cpu
                    else 1000 * cpu / signed if signed else None),
            rate=statistics.median(r[0] for r in runs),
            p50=statistics.median(r[1] for r in runs),
            p99=statistics.median(r[2] for r in runs),
            mean=statistics.median(r[4] for r in runs),
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
            now = datetime.datetime.now(datetime.UTC)
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


# The Go yardstick


def go_source_directory():
    """
    ../shared/go-sentryref beside the checkout (or beside the directory of
    worktrees the checkout is in), or None.
    """
    for parent in (os.path.dirname(ROOT), os.path.dirname(os.path.dirname(ROOT))):
        candidate = os.path.join(parent, "shared", "go-sentryref")
        if os.path.exists(os.path.join(candidate, "build.sh")):
            return candidate
    return None


def build_go_yardstick(workdir):
    """
    Build the Go yardstick with its build.sh (which installs Go from apt
    when it can).

    @return: (path of the binary, None), or (None, why it was not built).
    """
    source = go_source_directory()
    if source is None:
        return None, "../shared/go-sentryref not found beside the checkout"
    import sidecars

    # Kept for the next run (bench/.go-sentryref, ignored by git).
    out = sidecars.DEFAULT_GO_BINARY
    try:
        built = subprocess.run(["bash", os.path.join(source, "build.sh"), out],
                               capture_output=True, text=True, timeout=1200)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"build.sh failed: {e}"
    if built.returncode != 0 or not os.path.exists(out):
        return None, f"build.sh failed: {(built.stderr or built.stdout).strip()[-300:]}"
    return out, None


class GoServer:
    """
    The Go yardstick serving on a free loopback port (TLS, the same
    SignCertificate work).
    """

    def __init__(self, binary, workdir):
        self.binary = binary
        self.workdir = workdir
        self.port = free_port()
        self.root_path = os.path.join(workdir, "go-root.pem")
        self.process = None
        self.log = None

    def start(self):
        """
        Exec it; return the seconds until it accepts connections.
        """
        self.log = open(os.path.join(self.workdir, "go.log"), "ab")
        started = time.perf_counter()
        self.process = subprocess.Popen(
            [self.binary, "-port", str(self.port), "-root-out", self.root_path],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=self.workdir,
        )
        while time.perf_counter() - started < READY_TIMEOUT_SECONDS:
            if self.process.poll() is not None:
                raise RuntimeError(f"the Go yardstick exited; see {self.log.name}")
            if os.path.exists(self.root_path):
                try:
                    socket.create_connection(
                        ("127.0.0.1", self.port), timeout=1
                    ).close()
                    return time.perf_counter() - started
                except OSError:
                    pass
            time.sleep(0.01)
        raise RuntimeError("the Go yardstick did not start")

    def anchors_pem(self):
        with open(self.root_path, "rb") as f:
            return f.read()

    def cpu_seconds(self):
        return process_cpu_seconds(self.process.pid)

    def peak_rss_mib(self, per_process=False):
        try:
            with open(f"/proc/{self.process.pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) / 1024
        except OSError:
            pass
        return None

    def stop(self):
        stop_child(self.process)
        if self.log is not None:
            self.log.close()


def stop_child(process, grace_seconds=10):
    """
    SIGTERM a child that is still running, SIGKILL it if it has not ended
    within C{grace_seconds}, and reap it.
    """
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(grace_seconds)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def go_throughput(go, seconds, workdir, repeats):
    """
    For each in-flight count: medians over `repeats` h2load runs against
    the Go yardstick of signed/s, p50, p99, mean and CPU ms per
    certificate.  One call is checked first with a real client: it must be
    signed.
    """
    client = GrpcTestClient(f"127.0.0.1:{go.port}", go.anchors_pem(), "cluster.local")
    try:
        reply = client.sign(sign_request())
        if not reply.workload_certificate:
            raise RuntimeError("the Go yardstick answered without a certificate")
    finally:
        client.close()
    body_path = os.path.join(workdir, "go-request.grpc")
    with open(body_path, "wb") as f:
        f.write(grpc_frame(sign_request()))
    rows = {}
    for in_flight in IN_FLIGHT:
        runs = [
            h2load_run(go, in_flight, seconds, body_path, workdir)
            for _ in range(repeats)
        ]
        rows[in_flight] = dict(
            rate=statistics.median(r[0] for r in runs),
            p50=statistics.median(r[1] for r in runs),
            p99=statistics.median(r[2] for r in runs),
            mean=statistics.median(r[4] for r in runs),
            cpu_ms=statistics.median(r[5] for r in runs),
            calls=sum(r[3] for r in runs),
            failed=0,
        )
    return rows


# The hosting alternative (issue 9)


class HostingServer:
    """
    bench/hosting.py: one process serving in the design given (``thread``
    or ``same-loop``).
    """

    def __init__(self, design, workdir):
        self.design = design
        self.workdir = workdir
        self.process = None
        self.port = None

    def start(self):
        self.log = open(os.path.join(self.workdir, f"hosting-{self.design}.log"), "ab")
        self.process = subprocess.Popen(
            [
                sys.executable,
                os.path.join(HERE, "hosting.py"),
                self.design,
                self.workdir,
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=dict(os.environ, PYTHONPATH=ROOT),
        )
        port_path = os.path.join(self.workdir, "port")
        deadline = time.monotonic() + READY_TIMEOUT_SECONDS
        while not os.path.exists(port_path):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"bench/hosting.py {self.design} did not start; see {self.log.name}"
                )
            time.sleep(0.02)
        with open(port_path) as f:
            self.port = int(f.read())

    def cpu_seconds(self):
        return process_cpu_seconds(self.process.pid)

    def stop(self):
        stop_child(self.process)
        self.log.close()


def hosting_rates(workdir, seconds, repeats):
    """
    signed/s, p99 and CPU ms per certificate at 64 in flight for each
    hosting, one process each, measured alternately.

    @return: {design: row}.
    """
    body_path = os.path.join(workdir, "hosting-request.grpc")
    with open(body_path, "wb") as f:
        f.write(grpc_frame(sign_request()))
    runs = {"thread": [], "same-loop": []}
    for _ in range(repeats):
        for design in runs:
            server = HostingServer(design, tempfile.mkdtemp(dir=workdir))
            server.start()
            try:
                runs[design].append(
                    h2load_run(server, 64, seconds, body_path, server.workdir)
                )
            finally:
                server.stop()
    return {
        design: dict(
            rate=statistics.median(r[0] for r in design_runs),
            p99=statistics.median(r[2] for r in design_runs),
            cpu_ms=statistics.median(r[5] for r in design_runs),
        )
        for design, design_runs in runs.items()
    }


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
    left.legend()
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


TARGET_RATE_TO_GO = 0.5
STRETCH_RATE_TO_GO = 0.7
TARGET_LATENCY_TO_GO = 2.0
TARGET_CPU_TO_GO = 2.0
TARGET_RSS_PER_PROCESS_MIB = 80.0
TARGET_READY_SECONDS = 1.5
TARGET_RELOAD_SECONDS = 2.5
TARGET_KUBERNETES_PER_SECOND = 1000.0


def ratio(ours, go):
    """
    ours / go, or None when either is missing.
    """
    if ours is None or not go:
        return None
    return ours / go


def judge_targets(results, go_rows, kube_row, judged):
    """
    Each target of issue 9 against this run's figures, at the default
    process count (C{judged}, a key of C{results}): rows of (target,
    measured, met), met None when it could not be judged (no Go).
    """
    rows = []
    result = results.get(judged)
    if result is None:
        return rows
    at_64 = result["throughput"][64]
    go_64 = go_rows[64] if go_rows else None

    def against_go(name, key, limit, higher_is_better):
        if go_64 is None:
            rows.append((name, "n/a (no Go yardstick in this run)", None))
            return
        value = ratio(at_64[key], go_64[key])
        if value is None:
            rows.append((name, "n/a", None))
            return
        met = value >= limit if higher_is_better else value <= limit
        rows.append(
            (
                name,
                f"{value:.2f} x ({fmt(at_64[key], 2)} against {fmt(go_64[key], 2)})",
                met,
            )
        )

    against_go(f"signed/s over TLS at 64 in flight >= {TARGET_RATE_TO_GO} x Go", "rate",
               TARGET_RATE_TO_GO, True)
    against_go(
        f"(stretch) signed/s at 64 in flight >= {STRETCH_RATE_TO_GO} x Go",
        "rate",
        STRETCH_RATE_TO_GO,
        True,
    )
    against_go(
        f"mean latency at 64 in flight <= {TARGET_LATENCY_TO_GO:g} x Go's",
        "mean",
        TARGET_LATENCY_TO_GO,
        False,
    )
    against_go(f"p99 latency at 64 in flight <= {TARGET_LATENCY_TO_GO:g} x Go's", "p99",
               TARGET_LATENCY_TO_GO, False)
    against_go(
        f"CPU ms per certificate at 64 in flight <= {TARGET_CPU_TO_GO:g} x Go's",
        "cpu_ms",
        TARGET_CPU_TO_GO,
        False,
    )
    rows.append((f"peak RSS <= {TARGET_RSS_PER_PROCESS_MIB:g} MiB per serving process",
                 f"{result['rss_per_process']:.0f} MiB (largest process)",
                 result["rss_per_process"] <= TARGET_RSS_PER_PROCESS_MIB))
    rows.append((f"exec to healthz 200 <= {TARGET_READY_SECONDS} s",
                 f"{result['ready']:.2f} s", result["ready"] <= TARGET_READY_SECONDS))
    if "reload" in result:
        delay, failed = result["reload"]
        rows.append(
            (
                f"issuer swap visible <= {TARGET_RELOAD_SECONDS} s with 0 failed calls",
                f"{fmt(delay, 2)} s, {failed} failed",
                delay <= TARGET_RELOAD_SECONDS and failed == 0,
            )
        )
    if kube_row:
        rows.append(
            (
                f"kubernetes mode >= {TARGET_KUBERNETES_PER_SECOND:,.0f} signed/s "
                "(20 ms API; issue 10)",
                f"{kube_row['rate']:,.0f}/s",
                kube_row["rate"] >= TARGET_KUBERNETES_PER_SECOND
                and kube_row["failed"] == 0,
            )
        )
    return rows


def fmt(value, digits=1):
    if value is None:
        return "n/a"
    if value == float("inf"):
        return "not seen"
    return f"{value:,.{digits}f}"


def process_label(workers):
    """
    How a process count is shown: C{"default (2)"} for the default.
    """
    if workers is None:
        from sentry_tx.cores import default_serving_processes

        return f"default ({default_serving_processes()[0]})"
    return str(workers)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run, under 60 s")
    parser.add_argument(
        "--workers",
        default="default",
        help="comma-separated serving process counts to measure, 'default'"
        " for sentry_tx's own choice (default: default)",
    )
    parser.add_argument("--seconds", type=float, default=None,
                        help="duration of each load run (default 8, quick 2)")
    parser.add_argument(
        "--client", choices=("auto", "h2load", "python"), default="auto"
    )
    parser.add_argument(
        "--go",
        default=None,
        help="the Go yardstick's binary (default: build ../shared/go-sentryref;"
        " --quick builds nothing)",
    )
    parser.add_argument(
        "--no-go", action="store_true", help="do not run the Go yardstick"
    )
    parser.add_argument("--no-kubernetes", action="store_true",
                        help="skip the kubernetes-mode measurement")
    parser.add_argument("--no-sidecars", action="store_true",
                        help="skip the sidecar-pattern measurement (bench/sidecars.py)")
    parser.add_argument(
        "--sidecars-only",
        action="store_true",
        help="measure only the sidecar pattern and rewrite its section of"
        " RESULTS.md, keeping the rest",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="alternated rounds of the sidecar pattern (default 3, quick 1)",
    )
    parser.add_argument(
        "--write",
        default=None,
        help="write RESULTS.md and results.png here (default bench/, not in --quick)",
    )
    args = parser.parse_args(argv)

    seconds = args.seconds or (2.0 if args.quick else 8.0)
    repeats = 1 if args.quick else 3
    workers_list = [None if w == "default" else int(w) for w in args.workers.split(",")]
    if args.quick:
        workers_list = workers_list[:1]
    if args.sidecars_only:
        return sidecars_only(args, seconds)
    use_h2load = args.client == "h2load" or (
        args.client == "auto" and shutil.which("h2load")
    )
    client = (
        "h2load (pre-encoded gRPC body, TLS)"
        if use_h2load
        else "multi-process Python grpc client"
    )
    started = datetime.datetime.now(datetime.UTC)
    commit = git_commit()

    print(f"machine: {machine_description()}")
    print(f"commit: {commit}; date: {started:%Y-%m-%d %H:%M} UTC; client: {client}")
    print(f"each load run: {seconds:g} s, {repeats} run(s) per point, medians quoted")

    bare = bare_pipeline_rate(3.0 if args.quick else 6.0)
    print(f"bare pipeline, one process, one core: {bare:,.0f} certificates/s")

    results = {}
    go = dict(rows=None, reason=None, rss=None)
    with tempfile.TemporaryDirectory(prefix="sentry-bench-") as workdir:
        if args.no_go:
            go["reason"] = "--no-go"
        elif not use_h2load:
            go["reason"] = "needs h2load (apt-get install nghttp2-client)"
        else:
            import sidecars

            given = sidecars.find_go_binary(args.go)
            binary, go["reason"] = (given, None) if given else (
                (None, "--quick builds nothing; pass --go") if args.quick
                else build_go_yardstick(workdir))
            if binary:
                go_server = GoServer(binary, tempfile.mkdtemp(dir=workdir))
                try:
                    go_server.start()
                    go["rows"] = go_throughput(
                        go_server, seconds, go_server.workdir, repeats
                    )
                    go["rss"] = go_server.peak_rss_mib()
                finally:
                    go_server.stop()
        if go["rows"]:
            print("\nGo yardstick (one process):")
            for in_flight, row in go["rows"].items():
                print(f"  {in_flight:>3} in flight: {row['rate']:8,.0f} signed/s  "
                      f"mean {fmt(row['mean'], 2)} ms  p99 {fmt(row['p99'], 2)} ms  "
                      f"CPU {fmt(row['cpu_ms'], 3)} ms/cert")
        else:
            print(f"\nGo yardstick: not run ({go['reason']})")

        for workers in workers_list:
            label = process_label(workers)
            result = results[label] = {}
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
                result["throughput"] = throughput(
                    server, seconds, server.workdir, use_h2load, repeats
                )
                if not args.quick:
                    result["reload"] = reload_visibility(server, 3, 10.0)
                result["rss"] = server.peak_rss_mib()
                result["rss_per_process"] = server.peak_rss_mib(per_process=True)
            finally:
                result["exit"] = server.stop()
            print(
                f"\n{label} process(es) serving gRPC: ready in {result['ready']:.2f} "
                "s; "
                f"peak RSS {result['rss']:.0f} MiB in all, "
                f"{result['rss_per_process']:.0f} MiB in the largest process"
            )
            for in_flight, row in result["throughput"].items():
                go_row = go["rows"][in_flight] if go["rows"] else {}
                print(
                    f"  {in_flight:>3} in flight: {row['rate']:8,.0f} signed/s  "
                    f"mean {fmt(row['mean'], 2)} ms  p50 {fmt(row['p50'], 2)} ms  "
                    f"p99 {fmt(row['p99'], 2)} ms  "
                    f"failed {row['failed']} of {row['calls']:,}  "
                    f"server CPU {fmt(row['cpu_ms'], 3)} ms/cert  "
                    f"ratio to Go: rate "
                    f"{fmt(ratio(row['rate'], go_row.get('rate')), 2)}, "
                    f"mean {fmt(ratio(row['mean'], go_row.get('mean')), 2)}, "
                    f"p99 {fmt(ratio(row['p99'], go_row.get('p99')), 2)}, "
                    f"CPU {fmt(ratio(row['cpu_ms'], go_row.get('cpu_ms')), 2)}"
                )
            if "reload" in result:
                delay, failed = result["reload"]
                print(
                    f"  issuer swap -> first new certificate: {fmt(delay, 2)} s; "
                    f"failed calls {failed}"
                )
        if not args.quick and use_h2load:
            hosting = results["hosting"] = hosting_rates(workdir, seconds, repeats)
            print("\nhosting, one process each, 64 in flight:")
            for design, row in hosting.items():
                print(
                    f"  {design:>9}: {row['rate']:8,.0f} signed/s  p99 "
                    f"{fmt(row['p99'], 2)} ms  "
                    f"CPU {fmt(row['cpu_ms'], 3)} ms/cert"
                )
        if not args.quick and not args.no_kubernetes:
            kube_workers = max((w for w in workers_list if w is not None), default=None)
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
        if not args.no_sidecars:
            import sidecars

            binary = sidecars.find_go_binary(args.go)
            if binary is None:
                results["sidecars"] = (None, "no Go yardstick binary (pass --go)")
            else:
                rounds = args.rounds or (1 if args.quick else 3)
                print("\nthe sidecar pattern (bench/sidecars.py):")
                rows = sidecars.sidecar_comparison(
                    binary, workdir, seconds, rounds, workers_list[0],
                    kubernetes=not args.no_kubernetes,
                )
                results["sidecars"] = (sidecars.report_lines(
                    rows, seconds, rounds, process_label(workers_list[0])), None)
                for target, measured, met in sidecars.judge(rows):
                    verdict = (
                        "met" if met else "not judged" if met is None else "NOT met"
                    )
                    print(f"  target: {target}: {measured}: {verdict}")
        if not args.quick:
            from jwt_cost import jwt_cost, report_lines

            results["jwt"] = report_lines(
                jwt_cost(workdir, seconds, repeats, use_h2load)
            )
            print("\n" + "\n".join(results["jwt"]))

    judged = process_label(None)
    for target, measured, met in judge_targets(
        {
            k: v
            for k, v in results.items()
            if k not in ("hosting", "kubernetes", "sidecars")
        },
        go["rows"],
        (results.get("kubernetes") or (None, None))[0],
        judged,
    ):
        print(f"  target: {target}: {measured}: "
              f"{'met' if met else 'not judged' if met is None else 'NOT met'}")
    if args.quick and not args.write:
        return 0
    out = args.write or HERE
    write_report(out, results, bare, started, commit, client, seconds, repeats, go)
    return 0


def sidecars_only(args, seconds):
    """
    --sidecars-only: the sidecar pattern alone; its section of RESULTS.md is
    rewritten, the rest of the file kept.
    """
    import sidecars

    binary = sidecars.find_go_binary(args.go)
    if binary is None:
        print("no Go yardstick binary: pass --go")
        return 2
    rounds = args.rounds or (1 if args.quick else 3)
    workers = None if args.workers == "default" else int(args.workers.split(",")[0])
    started = datetime.datetime.now(datetime.UTC)
    commit = git_commit()
    print(f"machine: {machine_description()}")
    print(f"commit: {commit}; date: {started:%Y-%m-%d %H:%M} UTC; sidecar pattern only,"
          f" {rounds} round(s) of {seconds:g} s")
    with tempfile.TemporaryDirectory(prefix="sentry-bench-") as workdir:
        rows = sidecars.sidecar_comparison(binary, workdir, seconds, rounds, workers,
                                           kubernetes=not args.no_kubernetes)
    lines = sidecars.report_lines(rows, seconds, rounds, process_label(workers))
    print("\n".join(lines))
    if args.quick and not args.write:
        return 0
    out = args.write or HERE
    sidecars.write_section(
        os.path.join(out, "RESULTS.md"),
        lines,
        [
            f"Written by `bench/run.py --sidecars-only` on {started:%Y-%m-%d %H:%M} "
            "UTC at commit"
            f" {commit}; machine: {machine_description()}."
        ],
    )
    print(f"\nwrote the sidecar section of {os.path.join(out, 'RESULTS.md')}")
    return 0


def write_report(out, results, bare, started, commit, client, seconds, repeats, go):
    import sidecars

    sidecar_lines, sidecar_reason = results.pop("sidecars", (None, "--no-sidecars"))
    kept_sidecars = sidecars.existing_section(os.path.join(out, "RESULTS.md"))
    kube = results.pop("kubernetes", (None, "not measured"))
    jwt_lines = results.pop("jwt", [])
    storm_rows = results.pop("storms", [])
    hosting = results.pop("hosting", None)
    png = plot(results, os.path.join(out, "results.png"))
    go_rows = go["rows"]
    lines = [
        "# sentry_tx benchmark results",
        "",
        f"Written by `bench/run.py` on {started:%Y-%m-%d %H:%M} UTC at commit "
        f"{commit}.",
        "",
        f"- Machine: {machine_description()}.",
        f"- Load: {client}, every request a real P-256 CSR signed for real; "
        f"{seconds:g} s per run, {repeats} runs per point, medians quoted.",
        "- Server and load generator share the machine's cores; the machine is shared "
        "with"
        " other work, so compare ratios taken in this run, not single figures across "
        "runs.",
        "- CPU ms per certificate: the server's processes' user + system CPU over "
        "h2load's"
        " measured window (after its warm-up), over the calls answered in it; the same "
        "measure"
        " for the Go yardstick.",
        "",
        f"Bare issue pipeline (parse CSR, verify, build, sign, PEM), one process, one "
        "core: "
        f"**{bare:,.0f} certificates/s**.",
        "",
    ]
    if go_rows:
        lines += [
            f"Go yardstick (`../shared/go-sentryref`, one process, grpc-go), same "
            "load, same run;"
            f" peak RSS {fmt(go['rss'], 0)} MiB:",
            "",
            "| in flight | signed/s | mean ms | p50 ms | p99 ms | CPU ms per "
            "certificate |",
            "|---|---|---|---|---|---|",
        ]
        for in_flight, row in go_rows.items():
            lines.append(
                f"| {in_flight} | {row['rate']:,.0f} | {fmt(row['mean'], 2)} | "
                f"{fmt(row['p50'], 2)} | {fmt(row['p99'], 2)} | "
                f"{fmt(row['cpu_ms'], 3)} |"
            )
        lines.append("")
    else:
        lines += [f"Go yardstick: not run ({go['reason']}).", ""]
    lines += [
        "sentry_tx, and its ratios to Go at the same in-flight count:",
        "",
        "| processes | in flight | signed/s | mean ms | p50 ms | p99 ms | failed | CPU "
        "ms per certificate"
        " | rate / Go | mean / Go | p99 / Go | CPU / Go |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, result in results.items():
        for in_flight, row in result["throughput"].items():
            go_row = go_rows[in_flight] if go_rows else {}
            lines.append(
                f"| {label} | {in_flight} | {row['rate']:,.0f} | {fmt(row['mean'], 2)} "
                "| "
                f"{fmt(row['p50'], 2)} | {fmt(row['p99'], 2)} | {row['failed']} of "
                f"{row['calls']:,} | "
                f"{fmt(row['cpu_ms'], 3)} | "
                f"{fmt(ratio(row['rate'], go_row.get('rate')), 2)} | "
                f"{fmt(ratio(row['mean'], go_row.get('mean')), 2)} | "
                f"{fmt(ratio(row['p99'], go_row.get('p99')), 2)} | "
                f"{fmt(ratio(row['cpu_ms'], go_row.get('cpu_ms')), 2)} |"
            )
    lines += [
        "",
        "| processes | exec to healthz 200 | peak RSS, all processes | peak RSS, "
        "largest"
        " process | swap to new issuer | failed calls in swaps |",
        "|---|---|---|---|---|---|",
    ]
    for label, result in results.items():
        delay, failed = result.get("reload", (None, None))
        lines.append(
            f"| {label} | {result['ready']:.2f} s | {result['rss']:.0f} MiB | "
            f"{result['rss_per_process']:.0f} MiB | {fmt(delay, 2)} s | {failed} |"
        )
    if hosting:
        thread, same = hosting["thread"], hosting["same-loop"]
        faster = "thread" if thread["rate"] >= same["rate"] else "same-loop"
        lines += [
            "",
            "## Hosting: grpc.aio on its own loop thread against Twisted's asyncio "
            "reactor",
            "",
            "One process each (bench/hosting.py), INSECURE, 64 in flight, runs "
            "alternated:",
            "",
            "| hosting | signed/s | p99 ms | CPU ms per certificate |",
            "|---|---|---|---|",
            f"| grpc.aio on its own loop thread, default reactor (what sentry_tx runs) "
            "| "
            f"{thread['rate']:,.0f} | {fmt(thread['p99'], 2)} | "
            f"{fmt(thread['cpu_ms'], 3)} |",
            f"| Twisted's asyncio reactor, grpc.aio on the same loop (needs `twistd -r "
            "asyncio`) | "
            f"{same['rate']:,.0f} | {fmt(same['p99'], 2)} | {fmt(same['cpu_ms'], 3)} |",
            "",
            f"Faster in this run: **{faster}** "
            f"({ratio(same['rate'], thread['rate']):.2f} x the"
            f" thread design's rate for the same loop). Issue 9 keeps the same-loop "
            "design only if"
            f" it is faster and needs no `-r` flag; it needs `-r asyncio`, so "
            "sentry_tx keeps the"
            f" loop thread.",
        ]
    kube_row, reason = kube
    if kube_row:
        lines += [
            "",
            f"Kubernetes mode ({process_label(kube_row['workers'])} process(es)), fake "
            "API"
            f" server in its own process with 20 ms added to each TokenReview and Pod "
            "GET, 64 in"
            f" flight: **{kube_row['rate']:,.0f} signed/s**, p50 "
            f"{fmt(kube_row['p50'], 2)} ms, "
            f"p99 {fmt(kube_row['p99'], 2)} ms, failed {kube_row['failed']} of "
            f"{kube_row['calls']:,}. "
            f"CPU per signed certificate: sentry_tx's processes "
            f"{fmt(kube_row['cpu_ms'], 2)} ms, "
            f"the fake API server {fmt(kube_row['fake_cpu_ms'], 2)} ms; the bare "
            "pipeline needs "
            f"{1000 / bare:.2f} ms.",
        ]
    else:
        lines += ["", f"Kubernetes mode: not measured ({reason})."]
    if storm_rows:
        import kube_storm

        lines += ["", "Storms (bench/kube_storm.py):", ""]
        lines += [f"- {kube_storm.describe_storm(row)}" for row in storm_rows]
    judged = process_label(None)
    lines += [
        "",
        f"## Targets (issue 9), judged from the figures above at {judged} processes",
        "",
        "| target | measured | met |",
        "|---|---|---|",
    ]
    for target, measured, met in judge_targets(results, go_rows, kube_row, judged):
        verdict = "not judged" if met is None else "yes" if met else "**no**"
        lines.append(f"| {target} | {measured} | {verdict} |")
    if png:
        lines += ["", "![throughput and p99 against calls in flight](results.png)"]
    if jwt_lines:
        lines += [""] + jwt_lines
    if sidecar_lines:
        lines += [
            "",
            sidecars.SECTION_START,
            f"Written by `bench/run.py` on {started:%Y-%m-%d %H:%M} UTC at commit "
            f"{commit}.",
            "",
            *sidecar_lines,
            sidecars.SECTION_END,
        ]
    elif kept_sidecars:
        # Measured earlier by --sidecars-only: kept as it was.
        lines += ["", kept_sidecars]
    else:
        lines += ["", f"The sidecar pattern: not measured ({sidecar_reason})."]
    with open(os.path.join(out, "RESULTS.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print(
        f"\nwrote {os.path.join(out, 'RESULTS.md')}"
        + (" and results.png" if png else "")
    )


if __name__ == "__main__":
    sys.exit(main())
