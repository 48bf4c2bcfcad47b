"""
End-to-end: C{twistd -n sentry --mode kubernetes} as a child process,
talking to the fake Kubernetes API server that runs in the test process.
"""

import os
import signal

import grpc
from cryptography import x509
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from sentry_tx._proto import sentry_pb2
from sentry_tx.testing.certificates import TEST_NAMESPACE, TEST_TRUST_DOMAIN, make_csr
from sentry_tx.testing.container_images import (
    APP_IMAGE_ID,
    DAPRD_IMAGE_ID,
    HELPER_IMAGE_ID,
    images_list,
    sidecar_pod,
)
from sentry_tx.testing.grpc_client import GrpcTestClient
from sentry_tx.testing.kubeconfig import write_kubeconfig
from sentry_tx.testing.kubernetes import start_fake_kubernetes
from sentry_tx.testing.manifests import ENTRYPOINT
from sentry_tx.testing.twistd import LOOPBACK_FREE_PORTS, spawn_twistd

APPS = "apps"
TRUST_BUNDLE = "dapr-trust-bundle"
KUBERNETES = sentry_pb2.SignCertificateRequest.KUBERNETES
INSECURE = sentry_pb2.SignCertificateRequest.INSECURE


class KubernetesModeProcessTests(TestCase):
    """
    kubernetes mode as an operator runs it, against a fake API server.
    """

    timeout = 60

    def setUp(self):
        self.fake = start_fake_kubernetes(self)
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        self.kubeconfig = write_kubeconfig(
            os.path.join(directory, "kubeconfig"), self.fake.kubeconfig()
        )

    def _spawn(self):
        return spawn_twistd(
            self,
            [
                "--mode",
                "kubernetes",
                "--kubeconfig",
                self.kubeconfig,
                "--trust-domain",
                TEST_TRUST_DOMAIN,
            ]
            + LOOPBACK_FREE_PORTS,
            env={"NAMESPACE": TEST_NAMESPACE},
        )

    @inlineCallbacks
    def test_signs_for_a_pod(self):
        """
        twistd reads the Configuration resource, generates the bundle into
        the Secret and ConfigMap, becomes healthy, signs a certificate for a
        pod whose token the API server vouches for (with the pod's container
        images stamped in), refuses a bad token and
        INSECURE, runs the image's ENTRYPOINT arguments, and exits on
        SIGTERM.
        """
        import treq

        self.fake.add_configuration(
            TEST_NAMESPACE, "daprsystem", {"mtls": {"workloadCertTTL": "1h"}}
        )
        self.fake.put_object(
            "pods",
            APPS,
            "myapp-0",
            sidecar_pod(
                service_account="myapp", annotations={"dapr.io/app-id": "myapp"}
            ),
        )
        token = self.fake.issue_token(APPS, "myapp", "myapp-0")

        protocol = self._spawn()
        ports = yield protocol.wait_ready()
        response = yield treq.get(
            f"http://127.0.0.1:{ports['healthz']}/healthz", persistent=False
        )
        self.assertEqual(response.code, 200)
        yield response.content()

        anchors_pem = self.fake.secret_data(TEST_NAMESPACE, TRUST_BUNDLE)["ca.crt"]
        config_map = self.fake.get_object("configmaps", TEST_NAMESPACE, TRUST_BUNDLE)
        self.assertEqual(config_map["data"]["ca.crt"], anchors_pem.decode())

        client = GrpcTestClient(
            f"127.0.0.1:{ports['grpc']}",
            anchors_pem,
            server_name=f"dapr-sentry.{TEST_NAMESPACE}.svc",
        )
        self.addCleanup(client.close)
        _, csr = make_csr()

        def request(**fields):
            values = {
                "id": "myapp",
                "namespace": APPS,
                "token": token,
                "certificate_signing_request": csr,
            }
            values.update(fields)
            return sentry_pb2.SignCertificateRequest(**values)

        for validator in (KUBERNETES, sentry_pb2.SignCertificateRequest.UNKNOWN):
            reply = yield deferToThread(client.sign, request(token_validator=validator))
            leaf = x509.load_pem_x509_certificates(reply.workload_certificate)[0]
            self.assertEqual(
                leaf.extensions.get_extension_for_class(
                    x509.SubjectAlternativeName
                ).value.get_values_for_type(x509.UniformResourceIdentifier),
                ["spiffe://public/ns/apps/myapp"],
            )
            lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
            self.assertLessEqual(lifetime.total_seconds(), 3600 + 15 * 60)
            self.assertEqual(
                [
                    (entry["role"], entry["containerName"], entry["digest"])
                    for entry in images_list(leaf)
                ],
                [
                    ("daprd", "daprd", DAPRD_IMAGE_ID.split("@")[1]),
                    ("app", "cart", APP_IMAGE_ID.split("@")[1]),
                    ("app", "helper", HELPER_IMAGE_ID),
                ],
            )

        error = yield self.assertFailure(
            deferToThread(client.sign, request(token="not-a-token")), grpc.RpcError
        )
        self.assertEqual(error.code(), grpc.StatusCode.PERMISSION_DENIED)
        self.assertIn("token review failed", error.details())

        error = yield self.assertFailure(
            deferToThread(client.sign, request(token_validator=INSECURE)), grpc.RpcError
        )
        self.assertEqual(error.code(), grpc.StatusCode.INVALID_ARGUMENT)
        self.assertEqual(error.details(), "the requested validator is not enabled")

        self._assert_entrypoint(protocol.transport.pid)
        os.kill(protocol.transport.pid, signal.SIGTERM)
        reason = yield protocol.ended
        self.assertIn(
            (reason.exitCode, reason.signal), [(0, None), (None, signal.SIGTERM)]
        )
        self.assertNotIn(b"PRIVATE KEY", protocol.output)
        self.assertNotIn(token.encode(), protocol.output)

    @inlineCallbacks
    def test_jwks_validator_from_the_configuration(self):
        """
        A Configuration resource naming a jwks token validator adds JWKS
        beside KUBERNETES: on fresh connections (reaching both serving
        processes) a token signed by a key of the set gets a certificate
        for its subject, and KUBERNETES stays the default for UNKNOWN.
        """
        import json
        import time

        import jwt as pyjwt

        from sentry_tx.testing.http2 import sign_on_new_connection
        from sentry_tx.testing.jwk import jwk_member, rsa_key

        key_set = json.dumps({"keys": [jwk_member(rsa_key(), kid="k1")]})
        self.fake.add_configuration(
            TEST_NAMESPACE,
            "daprsystem",
            {
                "mtls": {
                    "tokenValidators": [
                        {"name": "jwks", "options": {"source": key_set}}
                    ]
                }
            },
        )
        protocol = spawn_twistd(
            self,
            ["--mode", "kubernetes", "--kubeconfig", self.kubeconfig,
             "--trust-domain", TEST_TRUST_DOMAIN, "--workers", "2"]
            + LOOPBACK_FREE_PORTS,
            env={"NAMESPACE": TEST_NAMESPACE},
        )  # fmt: skip
        ports = yield protocol.wait_ready()
        yield protocol.when_output(b"in 2 serving processes")
        anchors_pem = self.fake.secret_data(TEST_NAMESPACE, TRUST_BUNDLE)["ca.crt"]
        token = pyjwt.encode(
            {
                "sub": f"spiffe://public/ns/{APPS}/myapp",
                "aud": f"spiffe://{TEST_TRUST_DOMAIN}/ns/{TEST_NAMESPACE}/dapr-sentry",
                "iat": int(time.time()),
                "exp": int(time.time()) + 600,
            },
            rsa_key(),
            algorithm="RS256",
            headers={"kid": "k1"},
        )
        served_by = set()
        for _ in range(32):
            certificate, reply = yield deferToThread(
                sign_on_new_connection,
                "127.0.0.1",
                ports["grpc"],
                anchors_pem,
                f"dapr-sentry.{TEST_NAMESPACE}.svc",
                sentry_pb2.SignCertificateRequest(
                    id="myapp",
                    namespace=APPS,
                    token=token,
                    token_validator=sentry_pb2.SignCertificateRequest.JWKS,
                    certificate_signing_request=make_csr()[1],
                ),
            )
            self.assertIsNotNone(reply)
            leaf = x509.load_pem_x509_certificates(reply.workload_certificate)[0]
            self.assertEqual(
                leaf.extensions.get_extension_for_class(
                    x509.SubjectAlternativeName
                ).value.get_values_for_type(x509.UniformResourceIdentifier),
                [f"spiffe://public/ns/{APPS}/myapp"],
            )
            served_by.add(certificate)
            if len(served_by) == 2:
                break
        self.assertEqual(len(served_by), 2, "one process answered 32 connections")
        client = GrpcTestClient(
            f"127.0.0.1:{ports['grpc']}",
            anchors_pem,
            server_name=f"dapr-sentry.{TEST_NAMESPACE}.svc",
        )
        self.addCleanup(client.close)
        # UNKNOWN is KUBERNETES, which refuses a token the API does not know.
        error = yield self.assertFailure(
            deferToThread(
                client.sign,
                sentry_pb2.SignCertificateRequest(
                    id="myapp",
                    namespace=APPS,
                    token=token,
                    certificate_signing_request=make_csr()[1],
                ),
            ),
            grpc.RpcError,
        )
        self.assertEqual(error.code(), grpc.StatusCode.PERMISSION_DENIED)
        self.assertIn("token review failed", error.details())

    def _assert_entrypoint(self, pid):
        """
        The process runs the image's ENTRYPOINT arguments (read from /proc:
        sentry_tx, like Twisted's INotify it relies on, is Linux only).
        """
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [part.decode() for part in f.read().split(b"\0") if part]
        start = argv.index(ENTRYPOINT[1])
        self.assertEqual(argv[start : start + len(ENTRYPOINT) - 1], ENTRYPOINT[1:])

    @inlineCallbacks
    def test_missing_configuration(self):
        """
        A Configuration resource that does not exist makes twistd exit 1,
        naming it.
        """
        protocol = self._spawn()
        reason = yield protocol.ended
        self.assertEqual(reason.exitCode, 1)
        self.assertIn(
            f"Configuration {TEST_NAMESPACE}/daprsystem not found".encode(),
            protocol.output,
        )
        self.assertIsNone(self.fake.get_object("secrets", TEST_NAMESPACE, TRUST_BUNDLE))

    @inlineCallbacks
    def test_partial_secret(self):
        """
        A Secret holding only part of a bundle makes twistd exit 1, naming
        the missing keys, and is left as it was.
        """
        self.fake.add_configuration(TEST_NAMESPACE, "daprsystem")
        self.fake.add_secret(TEST_NAMESPACE, TRUST_BUNDLE, {"ca.crt": b"operator's"})
        protocol = self._spawn()
        reason = yield protocol.ended
        self.assertEqual(reason.exitCode, 1)
        self.assertIn(b"key 'issuer.crt'", protocol.output)
        self.assertEqual(
            self.fake.secret_data(TEST_NAMESPACE, TRUST_BUNDLE),
            {"ca.crt": b"operator's"},
        )
