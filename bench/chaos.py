"""
Attack a running sentry_tx from outside and print what held.

    .venv/bin/python bench/chaos.py            # every fault, about 70 s
    .venv/bin/python bench/chaos.py --quick    # a smoke: FIFO, bad issuers, slowloris
    .venv/bin/python bench/chaos.py --only fifo-during-service,slowloris
    .venv/bin/python bench/chaos.py --only audience-flood

Each fault starts sentry_tx as `twistd -n sentry` (a child process, every
listener on 127.0.0.1, free ports), applies the fault and checks the outcome
an operator needs; in kubernetes mode the API server is the fake one
(bench/fake_kube.py) in its own process.  Everything is loopback, every wait
is bounded, every fault has a deadline, and every process started is stopped
(SIGKILL at worst).  It prints a table: fault, outcome (ok or FAILED and
why), and the figure measured.  Exit status 0 when every fault held.

It is not part of the test suite (tests/test_faults.py holds the short
process tests of the same faults).
"""

import argparse
import datetime
import json
import os
import re
import resource
import selectors
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

import grpc  # noqa: E402
from cryptography import x509  # noqa: E402
from run import (  # noqa: E402
    free_port,
    percentile,
    process_tree_cpu_seconds,
    sign_request,
)

from sentry_tx._proto import sentry_pb2  # noqa: E402
from sentry_tx.testing.certificates import make_chain  # noqa: E402
from sentry_tx.testing.grpc_client import GrpcTestClient  # noqa: E402
from sentry_tx.testing.rotation import reissue_chain, replace_bundle_files  # noqa: E402

READY_TIMEOUT_SECONDS = 30.0
FAULT_DEADLINE_SECONDS = 90.0
STOP_BOUND_SECONDS = 6.0  # the 5 s drain + 1 s
SLOWLORIS_SOCKETS = 1100
SLOWLORIS_FILE_LIMIT = 1024
SLOWLORIS_PROBES = 15
SLOWLORIS_PROBE_TIMEOUT_SECONDS = 1.0  # the kubelet's default timeoutSeconds
KUBELET_FAILURE_THRESHOLD = 3
"""
Consecutive failed probes after which the kubelet acts: Dapr's chart gives
sentry's readiness probe failureThreshold 3 (period 1 s) and its liveness
probe 5 (period 10 s); one late probe changes nothing.
"""
SLOWLORIS_MAX_CONNECTS = 200000
AUDIENCE_FLOOD_AUDIENCES = 10_000
AUDIENCE_FLOOD_THREADS = 4
AUDIENCE_FLOOD_SECONDS = 5.0
AUDIENCE_FLOOD_MAX_CALLS = 2_000  # per attacking thread
AUDIENCE_FLOOD_HONEST_PAUSE_SECONDS = 0.02
AUDIENCE_FLOOD_CPU_MS_TARGET = 5.0
AUDIENCE_FLOOD_HONEST_P50_MS_TARGET = 50.0


class FaultFailed(Exception):
    """
    The fault was not held; the message says how.
    """


def _now():
    return datetime.datetime.now(datetime.UTC)


def _chain(**options):
    now = _now()
    options.setdefault("not_before", now - datetime.timedelta(days=1))
    options.setdefault("not_after", now + datetime.timedelta(days=30))
    return make_chain(trust_domain="localhost", **options)


