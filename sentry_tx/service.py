# -*- test-case-name: tests.test_http_listener,tests.test_listen,tests.test_modes -*-
"""
sentry_tx's root service and the web listeners it holds.

The root is a L{MultiService}.  A child that cannot start (the trust bundle is
refused, the port is taken) is fatal: sentry_tx logs why and exits with
status 1, because a CA that runs without its bundle would only hide the fault.
"""

import os
import sys
from collections.abc import Callable, Iterable
from typing import Any, NoReturn

from twisted.application.internet import TCPServer
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IProtocolFactory, IReactorCore
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import Request
from twisted.web.server import Site

from sentry_tx import open_files
from sentry_tx.errors import BundleError, ConfigError, ListenError
from sentry_tx.listen import listen_error

FATAL_EXIT_STATUS = 1


def _exit_process(status: int) -> NoReturn:
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
    @param raise_open_file_limit: raises the soft open-file limit to the
        hard one at start (L{open_files.raise_open_file_limit}).
    """

    _log = Logger()

    def __init__(
        self,
        reactor: IReactorCore,
        startup_warnings: Iterable[str] = (),
        exit: Callable[[int], object] = _exit_process,
        raise_open_file_limit: Callable[
            [], open_files.OpenFileLimit
        ] = open_files.raise_open_file_limit,
        startup_notes: Iterable[str] = (),
    ) -> None:
        super().__init__()
        self._reactor = reactor
        self._startup_warnings = tuple(startup_warnings)
        self._startup_notes = tuple(startup_notes)
        self._exit = exit
        self._raise_open_file_limit = raise_open_file_limit
        self._open_file_limit_raised = False
        self.exit_status: int | None = None
        self._listen_failure: Failure | None = None

    def startService(self) -> None:
        """
        Log the start-up warnings, then start the children in order.  A
        child whose port cannot be bound (L{ListenError}) is fatal: one line
        naming the flag and the port, exit 1; the children after it are not
        started.
        """
        for warning in self._startup_warnings:
            self._log.warn("{startup_warning}", startup_warning=warning)
        for note in self._startup_notes:
            self._log.info("{startup_note}", startup_note=note)
        self._raise_open_file_limit_once()
        Service.startService(self)
        if self._listen_failure is not None:
            self.fatal(self._listen_failure)
            return
        for service in self:
            try:
                service.startService()
            except (ListenError, ConfigError):
                self.fatal(Failure())
                return

    def privilegedStartService(self) -> None:
        """
        Let the children bind their ports (twistd calls this before
        C{startService}); the first L{ListenError} is kept, and made fatal
        by C{startService}, once logging runs.
        """
        self._raise_open_file_limit_once()
        Service.privilegedStartService(self)
        for service in self:
            try:
                service.privilegedStartService()
            except ListenError:
                self._listen_failure = Failure()
                return

    def stopService(self) -> Deferred[Any]:
        """
        Stop the children that were started, in reverse order; a child
        with a true C{stop_after_others} (the standard error capture) is
        stopped once the others have finished stopping.
        """
        Service.stopService(self)
        started = [service for service in reversed(list(self)) if service.running]
        last = [s for s in started if getattr(s, "stop_after_others", False)]
        d = DeferredList(
            [maybeDeferred(s.stopService) for s in started if s not in last]
        )
        if last:
            d.addCallback(
                lambda _: DeferredList([maybeDeferred(s.stopService) for s in last])
            )
        return d

    def _raise_open_file_limit_once(self) -> None:
        # Before any child opens a socket (serving copies inherit it):
        # twistd binds in privilegedStartService, tests may call only
        # startService.
        if self._open_file_limit_raised:
            return
        self._open_file_limit_raised = True
        limit = self._raise_open_file_limit()
        if limit.error is not None:
            self._log.warn(
                "{open_file_limit}", open_file_limit=open_files.describe(limit)
            )
        else:
            self._log.info(
                "{open_file_limit}", open_file_limit=open_files.describe(limit)
            )

    def fatal(self, failure: Failure) -> None:
        """
        Log why sentry_tx cannot go on, stop the reactor and exit 1.
        """
        if failure.check(BundleError, ConfigError, ListenError):
            self._log.critical(
                "refusing to start: {error}", error=failure.getErrorMessage()
            )
        else:
            self._log.failure(
                "refusing to start", failure, error=failure.getErrorMessage()
            )
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

    def __init__(
        self,
        label: str,
        port: int,
        site: IProtocolFactory,
        interface: str = "",
        flag: str | None = None,
    ) -> None:
        super().__init__(port, site, interface=interface)
        self.label = label
        self.flag = flag if flag is not None else f"--{label}-port"

    @property
    def port(self) -> int:
        """
        The port bound, once started.
        """
        if self._port is None:
            raise RuntimeError(f"the {self.label} server is not listening")
        port: int = self._port.getHost().port
        return port

    def privilegedStartService(self) -> None:
        """
        Listen (twistd binds here); a port that cannot be bound raises
        L{ListenError} naming C{flag}.
        """
        try:
            super().privilegedStartService()
        except CannotListenError as e:
            raise listen_error(self.flag, e.port, e.interface, e) from None

    def startService(self) -> None:
        """
        Listen, unless C{privilegedStartService} did; a port that cannot be
        bound raises L{ListenError} naming C{flag}.
        """
        try:
            super().startService()
        except CannotListenError as e:
            raise listen_error(self.flag, e.port, e.interface, e) from None
        self._log.info(
            "{label} server listening on port {port}", label=self.label, port=self.port
        )


class QuietSite(Site):
    """
    A twisted.web Site that writes no access log: probes of /healthz and
    scrapes of /metrics every few seconds would drown the CA's own log.
    """

    noisy = False

    def log(self, request: Request) -> None:
        pass
