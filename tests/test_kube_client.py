"""
Tests for L{sentry_tx.kube.client} and L{sentry_tx.kube.errors}: the API
client against the fake API server, and how its failures read.
"""

import base64
import os

from twisted.internet import defer, reactor
from twisted.logger import formatEvent
from twisted.trial.unittest import SynchronousTestCase, TestCase

from sentry_tx.errors import ConfigError
from sentry_tx.kube.client import KubernetesClient, KubernetesClientService
from sentry_tx.kube.errors import (
    KubernetesAPIError,
    KubernetesUnavailableError,
    api_error,
)
from sentry_tx.kube.incluster import in_cluster_connection
from sentry_tx.kube.kubeconfig import kubeconfig_connection
from sentry_tx.kube.paths import core_path
from sentry_tx.testing.certificates import TEST_NAMESPACE
from sentry_tx.testing.files import write_file
from sentry_tx.testing.kubeconfig import write_kubeconfig
from sentry_tx.testing.kubernetes import (
    FakeKubernetesAPI,
    kubernetes_client_for,
    start_fake_kubernetes,
)
from sentry_tx.testing.kubernetes_tokens import FAKE_API_TOKEN
from sentry_tx.testing.logs import capture_logs

SECRET_PATH = core_path(TEST_NAMESPACE, "secrets", "s")


class APIErrorTests(SynchronousTestCase):
    """
    L{KubernetesAPIError} carries the status, reason and message.
    """

    def test_status_body(self):
        """
        A C{Status} body gives the reason and message.
        """
        error = api_error(
            403,
            b"Forbidden",
            b'{"kind": "Status", "status": "Failure", "reason": "Forbidden",'
            b' "message": "no", "code": 403}',
            "GET",
            "/api/v1/x",
        )
        self.assertEqual(
            (error.status, error.reason, error.message), (403, "Forbidden", "no")
        )
        self.assertEqual(str(error), "GET /api/v1/x: HTTP 403 Forbidden: no")
        self.assertFalse(error.is_transient)

    def test_other_body(self):
        """
        Another body gives the HTTP phrase and an excerpt of the body.
        """
        error = api_error(
            502, b"Bad Gateway", b"<html>upstream\n down</html>", "GET", "/x"
        )
        self.assertEqual(error.reason, "Bad Gateway")
        self.assertEqual(error.message, "<html>upstream down</html>")
        self.assertTrue(error.is_transient)


