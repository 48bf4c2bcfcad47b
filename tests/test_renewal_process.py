"""
Automatic CA renewal end to end: C{twistd -n sentry} as a child process with
short CA times, signing for a client that reloads C{ca.crt} before each
call; and restarts after a kill at each step of a renewal.
"""

import os
import threading
import time
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.x509.verification import PolicyBuilder, Store
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from sentry_tx._proto import sentry_pb2
from sentry_tx.ca.renewal import ACTION_RENEW, ACTION_SWITCH, RenewalSettings
from sentry_tx.ca.renewal_files import FileRenewalStore
from sentry_tx.ca.store import FileTrustStore
from sentry_tx.testing.certificates import make_csr
from sentry_tx.testing.clocks import ImmediateReactor
from sentry_tx.testing.grpc_client import GrpcTestClient
from sentry_tx.testing.twistd import spawn_twistd, standalone_arguments

SKEW_SECONDS = 1
CA_TTL_SECONDS = 60
THRESHOLD = 0.5
GRACE_SECONDS = 10

CONFIGURATION = f"""\
apiVersion: dapr.io/v1alpha1
kind: Configuration
metadata:
  name: daprsystem
spec:
  mtls:
    workloadCertTTL: 20s
    allowedClockSkew: {SKEW_SECONDS}s
"""

RENEWAL_FLAGS = [
    "--ca-ttl",
    f"{CA_TTL_SECONDS}s",
    "--ca-renewal-threshold",
    str(THRESHOLD),
    "--trust-anchor-propagation-grace",
    f"{GRACE_SECONDS}s",
]

RUN_DEADLINE_SECONDS = 120.0
"""
The client stops this long after it started, whatever happens.
"""

SETTLE_SECONDS = 3.0
"""
How long the client goes on after the second switch.
"""


def _settings():
    return RenewalSettings(
        ca_ttl=timedelta(seconds=CA_TTL_SECONDS),
        threshold=THRESHOLD,
        grace=timedelta(seconds=GRACE_SECONDS),
        workload_ttl=timedelta(seconds=20),
        allowed_clock_skew=timedelta(seconds=SKEW_SECONDS),
    )


def _now():
    return datetime.now(UTC)


class _ReloadingClient:
    """
    Signs in a loop; before each call reads C{ca.crt}, and checks the chain
    it gets against what it read.

    @ivar failures: calls that failed or whose chain did not verify.
    @ivar issuers: the distinct issuer certificates seen, in order.
    @ivar dropped_early: anchors that left C{ca.crt} before expiring.
    """

    def __init__(self, target, credentials):
        self._target = target
        self._ca_path = os.path.join(credentials, "ca.crt")
        self.stop = threading.Event()
        self.calls = 0
        self.failures = []
        self.issuers = []
        self.dropped_early = []
        self.anchor_counts = set()

    def run(self):
        _, csr = make_csr()
        request = sentry_pb2.SignCertificateRequest(
            id="renewal", namespace="default", certificate_signing_request=csr
        )
        anchors_pem = client = None
        seen = {}
        deadline = time.monotonic() + RUN_DEADLINE_SECONDS
        try:
            while not self.stop.is_set() and time.monotonic() < deadline:
                with open(self._ca_path, "rb") as f:
                    read = f.read()
                read_at = _now()
                roots = x509.load_pem_x509_certificates(read)
                self.anchor_counts.add(len(roots))
                present = {root.serial_number for root in roots}
                for serial, not_after in seen.items():
                    if serial not in present and not_after >= read_at:
                        self.dropped_early.append(serial)
                for root in roots:
                    seen[root.serial_number] = root.not_valid_after_utc
                if read != anchors_pem:
                    if client is not None:
                        client.close()
                    anchors_pem = read
                    client = GrpcTestClient(self._target, anchors_pem)
                self.calls += 1
                try:
                    reply = client.sign(request, timeout=5.0)
                    chain = x509.load_pem_x509_certificates(reply.workload_certificate)
                    PolicyBuilder().store(Store(roots)).time(
                        _now()
                    ).build_client_verifier().verify(chain[0], chain[1:])
                except Exception as e:
                    self.failures.append(repr(e))
                    continue
                if chain[1] not in self.issuers:
                    self.issuers.append(chain[1])
        finally:
            if client is not None:
                client.close()


