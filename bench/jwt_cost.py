"""
What JWT-SVIDs cost: signed/s at 64 calls in flight with and without
`--jwt-enabled`, one serving process, each request asking for one JWT
audience besides the trust domain (two audiences: `jwt` plus one
per-audience token each, three RSA-2048 signatures per call on top of the
certificate's P-256 one).

    .venv/bin/python bench/jwt_cost.py            # 8 s runs, 3 per point
    .venv/bin/python bench/jwt_cost.py --quick    # 2 s runs, 1 per point

Run alone it rewrites the "JWT-SVIDs" section of bench/RESULTS.md (with
--write); bench/run.py calls it in its full run.
"""

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from run import (  # noqa: E402
    GrpcTestClient,
    Server,
    fmt,
    git_commit,
    grpc_frame,
    h2load_run,
    machine_description,
    python_client_run,
    sign_request,
)

IN_FLIGHT = 64
AUDIENCES = ("sts.amazonaws.com",)
SECTION_TITLE = "## JWT-SVIDs"


def _measure(server, request, seconds, repeats, use_h2load):
    body_path = os.path.join(server.workdir, "request-jwt.grpc")
    with open(body_path, "wb") as f:
        f.write(grpc_frame(request))
    before, cpu_before = server.metrics(), server.cpu_seconds()
    runs = []
    for _ in range(repeats):
        if use_h2load:
            runs.append(
                h2load_run(server, IN_FLIGHT, seconds, body_path, server.workdir)
            )
        else:
            runs.append(python_client_run(server, IN_FLIGHT, seconds, request))
    cpu = server.cpu_seconds() - cpu_before
    after = server.metrics()
    signed = after.get("dapr_sentry_cert_sign_success_total", 0) - before.get(
        "dapr_sentry_cert_sign_success_total", 0)
    failed = sum(after.get(k, 0) - before.get(k, 0)
                 for k in after if k.startswith("dapr_sentry_cert_sign_failure_total"))
    return dict(
        rate=statistics.median(r[0] for r in runs),
        p50=statistics.median(r[1] for r in runs),
        p99=statistics.median(r[2] for r in runs),
        cpu_ms=1000 * cpu / signed if signed else None,
        failed=int(failed),
        calls=sum(r[3] for r in runs),
    )


def jwt_cost(workdir, seconds, repeats, use_h2load):
    """
    Measure both configurations; return {"off": row, "on": row}.
    """
    rows = {}
    for label, extra in (("off", []), ("on", ["--jwt-enabled"])):
        server = Server(tempfile.mkdtemp(dir=workdir), 1, extra=extra)
        server.start()
        try:
            request = sign_request(jwt_audiences=list(AUDIENCES))
            client = GrpcTestClient(f"127.0.0.1:{server.port}", server.anchors_pem())
            try:
                reply = client.sign(request)
            finally:
                client.close()
            tokens = len(reply.per_audience_jwts) + (1 if reply.HasField("jwt") else 0)
            if tokens != (3 if label == "on" else 0):
                raise RuntimeError(f"JWT {label}: {tokens} tokens in a reply")
            rows[label] = _measure(server, request, seconds, repeats, use_h2load)
        finally:
            server.stop()
    return rows


def report_lines(rows):
    """
    The RESULTS.md section for L{jwt_cost}'s rows.
    """
    off, on = rows["off"], rows["on"]
    lines = [
        SECTION_TITLE,
        "",
        f"One serving process, {IN_FLIGHT} calls in flight, each request asking for "
        f"{len(AUDIENCES)} JWT audience(s) besides the trust domain: with "
        "`--jwt-enabled` every "
        "reply carries `jwt` and one `per_audience_jwts` token per audience, three "
        "RSA-2048 "
        "(RS256) signatures beside the certificate's ECDSA P-256 one.",
        "",
        "| JWTs | signed/s | p50 ms | p99 ms | failed | server CPU ms per call |",
        "|---|---|---|---|---|---|",
    ]
    for label, row in (("off", off), ("on, 2 audiences", on)):
        lines.append(
            f"| {label} | {row['rate']:,.0f} | {fmt(row['p50'], 2)} | "
            f"{fmt(row['p99'], 2)} | "
            f"{row['failed']} of {row['calls']:,} | {fmt(row['cpu_ms'], 2)} |"
        )
    if off["cpu_ms"] and on["cpu_ms"]:
        extra = on["cpu_ms"] - off["cpu_ms"]
        lines += [
            "",
            f"Cost: throughput falls to **{on['rate'] / off['rate']:.0%}** of the "
            "figure without "
            f"JWTs; each call costs {extra:.2f} ms more server CPU "
            f"({extra / 3:.2f} ms per RSA-2048 signature), "
            f"{on['cpu_ms'] / off['cpu_ms']:.1f} times the call without JWTs.",
        ]
    return lines


def write_section(path, lines, header):
    """
    Replace (or add) the JWT section of RESULTS.md at C{path}.
    """
    text = open(path).read() if os.path.exists(path) else ""
    start = text.find(SECTION_TITLE)
    if start != -1:
        end = text.find("\n## ", start + len(SECTION_TITLE))
        text = text[:start] + (text[end + 1:] if end != -1 else "")
    section = [lines[0], ""] + header + lines[2:]
    text = text.rstrip("\n") + "\n\n" + "\n".join(section) + "\n"
    with open(path, "w") as f:
        f.write(text)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--client", choices=("auto", "h2load", "python"), default="auto"
    )
    parser.add_argument("--write", default=None, help="RESULTS.md to update")
    args = parser.parse_args(argv)
    seconds, repeats = (2.0, 1) if args.quick else (8.0, 3)
    use_h2load = args.client == "h2load" or (
        args.client == "auto" and shutil.which("h2load")
    )
    started = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    with tempfile.TemporaryDirectory(prefix="sentry-bench-jwt-") as workdir:
        rows = jwt_cost(workdir, seconds, repeats, use_h2load)
    lines = report_lines(rows)
    print("\n".join(lines))
    if args.write:
        header = [
            f"Measured by `bench/jwt_cost.py` on {started} UTC at commit "
            f"{git_commit()}, "
            f"{seconds:g} s per run, {repeats} run(s) per point, medians quoted; "
            f"{'h2load' if use_h2load else 'Python grpc clients'}; "
            f"{machine_description()}.",
            "",
        ]
        write_section(args.write, lines, header)
    return 0


if __name__ == "__main__":
    sys.exit(main())
