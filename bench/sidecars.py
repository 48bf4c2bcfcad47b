"""
The sidecar pattern: how daprd really calls Sentry (a new TLS connection for
every certificate, one SignCertificate, close; dapr/dapr
C{pkg/security/sentry.go}), played by the Go yardstick's load mode
(C{-sidecars}, ../shared/go-sentryref/README.md) against sentry_tx and
against the yardstick's own server, in the same run, alternated:

- standalone: INSECURE;
- kubernetes mode: every call sends a service-account token with the
  KUBERNETES validator; both servers review it at the same fake API server
  (the yardstick's C{-fake-kube}, plain HTTP on 127.0.0.1, 20 ms per
  TokenReview by default).  sentry_tx also lists and watches Pods and
  Configurations there (the watches stay silent) and reads its trust bundle
  from the Secret; the yardstick server makes one TokenReview per call.

For each: certificates/s, p50 and p99 (the load generator's), failed calls,
and the server's CPU per certificate (user + system of every process of the
server, its own and its descendants', from /proc/PID/stat before and after
the load, over the calls that succeeded).

    .venv/bin/python bench/run.py --sidecars-only [--rounds 3] [--seconds 8]
    .venv/bin/python bench/sidecars.py [--rounds 3] [--seconds 8] [--no-kubernetes]

run.py calls it for its sidecar section and writes RESULTS.md; run alone it
prints the figures only.
"""

import argparse
import base64
import datetime
import json
import os
import re
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

# Where bench/run.py builds the yardstick once (ignored by git).
DEFAULT_GO_BINARY = os.path.join(HERE, ".go-sentryref")
SIDECARS = 64
REVIEW_DELAY_SECONDS = 0.020
SENTRY_NAMESPACE = "default"
APP_NAMESPACE = "apps"
APP_ID = "myapp"
POD_NAME = "myapp-0"
POD_UID = "0b9a6c1e-5d3f-4c1a-9b7e-000000000001"
SERVICE_ACCOUNT = "myapp"
TRUST_BUNDLE = "dapr-trust-bundle"
GO_SERVER_ID = "spiffe://localhost/ns/default/dapr-sentry"
START_TIMEOUT_SECONDS = 30.0

_SIDECARS_LINE = re.compile(
    r"sidecars (\d+) ok (\d+) failed map\[(.*?)\] rate ([\d.]+) mean_ms ([\d.]+)"
    r" p50_ms ([\d.]+) p99_ms ([\d.]+)"
)


def find_go_binary(given=None):
    """
    The yardstick's binary: C{given}, else bench/.go-sentryref (built there by
    bench/run.py), else
    C{go-sentryref} on the PATH; None when none exists.
    """
    for candidate in (given, DEFAULT_GO_BINARY, shutil.which("go-sentryref")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def descendants(pid):
    """
    C{pid} and every process below it (serving processes of any depth).
    """
    children = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(parent, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, ()))
    return found


def tree_cpu_seconds(pid):
    """
    User + system CPU seconds of C{pid} and all its descendants alive now.
    """
    from run import process_cpu_seconds

    return sum(process_cpu_seconds(p) for p in descendants(pid))


def fake_service_account_token(namespace, pod_name, pod_uid, account):
    """
    A JWT-shaped projected service-account token (unsigned: the fake API
    server vouches for it by its table), naming the pod as the kubelet's do.
    """

    def part(document):
        raw = json.dumps(document, separators=(",", ":")).encode()
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    claims = {
        "aud": ["dapr.io/sentry"],
        "sub": f"system:serviceaccount:{namespace}:{account}",
        "kubernetes.io": {
            "namespace": namespace,
            "pod": {"name": pod_name, "uid": pod_uid},
            "serviceaccount": {"name": account, "uid": "sa-uid"},
        },
    }
    return f"{part({'alg': 'RS256', 'kid': 'bench'})}.{part(claims)}.c2lnbmF0dXJl"


