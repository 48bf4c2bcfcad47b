"""
End-to-end: C{twistd -n sentry} as a child process on free loopback ports.
"""

import os
import signal
from datetime import UTC

from cryptography import x509
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from sentry_tx._proto import sentry_pb2
from sentry_tx.testing.certificates import make_csr
from sentry_tx.testing.grpc_client import GrpcTestClient
from sentry_tx.testing.twistd import (
    spawn_twistd,
    standalone_arguments,
)


def _children(pid):
    """
    The pids of the direct children of C{pid}, from /proc.
    """
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                children.append(int(entry))
    return children


def _alive(pid):
    """
    Whether process C{pid} still exists (and is not a zombie).
    """
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class TwistdProcessTests(TestCase):
    """
    The plugin as an operator runs it.
    """

    timeout = 60

    def setUp(self):
        self.credentials = os.path.abspath(self.mktemp())

    def _arguments(self, *extra):
        return standalone_arguments(self, self.credentials, *extra)

    @inlineCallbacks
    def test_serves_and_stops(self):
        """
        On a bare machine twistd warns about the missing configuration,
        generates a bundle, reaches healthz 200, signs a CSR over TLS, and
        exits on SIGTERM.
        """
        import treq

        protocol = spawn_twistd(self, self._arguments())
        ports = yield protocol.wait_ready()
        self.assertIn(b"not found; using the defaults", protocol.output)
        response = yield treq.get(
            f"http://127.0.0.1:{ports['healthz']}/healthz", persistent=False
        )
        self.assertEqual(response.code, 200)
        yield response.content()

        with open(os.path.join(self.credentials, "ca.crt"), "rb") as f:
            anchors_pem = f.read()
        client = GrpcTestClient(f"127.0.0.1:{ports['grpc']}", anchors_pem)
        self.addCleanup(client.close)
        _, csr = make_csr()
        reply = yield deferToThread(
            client.sign,
            sentry_pb2.SignCertificateRequest(
                id="myapp", namespace="default", certificate_signing_request=csr
            ),
        )
        leaf = x509.load_pem_x509_certificates(reply.workload_certificate)[0]
        self.assertEqual(
            leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
            .value.get_values_for_type(x509.UniformResourceIdentifier),
            ["spiffe://public/ns/default/myapp"],
        )

        metrics = yield treq.get(
            f"http://127.0.0.1:{ports['metrics']}/metrics", persistent=False
        )
        text = yield metrics.text()
        self.assertIn("dapr_sentry_cert_sign_success_total 1.0", text)

        os.kill(protocol.transport.pid, signal.SIGTERM)
        reason = yield protocol.ended
        # twistd reports a SIGTERM either as exit 0 or as death by that signal.
        self.assertIn(
            (reason.exitCode, reason.signal), [(0, None), (None, signal.SIGTERM)]
        )
        self.assertNotIn(b"PRIVATE KEY", protocol.output)

    @inlineCallbacks
    def test_workers(self):
        """
        With C{--workers 2}, two processes serve the port, twistd's own and
        one copy: healthz is 200 once both serve and says so, calls are
        signed, and SIGTERM stops every process.
        """
        import treq

        protocol = spawn_twistd(self, self._arguments("--workers", "2"))
        ports = yield protocol.wait_ready()
        response = yield treq.get(
            f"http://127.0.0.1:{ports['healthz']}/healthz", persistent=False
        )
        self.assertEqual(response.code, 200)
        body = yield response.content()
        self.assertEqual(body, b"ok\nserving processes: 2 of 2\n")
        with open(os.path.join(self.credentials, "ca.crt"), "rb") as f:
            anchors_pem = f.read()
        calls = 6
        for _ in range(calls):
            # A new channel each time, so that connections land on both
            # processes (the kernel spreads them over the listeners).
            client = GrpcTestClient(f"127.0.0.1:{ports['grpc']}", anchors_pem)
            self.addCleanup(client.close)
            _, csr = make_csr()
            yield deferToThread(
                client.sign,
                sentry_pb2.SignCertificateRequest(
                    id="myapp", namespace="default", certificate_signing_request=csr
                ),
            )
        children = _children(protocol.transport.pid)
        self.assertEqual(len(children), 1, children)
        os.kill(protocol.transport.pid, signal.SIGTERM)
        reason = yield protocol.ended
        self.assertIn(
            (reason.exitCode, reason.signal), [(0, None), (None, signal.SIGTERM)]
        )
        self.assertEqual([pid for pid in children if _alive(pid)], [])
        self.assertNotIn(b"PRIVATE KEY", protocol.output)

    def _replace_bundle_under_twistd(self, *extra):
        """
        Start twistd on a bundle in C{self.credentials}, wait until it is
        ready, then replace the bundle with a reissued one.

        @return: a Deferred firing with C{(protocol, written)}: the twistd
            process protocol, and the bytes of each of the three files as
            the replacement wrote them.
        """
        from datetime import datetime, timedelta

        from sentry_tx.testing.certificates import make_chain
        from sentry_tx.testing.rotation import reissue_chain, replace_bundle_files

        now = datetime.now(UTC)
        chain = make_chain(
            trust_domain="localhost",
            not_before=now - timedelta(days=1),
            not_after=now + timedelta(days=30),
        )
        os.makedirs(self.credentials, mode=0o700)
        chain.write(self.credentials)
        protocol = spawn_twistd(self, self._arguments(*extra))
        d = protocol.wait_ready()

        def replace(_):
            replace_bundle_files(reissue_chain(chain), self.credentials)
            written = {}
            for name in ("ca.crt", "issuer.crt", "issuer.key"):
                with open(os.path.join(self.credentials, name), "rb") as f:
                    written[name] = f.read()
            return protocol, written

        return d.addCallback(replace)

    def _assert_stopped_cleanly(self, protocol, reason, written):
        """
        twistd ended on SIGTERM without a traceback, and left the operator's
        three files exactly as C{written}.
        """
        self.assertIn(
            (reason.exitCode, reason.signal), [(0, None), (None, signal.SIGTERM)]
        )
        self.assertEqual(
            sorted(os.listdir(self.credentials)), ["ca.crt", "issuer.crt", "issuer.key"]
        )
        for name, data in written.items():
            with open(os.path.join(self.credentials, name), "rb") as f:
                self.assertEqual(f.read(), data, name)
        self.assertNotIn(b"Traceback", protocol.output)

    @inlineCallbacks
    def test_sigterm_while_window_open(self):
        """
        SIGTERM after a change is seen, while the reload window is still
        open, exits cleanly without reloading and leaves the operator's files
        exactly as written.
        """
        protocol, written = yield self._replace_bundle_under_twistd(
            "--log-level", "debug"
        )
        # The watcher logs each change at debug level as it opens the window
        # (ISSUER_CHANGE_WINDOW_SECONDS); the signal goes out as soon as
        # the first one is read.
        yield protocol.when_output(b"issuer credentials event")
        os.kill(protocol.transport.pid, signal.SIGTERM)
        reason = yield protocol.ended
        self._assert_stopped_cleanly(protocol, reason, written)
        # The window was open when the signal arrived: stopping cancelled it,
        # so the reload never began.
        self.assertNotIn(b"issuer credentials changed; reloading", protocol.output)

    @inlineCallbacks
    def test_sigterm_during_reload(self):
        """
        SIGTERM once the window has closed and the reload has begun (the new
        bundle loading, or just loaded) exits cleanly and leaves the
        operator's files exactly as written.
        """
        protocol, written = yield self._replace_bundle_under_twistd()
        yield protocol.when_output(b"issuer credentials changed; reloading")
        os.kill(protocol.transport.pid, signal.SIGTERM)
        reason = yield protocol.ended
        self._assert_stopped_cleanly(protocol, reason, written)

    @inlineCallbacks
    def test_partial_bundle_refused(self):
        """
        A credentials directory holding only some of the three files makes
        twistd exit 1, naming the missing file, and touches nothing.
        """
        os.makedirs(self.credentials)
        ca_path = os.path.join(self.credentials, "ca.crt")
        with open(ca_path, "wb") as f:
            f.write(b"operator's file\n")
        protocol = spawn_twistd(self, self._arguments())
        reason = yield protocol.ended
        self.assertEqual(reason.exitCode, 1)
        self.assertIn(b"issuer.crt", protocol.output)
        self.assertEqual(sorted(os.listdir(self.credentials)), ["ca.crt"])
        with open(ca_path, "rb") as f:
            self.assertEqual(f.read(), b"operator's file\n")

    @inlineCallbacks
    def test_bad_flag(self):
        """
        A bad flag value exits 1 with a one-line message naming the flag.
        """
        protocol = spawn_twistd(self, ["--port", "99999"])
        reason = yield protocol.ended
        self.assertEqual(reason.exitCode, 1)
        lines = protocol.output.strip().splitlines()
        self.assertEqual(len(lines), 1, protocol.output)
        self.assertIn(b"--port", lines[0])


