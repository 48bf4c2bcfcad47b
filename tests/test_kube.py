"""
Tests for L{sentry_tx.kube}: connection settings (in-cluster, kubeconfig),
the API client against the fake API server, the Configuration source and
the parts of kubernetes mode.
"""

import base64
import os

from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.logger import formatEvent
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from sentry_tx.config import MODE_KUBERNETES, SentryConfig
from sentry_tx.errors import ConfigError
from sentry_tx.interfaces import IConfigurationSource
from sentry_tx.kube.client import KubernetesClient, KubernetesClientService
from sentry_tx.kube.configuration import KubernetesConfigurationSource
from sentry_tx.kube.connection import StaticToken, TokenFile
from sentry_tx.kube.errors import (
    KubernetesAPIError,
    KubernetesUnavailableError,
    api_error,
)
from sentry_tx.kube.incluster import in_cluster_connection
from sentry_tx.kube.kubeconfig import (
    DEFAULT_KUBECONFIG,
    cluster_connection,
    kubeconfig_connection,
)
from sentry_tx.kube.paths import configuration_path, core_path
from sentry_tx.testing.certificates import make_chain, make_private_key, private_key_pem
from sentry_tx.testing.kubeconfig import kubeconfig_document, write_kubeconfig
from sentry_tx.testing.kubernetes import (
    FakeKubernetesAPI,
    kubernetes_client_for,
    start_fake_kubernetes,
)
from sentry_tx.testing.kubernetes_tokens import FAKE_API_TOKEN
from sentry_tx.testing.logs import capture_logs


NAMESPACE = "dapr-system"
SECRET_PATH = core_path(NAMESPACE, "secrets", "s")


def _write(path, data):
    with open(path, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)
    return path


class TokenFileTests(SynchronousTestCase):
    """
    L{TokenFile} re-reads a rotating token file.
    """

    def setUp(self):
        self.clock = Clock()
        directory = self.mktemp()
        os.makedirs(directory)
        self.path = _write(os.path.join(directory, "token"), "first\n")

    def _rotate(self, token):
        # A new file renamed into place, as the kubelet's symlink swap does.
        _write(self.path + ".new", token)
        os.replace(self.path + ".new", self.path)

    def test_reads_stripped_token(self):
        """
        The token is the file's content without surrounding whitespace.
        """
        self.assertEqual(TokenFile(self.path, self.clock, 10).current(), "first")

    def test_rereads_after_interval(self):
        """
        A changed file is read again once the check interval has passed.
        """
        token = TokenFile(self.path, self.clock, 10)
        self._rotate("second")
        self.clock.advance(10)
        self.assertEqual(token.current(), "second")

    def test_not_before_interval(self):
        """
        Within the check interval the file is not looked at.
        """
        token = TokenFile(self.path, self.clock, 10)
        self._rotate("second")
        self.clock.advance(9)
        self.assertEqual(token.current(), "first")

    def test_refresh_reads_at_once(self):
        """
        C{refresh} reads the file at once and says whether the token changed.
        """
        token = TokenFile(self.path, self.clock, 10)
        self.assertFalse(token.refresh())
        self._rotate("second")
        self.assertTrue(token.refresh())
        self.assertEqual(token.current(), "second")

    def test_keeps_token_when_file_vanishes(self):
        """
        A file that disappears later leaves the last token in use, with a
        warning that does not quote the token.
        """
        events = capture_logs(self)
        token = TokenFile(self.path, self.clock, 0)
        os.unlink(self.path)
        self.assertEqual(token.current(), "first")
        messages = [formatEvent(event) for event in events]
        self.assertTrue(any("token file" in message for message in messages))
        self.assertFalse(any("first" in message for message in messages))

    def test_empty_file_refused_at_start(self):
        """
        An empty token file is a L{ConfigError} when first read.
        """
        _write(self.path, "\n")
        error = self.assertRaises(ConfigError, TokenFile, self.path, self.clock)
        self.assertIn("is empty", str(error))

    def test_missing_file_refused_at_start(self):
        """
        A missing token file is a L{ConfigError} naming it.
        """
        error = self.assertRaises(
            ConfigError, TokenFile, self.path + ".missing", self.clock
        )
        self.assertIn("token.missing", str(error))

    def test_static_token(self):
        """
        A L{StaticToken} never refreshes.
        """
        token = StaticToken("abc")
        self.assertEqual(token.current(), "abc")
        self.assertFalse(token.refresh())


