"""
The install the README's test command makes (an editable install in
setuptools' strict mode): the environment's C{twistd} knows the C{sentry}
command, and it runs the source tree's code, with or without the
C{PYTHONPATH} tests give their child processes.
"""

import json
import os
import sys

from twisted.internet.defer import inlineCallbacks
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase

from sentry_tx.testing.source_tree import PROJECT_ROOT, child_environment

TWISTD_SCRIPT = os.path.join(os.path.dirname(sys.executable), "twistd")
"""
The console script pip installed beside this Python (the image's
ENTRYPOINT runs the same one).
"""

_WHERE_SENTRY_RUNS = """
import json, os, sys
from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins
(maker,) = [p for p in getPlugins(IServiceMaker) if p.tapname == "sentry"]
maker.options  # imports the plugin's module, as twistd does
print(json.dumps({"tap": os.path.realpath(sys.modules[maker.module].__file__)}))
"""
"""
Run by this Python: find the C{sentry} plugin as twistd does, load its
options (which imports C{sentry_tx.tap}) and print where that module's
file really is.
"""


def _bare_environment():
    """
    This process's environment without C{PYTHONPATH}: the install alone
    decides what is importable.
    """
    environment = dict(os.environ)
    environment.pop("PYTHONPATH", None)
    return environment


class InstallTests(TestCase):
    """
    What the environment's twistd finds.
    """

    timeout = 60

    def _outside_tree(self):
        """
        A new directory outside the source tree to run commands from.
        """
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        return directory

    @inlineCallbacks
    def test_twistd_lists_sentry(self):
        """
        C{twistd --help}, run from outside the source tree with no
        PYTHONPATH, lists the sentry command (setuptools' default editable
        mode hides twisted/plugins/ and this fails).
        """
        self.assertTrue(os.path.exists(TWISTD_SCRIPT), TWISTD_SCRIPT)
        out, err, code = yield getProcessOutputAndValue(
            sys.executable,
            [TWISTD_SCRIPT, "--help"],
            env=_bare_environment(),
            path=self._outside_tree(),
        )
        self.assertEqual(code, 0, err)
        commands = [
            line.split()[0]
            for line in out.decode().splitlines()
            if line.startswith("    ")
        ]
        self.assertIn("sentry", commands, out.decode())

    @inlineCallbacks
    def _tap_file(self, environment):
        """
        Where C{sentry_tx.tap}, loaded through the sentry plugin as twistd
        loads it, really is, run from outside the tree.
        """
        out, err, code = yield getProcessOutputAndValue(
            sys.executable,
            ["-c", _WHERE_SENTRY_RUNS],
            env=environment,
            path=self._outside_tree(),
        )
        self.assertEqual(code, 0, err)
        return json.loads(out)["tap"]

    @inlineCallbacks
    def test_installed_plugin_runs_tree_code(self):
        """
        With no PYTHONPATH, the sentry plugin runs the source tree's
        C{sentry_tx/tap.py}, not a copy.
        """
        tap = yield self._tap_file(_bare_environment())
        self.assertEqual(
            tap, os.path.realpath(os.path.join(PROJECT_ROOT, "sentry_tx", "tap.py"))
        )

    @inlineCallbacks
    def test_children_run_tree_code(self):
        """
        With the environment tests give their child processes, the sentry
        plugin runs the source tree's C{sentry_tx/tap.py}.
        """
        tap = yield self._tap_file(child_environment())
        self.assertEqual(
            tap, os.path.realpath(os.path.join(PROJECT_ROOT, "sentry_tx", "tap.py"))
        )