class Sentry:
    """
    `twistd -n sentry` on free loopback ports, its log in a file.
    """

    def __init__(self, workdir, extra=(), env=None, open_files_limit=None):
        self.workdir = workdir
        self.credentials = os.path.join(workdir, "credentials")
        self.port = free_port()
        self.healthz_port = free_port()
        self.metrics_port = free_port()
        self.extra = list(extra)
        self.env = dict(os.environ, PYTHONPATH=ROOT, **(env or {}))
        self.env.pop("KUBERNETES_SERVICE_HOST", None)
        self.open_files_limit = open_files_limit
        self.process = None
        self.log_path = os.path.join(workdir, f"sentry-{time.monotonic_ns()}.log")

    def spawn(self):
        argv = [
            sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
            "-n", "--pidfile=", "sentry",
            "--config", os.path.join(self.workdir, "missing.yaml"),
            "--issuer-credentials", self.credentials,
            "--trust-domain", "localhost",
            "--listen-address", "127.0.0.1", "--port", str(self.port),
            "--healthz-listen-address", "127.0.0.1",
            "--healthz-port", str(self.healthz_port),
            "--metrics-listen-address", "127.0.0.1",
            "--metrics-port", str(self.metrics_port),
        ] + self.extra
        limit = self.open_files_limit

        def limit_files():
            if limit is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                cwd=self.workdir, preexec_fn=limit_files,
            )
        self.started = time.monotonic()
        return self

    def start(self):
        """
        Spawn and wait for healthz 200; the seconds it took.
        """
        self.spawn()
        deadline = self.started + READY_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise FaultFailed(
                    f"sentry_tx exited {self.process.returncode}: {self.tail()}"
                )
            if self.healthz() == 200:
                return time.monotonic() - self.started
            time.sleep(0.02)
        raise FaultFailed("sentry_tx did not become ready")

    def wait_pool(self, timeout=READY_TIMEOUT_SECONDS):
        """
        Wait until every worker process serves too (healthz is 200 as soon
        as this process serves; the workers start afterwards, and a fault
        measured while they start measures their start-up); the seconds it
        took.
        """
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            log = self.log()
            # The parent logs this line once every serving copy serves; a
            # single process logs "serving gRPC from 1 process" and no pool.
            if re.search(r"gRPC server listening on \S+ in \d+ serving processes", log):
                return time.monotonic() - started
            if "serving gRPC from 1 process (" in log:
                return time.monotonic() - started
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        raise FaultFailed(f"the worker processes did not all serve: {self.tail()}")

    def log(self):
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def tail(self, lines=3):
        return " | ".join(self.log().strip().splitlines()[-lines:])[-400:]

    def wait_log(self, text, timeout=15.0, after=0):
        """
        Wait until `text` appears in the log past offset `after`; the
        seconds it took.
        """
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if text in self.log()[after:]:
                return time.monotonic() - started
            time.sleep(0.02)
        raise FaultFailed(f"no {text!r} in the log within {timeout} s: {self.tail()}")

    def healthz(self, timeout=1.0):
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.healthz_port}/healthz", timeout=timeout
            ) as response:
                return response.status
        except urllib.error.HTTPError as e:
            return e.code
        except OSError:
            return None

    def metric(self, name):
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            for line in response.read().decode().splitlines():
                if line.startswith(name + " "):
                    return float(line.split()[1])
        return None

    def anchors_pem(self):
        with open(os.path.join(self.credentials, "ca.crt"), "rb") as f:
            return f.read()

    def sign(self, anchors_pem=None, request=None, timeout=15.0):
        """
        One SignCertificate call; the issuer of the leaf, or raises
        grpc.RpcError.
        """
        client = GrpcTestClient(
            f"127.0.0.1:{self.port}", anchors_pem or self.anchors_pem()
        )
        try:
            reply = client.sign(request or sign_request(), timeout=timeout)
        finally:
            client.close()
        return x509.load_pem_x509_certificates(reply.workload_certificate)[0].issuer

    def stop(self):
        """
        SIGTERM; (exit status, seconds); SIGKILL after 15 s.
        """
        if self.process.poll() is not None:
            return self.process.returncode, 0.0
        started = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        try:
            status = self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            return "killed", time.monotonic() - started
        return status, time.monotonic() - started

    def kill(self):
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def wait_exit(self, timeout):
        try:
            return self.process.wait(timeout), time.monotonic() - self.started
        except subprocess.TimeoutExpired:
            raise FaultFailed(
                f"still running after {timeout} s: {self.tail()}"
            ) from None


