# -*- test-case-name: tests.test_workers -*-
"""
One worker process of a worker pool: C{python -m sentry_tx.server.worker}.

A worker serves SignCertificate exactly as the single-process authority
does (it runs a L{CertificateAuthorityService} on its own reactor, with
grpc.aio on its own gRPC loop thread), on the port it shares with the
twistd process and the other workers through SO_REUSEPORT.  It owns no files and reads no bundle: its
parent (L{sentry_tx.server.workers}) sends the configuration and the trust
bundle over AMP on the worker's stdin and stdout (L{sentry_tx.server.ipc}).
The worker logs to its stderr, which is its parent's.

A worker dies with its parent: when its stdin closes, it stops serving
(calls in flight have the authority's grace period,
L{sentry_tx.server.service.SHUTDOWN_GRACE_SECONDS}) and exits.  It ignores
SIGINT, which a terminal sends to the whole process group (the parent tells
it to stop), and takes SIGTERM as an order to stop.
"""

import argparse
import os
import signal
import sys

from twisted.internet.defer import Deferred, inlineCallbacks, maybeDeferred, succeed
from twisted.logger import Logger
from twisted.protocols import amp

from sentry_tx.errors import BundleError, ConfigError, IssuerExpiredError
from sentry_tx.modes import build_validators
from sentry_tx.server.ipc import (
    WORKER_MODULE,
    CounterDeltas,
    Counters,
    Reload,
    Start,
    Stop,
    WorkerRefused,
    bundle_from_pems,
    config_from_json,
)
from sentry_tx.server.pushed_store import PushedTrustStore

# Errors whose messages are written for an operator and hold no key
# material; the message of any other error stays in the worker's log.
_OPERATOR_ERRORS = (BundleError, ConfigError, IssuerExpiredError, OSError, RuntimeError)

_log = Logger()


def build_authority(
    config, reactor, trust_store, validator_set, metrics, jwt_minter=None
):
    """
    The certificate authority a worker serves with: the single-process one,
    binding with SO_REUSEPORT, minting JWTs with C{jwt_minter} when given.
    """
    from sentry_tx.server.service import CertificateAuthorityService

    return CertificateAuthorityService(
        config,
        reactor,
        trust_store,
        validator_set.validators,
        validator_set.default_validator,
        metrics,
        reuse_port=True,
        jwt_minter=jwt_minter,
    )


def jwt_minter_for(config, key_pem, jwks_json):
    """
    A L{JWTMinter} for C{config} with the JWT material the parent sent, or
    None when it sent none (JWTs off).  The material is checked again as at
    start, so a worker never signs with a key its JWKS does not publish.

    @raise WorkerRefused: when the material does not load (the message
        names what is wrong, never the key).
    """
    if key_pem is None or jwks_json is None:
        return None
    from sentry_tx.jwt.minting import JWTMinter

    minter = JWTMinter(config.jwt_issuer or None, config.jwt_ttl_seconds)
    minter.install(_jwt_material(config, key_pem, jwks_json))
    return minter


def _jwt_material(config, key_pem, jwks_json):
    from sentry_tx.errors import BundleError
    from sentry_tx.jwt.material import load_jwt_material

    try:
        return load_jwt_material(
            key_pem,
            jwks_json,
            config.jwt_signing_algorithm,
            config.jwt_key_id or None,
            ("the JWT key sent by the parent", "the JWKS sent by the parent"),
        )
    except BundleError as e:
        raise WorkerRefused(f"the JWT material cannot be used: {e}") from None


