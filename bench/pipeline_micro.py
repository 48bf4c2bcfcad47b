"""
Micro-benchmark of the signing pipeline, step by step, in one process.

    .venv/bin/python bench/pipeline_micro.py            # about 40 s
    .venv/bin/python bench/pipeline_micro.py --quick    # about 15 s
    .venv/bin/python bench/pipeline_micro.py --base 21bcbc4   # and A/B

Two kinds of figures, each the median over several repeats of the mean
CPU time per call (microseconds of this process's CPU time, so that other
work on a shared machine counts less than in wall time):

- "tree": the functions of the checked-out tree (``parse_csr``,
  ``build_leaf``, ``issue_workload_certificate`` and the two together).
  Run it on two commits to compare them.
- "ref": each step's two ways side by side, whatever the tree holds: PEM
  parsing (the bundle module's PEM reader + ``load_der_x509_csr`` against
  ``load_pem_x509_csr``), the CSR signature check (``is_signature_valid``
  against the public key's ``verify``) and building the leaf (the
  ``CertificateBuilder`` method chain against its constructor).

- "A/B" (with ``--base REV``): the tree's ``parse_csr``,
  ``issue_workload_certificate`` and both together against the same
  functions at commit REV (extracted with ``git archive`` into a temporary
  package ``sentry_tx_base``), in short turns, alternately, in this one
  process: the fairest before/after on a busy machine.

It prints the machine, the versions and the commit measured. The machine is
shared: compare figures taken in the same run, or medians of several runs.
"""

import argparse
import datetime
import importlib
import importlib.util
import io
import os
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding  # noqa: E402

from sentry_tx.ca import x509profile  # noqa: E402
from sentry_tx.ca.authority import issue_workload_certificate  # noqa: E402
from sentry_tx.ca.csr import parse_csr  # noqa: E402
from sentry_tx.ca.pem import iter_pem_blocks  # noqa: E402
from sentry_tx.config import MTLSConfig  # noqa: E402
from sentry_tx.identity.caller import CallerIdentity  # noqa: E402
from sentry_tx.testing.certificates import make_bundle, make_csr  # noqa: E402


