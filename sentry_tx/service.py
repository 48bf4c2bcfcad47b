"""
sentry_tx's root service and the web listeners it holds.

The root is a L{MultiService}.  A child that cannot start (the trust bundle is
refused, the port is taken) is fatal: sentry_tx logs why and exits with
status 1, because a CA that runs without its bundle would only hide the fault.
"""

import os
import sys

from twisted.application.internet import TCPServer
from twisted.application.service import MultiService
from twisted.logger import Logger
from twisted.web.server import Site

from sentry_tx.errors import BundleError, ConfigError

FATAL_EXIT_STATUS = 1


def _exit_process(status):
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


class SentryService(MultiService):
    """
    The root of sentry_tx's service tree.

    @param reactor: stopped on a fatal error.
    @param startup_warnings: messages found while parsing options, logged at
        start (logging is not running while options are parsed).
    @param startup_notes: information found while parsing options (how
        many processes serve, and why), logged at start.
    @param exit: called with the exit status after the reactor has shut down
        following a fatal error.
    """

    _log = Logger()

    def __init__(
        self, reactor, startup_warnings=(), exit=_exit_process, startup_notes=()
    ):
        super().__init__()
        self._reactor = reactor
        self._startup_warnings = tuple(startup_warnings)
        self._startup_notes = tuple(startup_notes)
        self._exit = exit
        self.exit_status = None

    def startService(self):
        for warning in self._startup_warnings:
            self._log.warn("{startup_warning}", startup_warning=warning)
        for note in self._startup_notes:
            self._log.info("{startup_note}", startup_note=note)
        super().startService()

    def fatal(self, failure):
        """
        Log why sentry_tx cannot go on, stop the reactor and exit 1.
        """
        if failure.check(BundleError, ConfigError):
            self._log.critical(
                "refusing to start: {error}", error=failure.getErrorMessage()
            )
        else:
            self._log.failure("refusing to start", failure, error=failure.getErrorMessage())
        if self.exit_status is not None:
            return
        self.exit_status = FATAL_EXIT_STATUS
        self._reactor.addSystemEventTrigger(
            "after", "shutdown", self._exit, FATAL_EXIT_STATUS
        )
        if self._reactor.running:
            self._reactor.stop()
        else:
            self._reactor.callWhenRunning(self._reactor.stop)


class WebService(TCPServer):
    """
    A twisted.web site on a TCP port that logs the port it bound (port 0
    picks a free one).
    """

    _log = Logger()

    def __init__(self, label, port, site, interface=""):
        super().__init__(port, site, interface=interface)
        self.label = label

    @property
    def port(self):
        """
        The port bound, once started.
        """
        return self._port.getHost().port

    def startService(self):
        super().startService()
        self._log.info(
            "{label} server listening on port {port}", label=self.label, port=self.port
        )


class QuietSite(Site):
    """
    A twisted.web Site that writes no access log: probes of /healthz and
    scrapes of /metrics every few seconds would drown the CA's own log.
    """

    noisy = False

    def log(self, request):
        pass