def _stopped_in_bound(sentry):
    status, seconds = sentry.stop()
    if status not in (0, -signal.SIGTERM) or seconds > STOP_BOUND_SECONDS:
        raise FaultFailed(f"SIGTERM: status {status} after {seconds:.1f} s")
    return seconds


def _serving(workdir, chain=None, **options):
    sentry = Sentry(workdir, **options)
    if chain is not None:
        os.makedirs(sentry.credentials, mode=0o700)
        chain.write(sentry.credentials)
    sentry.start()
    return sentry


# Standalone faults


def fault_fifo_during_service(workdir):
    chain = _chain()
    sentry = _serving(workdir, chain)
    try:
        offset = len(sentry.log())
        issuer = os.path.join(sentry.credentials, "issuer.crt")
        fifo = os.path.join(sentry.credentials, ".chaos-fifo")
        os.mkfifo(fifo)
        os.rename(fifo, issuer)
        refused = sentry.wait_log(
            "is a FIFO (named pipe), not a regular file", after=offset
        )
        if sentry.healthz() != 200:
            raise FaultFailed("healthz not 200 after the FIFO")
        failed = sentry.metric("dapr_sentry_issuercert_reload_failed_total")
        sentry.sign()
        offset = len(sentry.log())
        new = reissue_chain(chain)
        replace_bundle_files(new, sentry.credentials)
        taken = sentry.wait_log("issuer credentials reloaded", after=offset)
        if sentry.sign() != new.issuer.subject:
            raise FaultFailed("the rotation after the FIFO was not served")
        stop = _stopped_in_bound(sentry)
        return (
            f"refused by name in {refused:.1f} s, counted ({failed:g}); rotation"
            f" taken {taken:.1f} s later; SIGTERM {stop:.2f} s"
        )
    finally:
        sentry.kill()


def fault_fifo_at_start(workdir):
    chain = _chain()
    sentry = Sentry(workdir)
    os.makedirs(sentry.credentials, mode=0o700)
    chain.write(sentry.credentials)
    issuer = os.path.join(sentry.credentials, "issuer.crt")
    os.unlink(issuer)
    os.mkfifo(issuer)
    sentry.spawn()
    try:
        status, seconds = sentry.wait_exit(15)
        if status != 1 or f"{issuer}: is a FIFO" not in sentry.log():
            raise FaultFailed(f"exit {status}: {sentry.tail()}")
        return f"start refused naming the FIFO; exit 1 after {seconds:.1f} s"
    finally:
        sentry.kill()


def _bad_issuer(workdir, make_bad):
    chain = _chain()
    sentry = _serving(workdir, chain)
    try:
        offset = len(sentry.log())
        make_bad(chain, sentry.credentials)
        sentry.wait_log("issuer credentials refused", after=offset)
        failed = sentry.metric("dapr_sentry_issuercert_reload_failed_total")
        if sentry.sign() != chain.issuer.subject:
            raise FaultFailed("the old issuer is no longer served")
        if sentry.healthz() != 200:
            raise FaultFailed("healthz not 200")
        line = [t for t in sentry.log()[offset:].splitlines() if "refused" in t][0]
        reason = line.split("service: ", 1)[-1].replace(sentry.credentials + os.sep, "")
        return f"refused, old issuer kept, counted ({failed:g}): {reason[:90]}"
    finally:
        sentry.kill()


def fault_truncated_issuer(workdir):
    def truncate(chain, directory):
        with open(os.path.join(directory, ".issuer.crt.new"), "wb") as f:
            f.write(chain.issuer_chain_pem()[:200])
        os.rename(
            os.path.join(directory, ".issuer.crt.new"),
            os.path.join(directory, "issuer.crt"),
        )

    return _bad_issuer(workdir, truncate)


def fault_foreign_issuer(workdir):
    def foreign(chain, directory):
        other = _chain()
        for name, data in (
            ("issuer.crt", other.issuer_chain_pem()),
            ("issuer.key", other.issuer_key_pem()),
        ):
            path = os.path.join(directory, "." + name + ".new")
            with open(path, "wb") as f:
                f.write(data)
            os.chmod(path, 0o600)
            os.rename(path, os.path.join(directory, name))

    return _bad_issuer(workdir, foreign)