class WorkerCommands(amp.CommandLocator):
    """
    The worker's side of the AMP conversation: answers L{Start},
    L{Reload}, L{Counters} and L{Stop}.

    @param reactor: the worker's reactor.
    @param metrics: the worker's L{SentryMetrics}; L{Counters} reports how
        they grew.
    @param environ: the environment, for L{build_validators}.
    @param authority_factory: builds the L{ICertificateAuthority} from
        C{(config, reactor, trust_store, validator_set, metrics)}; its
        C{port} is read once it started.
    @param validators_factory: builds the L{ValidatorSet} from
        C{(config, reactor, environ)}.
    @param on_stopped: called (on a later reactor turn) once L{Stop} has
        been answered; the worker's C{main} closes the pipe there.
    """

    _log = Logger()

    def __init__(
        self,
        reactor,
        metrics,
        environ,
        authority_factory=build_authority,
        validators_factory=build_validators,
        on_stopped=lambda: None,
    ):
        super().__init__()
        self._reactor = reactor
        self._metrics = metrics
        self._environ = environ
        self._authority_factory = authority_factory
        self._validators_factory = validators_factory
        self._on_stopped = on_stopped
        self._deltas = CounterDeltas(metrics)
        self._authority = None
        self._jwt_minter = None
        self._trust_store = None
        self._validator_service = None
        self._start_asked = False
        # While a Start runs: the Deferreds to fire when it is done.
        self._starting = None
        self._stopped = None
        self._stop_waiters = []

    def _decode(self, config_json, anchors_pem, chain_pem, key_pem):
        try:
            config = config_from_json(config_json)
        except ValueError as e:
            raise WorkerRefused(f"the configuration cannot be read: {e}") from None
        try:
            bundle = bundle_from_pems(anchors_pem, chain_pem, key_pem)
        except ValueError as e:
            raise WorkerRefused(f"the trust bundle cannot be used: {e}") from None
        return config, bundle

    @Start.responder
    def start(
        self, config_json, anchors_pem, chain_pem, key_pem, jwt_key_pem=None, jwks_json=None
    ):
        """
        Serve the configuration and bundle given (and the JWT material, when
        JWTs are on); answer the port bound.
        """
        if self._start_asked or self._stopped is not None:
            raise WorkerRefused("this worker has been started already")
        config, bundle = self._decode(config_json, anchors_pem, chain_pem, key_pem)
        self._jwt_minter = jwt_minter_for(config, jwt_key_pem, jwks_json)
        self._start_asked = True
        self._starting = []
        d = maybeDeferred(self._start_serving, config, bundle)

        def started(_):
            return {"port": self._authority.port}

        def failed(failure):
            raise self._refusal(failure, "could not start serving")

        def done(result):
            waiters, self._starting = self._starting, None
            for waiter in waiters:
                waiter.callback(None)
            return result

        return d.addCallbacks(started, failed).addBoth(done)

    def _start_serving(self, config, bundle):
        validator_set = self._validators_factory(config, self._reactor, self._environ)
        self._trust_store = PushedTrustStore(bundle)
        self._authority = self._authority_factory(
            config,
            self._reactor,
            self._trust_store,
            validator_set,
            self._metrics,
            jwt_minter=self._jwt_minter,
        )
        self._validator_service = validator_set.service
        if self._validator_service is not None:
            self._validator_service.startService()
        return self._authority.start(config)

    @Reload.responder
    def reload(
        self, config_json, anchors_pem, chain_pem, key_pem, jwt_key_pem=None, jwks_json=None
    ):
        """
        Put the configuration and bundle given (and the JWT material, when
        JWTs are on) in service.
        """
        if (
            self._authority is None
            or self._starting is not None
            or self._stopped is not None
        ):
            raise WorkerRefused("this worker is not serving")
        config, bundle = self._decode(config_json, anchors_pem, chain_pem, key_pem)
        material = None
        if self._jwt_minter is not None and jwt_key_pem is not None:
            material = _jwt_material(config, jwt_key_pem, jwks_json)
        previous = self._trust_store.bundle
        self._trust_store.bundle = bundle
        d = maybeDeferred(self._authority.restart, config)

        def restarted(_):
            if material is not None:
                # One immutable object, read once per call.
                self._jwt_minter.install(material)
            return {}

        def failed(failure):
            self._trust_store.bundle = previous
            raise self._refusal(failure, "refused the new trust bundle")

        return d.addCallbacks(restarted, failed)

    @Counters.responder
    def counters(self):
        """
        The sign counters' growth since the previous answer.
        """
        return self._deltas.take()

    @Stop.responder
    def stop(self):
        """
        Stop serving; answer the last counts once calls in flight are done.
        """
        d = self.stop_serving()

        def answer(_):
            self._reactor.callLater(0, self._on_stopped)
            return self._deltas.take()

        return d.addCallback(answer)

    def stop_serving(self):
        """
        Stop serving, once: take no new calls, give calls in flight the
        authority's grace period, close the validators' connections.

        @return: a Deferred that fires (never fails) once that is done.
        """
        if self._stopped is None:
            self._stopped = self._stop_serving()
            self._stopped.addBoth(self._fire_stop_waiters)
        if self._stop_waiters is None:
            return succeed(None)
        waiter = Deferred()
        self._stop_waiters.append(waiter)
        return waiter

    def _fire_stop_waiters(self, result):
        waiters, self._stop_waiters = self._stop_waiters, None
        for waiter in waiters:
            waiter.callback(None)

    @inlineCallbacks
    def _stop_serving(self):
        if self._starting is not None:
            # Let the start finish (or fail) first, so that nothing it
            # opens is left behind.
            waiter = Deferred()
            self._starting.append(waiter)
            yield waiter
        try:
            if self._authority is not None:
                yield self._authority.stop()
            if self._validator_service is not None:
                yield self._validator_service.stopService()
        except Exception:
            self._log.failure("worker {pid} failed to stop cleanly", pid=os.getpid())

    def _refusal(self, failure, doing):
        """
        The L{WorkerRefused} to answer for C{failure}: the error's own
        message when it is one written for an operator, else only its type
        (the details are logged here, in the worker).
        """
        if failure.check(WorkerRefused):
            return failure.value
        if failure.check(*_OPERATOR_ERRORS):
            return WorkerRefused(f"{doing}: {failure.getErrorMessage()}")
        self._log.failure("worker {pid} {doing}", failure, pid=os.getpid(), doing=doing)
        return WorkerRefused(f"{doing}: {failure.type.__name__} (see the worker's log)")


