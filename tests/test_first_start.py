"""
The README's first command, as a new user runs it: it starts without a
single warning, and says once what is in effect.
"""

import os
import re
import signal

from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from sentry_tx.testing.source_tree import PROJECT_ROOT
from sentry_tx.testing.twistd import LOOPBACK_FREE_PORTS, spawn_twistd

README = os.path.join(PROJECT_ROOT, "README.md")


def readme_first_command():
    """
    The flags after C{sentry} in the README's first shell command.
    """
    with open(README, encoding="utf-8") as f:
        text = f.read()
    command = re.search(r"```sh\n(.*?)\n```", text, re.S).group(1)
    return command.split(" sentry ", 1)[1].split()


class FirstStartTests(TestCase):
    """
    The first start of a new user.
    """

    timeout = 60

    @inlineCallbacks
    def test_no_warning(self):
        """
        With the README's flags (its ./credentials made a fresh directory,
        and loopback ports added), sentry_tx generates a bundle and serves
        with no line at warning level or above, and logs the TTL, skew and
        validators in effect exactly once.
        """
        arguments = readme_first_command()
        self.assertEqual(arguments[:2], ["--config", "conf/daprsystem.yaml"])
        index = arguments.index("--issuer-credentials")
        arguments[index + 1] = os.path.abspath(self.mktemp())
        arguments[1] = os.path.join(PROJECT_ROOT, arguments[1])
        protocol = spawn_twistd(self, arguments + LOOPBACK_FREE_PORTS)
        yield protocol.wait_ready()
        os.kill(protocol.transport.pid, signal.SIGTERM)
        yield protocol.ended
        lines = protocol.output.decode().splitlines()
        levels = {line.split()[1] for line in lines if line.strip()}
        self.assertFalse(levels & {"warning", "error", "fatal"}, "\n".join(lines))
        effective = [line for line in lines if "in effect:" in line]
        self.assertEqual(len(effective), 1)
        self.assertIn(
            "workload certificates live 24h0m0s, allowed clock skew 15m0s", effective[0]
        )
        self.assertIn("validators INSECURE, default INSECURE", effective[0])

    def test_binds_loopback(self):
        """
        The README's first command (an INSECURE CA) puts all three
        listeners on 127.0.0.1, and says INSECURE beside it.
        """
        arguments = readme_first_command()
        for flag in (
            "--listen-address",
            "--healthz-listen-address",
            "--metrics-listen-address",
        ):
            self.assertEqual(arguments[arguments.index(flag) + 1], "127.0.0.1", flag)
        with open(README, encoding="utf-8") as f:
            text = f.read()
        after_command = text.split("```", 2)[2]
        self.assertIn("**This CA is INSECURE**", after_command.split("```", 1)[0])