class InClusterConnectionTests(SynchronousTestCase):
    """
    L{in_cluster_connection} reads the pod's environment and files.
    """

    def setUp(self):
        self.directory = self.mktemp()
        os.makedirs(self.directory)
        _write(os.path.join(self.directory, "token"), "pod-token")
        _write(os.path.join(self.directory, "ca.crt"), make_chain().anchors_pem)
        self.environ = {
            "KUBERNETES_SERVICE_HOST": "10.0.0.1",
            "KUBERNETES_SERVICE_PORT": "443",
        }

    def test_from_environment_and_files(self):
        """
        The server comes from the variables, the token and CA from the
        directory.
        """
        connection = in_cluster_connection(self.environ, Clock(), self.directory)
        self.assertEqual(connection.server, "https://10.0.0.1:443")
        self.assertEqual(connection.token.current(), "pod-token")
        self.assertIn(b"BEGIN CERTIFICATE", connection.trust_roots_pem)

    def test_ipv6_host(self):
        """
        An IPv6 service host is bracketed in the URL.
        """
        self.environ["KUBERNETES_SERVICE_HOST"] = "fd00::1"
        connection = in_cluster_connection(self.environ, Clock(), self.directory)
        self.assertEqual(connection.server, "https://[fd00::1]:443")

    def test_missing_port_variable(self):
        """
        Without C{KUBERNETES_SERVICE_PORT} the settings are refused.
        """
        del self.environ["KUBERNETES_SERVICE_PORT"]
        error = self.assertRaises(
            ConfigError, in_cluster_connection, self.environ, Clock(), self.directory
        )
        self.assertIn("KUBERNETES_SERVICE_PORT", str(error))

    def test_bad_port(self):
        """
        A port that is not a number is refused.
        """
        self.environ["KUBERNETES_SERVICE_PORT"] = "https"
        error = self.assertRaises(
            ConfigError, in_cluster_connection, self.environ, Clock(), self.directory
        )
        self.assertIn("not a port number", str(error))

    def test_missing_ca(self):
        """
        A missing C{ca.crt} is refused, naming the file.
        """
        os.unlink(os.path.join(self.directory, "ca.crt"))
        error = self.assertRaises(
            ConfigError, in_cluster_connection, self.environ, Clock(), self.directory
        )
        self.assertIn("ca.crt", str(error))

    def test_ca_not_a_certificate(self):
        """
        A C{ca.crt} without a certificate is refused.
        """
        _write(os.path.join(self.directory, "ca.crt"), "not a certificate\n")
        error = self.assertRaises(
            ConfigError, in_cluster_connection, self.environ, Clock(), self.directory
        )
        self.assertIn("does not hold a PEM certificate", str(error))

    def test_missing_token(self):
        """
        A missing token file is refused, naming it.
        """
        os.unlink(os.path.join(self.directory, "token"))
        error = self.assertRaises(
            ConfigError, in_cluster_connection, self.environ, Clock(), self.directory
        )
        self.assertIn("token", str(error))