def _until(predicate, seconds, step_seconds=0.1):
    """
    A Deferred that fires with the seconds waited once C{predicate()} is
    true, checked every C{step_seconds}; it fails with C{TimeoutError}
    after C{seconds}.
    """
    from twisted.internet import task

    started = reactor.seconds()

    def check():
        waited = reactor.seconds() - started
        if predicate():
            return waited
        if waited > seconds:
            raise TimeoutError(f"not true within {seconds} s")
        return task.deferLater(reactor, step_seconds, check)

    return task.deferLater(reactor, 0, check)


def _kill_quietly(pid):
    """
    SIGKILL C{pid} if it still exists (a test's cleanup).
    """
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


class ServingCopiesProcessTests(TestCase):
    """
    twistd with serving copies, as an operator runs it: supervision,
    rotation in every process, counts that survive a killed copy, copies
    that follow a killed parent.
    """

    timeout = 120

    def setUp(self):
        from datetime import datetime, timedelta

        from sentry_tx.testing.certificates import make_chain

        self.credentials = os.path.abspath(self.mktemp())
        now = datetime.now(UTC)
        self.chain = make_chain(
            trust_domain="localhost",
            not_before=now - timedelta(days=1),
            not_after=now + timedelta(days=30),
        )
        os.makedirs(self.credentials, mode=0o700)
        self.chain.write(self.credentials)

    @inlineCallbacks
    def start(self, processes, *extra):
        """
        Start twistd with C{processes} serving processes and C{extra}
        flags; wait until all serve.

        @return: a Deferred firing with C{(protocol, ports, copy pids)}.
        """
        protocol = spawn_twistd(
            self,
            standalone_arguments(
                self, self.credentials, "--workers", str(processes), *extra
            ),
        )
        ports = yield protocol.wait_ready()
        copies = _children(protocol.transport.pid)
        self.assertEqual(len(copies), processes - 1)
        for pid in copies:
            self.addCleanup(_kill_quietly, pid)
        return protocol, ports, copies

    def issuers_served(self, port, connections):
        """
        The issuer public keys presented on C{connections} new connections
        (each lands on one of the processes sharing the port).
        """
        client = GrpcTestClient(f"127.0.0.1:{port}", self.chain.anchors_pem)
        self.addCleanup(client.close)

        def handshakes():
            return [
                client.server_chain(timeout=5.0)[1].public_key()
                for _ in range(connections)
            ]

        return deferToThread(handshakes)

    @inlineCallbacks
    def test_stuck_copy_replaced_rotation_elsewhere(self):
        """
        A copy stopped with SIGSTOP is killed and replaced within 15 s;
        meanwhile an issuer rotation is in effect within 5 s in every other
        process, and after the replacement in all of them.
        """
        from sentry_tx.testing.rotation import reissue_chain, replace_bundle_files

        protocol, ports, (stuck, running) = yield self.start(3)
        parent = protocol.transport.pid
        os.kill(stuck, signal.SIGSTOP)
        stopped_at = reactor.seconds()
        rotated = reissue_chain(self.chain)
        replace_bundle_files(rotated, self.credentials)
        # The twistd process and the copy that runs each reload once.
        yield _until(
            lambda: protocol.output.count(b"issuer credentials reloaded") >= 2, 5.0
        )
        self.assertEqual(protocol.output.count(b"issuer credentials reloaded"), 2)

        def replaced():
            live = [pid for pid in _children(parent) if _alive(pid)]
            return (
                stuck not in live
                and len(live) == 2
                and all(
                    f"(pid {pid}) serves".encode() in protocol.output for pid in live
                )
            )

        yield _until(replaced, 15.0 - (reactor.seconds() - stopped_at))
        self.assertFalse(_alive(stuck))
        self.assertIn(b"failed 2 liveness checks in a row; killing it", protocol.output)
        served = yield self.issuers_served(ports["grpc"], 12)
        self.assertEqual(set(key.public_numbers() for key in served),
                         {rotated.issuer.public_key().public_numbers()})

    @inlineCallbacks
    def test_refused_reload_changes_no_process(self):
        """
        A new bundle whose key is not the issuer's, then a new good bundle
        beside a JWT pair whose key its JWKS does not publish: each is
        refused by every process, and every process keeps serving the first
        issuer.
        """
        from sentry_tx.jwt.material import generate_jwt_material
        from sentry_tx.testing.rotation import reissue_chain, replace_bundle_files

        protocol, ports, _ = yield self.start(3, "--jwt-enabled")
        first = self.chain.issuer.public_key().public_numbers()
        from dataclasses import replace

        wrong_key = replace(
            reissue_chain(self.chain), issuer_key=reissue_chain(self.chain).issuer_key
        )
        replace_bundle_files(wrong_key, self.credentials)
        refused = b"issuer credentials refused"
        yield _until(lambda: protocol.output.count(refused) >= 3, 30.0)
        served = yield self.issuers_served(ports["grpc"], 12)
        self.assertEqual({key.public_numbers() for key in served}, {first})
        replace_bundle_files(reissue_chain(self.chain), self.credentials)
        key_pem, _ = generate_jwt_material()
        with open(os.path.join(self.credentials, "jwt.key"), "wb") as f:
            f.write(key_pem)
        yield _until(lambda: protocol.output.count(refused) >= 6, 30.0)
        served = yield self.issuers_served(ports["grpc"], 12)
        self.assertEqual({key.public_numbers() for key in served}, {first})
        self.assertNotIn(b"issuer credentials reloaded", protocol.output)

    @inlineCallbacks
    def test_killed_copy_keeps_its_counts(self):
        """
        After SIGKILL of a copy under load, success_total is at least the
        OK answers the clients counted, less the calls in flight at the
        kill (one per caller at most); the restart is counted, and the copy replaced.
        """
        import threading

        import grpc
        import treq
        from prometheus_client.parser import text_string_to_metric_families

        protocol, ports, (victim, _) = yield self.start(3)
        _, csr = make_csr()
        request = sentry_pb2.SignCertificateRequest(
            id="myapp", namespace="default", certificate_signing_request=csr
        )
        stop = threading.Event()
        callers = 8
        oks = [0] * callers

        def load(index):
            # A channel of its own: the callers' connections spread over the
            # processes, and one on the killed copy reconnects elsewhere.
            client = GrpcTestClient(
                f"127.0.0.1:{ports['grpc']}", self.chain.anchors_pem
            )
            try:
                while not stop.is_set():
                    try:
                        client.sign(request, timeout=5.0)
                    except grpc.RpcError:
                        continue
                    oks[index] += 1
            finally:
                client.close()

        loads = [deferToThread(load, index) for index in range(callers)]
        yield _until(lambda: sum(oks) >= 50, 30.0)
        os.kill(victim, signal.SIGKILL)
        counted_at_kill = sum(oks)
        yield _until(lambda: sum(oks) >= counted_at_kill + 50, 30.0)
        stop.set()
        for d in loads:
            # inlineCallbacks sends each result back in: not `yield from`.
            _ = yield d

        @inlineCallbacks
        def scrape():
            response = yield treq.get(
                f"http://127.0.0.1:{ports['metrics']}/metrics", persistent=False
            )
            text = yield response.text()
            return {
                sample.name: sample.value
                for family in text_string_to_metric_families(text)
                for sample in family.samples
                if not sample.labels
            }

        samples = yield scrape()
        # At most one call per caller was in flight at the kill.
        self.assertGreaterEqual(
            samples["dapr_sentry_cert_sign_success_total"], sum(oks) - callers
        )
        self.assertGreaterEqual(
            samples["dapr_sentry_serving_process_restarts_total"], 1
        )
        # And the copy is replaced: three processes serve again.
        for _ in range(150):
            if samples["dapr_sentry_serving_processes"] == 3:
                break
            yield deferLater(reactor, 0.1, lambda: None)
            samples = yield scrape()
        self.assertEqual(samples["dapr_sentry_serving_processes"], 3)

    @inlineCallbacks
    def test_copies_follow_killed_parent(self):
        """
        After SIGKILL of the twistd process, every copy notices (its stdin
        ends), stops and exits within the drain grace and a margin.
        """
        protocol, _, copies = yield self.start(3)
        os.kill(protocol.transport.pid, signal.SIGKILL)
        yield protocol.ended
        yield _until(lambda: not any(_alive(pid) for pid in copies), 10.0)
