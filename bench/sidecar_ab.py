"""
A/B of sentry_tx source trees under the sidecar pattern (bench/sidecars.py):
each tree is started as its own twistd (PYTHONPATH pointing at it), and the
Go yardstick's -sidecars load runs against each in turn, rounds alternated,
the order reversed every other round; CPU per certificate of every process
of each server.  How bench/PROFILE.md measured what a change saves when the
machine is too noisy for figures taken minutes apart.

    git archive HEAD | tar -x -C /tmp/a      # and a changed copy in /tmp/b
    .venv/bin/python bench/sidecar_ab.py a=/tmp/a,b=/tmp/b [--rounds 6]
        [--seconds 5] [--workers 1] [--kubernetes]
"""

import argparse
import datetime
import os
import statistics
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import run  # noqa: E402
import sidecars  # noqa: E402


class _Tree:
    """
    One tree's server under load (the fields L{sidecars.measure_run} reads).
    """

    def __init__(self, root, workdir, workers, fake, chain_dir):
        extra, env = [], {}
        if fake is not None:
            extra = ["--mode", "kubernetes", "--kubeconfig", fake.kubeconfig,
                     "--config", "daprsystem"]
            env = {"NAMESPACE": sidecars.SENTRY_NAMESPACE}
        self.server = run.Server(
            tempfile.mkdtemp(dir=workdir), workers, extra=extra, env=env
        )
        self.server.env["PYTHONPATH"] = root
        self.server.start()
        self.port = self.server.port
        self.pid = self.server.process.pid
        self.root_path = os.path.join(chain_dir or self.server.credentials, "ca.crt")
        self.server_id = sidecars.served_spiffe_id(self.port)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trees", help="name=path,name=path...")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--kubernetes", action="store_true")
    parser.add_argument("--go", default=None)
    args = parser.parse_args(argv)
    trees = dict(item.split("=", 1) for item in args.trees.split(","))
    binary = sidecars.find_go_binary(args.go)
    if binary is None:
        print("no Go yardstick binary: pass --go")
        return 2
    runs = {name: [] for name in trees}
    with tempfile.TemporaryDirectory(prefix="sentry-ab-") as workdir:
        fake = chain_dir = None
        started = []
        try:
            if args.kubernetes:
                from sentry_tx.testing.certificates import make_chain

                now = datetime.datetime.now(datetime.UTC)
                chain_dir = tempfile.mkdtemp(dir=workdir)
                make_chain(
                    trust_domain="cluster.local",
                    not_before=now - datetime.timedelta(days=1),
                    not_after=now + datetime.timedelta(days=30),
                ).write(chain_dir)
                fake = sidecars.GoFakeAPI(
                    binary, workdir, sidecars.REVIEW_DELAY_SECONDS, chain_dir
                )
            token = fake.token if fake else None
            servers = {}
            for name, root in trees.items():
                tree = _Tree(root, workdir, args.workers, fake, chain_dir)
                started.append(tree)
                servers[name] = tree
                sidecars.sidecar_load(binary, tree.port, tree.root_path, tree.server_id,
                                      1.0, workdir, token=token)
            for index in range(args.rounds):
                order = list(servers.items())
                if index % 2:
                    order.reverse()
                for name, tree in order:
                    row = sidecars.measure_run(
                        tree, binary, args.seconds, workdir, token, fake
                    )
                    runs[name].append(row)
                    print(
                        f"{name}: {row['rate']:,.0f}/s CPU {row['cpu_ms']:.3f} ms/cert"
                        f" p99 {row['p99']:.1f} ms failed {row['failed']}",
                        flush=True,
                    )
        finally:
            for tree in started:
                tree.server.stop()
            if fake is not None:
                fake.stop()
    for name, rows in runs.items():
        print(
            f"median {name}: CPU {statistics.median(r['cpu_ms'] for r in rows):.3f} "
            "ms/cert,"
            f" {statistics.median(r['rate'] for r in rows):,.0f}/s,"
            f" failed {sum(r['failed'] for r in rows)}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
