"""
Faults found by attacking a running sentry_tx (C{twistd -n sentry} as a
child process, loopback only): a FIFO in place of a bundle file, and
slowloris on healthz under a low open-file limit.
"""

import os
import signal
import sys
from datetime import UTC, datetime, timedelta

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase

from sentry_tx._proto import sentry_pb2
from sentry_tx.testing.certificates import make_chain, make_csr
from sentry_tx.testing.grpc_client import GrpcTestClient
from sentry_tx.testing.rotation import reissue_chain, replace_bundle_files
from sentry_tx.testing.twistd import spawn_twistd, standalone_arguments

_PROBES = """
import sys, urllib.request
port, count = sys.argv[1], int(sys.argv[2])
for _ in range(count):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as r:
            print(r.status, flush=True)
    except Exception as e:
        print(type(e).__name__, flush=True)
"""
"""
Healthz probes as the kubelet sends them: one at a time, each with a 1 s
timeout; prints each status (or the error's name).
"""

STOP_BOUND_SECONDS = 5.0 + 1.0
"""
SIGTERM must stop sentry_tx within the 5 s drain plus 1 s.
"""


def _sample(text, name):
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in the metrics")


class _Trickler(Protocol):
    """
    Sends the start of a request and never finishes it.
    """

    def connectionMade(self):
        self.factory.connected += 1
        self.transport.write(b"GET /healthz HTTP/1.1\r\nHost: x")

    def connectionLost(self, reason):
        self.factory.lost()


class _TricklingSockets(ClientFactory):
    """
    C{count} slowloris connections to C{port} that reconnect as soon as they
    are closed, at most C{max_connects} connects in all, until L{stop}.
    """

    protocol = _Trickler

    def __init__(self, port, count, max_connects):
        self.port = port
        self.count = count
        self.max_connects = max_connects
        self.connects = 0
        self.connected = 0
        self.closed = 0
        self.stopped = False
        self._open = 0
        self._all_gone = None

    def start(self):
        for _ in range(self.count):
            self._connect()

    def _connect(self):
        if self.stopped or self.connects >= self.max_connects:
            return
        self.connects += 1
        self._open += 1
        reactor.connectTCP("127.0.0.1", self.port, self, timeout=5)

    def buildProtocol(self, addr):
        protocol = super().buildProtocol(addr)
        self.protocols.add(protocol)
        return protocol

    def startFactory(self):
        self.protocols = set()

    def lost(self):
        self.closed += 1

    def clientConnectionLost(self, connector, reason):
        self._gone()

    def clientConnectionFailed(self, connector, reason):
        self._gone()

    def _gone(self):
        self._open -= 1
        if self.stopped:
            if self._open == 0 and self._all_gone is not None:
                self._all_gone.callback(None)
            return
        self._connect()

    def stop(self):
        """
        Close every connection; fires once all are gone.
        """
        self.stopped = True
        self._all_gone = Deferred()
        if self._open == 0:
            self._all_gone.callback(None)
        for protocol in list(self.protocols):
            if protocol.transport is not None:
                protocol.transport.abortConnection()
        return self._all_gone