def _bench_run_module():
    # bench/run.py is a script, not a package module: load it by path for
    # its machine and commit description.
    spec = importlib.util.spec_from_file_location(
        "_sentry_bench_run", os.path.join(HERE, "run.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def measure(function, repeats, seconds_per_repeat):
    """
    The median over C{repeats} of the mean CPU microseconds per call of
    C{function}, each repeat taking about C{seconds_per_repeat} of CPU.
    """
    clock = time.process_time
    # Calibrate the number of calls per repeat on a short warm-up.
    calls, start = 0, clock()
    while clock() - start < 0.05:
        function()
        calls += 1
    per_call = (clock() - start) / calls
    number = max(1, int(seconds_per_repeat / per_call))
    results = []
    for _ in range(repeats):
        start = clock()
        for _ in range(number):
            function()
        results.append((clock() - start) / number * 1e6)
    return statistics.median(results)


def _old_pem(data):
    block = next(iter_pem_blocks(data, strict=False))
    return x509.load_der_x509_csr(block.der)


def _verify(csr, key):
    # The key is loaded once by the caller: parse_csr loads it either way.
    if isinstance(key, ec.EllipticCurvePublicKey):
        key.verify(
            csr.signature,
            csr.tbs_certrequest_bytes,
            ec.ECDSA(csr.signature_hash_algorithm),
        )
    elif isinstance(key, ed25519.Ed25519PublicKey):
        key.verify(csr.signature, csr.tbs_certrequest_bytes)
    else:
        key.verify(
            csr.signature,
            csr.tbs_certrequest_bytes,
            padding.PKCS1v15(),
            csr.signature_hash_algorithm,
        )


def _leaf_arguments(bundle, public_key, now):
    names = x509.SubjectAlternativeName(
        [x509.UniformResourceIdentifier("spiffe://public/ns/default/myapp")]
    )
    return (
        names,
        now - datetime.timedelta(minutes=15),
        now + datetime.timedelta(hours=24),
    )


def _chain_builder(bundle, public_key, now):
    names, not_before, not_after = _leaf_arguments(bundle, public_key, now)
    return (
        x509.CertificateBuilder()
        .issuer_name(bundle.issuer_name)
        .subject_name(x509.Name([]))
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(names, critical=True)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
            critical=False,
        )
        .add_extension(bundle.authority_key_identifier, critical=False)
    )


def _constructor_builder(bundle, public_key, now, fixed):
    names, not_before, not_after = _leaf_arguments(bundle, public_key, now)
    return x509.CertificateBuilder(
        bundle.issuer_name,
        fixed[0],
        public_key,
        x509.random_serial_number(),
        not_before.replace(tzinfo=None),
        not_after.replace(tzinfo=None),
        [x509.Extension(names.oid, True, names), *fixed[1]],
    )


def _base_package(revision, directory):
    """
    Extract C{sentry_tx/} at C{revision} into C{directory} as the package
    C{sentry_tx_base} (its own imports renamed), and put it on the path.
    """
    archive = subprocess.run(
        ["git", "archive", revision, "sentry_tx"],
        cwd=ROOT, capture_output=True, check=True,
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        try:
            tar.extractall(directory, filter="data")
        except TypeError:
            # Python before 3.11.4 has no filter; the archive is our own.
            tar.extractall(directory)
    package = os.path.join(directory, "sentry_tx_base")
    os.rename(os.path.join(directory, "sentry_tx"), package)
    pattern = re.compile(r"\bsentry_tx\b(?=[. ])")
    for folder, _, files in os.walk(package):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                with open(path, encoding="utf-8") as f:
                    text = f.read()
                with open(path, "w", encoding="utf-8") as f:
                    f.write(pattern.sub("sentry_tx_base", text))
    sys.path.insert(0, directory)


def compare_with(revision, bundle, identity, mtls, csr_pem, now, turns, calls):
    """
    Print the A/B rows: this tree against C{revision}, alternately.
    """
    directory = tempfile.mkdtemp(prefix="pipeline-base-")
    try:
        _base_package(revision, directory)
        base_csr = importlib.import_module("sentry_tx_base.ca.csr")
        base_authority = importlib.import_module("sentry_tx_base.ca.authority")
        base_bundle_module = importlib.import_module("sentry_tx_base.ca.bundle")
    finally:
        shutil.rmtree(directory)
    base_bundle = base_bundle_module.TrustBundle.from_certificates(
        bundle.anchors, bundle.issuer_chain, bundle.issuer_key
    )
    public_key = parse_csr(csr_pem)
    cases = {
        "parse_csr": (
            lambda: base_csr.parse_csr(csr_pem),
            lambda: parse_csr(csr_pem),
        ),
        "issue_workload_certificate": (
            lambda: base_authority.issue_workload_certificate(
                base_bundle, identity, public_key, now, mtls, "default"
            ),
            lambda: issue_workload_certificate(
                bundle, identity, public_key, now, mtls, "default"
            ),
        ),
        "pipeline (both)": (
            lambda: base_authority.issue_workload_certificate(
                base_bundle, identity, base_csr.parse_csr(csr_pem), now, mtls, "default"
            ),
            lambda: issue_workload_certificate(
                bundle, identity, parse_csr(csr_pem), now, mtls, "default"
            ),
        ),
    }

    def turn(function):
        start = time.process_time()
        for _ in range(calls):
            function()
        return (time.process_time() - start) / calls * 1e6

    print(f"A/B against {revision} ({turns} alternating turns of {calls} calls):")
    for name, (base, head) in cases.items():
        base_times, head_times = [], []
        for _ in range(turns):
            base_times.append(turn(base))
            head_times.append(turn(head))
        before = statistics.median(base_times)
        after = statistics.median(head_times)
        print(
            f"  A/B  {name:28} {before:9.1f} -> {after:7.1f}"
            f"  ({(after - before) / before * 100:+.1f} %)"
        )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--quick", action="store_true", help="fewer, shorter repeats")
    parser.add_argument("--base", metavar="REV",
                        help="also compare with the pipeline at commit REV")
    args = parser.parse_args(argv)
    repeats, seconds = (5, 0.1) if args.quick else (7, 0.25)

    run = _bench_run_module()
    print(f"machine: {run.machine_description()}")
    print(f"commit:  {run.git_commit()}")
    print(
        f"method:  median of {repeats} repeats of ~{seconds} CPU s each, CPU us per "
        "call"
    )

    now = datetime.datetime.now(datetime.UTC)
    bundle = make_bundle(now=now)
    mtls = MTLSConfig()
    identity = CallerIdentity("public", "default", "myapp")
    csrs = {kind: make_csr(kind)[1] for kind in ("ecdsa-p256", "ed25519", "rsa-2048")}
    csr_pem = csrs["ecdsa-p256"]
    public_key = parse_csr(csr_pem)
    not_before, not_after = x509profile.leaf_validity(
        now, mtls.workload_cert_ttl, mtls.allowed_clock_skew, bundle.chain_not_after
    )

    rows = []

    def row(kind, step, function):
        figure = measure(function, repeats, seconds)
        rows.append((kind, step, figure))
        print(f"  {kind:4} {step:58} {figure:9.1f}")

    print("tree (this commit's code), ECDSA P-256 caller, ECDSA P-256 issuer:")
    row("tree", "parse_csr (PEM + signature + key check)", lambda: parse_csr(csr_pem))
    for kind in ("ed25519", "rsa-2048"):
        pem = csrs[kind]
        row("tree", f"parse_csr, {kind} caller", lambda pem=pem: parse_csr(pem))
    row(
        "tree",
        "build_leaf (build + sign)",
        lambda: x509profile.build_leaf(
            bundle, public_key, identity.spiffe_id, [], not_before, not_after
        ),
    )
    row(
        "tree",
        "issue_workload_certificate (build + sign + PEM)",
        lambda: issue_workload_certificate(
            bundle, identity, public_key, now, mtls, "default"
        ),
    )
    row(
        "tree",
        "pipeline: parse_csr + issue_workload_certificate",
        lambda: issue_workload_certificate(
            bundle, identity, parse_csr(csr_pem), now, mtls, "default"
        ),
    )

    print("ref (both ways of each step, same run):")
    row("ref", "PEM: iter_pem_blocks + load_der_x509_csr", lambda: _old_pem(csr_pem))
    row("ref", "PEM: load_pem_x509_csr", lambda: x509.load_pem_x509_csr(csr_pem))
    for kind, pem in csrs.items():
        csr = x509.load_pem_x509_csr(pem)
        row("ref", f"signature {kind}: is_signature_valid",
            lambda csr=csr: csr.is_signature_valid)
        key = csr.public_key()
        row("ref", f"signature {kind}: public_key().verify",
            lambda csr=csr, key=key: _verify(csr, key))
    fixed = (
        x509.Name([]),
        [
            x509.Extension(
                x509.BasicConstraints.oid,
                True,
                x509.BasicConstraints(ca=False, path_length=None),
            ),
            x509.Extension(
                x509.ExtendedKeyUsage.oid,
                False,
                x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
            ),
            x509.Extension(
                bundle.authority_key_identifier.oid,
                False,
                bundle.authority_key_identifier,
            ),
        ],
    )
    row("ref", "builder: method chain (no sign)",
        lambda: _chain_builder(bundle, public_key, now))
    row("ref", "builder: constructor, extensions prepared (no sign)",
        lambda: _constructor_builder(bundle, public_key, now, fixed))
    row("ref", "sign (ECDSA P-256 issuer)",
        lambda: _constructor_builder(bundle, public_key, now, fixed).sign(
            bundle.issuer_key, bundle.signature_hash
        ))
    if args.base:
        compare_with(
            args.base, bundle, identity, mtls, csr_pem, now,
            turns=9 if args.quick else 25, calls=100 if args.quick else 200,
        )
    return rows


if __name__ == "__main__":
    main()