class RenewalProcessTests(TestCase):
    """
    sentry_tx renews itself while it serves.
    """

    timeout = RUN_DEADLINE_SECONDS + 60

    def setUp(self):
        self.credentials = os.path.abspath(self.mktemp())
        self.configuration = os.path.abspath(self.mktemp())
        with open(self.configuration, "w") as f:
            f.write(CONFIGURATION)

    def _arguments(self, *extra):
        arguments = standalone_arguments(self, self.credentials, *RENEWAL_FLAGS, *extra)
        arguments[arguments.index("--config") + 1] = self.configuration
        return arguments

    @inlineCallbacks
    def test_two_renewals_while_signing(self):
        """
        Two full renewals while a client reloading ca.crt signs continuously: no failed
        call, every chain verifies against the ca.crt read, no anchor leaves before it
        expires.
        """
        protocol = spawn_twistd(self, self._arguments("--workers", "2"))
        ports = yield protocol.wait_ready()
        client = _ReloadingClient(f"127.0.0.1:{ports['grpc']}", self.credentials)
        running = deferToThread(client.run)
        self.addCleanup(client.stop.set)
        yield protocol.when_output(b"automatic CA renewal is on")
        # The second switch: the third issuer signs.
        while len(client.issuers) < 3 and not running.called:
            yield _later(1.0)
        yield _later(SETTLE_SECONDS)
        client.stop.set()
        yield running
        self.assertEqual(client.failures, [])
        self.assertEqual(len(client.issuers), 3, protocol.output[-3000:])
        self.assertEqual(client.dropped_early, [])
        self.assertIn(2, client.anchor_counts)
        self.assertIn(
            b"restart workloads before then so their sidecars trust the new root",
            protocol.output,
        )
        self.assertGreater(client.calls, 20)

    @inlineCallbacks
    def _restart_after_kill(self, action, part):
        """
        Leave the files as a kill after C{part}'s write of C{action} would,
        start sentry_tx on them, and wait for it to finish the renewal.
        """
        trust_store = self._trust_store()
        settings = _settings()
        # Made so that renewal is due now.
        made = _now() - timedelta(seconds=CA_TTL_SECONDS * THRESHOLD + 2)
        trust_store.load_or_generate_sync(made)

        class Killed(Exception):
            pass

        def kill(done_action, done_part):
            if (done_action, done_part) == (action, part):
                raise Killed()

        if action == ACTION_SWITCH:
            FileRenewalStore(None, trust_store).step_sync(_now(), settings)
            later = _now() + timedelta(seconds=GRACE_SECONDS + 1)
        else:
            later = _now()
        self.assertRaises(
            Killed,
            FileRenewalStore(None, trust_store, _after_write=kill).step_sync,
            later,
            settings,
        )
        protocol = spawn_twistd(self, self._arguments())
        yield protocol.wait_ready()
        yield protocol.when_output(b"switched the CA issuer to the renewed one")
        bundle = trust_store.load_sync(_now())
        self.assertEqual(len(bundle.anchors), 2)
        self.assertEqual(bundle.active_anchors, (bundle.anchors[1],))
        self.assertEqual(
            sorted(os.listdir(self.credentials)), ["ca.crt", "issuer.crt", "issuer.key"]
        )

    def _trust_store(self):
        return FileTrustStore(
            ImmediateReactor(),
            os.path.join(self.credentials, "ca.crt"),
            os.path.join(self.credentials, "issuer.crt"),
            os.path.join(self.credentials, "issuer.key"),
            "localhost",
            "default",
            timedelta(seconds=SKEW_SECONDS),
            ca_ttl=timedelta(seconds=CA_TTL_SECONDS),
        )

    def _files(self):
        return {
            name: open(os.path.join(self.credentials, name), "rb").read()
            for name in sorted(os.listdir(self.credentials))
        }

    @inlineCallbacks
    def test_sigkill_after_append(self):
        """
        SIGKILLed right after it appended a new root, sentry_tx restarts, resumes the
        pending renewal and switches.
        """
        import signal

        trust_store = self._trust_store()
        trust_store.load_or_generate_sync(
            _now() - timedelta(seconds=CA_TTL_SECONDS * THRESHOLD - 3)
        )
        protocol = spawn_twistd(self, self._arguments())
        yield protocol.wait_ready()
        yield protocol.when_output(b"renewed the CA: appended a new root")
        os.kill(protocol.transport.pid, signal.SIGKILL)
        yield protocol.ended
        pending = FileRenewalStore(None, trust_store).read_sync(_now())
        self.assertTrue(pending.pending)
        protocol = spawn_twistd(self, self._arguments())
        yield protocol.wait_ready()
        yield protocol.when_output(b"a CA renewal is pending")
        yield protocol.when_output(b"switched the CA issuer to the renewed one")
        bundle = trust_store.load_sync(_now())
        self.assertEqual(bundle.issuer, pending.next_issuer)
        self.assertEqual(
            sorted(os.listdir(self.credentials)), ["ca.crt", "issuer.crt", "issuer.key"]
        )

    @inlineCallbacks
    def test_variable_turns_renewal_off(self):
        """
        DAPR_SENTRY_CA_RENEWAL_ENABLED=false: a generated bundle past its threshold is
        not written, and the start-up line says why.
        """
        self._trust_store().load_or_generate_sync(
            _now() - timedelta(seconds=CA_TTL_SECONDS * THRESHOLD + 5)
        )
        before = self._files()
        protocol = spawn_twistd(
            self, self._arguments(), env={"DAPR_SENTRY_CA_RENEWAL_ENABLED": "false"}
        )
        yield protocol.wait_ready()
        yield protocol.when_output(
            b"automatic CA renewal is off: --ca-renewal-enabled is false"
        )
        yield _later(2.0)
        self.assertEqual(self._files(), before)

    @inlineCallbacks
    def test_operator_bundle_not_written(self):
        """
        An operator's bundle past its threshold: nothing written, renewal off saying
        why, and the expiry warnings as before.
        """
        from sentry_tx.testing.certificates import make_chain

        os.makedirs(self.credentials)
        now = _now()
        make_chain(
            intermediates=1,
            trust_domain="localhost",
            not_before=now - timedelta(days=300),
            not_after=now + timedelta(days=20),
        ).write(self.credentials)
        before = self._files()
        protocol = spawn_twistd(self, self._arguments())
        yield protocol.wait_ready()
        yield protocol.when_output(
            b"automatic CA renewal is off: the bundle is not one"
        )
        yield protocol.when_output(b"certificate expires in 19 days")
        yield _later(2.0)
        self.assertEqual(self._files(), before)

    def test_kill_after_next_pair(self):
        """
        Killed after the next pair was written, before the append: the restart appends,
        then switches.
        """
        return self._restart_after_kill(ACTION_RENEW, "next_crt")

    def test_kill_after_append(self):
        """
        Killed after the append: the restart resumes the pending renewal and switches.
        """
        return self._restart_after_kill(ACTION_RENEW, "anchors")

    def test_kill_mid_switch(self):
        """
        Killed between issuer.crt and issuer.key: the restart serves the matching pair
        and finishes the switch.
        """
        return self._restart_after_kill(ACTION_SWITCH, "issuer")