class GoFakeAPI:
    """
    The yardstick's fast fake API server (C{-fake-kube}), holding what
    sentry_tx's kubernetes mode reads: the Configuration C{daprsystem}, the
    trust bundle Secret and ConfigMap (a bundle made here, so that its
    anchors are known), one Pod, and the token table.
    """

    def __init__(self, binary, workdir, delay_seconds, chain):
        from run import free_port

        self.dir = tempfile.mkdtemp(dir=workdir, prefix="fake-kube-")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.token = fake_service_account_token(
            APP_NAMESPACE, POD_NAME, POD_UID, SERVICE_ACCOUNT
        )

        def b64(data):
            return base64.b64encode(data).decode()

        anchors = open(os.path.join(chain, "ca.crt"), "rb").read()
        issuer = open(os.path.join(chain, "issuer.crt"), "rb").read()
        key = open(os.path.join(chain, "issuer.key"), "rb").read()
        ns_path = f"/api/v1/namespaces/{SENTRY_NAMESPACE}"
        state = {
            "review_delay_s": delay_seconds,
            "tokens": {
                self.token: f"system:serviceaccount:{APP_NAMESPACE}:{SERVICE_ACCOUNT}"
            },
            "objects": [
                {
                    "path": (
                        f"/apis/dapr.io/v1alpha1/namespaces/{SENTRY_NAMESPACE}"
                        "/configurations"
                    ),
                    "body": {
                        "apiVersion": "dapr.io/v1alpha1",
                        "kind": "Configuration",
                        "metadata": {
                            "name": "daprsystem",
                            "namespace": SENTRY_NAMESPACE,
                        },
                        "spec": {"mtls": {"workloadCertTTL": "24h"}},
                    },
                },
                {
                    "path": f"{ns_path}/secrets",
                    "body": {
                        "apiVersion": "v1",
                        "kind": "Secret",
                        "metadata": {
                            "name": TRUST_BUNDLE,
                            "namespace": SENTRY_NAMESPACE,
                        },
                        "data": {
                            "ca.crt": b64(anchors),
                            "issuer.crt": b64(issuer),
                            "issuer.key": b64(key),
                        },
                    },
                },
                {
                    "path": f"{ns_path}/configmaps",
                    "body": {
                        "apiVersion": "v1",
                        "kind": "ConfigMap",
                        "metadata": {
                            "name": TRUST_BUNDLE,
                            "namespace": SENTRY_NAMESPACE,
                        },
                        "data": {"ca.crt": anchors.decode()},
                    },
                },
                {
                    "path": f"/api/v1/namespaces/{APP_NAMESPACE}/pods",
                    "body": {
                        "apiVersion": "v1",
                        "kind": "Pod",
                        "metadata": {
                            "name": POD_NAME,
                            "namespace": APP_NAMESPACE,
                            "uid": POD_UID,
                            "annotations": {"dapr.io/app-id": APP_ID},
                        },
                        "spec": {"serviceAccountName": SERVICE_ACCOUNT},
                    },
                },
            ],
        }
        state_path = os.path.join(self.dir, "state.json")
        with open(state_path, "w") as f:
            json.dump(state, f)
        self.kubeconfig = os.path.join(self.dir, "kubeconfig")
        with open(self.kubeconfig, "w") as f:
            json.dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "current-context": "fake",
                    "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
                    "users": [{"name": "fake", "user": {"token": "bench-api-token"}}],
                    "contexts": [
                        {"name": "fake", "context": {"cluster": "fake", "user": "fake"}}
                    ],
                },
                f,
            )
        self.log = open(os.path.join(self.dir, "fake.log"), "wb")
        self.process = subprocess.Popen(
            [binary, "-fake-kube", state_path, "-port", str(self.port)],
            stdout=self.log, stderr=subprocess.STDOUT,
        )
        _wait_for_port(self.port, self.process, "the fake API server")

    def cpu_seconds(self):
        return tree_cpu_seconds(self.process.pid)

    def stop(self):
        from run import stop_child

        stop_child(self.process)
        self.log.close()


def _wait_for_port(port, process, what):
    started = time.monotonic()
    while time.monotonic() - started < START_TIMEOUT_SECONDS:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"{what} did not start")


def served_spiffe_id(port):
    """
    The SPIFFE ID in the certificate served on C{port} (read without
    verifying it: the sidecars verify it).
    """
    from cryptography import x509

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw) as tls:
            der = tls.getpeercert(binary_form=True)
    names = x509.load_der_x509_certificate(der).extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    ).value
    return names.get_values_for_type(x509.UniformResourceIdentifier)[0]


def sidecar_load(go_binary, port, root_path, server_id, seconds, workdir,
                 token=None, sidecars=SIDECARS):
    """
    One run of the yardstick's load mode against 127.0.0.1:C{port}.

    @return: dict(ok, failed, failures, rate, mean, p50, p99).
    """
    argv = [go_binary, "-sidecars", f"127.0.0.1:{port}", "-root", root_path,
            "-server-id", server_id, "-c", str(sidecars), "-d", f"{seconds:g}s"]
    if token:
        argv += ["-token", token, "-ns", APP_NAMESPACE, "-id", APP_ID]
    done = subprocess.run(argv, capture_output=True, text=True, cwd=workdir,
                          timeout=seconds + 120)
    match = _SIDECARS_LINE.search(done.stdout)
    if match is None:
        raise RuntimeError(
            f"the sidecar load printed no result: {(done.stdout + done.stderr)[-500:]}"
        )
    failures = {}
    for item in match.group(3).split():
        reason, _, count = item.rpartition(":")
        failures[reason] = failures.get(reason, 0) + int(count or 0)
    return dict(
        ok=int(match.group(2)),
        failed=sum(failures.values()),
        failures=failures,
        rate=float(match.group(4)),
        mean=float(match.group(5)),
        p50=float(match.group(6)),
        p99=float(match.group(7)),
    )