def fault_expired_issuer(workdir):
    def expired(chain, directory):
        now = _now()
        replace_bundle_files(
            reissue_chain(
                chain,
                not_before=now - datetime.timedelta(days=10),
                not_after=now - datetime.timedelta(days=1),
            ),
            directory,
        )

    return _bad_issuer(workdir, expired)


def fault_sigkill_during_generation(workdir):
    # Kill at growing delays until the kill lands while temporary files
    # exist; each attempt starts over in a new directory.
    for attempt in range(40):
        sentry = Sentry(os.path.join(workdir, f"attempt-{attempt}"))
        os.makedirs(sentry.workdir)
        sentry.spawn()
        seen = []
        deadline = time.monotonic() + 20
        try:
            while time.monotonic() < deadline and sentry.process.poll() is None:
                if os.path.isdir(sentry.credentials):
                    seen = [
                        n for n in os.listdir(sentry.credentials) if ".sentry-tx-" in n
                    ]
                    if seen:
                        break
                time.sleep(0.0005)
            sentry.kill()
        finally:
            sentry.kill()
        if os.path.isdir(sentry.credentials):
            seen = [n for n in os.listdir(sentry.credentials) if ".sentry-tx-" in n]
        if seen:
            break
    else:
        raise FaultFailed("never caught a generation in flight")
    restarted = Sentry(sentry.workdir)
    restarted.spawn()
    try:
        try:
            status, _ = restarted.wait_exit(10)
        except FaultFailed:
            status = None  # still running: serving
        left = [n for n in os.listdir(restarted.credentials) if ".sentry-tx-" in n]
        removed = restarted.log().count("removed the temporary file")
        if left:
            raise FaultFailed(f"temporary files left after restart: {left}")
        if status is None:
            if restarted.healthz() != 200:
                raise FaultFailed("restarted but not ready")
            outcome = "restart serves"
        elif (
            "refusing to start" in restarted.log()
            and "missing, while" in restarted.log()
        ):
            outcome = "restart refuses the partial bundle (fail closed)"
        else:
            raise FaultFailed(f"restart exited {status}: {restarted.tail()}")
        return (
            f"{len(seen)} temporary file(s) at the kill; {removed} removed at"
            f" restart; {outcome}"
        )
    finally:
        restarted.kill()


def fault_sigkill_during_reload(workdir):
    chain = _chain()
    sentry = _serving(workdir, chain)
    try:
        offset = len(sentry.log())
        new = reissue_chain(chain)
        replace_bundle_files(new, sentry.credentials)
        sentry.wait_log("issuer credentials changed; reloading", after=offset)
        sentry.process.kill()
        sentry.process.wait()
    finally:
        sentry.kill()
    restarted = Sentry(workdir)
    restarted.credentials = sentry.credentials
    try:
        seconds = restarted.start()
        if restarted.sign() != new.issuer.subject:
            raise FaultFailed("the restarted CA does not serve the new issuer")
        return f"restart serves the new issuer; ready in {seconds:.1f} s"
    finally:
        restarted.kill()


