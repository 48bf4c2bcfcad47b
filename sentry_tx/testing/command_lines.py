# -*- test-case-name: tests.test_tap,tests.test_jwt_flags -*-
"""
Parsing sentry_tx's command line in a test: L{options_for_test} builds an
L{Options} with an empty environment and captured output, and
L{OptionsTestCase} parses with it and checks the one-line refusals.

Moved here from C{tests.test_tap} so that the tests of each group of flags
share it without importing one another.
"""

from __future__ import annotations

from collections.abc import Mapping
from io import StringIO
from typing import cast

from twisted.trial.unittest import SynchronousTestCase

from sentry_tx.config import SentryConfig
from sentry_tx.options import Options


def options_for_test(environ: Mapping[str, str] | None = None) -> Options:
    """
    Options with an empty environment (unless given) and captured output.
    """
    return Options(
        environ={} if environ is None else environ,
        stdout=StringIO(),
        stderr=StringIO(),
        default_processes=lambda: (1, "one core in these tests"),
    )


def _captured(stream: object) -> str:
    return cast(StringIO, stream).getvalue()


class OptionsTestCase(SynchronousTestCase):
    """
    Helpers for parsing command lines.
    """

    def parse(
        self, arguments: list[str], environ: Mapping[str, str] | None = None
    ) -> Options:
        """
        Parse C{arguments} successfully and return the L{Options}.
        """
        options = options_for_test(environ)
        options.parseOptions(arguments)
        self.assertEqual(_captured(options.stderr), "")
        return options

    def config(
        self, arguments: list[str], environ: Mapping[str, str] | None = None
    ) -> SentryConfig:
        """
        The L{SentryConfig} C{arguments} give.
        """
        config = self.parse(arguments, environ).sentry_config
        assert config is not None, "parsed options without a configuration"
        return config

    def fail_to_parse(
        self, arguments: list[str], environ: Mapping[str, str] | None = None
    ) -> str:
        """
        Parse C{arguments}, which must fail with exit status 1 and exactly
        one line on stderr; return that line.
        """
        options = options_for_test(environ)
        exit = self.assertRaises(SystemExit, options.parseOptions, arguments)
        self.assertEqual(exit.code, 1)
        output = _captured(options.stderr)
        self.assertTrue(output.endswith("\n"), output)
        self.assertEqual(output.count("\n"), 1, output)
        self.assertEqual(_captured(options.stdout), "")
        return output.rstrip("\n")

    def assertFailsNaming(
        self,
        arguments: list[str],
        flag: str,
        *fragments: str,
        environ: Mapping[str, str] | None = None,
    ) -> str:
        """
        C{arguments} fail with one line C{sentry: <flag>: ...} that contains
        each fragment.
        """
        line = self.fail_to_parse(arguments, environ)
        self.assertTrue(line.startswith(f"sentry: {flag}: "), line)
        for fragment in fragments:
            self.assertIn(fragment, line)
        return line

    def write(self, content: str) -> str:
        """
        Write C{content} to a new file and return its path.
        """
        path = str(self.mktemp())
        with open(path, "w") as configuration_file:
            configuration_file.write(content)
        return path