class KubeconfigConnectionTests(SynchronousTestCase):
    """
    L{kubeconfig_connection} reads the current context of a kubeconfig.
    """

    def setUp(self):
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.path = os.path.join(self.directory, "kubeconfig")
        self.ca_pem = make_chain().anchors_pem

    def _connection(self, server="https://127.0.0.1:6443", cluster=None, user=None):
        if cluster is None:
            cluster = {"certificate-authority-data": self.ca_pem}
        write_kubeconfig(self.path, kubeconfig_document(server, cluster, user))
        return kubeconfig_connection(self.path, Clock())

    def _refused(self, **kwargs):
        return str(self.assertRaises(ConfigError, self._connection, **kwargs))

    def test_inline_ca_and_token(self):
        """
        C{certificate-authority-data} and C{token} are used.
        """
        connection = self._connection(user={"token": "abc"})
        self.assertEqual(connection.server, "https://127.0.0.1:6443")
        self.assertEqual(connection.trust_roots_pem, self.ca_pem)
        self.assertEqual(connection.token.current(), "abc")

    def test_relative_ca_file(self):
        """
        A relative C{certificate-authority} is read next to the kubeconfig.
        """
        _write(os.path.join(self.directory, "ca.pem"), self.ca_pem)
        connection = self._connection(cluster={"certificate-authority": "ca.pem"})
        self.assertEqual(connection.trust_roots_pem, self.ca_pem)

    def test_token_file(self):
        """
        C{tokenFile} is read (and wins over C{token}, as in client-go).
        """
        _write(os.path.join(self.directory, "token"), "from-file\n")
        connection = self._connection(user={"tokenFile": "token", "token": "inline"})
        self.assertIsInstance(connection.token, TokenFile)
        self.assertEqual(connection.token.current(), "from-file")

    def test_client_certificate_data(self):
        """
        Inline client certificate and key are used.
        """
        chain = make_chain()
        connection = self._connection(
            user={
                "client-certificate-data": chain.issuer_chain_pem(),
                "client-key-data": chain.issuer_key_pem(),
            }
        )
        self.assertEqual(connection.client_certificate_pem, chain.issuer_chain_pem())
        self.assertIsNone(connection.token)

    def test_client_certificate_files(self):
        """
        Client certificate and key files are read.
        """
        chain = make_chain()
        _write(os.path.join(self.directory, "client.crt"), chain.issuer_chain_pem())
        _write(os.path.join(self.directory, "client.key"), chain.issuer_key_pem("sec1"))
        connection = self._connection(
            user={"client-certificate": "client.crt", "client-key": "client.key"}
        )
        self.assertEqual(connection.client_key_pem, chain.issuer_key_pem("sec1"))

    def test_client_key_of_another_certificate(self):
        """
        A client key that does not match the certificate is refused, without
        quoting it.
        """
        chain = make_chain()
        other_key = private_key_pem(make_private_key())
        message = self._refused(
            user={
                "client-certificate-data": chain.issuer_chain_pem(),
                "client-key-data": other_key,
            }
        )
        self.assertIn("does not belong to the client certificate", message)
        self.assertNotIn("PRIVATE KEY", message)

    def test_client_certificate_without_key(self):
        """
        A client certificate without its key is refused.
        """
        message = self._refused(
            user={"client-certificate-data": make_chain().issuer_chain_pem()}
        )
        self.assertIn("needs both client-certificate and client-key", message)

    def test_http_loopback(self):
        """
        Plain http:// on loopback (kubectl proxy) is accepted, without a CA.
        """
        connection = self._connection(server="http://127.0.0.1:8001", cluster={})
        self.assertEqual(connection.server, "http://127.0.0.1:8001")
        self.assertIsNone(connection.token)

    def test_http_localhost(self):
        """
        Plain http:// to localhost is accepted.
        """
        connection = self._connection(server="http://localhost:8001/", cluster={})
        self.assertEqual(connection.server, "http://localhost:8001")

    def test_http_elsewhere_refused(self):
        """
        Plain http:// to another host is refused.
        """
        message = self._refused(server="http://10.0.0.1:8080", cluster={})
        self.assertIn("only on loopback", message)

    def test_insecure_skip_tls_verify_refused(self):
        """
        C{insecure-skip-tls-verify} is refused with a reason.
        """
        message = self._refused(cluster={"insecure-skip-tls-verify": True})
        self.assertIn("insecure-skip-tls-verify", message)

    def test_exec_refused(self):
        """
        An exec credential plugin is refused.
        """
        message = self._refused(user={"exec": {"command": "aws"}})
        self.assertIn("exec credential plugins are not supported", message)

    def test_no_ca_uses_system_roots(self):
        """
        An https server without a CA is verified against the system roots.
        """
        connection = self._connection(cluster={})
        self.assertIsNone(connection.trust_roots_pem)

    def test_bad_ca_data(self):
        """
        C{certificate-authority-data} that is not base64 is refused.
        """
        message = self._refused(cluster={"certificate-authority-data": "%%%"})
        self.assertIn("certificate-authority-data is not base64", message)

    def test_bad_server(self):
        """
        A server that is not an http(s) URL is refused.
        """
        message = self._refused(server="ftp://example.org")
        self.assertIn("is not an https:// URL", message)

    def test_no_current_context(self):
        """
        A kubeconfig without current-context is refused.
        """
        document = kubeconfig_document("https://127.0.0.1:6443")
        del document["current-context"]
        write_kubeconfig(self.path, document)
        error = self.assertRaises(
            ConfigError, kubeconfig_connection, self.path, Clock()
        )
        self.assertIn("no current-context", str(error))

    def test_unknown_context(self):
        """
        A current-context naming no context is refused.
        """
        document = kubeconfig_document("https://127.0.0.1:6443")
        document["current-context"] = "elsewhere"
        write_kubeconfig(self.path, document)
        error = self.assertRaises(
            ConfigError, kubeconfig_connection, self.path, Clock()
        )
        self.assertIn("no context named 'elsewhere'", str(error))

    def test_missing_file(self):
        """
        A missing kubeconfig is refused, naming the flag and the file.
        """
        error = self.assertRaises(
            ConfigError, kubeconfig_connection, self.path, Clock()
        )
        self.assertEqual(error.field, "--kubeconfig")
        self.assertIn(self.path, str(error))

    def test_not_yaml(self):
        """
        A kubeconfig that is not YAML is refused.
        """
        _write(self.path, "clusters: [\n")
        error = self.assertRaises(
            ConfigError, kubeconfig_connection, self.path, Clock()
        )
        self.assertIn("not valid YAML", str(error))