class Slowloris:
    """
    `count` sockets that each send the start of a healthz request and
    nothing more, reconnecting as soon as the server closes them.
    """

    def __init__(self, port, count, max_connects):
        self.port = port
        self.count = count
        self.max_connects = max_connects
        self.connects = 0
        self.closed_by_server = 0
        self.selector = selectors.DefaultSelector()

    def _connect(self):
        if self.connects >= self.max_connects:
            return
        self.connects += 1
        sock = socket.socket()
        sock.setblocking(False)
        sock.connect_ex(("127.0.0.1", self.port))
        self.selector.register(sock, selectors.EVENT_WRITE, "connecting")

    def run(self, seconds, between=None):
        """
        Keep the sockets up for `seconds`; call `between()` every 0.5 s.
        """
        for _ in range(self.count):
            self._connect()
        end = time.monotonic() + seconds
        next_call = time.monotonic()
        while time.monotonic() < end:
            for key, _events in self.selector.select(timeout=0.05):
                sock = key.fileobj
                if key.data == "connecting":
                    if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                        self._drop(sock)
                        continue
                    try:
                        sock.send(b"GET /healthz HTTP/1.1\r\nHost: x")
                    except OSError:
                        self._drop(sock)
                        continue
                    self.selector.modify(sock, selectors.EVENT_READ, "open")
                else:
                    try:
                        data = sock.recv(4096)
                    except OSError:
                        data = b""
                    if not data:
                        self.closed_by_server += 1
                        self._drop(sock)
            if between is not None and time.monotonic() >= next_call:
                next_call += 0.5
                between()

    def _drop(self, sock):
        self.selector.unregister(sock)
        sock.close()
        self._connect()

    def close(self):
        for key in list(self.selector.get_map().values()):
            key.fileobj.close()
        self.selector.close()


def fault_slowloris(
    workdir,
    sockets=SLOWLORIS_SOCKETS,
    limit=SLOWLORIS_FILE_LIMIT,
    probes=SLOWLORIS_PROBES,
):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < sockets + 100:
        raise FaultFailed(
            f"this shell's hard open-file limit {hard} is below {sockets + 100}"
        )
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    chain = _chain()
    sentry = _serving(workdir, chain, open_files_limit=limit)
    attack = Slowloris(sentry.healthz_port, sockets, SLOWLORIS_MAX_CONNECTS)
    codes, signs, fds, seconds = [], [], [], []

    def probe():
        if len(codes) >= probes:
            return
        started = time.monotonic()
        codes.append(sentry.healthz(timeout=SLOWLORIS_PROBE_TIMEOUT_SECONDS))
        seconds.append(time.monotonic() - started)
        fds.append(len(os.listdir(f"/proc/{sentry.process.pid}/fd")))
        if len(codes) % 5 == 0:
            try:
                sentry.sign(chain.anchors_pem, timeout=5)
                signs.append(True)
            except grpc.RpcError:
                signs.append(False)

    try:
        # The workers start after healthz is 200; measured while they
        # start, the probes would measure their start-up.
        sentry.wait_pool()
        attack.run(probes * 0.5 + 1.0, between=probe)
        attack.close()
        ok = codes.count(200)
        failing = _longest_run(code != 200 for code in codes)
        figure = (
            f"limit {limit}, {sockets} sockets, {attack.connects} connects;"
            f" healthz {ok}/{len(codes)} 200 (slowest {max(seconds):.2f} s,"
            f" at most {failing} failed in a row);"
            f" signed {signs.count(True)}/{len(signs)}; peak fds {max(fds)}"
        )
        # What an operator needs: the kubelet never acts (no
        # KUBELET_FAILURE_THRESHOLD probes failed in a row) and calls are
        # signed.  A single late probe is not a failure: each waits behind
        # up to ~1,000 queued connections (~0.1 s of server CPU), and on a
        # shared machine the server may get too little CPU for that.
        if failing >= KUBELET_FAILURE_THRESHOLD or not all(signs) or not signs:
            raise FaultFailed(figure)
        return figure
    finally:
        attack.close() if attack.selector.get_map() is not None else None
        sentry.kill()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _longest_run(flags):
    """
    The length of the longest run of true values in `flags`.
    """
    longest = current = 0
    for flag in flags:
        current = current + 1 if flag else 0
        longest = max(longest, current)
    return longest


def _audience_flood_request():
    """
    An INSECURE request asking for AUDIENCE_FLOOD_AUDIENCES distinct
    audiences (decimal numbers: about 59 KB, under the 64 KiB cap).
    """
    return sign_request(
        jwt_audiences=[str(n) for n in range(AUDIENCE_FLOOD_AUDIENCES)]
    )