class FaultTests(TestCase):
    """
    sentry_tx as an operator runs it, attacked from outside.
    """

    timeout = 90

    def setUp(self):
        self.credentials = os.path.abspath(self.mktemp())

    def _arguments(self, *extra):
        return standalone_arguments(
            self, self.credentials, "--trust-domain", "localhost", *extra
        )

    def _write_chain(self):
        now = datetime.now(UTC)
        chain = make_chain(
            trust_domain="localhost",
            not_before=now - timedelta(days=1),
            not_after=now + timedelta(days=30),
        )
        os.makedirs(self.credentials, mode=0o700)
        chain.write(self.credentials)
        return chain

    @inlineCallbacks
    def _get(self, port, path):
        import treq

        response = yield treq.get(
            f"http://127.0.0.1:{port}{path}", persistent=False, timeout=1.0
        )
        body = yield response.content()
        return response.code, body

    @inlineCallbacks
    def _sign(self, port, anchors_pem):
        client = GrpcTestClient(f"127.0.0.1:{port}", anchors_pem)
        self.addCleanup(client.close)
        _, csr = make_csr()
        reply = yield deferToThread(
            client.sign,
            sentry_pb2.SignCertificateRequest(
                id="myapp", namespace="default", certificate_signing_request=csr
            ),
        )
        return reply

    @inlineCallbacks
    def _stop_within_bound(self, protocol):
        started = reactor.seconds()
        os.kill(protocol.transport.pid, signal.SIGTERM)
        reason = yield protocol.ended
        elapsed = reactor.seconds() - started
        self.assertLess(elapsed, STOP_BOUND_SECONDS)
        self.assertIn(
            (reason.exitCode, reason.signal), [(0, None), (None, signal.SIGTERM)]
        )

    @inlineCallbacks
    def test_fifo_during_service(self):
        """
        A FIFO swapped in for issuer.crt is refused by name and counted,
        healthz stays 200, a valid rotation afterwards is taken, and SIGTERM
        stops the process within the bound.
        """
        chain = self._write_chain()
        protocol = spawn_twistd(self, self._arguments())
        ports = yield protocol.wait_ready()
        issuer = os.path.join(self.credentials, "issuer.crt")
        refused = protocol.when_output(b"not a regular file")
        fifo = os.path.join(self.credentials, ".fifo")
        os.mkfifo(fifo)
        os.rename(fifo, issuer)
        yield refused
        self.assertIn(f"{issuer}: is a FIFO".encode(), protocol.output)
        code, _ = yield self._get(ports["healthz"], "/healthz")
        self.assertEqual(code, 200)
        # The line may come from a serving copy first; the twistd process,
        # which alone counts the refusal, logs it too, soon after.
        failed = 0.0
        for _ in range(50):
            _, text = yield self._get(ports["metrics"], "/metrics")
            failed = _sample(
                text.decode(), "dapr_sentry_issuercert_reload_failed_total"
            )
            if failed:
                break
            yield deferLater(reactor, 0.1, lambda: None)
        self.assertEqual(failed, 1.0)

        reloaded = protocol.when_output(b"issuer credentials reloaded")
        replace_bundle_files(reissue_chain(chain), self.credentials)
        yield reloaded
        yield self._sign(ports["grpc"], chain.anchors_pem)
        yield self._stop_within_bound(protocol)

    @inlineCallbacks
    def test_fifo_at_start(self):
        """
        A FIFO at issuer.crt at start fails the start at once, naming it,
        instead of hanging.
        """
        self._write_chain()
        issuer = os.path.join(self.credentials, "issuer.crt")
        os.unlink(issuer)
        os.mkfifo(issuer)
        protocol = spawn_twistd(self, self._arguments())
        reason = yield protocol.ended
        self.assertEqual(reason.exitCode, 1)
        self.assertIn(
            f"refusing to start: {issuer}: is a FIFO".encode(), protocol.output
        )

    @inlineCallbacks
    def test_leftover_temporaries_removed(self):
        """
        Temporary files of a generation killed mid-way are removed at the
        next start, each logged; other files stay.
        """
        self._write_chain()
        leftover = os.path.join(
            self.credentials, ".issuer.key.sentry-tx-0123456789abcdef.tmp"
        )
        other = os.path.join(self.credentials, "notes.tmp")
        for path in (leftover, other):
            with open(path, "wb") as f:
                f.write(b"x")
        protocol = spawn_twistd(self, self._arguments())
        yield protocol.wait_ready()
        self.assertFalse(os.path.exists(leftover))
        self.assertTrue(os.path.exists(other))
        self.assertIn(
            f"removed the temporary file {leftover}".encode(), protocol.output
        )
        yield self._stop_within_bound(protocol)

    @inlineCallbacks
    def test_slowloris_under_low_file_limit(self):
        """
        With an open-file limit of 256 and 300 trickling healthz connections
        that reconnect when closed, healthz answers 200 every time and gRPC
        signs.
        """
        chain = self._write_chain()
        protocol = spawn_twistd(
            self, self._arguments("--enable-metrics=false"), open_files_limit=256
        )
        ports = yield protocol.wait_ready()
        self.assertIn(b"open file limit is 256", protocol.output)
        attack = _TricklingSockets(ports["healthz"], 300, max_connects=20000)
        self.addCleanup(lambda: attack.stop() if not attack.stopped else None)
        attack.start()
        while attack.connected < 300:
            yield _later(0.05)
        # The probes come from their own process, as the kubelet's do: a
        # client in this process would wait for the reactor the attack
        # keeps busy before it sent its request.
        out, err, status = yield getProcessOutputAndValue(
            sys.executable,
            ["-c", _PROBES, str(ports["healthz"]), "10"],
            env=dict(os.environ),
            reactor=reactor,
        )
        codes = [int(code) if code.isdigit() else code for code in out.decode().split()]
        reply = yield self._sign(ports["grpc"], chain.anchors_pem)
        self.assertTrue(reply.workload_certificate)
        fds = len(os.listdir(f"/proc/{protocol.transport.pid}/fd"))
        connects, closed = attack.connects, attack.closed
        yield attack.stop()
        self.assertEqual(codes, [200] * 10)
        self.assertLess(fds, 256)
        # The cap did close trickling connections to make room.
        self.assertGreater(closed, 0)
        self.assertGreater(connects, 300)
        yield self._stop_within_bound(protocol)


def _later(seconds):
    from twisted.internet.task import deferLater

    return deferLater(reactor, seconds, lambda: None)