class ClusterConnectionChoiceTests(SynchronousTestCase):
    """
    L{cluster_connection} chooses between in-cluster and kubeconfig.
    """

    def setUp(self):
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        _write(os.path.join(self.directory, "token"), "pod-token")
        _write(os.path.join(self.directory, "ca.crt"), make_chain().anchors_pem)
        self.kubeconfig = write_kubeconfig(
            os.path.join(self.directory, "kubeconfig"),
            kubeconfig_document("http://127.0.0.1:8001"),
        )
        self.pod_environ = {
            "KUBERNETES_SERVICE_HOST": "10.0.0.1",
            "KUBERNETES_SERVICE_PORT": "443",
        }

    def test_explicit_kubeconfig_wins(self):
        """
        An explicit C{--kubeconfig} is used even in a pod.
        """
        connection = cluster_connection(
            self.kubeconfig, self.pod_environ, Clock(), self.directory
        )
        self.assertEqual(connection.server, "http://127.0.0.1:8001")

    def test_in_cluster_by_default_in_a_pod(self):
        """
        With the default C{--kubeconfig}, a pod uses its service account.
        """
        connection = cluster_connection(
            DEFAULT_KUBECONFIG, self.pod_environ, Clock(), self.directory
        )
        self.assertEqual(connection.server, "https://10.0.0.1:443")

    def test_kubeconfig_variable(self):
        """
        Outside a pod, the first file of C{$KUBECONFIG} is used.
        """
        environ = {"KUBECONFIG": self.kubeconfig + os.pathsep + "/nonexistent"}
        connection = cluster_connection(DEFAULT_KUBECONFIG, environ, Clock())
        self.assertEqual(connection.server, "http://127.0.0.1:8001")

    def test_home_kubeconfig(self):
        """
        Otherwise C{~/.kube/config} under C{$HOME}.
        """
        os.makedirs(os.path.join(self.directory, ".kube"))
        os.replace(self.kubeconfig, os.path.join(self.directory, ".kube", "config"))
        connection = cluster_connection(
            DEFAULT_KUBECONFIG, {"HOME": self.directory}, Clock()
        )
        self.assertEqual(connection.server, "http://127.0.0.1:8001")


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
        self.fake.add_secret(NAMESPACE, "s", {"ca.crt": b"x"})

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
        _write(os.path.join(directory, "c.crt"), certificate_pem)
        _write(os.path.join(directory, "c.key"), key_pem)
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
        proxy.add_secret(NAMESPACE, "s", {})
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
            client.get(core_path(NAMESPACE, "secrets", "missing")), KubernetesAPIError
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
        _write(os.path.join(directory, "token.new"), "second")
        os.replace(
            os.path.join(directory, "token.new"), os.path.join(directory, "token")
        )
        self.fake.api_tokens = {"second"}
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
        _write(os.path.join(directory, "token.new"), "second")
        os.replace(
            os.path.join(directory, "token.new"), os.path.join(directory, "token")
        )
        self.fake.api_tokens = {"second"}
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
        self.fake.add_pod(NAMESPACE, "p")
        client = kubernetes_client_for(self, self.fake)
        service = KubernetesClientService(client)
        service.startService()
        pod_path = core_path(NAMESPACE, "pods", "p")
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