def _honest_calls(sentry, anchors_pem, stop, latencies, failures):
    """
    Sign well-formed requests one after another, pausing between them,
    until `stop` is set; each latency in ms into `latencies`.
    """
    client = GrpcTestClient(f"127.0.0.1:{sentry.port}", anchors_pem)
    try:
        while not stop.is_set():
            started = time.monotonic()
            try:
                client.sign(
                    sign_request(jwt_audiences=["sts.amazonaws.com"]), timeout=10
                )
            except grpc.RpcError as e:
                failures.append(e.code().name)
            else:
                latencies.append(1000 * (time.monotonic() - started))
            stop.wait(AUDIENCE_FLOOD_HONEST_PAUSE_SECONDS)
    finally:
        client.close()


def _attacking_calls(sentry, anchors_pem, data, stop, codes, lock):
    """
    Send `data` (a serialised request) as fast as answers come back, until
    `stop` is set or AUDIENCE_FLOOD_MAX_CALLS were sent; count the codes.
    """
    channel = grpc.secure_channel(
        f"127.0.0.1:{sentry.port}",
        grpc.ssl_channel_credentials(root_certificates=anchors_pem),
        options=[("grpc.ssl_target_name_override", "dapr-sentry.default.svc")],
    )
    call = channel.unary_unary(
        "/dapr.proto.sentry.v1.CA/SignCertificate",
        request_serializer=None,
        response_deserializer=None,
    )
    try:
        for _ in range(AUDIENCE_FLOOD_MAX_CALLS):
            if stop.is_set():
                break
            try:
                call(data, timeout=10)
                code = "OK"
            except grpc.RpcError as e:
                code = e.code().name
            with lock:
                codes[code] = codes.get(code, 0) + 1
    finally:
        channel.close()


def fault_audience_flood(workdir):
    """
    Four threads send calls with 10,000 distinct audiences while an honest
    caller signs: each must be INVALID_ARGUMENT for less than
    AUDIENCE_FLOOD_CPU_MS_TARGET of server CPU (all the server's CPU over
    the attack, the honest calls' included, divided by the attacking
    calls), and the honest caller's p50 must stay under
    AUDIENCE_FLOOD_HONEST_P50_MS_TARGET.
    """
    sentry = _serving(workdir, extra=["--jwt-enabled"])
    try:
        sentry.wait_pool()
        anchors = sentry.anchors_pem()
        data = _audience_flood_request().SerializeToString()
        stop = threading.Event()
        latencies, failures, codes, lock = [], [], {}, threading.Lock()
        honest = threading.Thread(
            target=_honest_calls, args=(sentry, anchors, stop, latencies, failures)
        )
        attackers = [
            threading.Thread(
                target=_attacking_calls, args=(sentry, anchors, data, stop, codes, lock)
            )
            for _ in range(AUDIENCE_FLOOD_THREADS)
        ]
        cpu_before = process_tree_cpu_seconds(sentry.process.pid)
        for thread in [honest] + attackers:
            thread.start()
        try:
            stop.wait(AUDIENCE_FLOOD_SECONDS)
        finally:
            stop.set()
            for thread in [honest] + attackers:
                thread.join(30)
        cpu = process_tree_cpu_seconds(sentry.process.pid) - cpu_before
        attacks = sum(codes.values())
        cpu_ms = 1000 * cpu / attacks if attacks else float("inf")
        p50 = percentile(sorted(latencies), 50)
        figure = (
            f"{len(data) / 1000:.0f} KB x {attacks} calls from"
            f" {AUDIENCE_FLOOD_THREADS} threads in {AUDIENCE_FLOOD_SECONDS:g} s"
            f" ({', '.join(f'{k} {v}' for k, v in sorted(codes.items()))});"
            f" server CPU {cpu_ms:.2f} ms per attacking call"
            f" (target < {AUDIENCE_FLOOD_CPU_MS_TARGET:g});"
            f" honest p50 {p50 if p50 is None else round(p50, 1)} ms over"
            f" {len(latencies)} calls (target < "
            f"{AUDIENCE_FLOOD_HONEST_P50_MS_TARGET:g})"
        )
        if failures:
            figure += f"; honest calls refused: {sorted(set(failures))}"
        if (
            set(codes) != {"INVALID_ARGUMENT"}
            or failures
            or cpu_ms >= AUDIENCE_FLOOD_CPU_MS_TARGET
            or p50 is None
            or p50 >= AUDIENCE_FLOOD_HONEST_P50_MS_TARGET
        ):
            raise FaultFailed(figure)
        return figure
    finally:
        sentry.kill()