class _SentryUnderLoad:
    """
    sentry_tx (bench/run.py's L{run.Server}) standalone or in kubernetes
    mode against the fake API server.
    """

    def __init__(self, workdir, workers, fake=None, chain_dir=None):
        from run import Server

        extra, env = [], {}
        if fake is not None:
            extra = ["--mode", "kubernetes", "--kubeconfig", fake.kubeconfig,
                     "--config", "daprsystem"]
            env = {"NAMESPACE": SENTRY_NAMESPACE}
        self.server = Server(
            tempfile.mkdtemp(dir=workdir), workers, extra=extra, env=env
        )
        self.server.start()
        self.root_path = chain_dir and os.path.join(chain_dir, "ca.crt")
        if self.root_path is None:
            self.root_path = os.path.join(self.server.credentials, "ca.crt")
        self.port = self.server.port
        self.server_id = served_spiffe_id(self.port)
        self.pid = self.server.process.pid

    def stop(self):
        self.server.stop()


class _GoUnderLoad:
    """
    The yardstick's server, reviewing each call's token at C{fake} when
    given.
    """

    def __init__(self, binary, workdir, fake=None):
        from run import free_port

        self.dir = tempfile.mkdtemp(dir=workdir, prefix="go-")
        self.port = free_port()
        self.root_path = os.path.join(self.dir, "go-root.pem")
        argv = [binary, "-port", str(self.port), "-root-out", self.root_path]
        if fake is not None:
            argv += ["-kube-url", fake.url, "-kube-token", "bench-api-token"]
        self.log = open(os.path.join(self.dir, "go.log"), "wb")
        self.process = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT)
        _wait_for_port(self.port, self.process, "the Go yardstick")
        while not os.path.exists(self.root_path):
            time.sleep(0.02)
        self.server_id = GO_SERVER_ID
        self.pid = self.process.pid

    def stop(self):
        from run import stop_child

        stop_child(self.process)
        self.log.close()


def measure_run(target, go_binary, seconds, workdir, token, fake):
    """
    One load run against a started server: the load's figures plus the
    server's (and the fake API server's) CPU ms per certificate.
    """
    cpu_before = tree_cpu_seconds(target.pid)
    fake_before = fake.cpu_seconds() if fake else 0.0
    row = sidecar_load(go_binary, target.port, target.root_path, target.server_id,
                       seconds, workdir, token=token)
    cpu = tree_cpu_seconds(target.pid) - cpu_before
    fake_cpu = (fake.cpu_seconds() - fake_before) if fake else 0.0
    row["cpu_ms"] = 1000 * cpu / row["ok"] if row["ok"] else None
    row["fake_cpu_ms"] = 1000 * fake_cpu / row["ok"] if (fake and row["ok"]) else None
    return row


def _median_row(runs):
    keys = ("rate", "mean", "p50", "p99", "cpu_ms", "fake_cpu_ms")
    row = {}
    for key in keys:
        values = [r[key] for r in runs if r.get(key) is not None]
        row[key] = statistics.median(values) if values else None
        row[key + "_all"] = [r.get(key) for r in runs]
    row["ok"] = sum(r["ok"] for r in runs)
    row["failed"] = sum(r["failed"] for r in runs)
    failures = {}
    for r in runs:
        for reason, count in r["failures"].items():
            failures[reason] = failures.get(reason, 0) + count
    row["failures"] = failures
    row["runs"] = len(runs)
    return row