class ParentConnection(amp.BinaryBoxProtocol):
    """
    The AMP connection to the parent, over the worker's stdin and stdout.

    @param commands: the L{WorkerCommands} answering the parent.
    @param on_lost: called with no arguments when the connection is lost
        (the parent closed the pipe or died).
    """

    def __init__(self, commands, on_lost):
        super().__init__(amp.BoxDispatcher(commands))
        self._on_lost = on_lost

    def connectionLost(self, reason):
        super().connectionLost(reason)
        self._on_lost()


def _parse_arguments(argv):
    parser = argparse.ArgumentParser(
        prog=f"python -m {WORKER_MODULE}",
        description="A sentry_tx worker process; started by sentry_tx itself.",
    )
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--log-as-json", action="store_true")
    return parser.parse_args(argv)


def main(argv=None):
    """
    Run one worker until its parent tells it to stop, closes its stdin, or
    it gets SIGTERM; then exit with status 0.

    @param argv: the arguments (C{--log-level}, C{--log-as-json}), as the
        parent passes them; C{sys.argv[1:]} by default.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    options = _parse_arguments(sys.argv[1:] if argv is None else argv)
    # AMP owns the real stdout; anything else that writes to fd 1 (a stray
    # print, a C library) goes to stderr instead of corrupting the pipe.
    parent_fd = os.dup(1)
    os.dup2(2, 1)

    from twisted.internet import reactor
    from twisted.internet.stdio import StandardIO
    from twisted.logger import globalLogBeginner

    from sentry_tx import logs
    from sentry_tx.metrics import SentryMetrics

    globalLogBeginner.beginLoggingTo(
        [logs.make_observer(options.log_level, options.log_as_json, sys.stderr)],
        redirectStandardIO=False,
    )
    exiting = []

    def exit_after_stopping():
        if exiting:
            return
        exiting.append(True)
        d = commands.stop_serving()
        d.addCallback(lambda _: reactor.stop())

    commands = WorkerCommands(
        reactor,
        SentryMetrics(),
        os.environ,
        on_stopped=lambda: connection.transport.loseConnection(),
    )
    connection = ParentConnection(commands, on_lost=exit_after_stopping)
    StandardIO(connection, stdin=0, stdout=parent_fd, reactor=reactor)
    signal.signal(
        signal.SIGTERM,
        lambda number, frame: reactor.callFromThread(exit_after_stopping),
    )
    reactor.run(installSignalHandlers=False)
    _log.debug("worker {pid} exits", pid=os.getpid())
    sys.stderr.flush()
    # grpcio's and the thread pools' threads are done or abandoned: do not
    # let the interpreter wait for them.
    os._exit(0)


if __name__ == "__main__":
    # Import the module by its name, so that its loggers are named after it
    # rather than after __main__.
    from sentry_tx.server.worker import main as _main

    _main()