# Kubernetes mode, against the fake API server


class FakeAPI:
    """
    bench/fake_kube.py in its own process.
    """

    def __init__(self, workdir, delay_seconds=0.0):
        self.workdir = workdir
        os.makedirs(workdir, exist_ok=True)
        self.process = subprocess.Popen(
            [
                sys.executable,
                os.path.join(HERE, "fake_kube.py"),
                workdir,
                str(delay_seconds),
            ],
            stdout=subprocess.DEVNULL,
            stderr=open(os.path.join(workdir, "fake.log"), "wb"),
        )
        info = os.path.join(workdir, "fake-kube.json")
        deadline = time.monotonic() + READY_TIMEOUT_SECONDS
        while not os.path.exists(info):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise FaultFailed("the fake API server did not start")
            time.sleep(0.05)
        with open(info) as f:
            self.info = json.load(f)

    def anchors_pem(self):
        context = ssl.create_default_context(cadata=self.info["ca_pem"])
        context.check_hostname = False
        request = urllib.request.Request(
            self.info["url"]
            + "/api/v1/namespaces/default/configmaps/dapr-trust-bundle",
            headers={"Authorization": "Bearer " + self.info["api_token"]},
        )
        with urllib.request.urlopen(request, context=context, timeout=5) as response:
            return json.load(response)["data"]["ca.crt"].encode()

    def kill(self):
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def _kube_sentry(workdir, kubeconfig):
    return Sentry(
        workdir,
        extra=[
            "--mode",
            "kubernetes",
            "--kubeconfig",
            kubeconfig,
            "--config",
            "daprsystem",
        ],
        env={"NAMESPACE": "default"},
    )


def _kube_request(fake):
    return sign_request(
        token_validator=sentry_pb2.SignCertificateRequest.KUBERNETES,
        namespace=fake.info["namespace"],
        token=fake.info["token"],
    )


def _kube_call(sentry, fake, anchors_pem):
    started = time.monotonic()
    try:
        sentry.sign(anchors_pem, _kube_request(fake), timeout=20)
        code = "OK"
    except grpc.RpcError as e:
        code = e.code().name
    return code, time.monotonic() - started


def fault_kube_api_down(workdir):
    fake = FakeAPI(os.path.join(workdir, "fake"))
    sentry = _kube_sentry(workdir, fake.info["kubeconfig"])
    try:
        sentry.start()
        anchors = fake.anchors_pem()
        before, _ = _kube_call(sentry, fake, anchors)
        fake.kill()
        code, seconds = _kube_call(sentry, fake, anchors)
        health = sentry.healthz()
        if before != "OK" or code != "UNAVAILABLE":
            raise FaultFailed(f"before {before}, with the API down {code}")
        stop = _stopped_in_bound(sentry)
        return (
            f"calls UNAVAILABLE in {seconds:.2f} s; healthz {health};"
            f" SIGTERM {stop:.2f} s"
        )
    finally:
        sentry.kill()
        fake.kill()


def fault_kube_api_slow(workdir):
    fake = FakeAPI(os.path.join(workdir, "fake"), delay_seconds=15.0)
    sentry = _kube_sentry(workdir, fake.info["kubeconfig"])
    try:
        sentry.start()
        code, seconds = _kube_call(sentry, fake, fake.anchors_pem())
        if code in ("OK", "INTERNAL", "UNKNOWN", "CANCELLED") or seconds > 12:
            raise FaultFailed(f"{code} after {seconds:.1f} s")
        stop = _stopped_in_bound(sentry)
        return f"API 15 s late: call {code} after {seconds:.1f} s; SIGTERM {stop:.2f} s"
    finally:
        sentry.kill()
        fake.kill()


