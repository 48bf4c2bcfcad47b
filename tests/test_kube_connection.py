"""
Tests for L{sentry_tx.kube.connection} and L{sentry_tx.kube.incluster}: the
token file that is re-read as it rotates, and a pod's connection to its own
cluster.
"""

import os

from twisted.internet.task import Clock
from twisted.logger import formatEvent
from twisted.trial.unittest import SynchronousTestCase

from sentry_tx.errors import ConfigError
from sentry_tx.kube.connection import StaticToken, TokenFile
from sentry_tx.kube.incluster import in_cluster_connection
from sentry_tx.testing.certificates import make_chain
from sentry_tx.testing.files import write_file
from sentry_tx.testing.logs import capture_logs


class TokenFileTests(SynchronousTestCase):
    """
    L{TokenFile} re-reads a rotating token file.
    """

    def setUp(self):
        self.clock = Clock()
        directory = self.mktemp()
        os.makedirs(directory)
        self.path = write_file(os.path.join(directory, "token"), "first\n")

    def _rotate(self, token):
        # A new file renamed into place, as the kubelet's symlink swap does.
        write_file(self.path + ".new", token)
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

    def test_fifo_refused_without_blocking(self):
        """
        A FIFO swapped in for the token file is refused at once (the open
        does not wait for a writer) and the last token stays in use.
        """
        token = TokenFile(self.path, self.clock, 0)
        fifo = self.path + ".fifo"
        os.mkfifo(fifo)
        os.replace(fifo, self.path)
        self.assertFalse(token.refresh())
        self.assertEqual(token.current(), "first")

    def test_fifo_refused_at_start(self):
        """
        A FIFO as the token file at start is a L{ConfigError} saying so.
        """
        os.unlink(self.path)
        os.mkfifo(self.path)
        error = self.assertRaises(ConfigError, TokenFile, self.path, self.clock)
        self.assertIn("not a regular file", str(error))

    def test_empty_file_refused_at_start(self):
        """
        An empty token file is a L{ConfigError} when first read.
        """
        write_file(self.path, "\n")
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
        write_file(os.path.join(self.directory, "token"), "pod-token")
        write_file(os.path.join(self.directory, "ca.crt"), make_chain().anchors_pem)
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
        write_file(os.path.join(self.directory, "ca.crt"), "not a certificate\n")
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