class ConfigurationSourceTests(TestCase):
    """
    L{KubernetesConfigurationSource} reads the Configuration resource.
    """

    timeout = 30

    def setUp(self):
        self.fake = start_fake_kubernetes(self)
        self.client = kubernetes_client_for(self, self.fake)
        self.resolved = []
        self.source = KubernetesConfigurationSource(
            self.client, on_resolved=(self.resolved.append,)
        )
        self.config = SentryConfig(mode=MODE_KUBERNETES, namespace=NAMESPACE)

    def test_interface(self):
        """
        It provides L{IConfigurationSource}.
        """
        verifyObject(IConfigurationSource, self.source)

    @defer.inlineCallbacks
    def test_present(self):
        """
        The resource's spec.mtls completes the config, and listeners see it.
        """
        self.fake.add_configuration(
            NAMESPACE,
            "daprsystem",
            {"mtls": {"workloadCertTTL": "1h", "allowedClockSkew": "5m"}},
        )
        config = yield self.source.resolve(self.config)
        self.assertEqual(config.mtls.workload_cert_ttl.total_seconds(), 3600)
        self.assertEqual(config.mtls.allowed_clock_skew.total_seconds(), 300)
        self.assertEqual(config.config, "daprsystem")
        self.assertEqual(self.resolved, [config])
        self.assertIn(
            ("GET", configuration_path(NAMESPACE, "daprsystem")), self.fake.requests
        )

    @defer.inlineCallbacks
    def test_missing(self):
        """
        A missing resource is a L{ConfigError} naming it.
        """
        error = yield self.assertFailure(self.source.resolve(self.config), ConfigError)
        self.assertEqual(error.field, "--config")
        self.assertIn("Configuration dapr-system/daprsystem not found", str(error))
        self.assertEqual(self.resolved, [])

    @defer.inlineCallbacks
    def test_invalid_field(self):
        """
        A wrong field is a L{ConfigError} naming the field and the resource.
        """
        self.fake.add_configuration(
            NAMESPACE, "daprsystem", {"mtls": {"workloadCertTTL": "0s"}}
        )
        error = yield self.assertFailure(self.source.resolve(self.config), ConfigError)
        self.assertEqual(error.field, "spec.mtls.workloadCertTTL")
        self.assertIn("Configuration dapr-system/daprsystem", str(error))

    @defer.inlineCallbacks
    def test_api_error(self):
        """
        An API refusal is a L{ConfigError} carrying the status and reason.
        """
        self.fake.forbidden.add(("GET", "configurations"))
        error = yield self.assertFailure(self.source.resolve(self.config), ConfigError)
        self.assertIn("HTTP 403 Forbidden", str(error))

    @defer.inlineCallbacks
    def test_unreachable(self):
        """
        An unreachable API server is a L{ConfigError}.
        """
        yield self.fake.stop()
        error = yield self.assertFailure(self.source.resolve(self.config), ConfigError)
        self.assertIn("cannot read Configuration dapr-system/daprsystem", str(error))


class ConfigurationSourceWarningTests(TestCase):
    """
    L{KubernetesConfigurationSource} warns about what it ignores in the
    resource.
    """

    timeout = 30

    @defer.inlineCallbacks
    def test_unknown_and_missing_mtls(self):
        """
        An unknown key under spec.mtls is warned about by name, with the
        resource named; a resource without spec.mtls is warned about too.
        """
        from dataclasses import replace

        from twisted.logger import LogLevel, capturedLogs

        fake = start_fake_kubernetes(self)
        source = KubernetesConfigurationSource(kubernetes_client_for(self, fake))
        config = SentryConfig(mode=MODE_KUBERNETES, namespace=NAMESPACE)
        fake.add_configuration(NAMESPACE, "misspelt", {"mtls": {"workloadCertTTl": "1h"}})
        fake.add_configuration(NAMESPACE, "bare", {})
        with capturedLogs() as events:
            resolved = yield source.resolve(replace(config, config="misspelt"))
            yield source.resolve(replace(config, config="bare"))
        warnings = [
            e["configuration_warning"] for e in events if e["log_level"] == LogLevel.warn
        ]
        self.assertEqual(len(warnings), 2)
        self.assertIn("spec.mtls.workloadCertTTl: unknown key", warnings[0])
        self.assertIn(f"Configuration {NAMESPACE}/misspelt", warnings[0])
        self.assertIn("has no spec.mtls", warnings[1])
        self.assertEqual(resolved.mtls.workload_cert_ttl.total_seconds(), 24 * 3600)
