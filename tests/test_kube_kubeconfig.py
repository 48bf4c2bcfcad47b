"""
Tests for L{sentry_tx.kube.kubeconfig}: the connection a kubeconfig file
describes, and the choice between it and the in-cluster connection.
"""

import os

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from sentry_tx.errors import ConfigError
from sentry_tx.kube.connection import TokenFile
from sentry_tx.kube.kubeconfig import (
    DEFAULT_KUBECONFIG,
    cluster_connection,
    kubeconfig_connection,
)
from sentry_tx.testing.certificates import make_chain, make_private_key, private_key_pem
from sentry_tx.testing.files import write_file
from sentry_tx.testing.kubeconfig import kubeconfig_document, write_kubeconfig


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
        write_file(os.path.join(self.directory, "ca.pem"), self.ca_pem)
        connection = self._connection(cluster={"certificate-authority": "ca.pem"})
        self.assertEqual(connection.trust_roots_pem, self.ca_pem)

    def test_token_file(self):
        """
        C{tokenFile} is read (and wins over C{token}, as in client-go).
        """
        write_file(os.path.join(self.directory, "token"), "from-file\n")
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
        write_file(os.path.join(self.directory, "client.crt"), chain.issuer_chain_pem())
        write_file(
            os.path.join(self.directory, "client.key"), chain.issuer_key_pem("sec1")
        )
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
        write_file(self.path, "clusters: [\n")
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
        write_file(os.path.join(self.directory, "token"), "pod-token")
        write_file(os.path.join(self.directory, "ca.crt"), make_chain().anchors_pem)
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
