"""
The HTTP/2 CONTINUATION flood (issue 9): a header block that never ends,
sent on several connections, must not grow the gRPC server without bound,
and honest calls must still be answered meanwhile.

A real C{grpc.aio} server runs in a child process on 127.0.0.1 port 0 with
sentry_tx's channel arguments (L{sentry_tx.testing.flood.FloodTarget}); the flood
(L{sentry_tx.testing.flood.continuation_flood}) lasts a few seconds and stops by
itself.  Growth is read from the child's peak RSS (C{VmHWM}), so no
sampling is needed.
"""

import threading

from twisted.trial.unittest import SynchronousTestCase

from sentry_tx.server.service import MAX_TCP_READ_BUFFER_BYTES, grpc_server_options
from sentry_tx.testing.flood import FloodTarget, continuation_flood

MIB = 1024 * 1024

FLOOD_CONNECTIONS = 4
FLOOD_SECONDS = 3.0
FLOOD_START_TIMEOUT_SECONDS = 15.0

RSS_GROWTH_BOUND_BYTES = 32 * MIB
"""
How much the server may grow under the flood.  Measured with sentry_tx's
options: ~4 MiB (4 or 8 connections, 8 or 20 s); without the read-buffer
bound: ~260 MiB in 8 s.
"""

MIN_FLOOD_BYTES = 4 * RSS_GROWTH_BOUND_BYTES
"""
The flood must have carried at least this much for the bound to mean
anything (it carries gigabytes on loopback).
"""

READ_BUFFER_OPTION = "grpc.experimental.tcp_max_read_buffer_size"


def _flood(target):
    """
    Flood C{target}, making honest calls while the flood lasts.

    @return: C{(growth_bytes, sent_bytes, failures, calls)}: the growth of
        the target's peak RSS over its peak before the flood, the bytes the
        flood sent, the honest calls that failed (their texts) and how many
        were made.
    """
    failure = target.honest_call()
    if failure is not None:
        raise AssertionError(f"the target does not answer before the flood: {failure}")
    baseline = target.peak_rss_bytes()
    flooding = threading.Event()
    results = []
    flood = threading.Thread(
        target=lambda: results.extend(
            continuation_flood(
                "127.0.0.1",
                target.port,
                target.anchors_pem,
                target.server_name,
                connections=FLOOD_CONNECTIONS,
                seconds=FLOOD_SECONDS,
                flooding=flooding,
            )
        ),
        daemon=True,
    )
    flood.start()
    if not flooding.wait(FLOOD_START_TIMEOUT_SECONDS):
        raise AssertionError("the flood did not start")
    failures, calls = [], 0
    while flood.is_alive():
        failure = target.honest_call(timeout=5.0)
        calls += 1
        if failure is not None:
            failures.append(failure)
        flood.join(0.5)
    flood.join(FLOOD_SECONDS + 15.0)
    growth = target.peak_rss_bytes() - baseline
    return growth, sum(result.sent_bytes for result in results), failures, calls


class ContinuationFloodTests(SynchronousTestCase):
    """
    A gRPC server with sentry_tx's channel arguments under the flood.
    """

    def test_read_buffer_bounded(self):
        """The server's channel arguments bound grpc core's reads to 256 KiB."""
        self.assertEqual(MAX_TCP_READ_BUFFER_BYTES, 256 * 1024)
        self.assertEqual(
            dict(grpc_server_options())[READ_BUFFER_OPTION], MAX_TCP_READ_BUFFER_BYTES
        )

    def test_flood_bounded_and_honest_calls_answered(self):
        """
        Under the flood the server grows by less than the bound, and every
        honest call made during and after it is answered.
        """
        with FloodTarget() as target:
            growth, sent, failures, calls = _flood(target)
            after = target.honest_call()
        self.assertGreaterEqual(sent, MIN_FLOOD_BYTES)
        self.assertLess(
            growth,
            RSS_GROWTH_BOUND_BYTES,
            f"grew by {growth / MIB:.1f} MiB under {sent / MIB:.0f} MiB of flood",
        )
        self.assertGreater(calls, 0)
        self.assertEqual(failures, [])
        self.assertIsNone(after)

    def test_flood_grows_server_without_the_bound(self):
        """
        The same flood grows a server without the read-buffer bound past the
        bound: the attack is real for the grpcio in use, and the option is
        what stops it.
        """
        with FloodTarget(without=(READ_BUFFER_OPTION,)) as target:
            growth, sent, _, _ = _flood(target)
        self.assertGreater(
            growth,
            RSS_GROWTH_BOUND_BYTES,
            f"grew by only {growth / MIB:.1f} MiB under {sent / MIB:.0f} MiB",
        )
