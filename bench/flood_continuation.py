"""
Reproduce the HTTP/2 CONTINUATION flood against a grpc.aio server and print
what it does to the server: RSS over time, and whether honest calls are
still answered.

    .venv/bin/python bench/flood_continuation.py
    .venv/bin/python bench/flood_continuation.py --option grpc.max_metadata_size=8192
    .venv/bin/python bench/flood_continuation.py --payload literal --connections 8
    .venv/bin/python bench/flood_continuation.py \\
        --without grpc.experimental.tcp_max_read_buffer_size

The server (sentry_tx.testing.flood.FloodTarget) runs in a child process with
sentry_tx's grpc_server_options(), less each --without, plus each --option
(which replaces a default of the same name); it answers one method with an
empty message.
The flood goes to 127.0.0.1 only, for --seconds, and stops by itself.
"""

import argparse
import os
import statistics
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from sentry_tx.testing.flood import PAYLOADS, FloodTarget, continuation_flood  # noqa: E402

MIB = 1024 * 1024


def _option(text):
    name, _, value = text.partition("=")
    try:
        return name, int(value)
    except ValueError:
        return name, value


def run(options, without, connections, seconds, payload, sample_seconds=0.5):
    """
    One flood against a fresh server; prints a line per sample and a summary.

    @return: a dict of the figures.
    """
    with FloodTarget(options, without) as target:
        before = target.honest_call()
        baseline = target.peak_rss_bytes()
        results = []
        flood = threading.Thread(
            target=lambda: results.extend(
                continuation_flood(
                    "127.0.0.1", target.port, target.anchors_pem, target.server_name,
                    connections=connections, seconds=seconds, payload=payload,
                )
            )
        )
        start = time.monotonic()
        flood.start()
        samples, during = [], []
        while flood.is_alive():
            time.sleep(sample_seconds)
            rss = target.rss_bytes()
            samples.append((time.monotonic() - start, rss))
            print(f"  t={samples[-1][0]:5.1f}s  RSS {rss / MIB:8.1f} MiB", flush=True)
            if len(samples) % 4 == 0:
                called = time.monotonic()
                failure = target.honest_call(timeout=2.0)
                during.append((failure, time.monotonic() - called))
        flood.join()
        time.sleep(1.0)
        after_rss = target.rss_bytes()
        after = target.honest_call()
        peak = target.peak_rss_bytes()
    sent = sum(result.sent_bytes for result in results)
    closed = [result.closed_after_seconds for result in results
              if result.closed_after_seconds is not None]
    answered = sum(1 for failure, _ in during if failure is None)
    summary = {
        "options": options,
        "without": without,
        "payload": payload,
        "connections": connections,
        "seconds": seconds,
        "baseline_mib": baseline / MIB,
        "peak_mib": peak / MIB,
        "growth_mib": (peak - baseline) / MIB,
        "after_mib": after_rss / MIB if after_rss else None,
        "sent_mib": sent / MIB,
        "connections_closed": len(closed),
        "closed_after_s": statistics.median(closed) if closed else None,
        "stalled": sum(result.stalled for result in results),
        "honest_before": before or "OK",
        "honest_after": after or "OK",
        "honest_during": f"{answered}/{len(during)} answered",
        "honest_during_max_s": max((d for _, d in during), default=None),
    }
    for name, value in summary.items():
        print(f"  {name}: {value}")
    return summary


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--option", action="append", default=[], type=_option,
                        help="an extra grpc channel argument, name=value")
    parser.add_argument("--without", action="append", default=[],
                        help="leave out this default channel argument")
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--payload", choices=PAYLOADS, default=PAYLOADS[0])
    args = parser.parse_args(argv)
    import grpc

    print(f"grpcio {grpc.__version__}; flood: {args.connections} connections x "
          f"{args.seconds} s, payload {args.payload}; options {args.option}, "
          f"without {args.without}")
    run(args.option, args.without, args.connections, args.seconds, args.payload)


if __name__ == "__main__":
    main()