def _later(seconds):
    from twisted.internet import reactor
    from twisted.internet.task import deferLater

    return deferLater(reactor, seconds, lambda: None)


class KubernetesRenewalProcessTests(TestCase):
    """
    Two kubernetes-mode replicas against the fake API server renew once.
    """

    timeout = RUN_DEADLINE_SECONDS + 60

    @inlineCallbacks
    def test_two_replicas_renew_once_and_both_switch(self):
        """
        Two replicas: one renewal, one new root in the Secret and the ConfigMap, and
        both replicas sign with the new issuer after the switch, with no failed call.
        """
        from sentry_tx.testing.certificates import TEST_NAMESPACE, TEST_TRUST_DOMAIN
        from sentry_tx.testing.kubeconfig import write_kubeconfig
        from sentry_tx.testing.kubernetes import start_fake_kubernetes
        from sentry_tx.testing.twistd import LOOPBACK_FREE_PORTS

        fake = start_fake_kubernetes(self)
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        kubeconfig = write_kubeconfig(
            os.path.join(directory, "kubeconfig"), fake.kubeconfig()
        )
        fake.add_configuration(
            TEST_NAMESPACE,
            "daprsystem",
            {
                "mtls": {
                    "workloadCertTTL": "20s",
                    "allowedClockSkew": f"{SKEW_SECONDS}s",
                }
            },
        )
        fake.add_pod("apps", "myapp-0", "myapp", {"dapr.io/app-id": "myapp"})
        token = fake.issue_token("apps", "myapp", "myapp-0")
        arguments = [
            "--mode", "kubernetes", "--kubeconfig", kubeconfig,
            "--trust-domain", TEST_TRUST_DOMAIN, "--workers", "1",
        ] + LOOPBACK_FREE_PORTS + RENEWAL_FLAGS  # fmt: skip
        replicas = []
        for _ in range(2):
            protocol = spawn_twistd(self, arguments, env={"NAMESPACE": TEST_NAMESPACE})
            ports = yield protocol.wait_ready()
            replicas.append((protocol, ports))
        _, csr = make_csr()
        request = sentry_pb2.SignCertificateRequest(
            id="myapp",
            namespace="apps",
            token=token,
            certificate_signing_request=csr,
            token_validator=sentry_pb2.SignCertificateRequest.KUBERNETES,
        )
        issuers = [[], []]
        failures = []
        anchor_counts = set()

        def sign(index, anchors_pem):
            roots = x509.load_pem_x509_certificates(anchors_pem)
            anchor_counts.add(len(roots))
            client = GrpcTestClient(
                f"127.0.0.1:{replicas[index][1]['grpc']}",
                anchors_pem,
                server_name=f"dapr-sentry.{TEST_NAMESPACE}.svc",
            )
            try:
                reply = client.sign(request, timeout=5.0)
                chain = x509.load_pem_x509_certificates(reply.workload_certificate)
                PolicyBuilder().store(Store(roots)).time(_now()).build_client_verifier().verify(
                    chain[0], chain[1:]
                )
            except Exception as e:
                failures.append(repr(e))
                return
            finally:
                client.close()
            if chain[1] not in issuers[index]:
                issuers[index].append(chain[1])

        deadline = time.monotonic() + RUN_DEADLINE_SECONDS
        while time.monotonic() < deadline and not all(len(i) >= 2 for i in issuers):
            for index in range(2):
                # The ConfigMap (what the injector gives new pods) is read
                # on the reactor before each call; the call runs in a thread.
                config_map = fake.get_object(
                    "configmaps", TEST_NAMESPACE, "dapr-trust-bundle"
                )
                yield deferToThread(sign, index, config_map["data"]["ca.crt"].encode())
            yield _later(0.5)
        self.assertEqual(failures, [])
        self.assertEqual([len(i) for i in issuers], [2, 2])
        self.assertEqual(issuers[0][1], issuers[1][1])
        renewals = sum(
            protocol.output.count(b"renewed the CA: appended a new root")
            for protocol, _ in replicas
        )
        self.assertEqual(renewals, 1)
        secret = fake.secret_data(TEST_NAMESPACE, "dapr-trust-bundle")
        self.assertEqual(len(x509.load_pem_x509_certificates(secret["ca.crt"])), 2)
        self.assertEqual(sorted(secret), ["ca.crt", "issuer.crt", "issuer.key"])
        self.assertIn(2, anchor_counts)