def sidecar_comparison(go_binary, workdir, seconds=8.0, rounds=3, workers=None,
                       kubernetes=True, delay_seconds=REVIEW_DELAY_SECONDS, log=print):
    """
    The sidecar pattern against sentry_tx and the yardstick, standalone and
    (with C{kubernetes}) in kubernetes mode: C{rounds} rounds, each one run
    per server, the two alternated (which goes first alternates too).

    @return: {mode: {"sentry_tx": row, "go": row}} with medians per row.
    """
    from sentry_tx.testing.certificates import make_chain

    results = {}
    modes = ["standalone"] + (["kubernetes"] if kubernetes else [])
    for mode in modes:
        fake = None
        chain_dir = None
        if mode == "kubernetes":
            now = datetime.datetime.now(datetime.UTC)
            chain_dir = tempfile.mkdtemp(dir=workdir, prefix="chain-")
            make_chain(
                trust_domain="cluster.local",
                not_before=now - datetime.timedelta(days=1),
                not_after=now + datetime.timedelta(days=30),
            ).write(chain_dir)
            fake = GoFakeAPI(go_binary, workdir, delay_seconds, chain_dir)
        token = fake.token if fake else None
        # What else was running: the 1-minute load average before this
        # mode's servers start, printed with the figures.
        load_before = os.getloadavg()[0]
        ours = theirs = None
        try:
            ours = _SentryUnderLoad(workdir, workers, fake, chain_dir)
            theirs = _GoUnderLoad(go_binary, workdir, fake)
            # One short warm-up each (connections, caches, JIT-free but
            # allocator and informer warm).
            for target in (ours, theirs):
                sidecar_load(go_binary, target.port, target.root_path, target.server_id,
                             1.0, workdir, token=token)
            runs = {"sentry_tx": [], "go": []}
            for index in range(rounds):
                order = [("sentry_tx", ours), ("go", theirs)]
                if index % 2:
                    order.reverse()
                for name, target in order:
                    row = measure_run(target, go_binary, seconds, workdir, token, fake)
                    runs[name].append(row)
                    log(
                        f"  sidecars, {mode}, round {index + 1}, {name}: "
                        f"{row['rate']:,.0f}/s p50 {row['p50']:.2f} ms p99 "
                        f"{row['p99']:.2f} ms"
                        f" failed {row['failed']} CPU {_fmt(row['cpu_ms'], 3)} ms/cert"
                    )
            results[mode] = {name: _median_row(rows) for name, rows in runs.items()}
            results[mode]["load_before"] = load_before
        finally:
            for target in (ours, theirs):
                if target is not None:
                    target.stop()
            if fake is not None:
                fake.stop()
    return results


def _fmt(value, digits=2):
    return "n/a" if value is None else f"{value:,.{digits}f}"


def _ratio(ours, go):
    return None if ours is None or not go else ours / go


TARGETS = (
    # (what, key, limit, stretch, higher is better)
    ("CPU per certificate", "cpu_ms", 1.6, 1.4, False),
    ("certificates/s", "rate", 0.8, 0.9, True),
    ("p99", "p99", 2.0, None, False),
)


def judge(results):
    """
    Issue 19's targets for the sidecar pattern: rows of (target, measured,
    met), one per mode and target, and the no-failure rule.
    """
    rows = []
    for mode, pair in results.items():
        ours, go = pair["sentry_tx"], pair["go"]
        for what, key, limit, stretch, higher in TARGETS:
            value = _ratio(ours[key], go[key])
            met = (
                None
                if value is None
                else (value >= limit if higher else value <= limit)
            )
            bound = ">=" if higher else "<="
            name = f"sidecars, {mode}: {what} {bound} {limit:g} x Go's"
            if stretch:
                name += f" (stretch {stretch:g} x)"
            measured = "n/a" if value is None else (
                f"{value:.2f} x ({_fmt(ours[key])} against {_fmt(go[key])})")
            if stretch and value is not None:
                stretch_met = value >= stretch if higher else value <= stretch
                measured += "; stretch " + ("met" if stretch_met else "not met")
            rows.append((name, measured, met))
        rows.append((f"sidecars, {mode}: no call fails",
                     f"{ours['failed']} failed of {ours['ok'] + ours['failed']:,}",
                     ours["failed"] == 0))
    return rows