class ClientTests(TestCase):
    """
    L{KubernetesClient} against the fake API server over real TLS.
    """

    timeout = 30

    def setUp(self):
        self.fake = start_fake_kubernetes(self)
        self.fake.add_secret(TEST_NAMESPACE, "s", {"ca.crt": b"x"})

    def _client(self, connection_loader, **options):
        client = KubernetesClient(reactor, connection_loader, **options)
        self.addCleanup(client.close)
        return client

    def _kubeconfig(self, user=None, inline=True):
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        return write_kubeconfig(
            os.path.join(directory, "kubeconfig"),
            self.fake.kubeconfig(user=user, inline=inline, directory=directory),
        )

    @defer.inlineCallbacks
    def test_get_with_token(self):
        """
        A GET with a kubeconfig token answers the stored object.
        """
        client = kubernetes_client_for(self, self.fake)
        secret = yield client.get(SECRET_PATH)
        self.assertEqual(secret["kind"], "Secret")
        self.assertEqual(secret["data"], {"ca.crt": base64.b64encode(b"x").decode()})

    @defer.inlineCallbacks
    def test_ca_file(self):
        """
        A kubeconfig naming a CA file verifies the server with it.
        """
        path = self._kubeconfig(inline=False)
        client = self._client(lambda: kubeconfig_connection(path, reactor))
        secret = yield client.get(SECRET_PATH)
        self.assertEqual(secret["metadata"]["name"], "s")

    @defer.inlineCallbacks
    def test_in_cluster(self):
        """
        The in-cluster settings (environment and files) reach the server.
        """
        directory = os.path.abspath(self.mktemp())
        environ = self.fake.write_service_account(directory)
        client = self._client(
            lambda: in_cluster_connection(environ, reactor, directory)
        )
        secret = yield client.get(SECRET_PATH)
        self.assertEqual(secret["metadata"]["name"], "s")

    @defer.inlineCallbacks
    def test_client_certificate(self):
        """
        A client certificate authenticates without a token.
        """
        certificate_pem, key_pem = self.fake.issue_client_certificate()
        self.fake.api_tokens.clear()
        client = kubernetes_client_for(
            self,
            self.fake,
            user={
                "client-certificate-data": certificate_pem,
                "client-key-data": key_pem,
            },
        )
        secret = yield client.get(SECRET_PATH)
        self.assertEqual(secret["metadata"]["name"], "s")

    @defer.inlineCallbacks
    def test_client_certificate_files(self):
        """
        Client certificate and key files authenticate too.
        """
        certificate_pem, key_pem = self.fake.issue_client_certificate("files")
        self.fake.api_tokens.clear()
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        write_file(os.path.join(directory, "c.crt"), certificate_pem)
        write_file(os.path.join(directory, "c.key"), key_pem)
        client = kubernetes_client_for(
            self,
            self.fake,
            user={
                "client-certificate": os.path.join(directory, "c.crt"),
                "client-key": os.path.join(directory, "c.key"),
            },
        )
        secret = yield client.get(SECRET_PATH)
        self.assertEqual(secret["metadata"]["name"], "s")

    @defer.inlineCallbacks
    def test_kubectl_proxy(self):
        """
        A plain http:// loopback server without credentials (kubectl proxy)
        is used.
        """
        proxy = start_fake_kubernetes(self, tls=False, api_tokens=())
        proxy.add_secret(TEST_NAMESPACE, "s", {})
        client = kubernetes_client_for(self, proxy, user={})
        secret = yield client.get(SECRET_PATH)
        self.assertEqual(secret["metadata"]["name"], "s")

    @defer.inlineCallbacks
    def test_wrong_token(self):
        """
        A token the server does not accept is a 401 with the Status reason.
        """
        client = kubernetes_client_for(self, self.fake, user={"token": "wrong"})
        error = yield self.assertFailure(client.get(SECRET_PATH), KubernetesAPIError)
        self.assertEqual((error.status, error.reason), (401, "Unauthorized"))
        self.assertIn("HTTP 401 Unauthorized", str(error))
        self.assertNotIn("wrong", str(error))

    @defer.inlineCallbacks
    def test_not_found(self):
        """
        A missing object is a 404 NotFound with Kubernetes' message.
        """
        client = kubernetes_client_for(self, self.fake)
        error = yield self.assertFailure(
            client.get(core_path(TEST_NAMESPACE, "secrets", "missing")),
            KubernetesAPIError,
        )
        self.assertTrue(error.is_not_found)
        self.assertEqual(error.reason, "NotFound")
        self.assertEqual(error.message, 'secrets "missing" not found')
        self.assertEqual(
            str(error),
            "GET /api/v1/namespaces/dapr-system/secrets/missing: HTTP 404 NotFound:"
            ' secrets "missing" not found',
        )

    @defer.inlineCallbacks
    def test_stale_update(self):
        """
        A PUT with a stale resourceVersion is a 409 Conflict.
        """
        client = kubernetes_client_for(self, self.fake)
        secret = yield client.get(SECRET_PATH)
        yield client.replace(SECRET_PATH, secret)
        error = yield self.assertFailure(
            client.replace(SECRET_PATH, secret), KubernetesAPIError
        )
        self.assertTrue(error.is_conflict)
        self.assertEqual(error.reason, "Conflict")
        self.assertIn("the object has been modified", error.message)

    @defer.inlineCallbacks
    def test_forbidden(self):
        """
        A call RBAC refuses is a 403 Forbidden.
        """
        self.fake.forbidden.add(("GET", "secrets"))
        client = kubernetes_client_for(self, self.fake)
        error = yield self.assertFailure(client.get(SECRET_PATH), KubernetesAPIError)
        self.assertEqual((error.status, error.reason), (403, "Forbidden"))

    @defer.inlineCallbacks
    def test_server_error(self):
        """
        A 503 is a transient L{KubernetesAPIError}.
        """
        self.fake.fail_with(503, "ServiceUnavailable", "etcd is down")
        client = kubernetes_client_for(self, self.fake)
        error = yield self.assertFailure(client.get(SECRET_PATH), KubernetesAPIError)
        self.assertTrue(error.is_transient)
        self.assertIn("HTTP 503 ServiceUnavailable: etcd is down", str(error))

    @defer.inlineCallbacks
    def test_timeout(self):
        """
        A server that does not answer makes the call fail after its deadline
        with L{KubernetesUnavailableError}.
        """
        self.fake.hang()
        client = kubernetes_client_for(self, self.fake, request_timeout_seconds=0.2)
        error = yield self.assertFailure(
            client.get(SECRET_PATH), KubernetesUnavailableError
        )
        self.assertIn("no answer within 0.2 s", str(error))

    @defer.inlineCallbacks
    def test_connection_refused(self):
        """
        A server that is not listening is L{KubernetesUnavailableError}.
        """
        client = kubernetes_client_for(self, self.fake)
        yield self.fake.stop()
        error = yield self.assertFailure(
            client.get(SECRET_PATH), KubernetesUnavailableError
        )
        self.assertIn("refused", str(error))

    @defer.inlineCallbacks
    def test_untrusted_server(self):
        """
        A server whose certificate the CA does not vouch for is refused.
        """
        other = FakeKubernetesAPI(reactor)
        document = self.fake.kubeconfig()
        document["clusters"][0]["cluster"]["certificate-authority-data"] = (
            base64.b64encode(other.server_certificate_pem).decode()
        )
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        path = write_kubeconfig(os.path.join(directory, "kubeconfig"), document)
        client = self._client(lambda: kubeconfig_connection(path, reactor))
        error = yield self.assertFailure(
            client.get(SECRET_PATH), KubernetesUnavailableError
        )
        self.assertIn("certificate verify failed", str(error))

    @defer.inlineCallbacks
    def test_response_too_large(self):
        """
        An answer larger than the limit is refused.
        """
        client = kubernetes_client_for(self, self.fake, max_response_bytes=64)
        error = yield self.assertFailure(
            client.get(SECRET_PATH), KubernetesUnavailableError
        )
        self.assertIn("larger than 64 bytes", str(error))

    @defer.inlineCallbacks
    def test_response_cap_per_call(self):
        """
        A call may read a larger answer than the client's cap (a list page)
        when it says so; the next call has the client's cap again.
        """
        client = kubernetes_client_for(self, self.fake, max_response_bytes=64)
        secret = yield client.get(SECRET_PATH, max_response_bytes=64 * 1024)
        self.assertEqual(secret["metadata"]["name"], "s")
        yield self.assertFailure(client.get(SECRET_PATH), KubernetesUnavailableError)

    @defer.inlineCallbacks
    def test_token_file_reread(self):
        """
        A rotated token file is used for the next call once the check
        interval has passed.
        """
        directory = os.path.abspath(self.mktemp())
        environ = self.fake.write_service_account(directory, token="first")
        self.fake.api_tokens = {"first"}
        client = self._client(
            lambda: in_cluster_connection(environ, reactor, directory, 0)
        )
        yield client.get(SECRET_PATH)
        self.fake.rotate_service_account_token(directory, "second")
        secret = yield client.get(SECRET_PATH)
        self.assertEqual(secret["metadata"]["name"], "s")

    @defer.inlineCallbacks
    def test_token_reread_after_401(self):
        """
        A 401 makes the client re-read a rotated token file at once and try
        again, even within the check interval.
        """
        directory = os.path.abspath(self.mktemp())
        environ = self.fake.write_service_account(directory, token="first")
        self.fake.api_tokens = {"first"}
        client = self._client(
            lambda: in_cluster_connection(environ, reactor, directory, 3600)
        )
        yield client.get(SECRET_PATH)
        self.fake.rotate_service_account_token(directory, "second")
        secret = yield client.get(SECRET_PATH)
        self.assertEqual(secret["metadata"]["name"], "s")
        self.assertEqual(len(self.fake.requests), 3)

    @defer.inlineCallbacks
    def test_connections_reused(self):
        """
        Sequential calls reuse one pooled connection.
        """
        client = kubernetes_client_for(self, self.fake)
        for _ in range(5):
            yield client.get(SECRET_PATH)
        self.assertEqual(len(self.fake._channels), 1)

    @defer.inlineCallbacks
    def test_concurrent_calls(self):
        """
        Many concurrent calls all succeed.
        """
        client = kubernetes_client_for(self, self.fake)
        results = yield defer.gatherResults(
            [client.get(SECRET_PATH) for _ in range(50)]
        )
        self.assertEqual({secret["metadata"]["name"] for secret in results}, {"s"})

    @defer.inlineCallbacks
    def test_close_cancels_calls_in_flight(self):
        """
        Closing the client fails the calls in flight and refuses new ones.
        """
        self.fake.hang()
        client = kubernetes_client_for(self, self.fake)
        pending = client.get(SECRET_PATH)
        yield client.close()
        yield self.assertFailure(pending, KubernetesUnavailableError)
        error = yield self.assertFailure(
            client.get(SECRET_PATH), KubernetesUnavailableError
        )
        self.assertIn("closed", str(error))

    @defer.inlineCallbacks
    def test_stop_lets_calls_finish(self):
        """
        Stopping the client service lets calls in flight, and the calls they
        lead to, finish before the connections close.
        """
        self.fake.pod_latency_seconds = 0.05
        self.fake.add_pod(TEST_NAMESPACE, "p")
        client = kubernetes_client_for(self, self.fake)
        service = KubernetesClientService(client)
        service.startService()
        pod_path = core_path(TEST_NAMESPACE, "pods", "p")
        results = []
        pending = client.get(pod_path)
        pending.addCallback(lambda _: client.get(pod_path))
        pending.addCallback(results.append)
        yield service.stopService()
        self.assertEqual(results[0]["metadata"]["name"], "p")
        error = yield self.assertFailure(
            client.get(pod_path), KubernetesUnavailableError
        )
        self.assertIn("closed", str(error))

    @defer.inlineCallbacks
    def test_close_grace_expires(self):
        """
        Calls still in flight when the grace period ends are cancelled.
        """
        self.fake.hang()
        client = kubernetes_client_for(self, self.fake)
        pending = client.get(SECRET_PATH)
        yield client.close(grace_seconds=0.05)
        error = yield self.assertFailure(pending, KubernetesUnavailableError)
        self.assertIn("the client was closed", str(error))

    @defer.inlineCallbacks
    def test_bad_settings_fail_calls(self):
        """
        Connection settings that cannot be read fail every call with
        L{ConfigError}.
        """
        client = self._client(
            lambda: kubeconfig_connection("/nonexistent/kubeconfig", reactor)
        )
        error = yield self.assertFailure(client.get(SECRET_PATH), ConfigError)
        self.assertEqual(error.field, "--kubeconfig")

    @defer.inlineCallbacks
    def test_connections_opened_quietly(self):
        """
        A new connection to the API server logs no "Starting factory" line
        (one per connection would flood the log under load).
        """
        events = capture_logs(self)
        client = kubernetes_client_for(self, self.fake)
        yield client.get(SECRET_PATH)
        self.assertTrue(events)
        for event in events:
            self.assertNotIn("Starting factory", formatEvent(event))

    @defer.inlineCallbacks
    def test_token_never_logged(self):
        """
        No log event of a call, failed or not, carries the bearer token, nor
        does the error a failed call ends with.
        """
        events = capture_logs(self)
        client = kubernetes_client_for(self, self.fake)
        yield client.get(SECRET_PATH)
        self.fake.fail_with(500, "InternalError", "boom")
        error = yield self.assertFailure(client.get(SECRET_PATH), KubernetesAPIError)
        self.assertIn("boom", str(error))
        self.assertNotIn(FAKE_API_TOKEN, str(error))
        self.assertNotIn(FAKE_API_TOKEN, repr(error))
        # The connection is logged when first made: there is something to check.
        self.assertTrue(events)
        for event in events:
            self.assertNotIn(FAKE_API_TOKEN, formatEvent(event))
            self.assertNotIn(FAKE_API_TOKEN, repr(event))
