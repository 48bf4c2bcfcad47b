"""
A short smoke of bench/chaos.py: two of its faults against a real sentry_tx.
"""

import os
import sys

from twisted.internet import reactor
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase

from sentry_tx.testing.source_tree import PROJECT_ROOT


class ChaosSmokeTests(TestCase):
    """
    bench/chaos.py runs, holds and prints its table.
    """

    timeout = 120

    def test_smoke(self):
        """
        A FIFO at start and a truncated issuer are held; the table says ok for both.
        """
        environment = dict(os.environ)
        environment.pop("KUBERNETES_SERVICE_HOST", None)
        d = getProcessOutputAndValue(
            sys.executable,
            [
                os.path.join(PROJECT_ROOT, "bench", "chaos.py"),
                "--only",
                "fifo-at-start,truncated-issuer",
            ],
            env=environment,
            path=PROJECT_ROOT,
            reactor=reactor,
        )

        def check(result):
            out, err, status = result
            lines = out.decode().splitlines()
            self.assertEqual(status, 0, out + err)
            self.assertEqual(lines[0].split(), ["fault", "outcome", "figure"])
            rows = {line.split()[0]: line.split()[1] for line in lines[1:]}
            self.assertEqual(rows, {"fifo-at-start": "ok", "truncated-issuer": "ok"})

        return d.addCallback(check)