def report_lines(
    results, seconds, rounds, workers_label, delay_seconds=REVIEW_DELAY_SECONDS
):
    """
    The Markdown section for RESULTS.md.
    """
    lines = [
        "## The sidecar pattern (issue 19): a new TLS connection per certificate",
        "",
        f"The Go yardstick's load mode (`-sidecars`, {SIDECARS} sidecars at once, each "
        "dialling,"
        " checking the server's SPIFFE ID, calling SignCertificate once and closing) "
        "against"
        f" sentry_tx ({workers_label} serving process(es)) and against the yardstick's "
        "server, "
        f"{rounds} alternated rounds of {seconds:g} s each, medians quoted. Kubernetes "
        "mode: both"
        f" servers review every call's token at the yardstick's fake API server "
        "(`-fake-kube`,"
        f" {delay_seconds * 1000:g} ms per TokenReview). CPU per certificate: user + "
        "system CPU"
        " of every process of the server (/proc/PID/stat, the process and its "
        "descendants)"
        " over the load, divided by the certificates signed; the fake API server's own "
        "CPU is"
        " shown apart. 1-minute load average before each mode's servers"
        " started: "
        + ", ".join(
            f"{mode} {pair['load_before']:.2f}" for mode, pair in results.items()
        )
        + " (the machine may be shared: quote the ratios, taken in the same run).",
        "",
        "| load | server | certificates/s | p50 ms | p99 ms | failed | CPU ms per "
        "certificate"
        " | fake API CPU ms per certificate | CPU ms, each round |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for mode, pair in results.items():
        for name in ("sentry_tx", "go"):
            row = pair[name]
            failed = f"{row['failed']} of {row['ok'] + row['failed']:,}"
            if row["failures"]:
                failed += (
                    " ("
                    + ", ".join(f"{k} {v}" for k, v in row["failures"].items())
                    + ")"
                )
            each = ", ".join(_fmt(v, 3) for v in row["cpu_ms_all"])
            lines.append(
                f"| {mode} | {'Go yardstick' if name == 'go' else 'sentry_tx'} | "
                f"{row['rate']:,.0f} | {_fmt(row['p50'])} | {_fmt(row['p99'])} | "
                f"{failed} | "
                f"{_fmt(row['cpu_ms'], 3)} | {_fmt(row['fake_cpu_ms'], 3)} | {each} |"
            )
    lines += [
        "",
        "| load | CPU / Go | rate / Go | p50 / Go | p99 / Go |",
        "|---|---|---|---|---|",
    ]
    for mode, pair in results.items():
        ours, go = pair["sentry_tx"], pair["go"]
        lines.append(
            f"| {mode} | {_fmt(_ratio(ours['cpu_ms'], go['cpu_ms']))} | "
            f"{_fmt(_ratio(ours['rate'], go['rate']))} | "
            f"{_fmt(_ratio(ours['p50'], go['p50']))} | "
            f"{_fmt(_ratio(ours['p99'], go['p99']))} |"
        )
    lines += ["", "| target (issue 19) | measured | met |", "|---|---|---|"]
    for target, measured, met in judge(results):
        lines.append(f"| {target} | {measured} | "
                     f"{'not judged' if met is None else 'yes' if met else '**no**'} |")
    return lines


SECTION_START = (
    "<!-- sidecars: written by bench/run.py --sidecars-only; kept by full runs -->"
)
SECTION_END = "<!-- /sidecars -->"


def write_section(results_path, lines, header):
    """
    Put C{lines} between the sidecar markers of RESULTS.md, keeping the rest
    of the file (today's h2load figures) as it is.
    """
    try:
        with open(results_path) as f:
            text = f.read()
    except FileNotFoundError:
        text = "# sentry_tx benchmark results\n"
    block = "\n".join([SECTION_START, *header, "", *lines, SECTION_END])
    start, end = text.find(SECTION_START), text.find(SECTION_END)
    if start >= 0 and end > start:
        text = text[:start] + block + text[end + len(SECTION_END):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    with open(results_path, "w") as f:
        f.write(text)


def existing_section(results_path):
    """
    The sidecar block of RESULTS.md as it is (a full run keeps it), or "".
    """
    try:
        with open(results_path) as f:
            text = f.read()
    except FileNotFoundError:
        return ""
    start, end = text.find(SECTION_START), text.find(SECTION_END)
    if start >= 0 and end > start:
        return text[start:end + len(SECTION_END)]
    return ""


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--go",
        default=None,
        help=f"the yardstick's binary (default {DEFAULT_GO_BINARY})",
    )
    parser.add_argument(
        "--seconds", type=float, default=8.0, help="each load run (default 8)"
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="alternated rounds (default 3)"
    )
    parser.add_argument("--workers", type=int, default=None,
                        help="sentry_tx's serving processes (default: its own choice)")
    parser.add_argument("--no-kubernetes", action="store_true", help="standalone only")
    args = parser.parse_args(argv)
    binary = find_go_binary(args.go)
    if binary is None:
        print("no Go yardstick binary (pass --go)")
        return 2
    with tempfile.TemporaryDirectory(prefix="sentry-sidecars-") as workdir:
        results = sidecar_comparison(
            binary,
            workdir,
            args.seconds,
            args.rounds,
            args.workers,
            not args.no_kubernetes,
        )
    print(
        "\n".join(
            report_lines(results, args.seconds, args.rounds, args.workers or "default")
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