def fault_kube_api_refusing(workdir):
    fake = FakeAPI(os.path.join(workdir, "fake"))
    kubeconfig = fake.info["kubeconfig"]
    fake.kill()  # nothing listens on its port now: connections are refused
    sentry = _kube_sentry(workdir, kubeconfig)
    sentry.spawn()
    try:
        try:
            status, seconds = sentry.wait_exit(40)
        except FaultFailed:
            stop = _stopped_in_bound(sentry)
            return (
                f"still waiting for the API after 40 s, healthz {sentry.healthz()};"
                f" SIGTERM {stop:.2f} s"
            )
        refusal = [t for t in sentry.log().splitlines() if "refusing to start" in t]
        if status != 1 or not refusal:
            raise FaultFailed(f"exit {status}: {sentry.tail()}")
        reason = refusal[0].split("refusing to start: ", 1)[-1]
        return f"start refused, exit 1 after {seconds:.1f} s: {reason[:80]}"
    finally:
        sentry.kill()


FAULTS = [
    ("fifo-during-service", fault_fifo_during_service),
    ("fifo-at-start", fault_fifo_at_start),
    ("truncated-issuer", fault_truncated_issuer),
    ("foreign-issuer", fault_foreign_issuer),
    ("expired-issuer", fault_expired_issuer),
    ("sigkill-during-generation", fault_sigkill_during_generation),
    ("sigkill-during-reload", fault_sigkill_during_reload),
    ("slowloris", fault_slowloris),
    ("audience-flood", fault_audience_flood),
    ("kube-api-down", fault_kube_api_down),
    ("kube-api-slow", fault_kube_api_slow),
    ("kube-api-refusing", fault_kube_api_refusing),
]

QUICK = ("fifo-during-service", "fifo-at-start", "truncated-issuer", "slowloris")


def run_fault(function, workdir):
    """
    (held, figure) for one fault, with its deadline enforced by SIGALRM.
    """

    def overdue(signum, frame):
        raise FaultFailed(f"over its {FAULT_DEADLINE_SECONDS:g} s deadline")

    previous = signal.signal(signal.SIGALRM, overdue)
    signal.alarm(int(FAULT_DEADLINE_SECONDS))
    started = time.monotonic()
    try:
        figure = function(workdir)
        held = True
    except FaultFailed as e:
        figure, held = str(e), False
    except Exception as e:  # a bug in the fault itself: report, go on
        figure, held = f"{type(e).__name__}: {e}", False
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    return held, figure, time.monotonic() - started


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="the smoke subset: " + ", ".join(QUICK)
    )
    parser.add_argument("--only", help="comma-separated fault names")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    arguments = parser.parse_args(argv)
    names = [name for name, _ in FAULTS]
    if arguments.only:
        chosen = arguments.only.split(",")
        unknown = set(chosen) - set(names)
        if unknown:
            parser.error(f"unknown faults {sorted(unknown)}; known: {', '.join(names)}")
    elif arguments.quick:
        chosen = list(QUICK)
    else:
        chosen = names
    workdir = tempfile.mkdtemp(prefix="sentry-chaos-")
    rows = []
    try:
        for name, function in FAULTS:
            if name not in chosen:
                continue
            directory = os.path.join(workdir, name)
            os.makedirs(directory)
            held, figure, seconds = run_fault(function, directory)
            rows.append((name, "ok" if held else "FAILED", figure, seconds))
            print(
                f"{name}: {'ok' if held else 'FAILED'} ({seconds:.1f} s)",
                file=sys.stderr,
                flush=True,
            )
    finally:
        if not arguments.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    width = max(len(row[0]) for row in rows)
    print(f"{'fault':<{width}}  outcome  figure")
    for name, outcome, figure, _ in rows:
        print(f"{name:<{width}}  {outcome:<7}  {figure}")
    if arguments.keep:
        print(f"logs kept in {workdir}")
    return 0 if all(row[1] == "ok" for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
