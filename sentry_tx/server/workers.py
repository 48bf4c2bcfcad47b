# -*- test-case-name: tests.test_workers,tests.test_root -*-
"""
The certificate authority as several serving processes sharing one port.

One Python process signs on one core (the pipeline holds the GIL).
L{WorkerPoolAuthority} is the L{ICertificateAuthority} that uses more: it
loads the trust bundle as the single-process authority does, serves in this
process too (a local L{CertificateAuthorityService}, when given), and runs
worker processes (L{sentry_tx.server.worker}), each one a single-process
authority on its own reactor, all bound to the same port with SO_REUSEPORT
so that the kernel spreads connections over them.  N serving processes are
this one and N - 1 workers.

The parent keeps what is process-wide: the configuration, the trust store
and the bundle (it alone reads, generates and verifies it), the readiness
that C{/healthz} reads, and the metrics that C{/metrics} serves (it pulls
every worker's counter increments every L{METRICS_PULL_INTERVAL_SECONDS}).
It talks AMP to each worker over the worker's stdin and stdout
(L{sentry_tx.server.ipc}); a worker's stderr is the parent's.  The parent
never blocks: it makes no grpc call, and the only thread it uses checks a
new bundle before reload.
"""

import os
import sys
from dataclasses import replace
from datetime import datetime, timezone

from twisted.application.service import Service
from twisted.internet.defer import (
    Deferred,
    DeferredList,
    FirstError,
    TimeoutError,
    fail,
    gatherResults,
    inlineCallbacks,
)
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.protocols import amp
from zope.interface import implementer

from sentry_tx.interfaces import ICertificateAuthority
from sentry_tx.listen import check_port_free
from sentry_tx.server.ipc import (
    WORKER_MODULE,
    Counters,
    Reload,
    Start,
    Stop,
    WorkerRefused,
    add_counter_deltas,
    bundle_to_pems,
    config_to_json,
)
from sentry_tx.server.pushed_store import PushedTrustStore
from sentry_tx.server.serial import SerialReloads, StartGate
from sentry_tx.server.service import (
    GRPC_PORT_FLAG,
    SHUTDOWN_GRACE_SECONDS,
    AlreadyRunningError,
    NotRunningError,
    listen_target,
)
from sentry_tx.server.worker_process import (
    KILL_WAIT_SECONDS,
    WorkerError,
    WorkerProcess,
    check_bundle_for_workers,
    describe_exit,
)


METRICS_PULL_INTERVAL_SECONDS = 1.0
"""
How often the parent adds the workers' counter increments to its metrics.
"""

COUNTERS_TIMEOUT_SECONDS = 5.0
"""
How long a worker may take to answer L{Counters} before that pull is given
up (the next pull asks again; nothing is lost).
"""

RESPAWN_INITIAL_DELAY_SECONDS = 1.0
"""
How long after it ended a worker is started again the first time.  The
delay doubles each time the same worker ends again, up to
L{RESPAWN_MAX_DELAY_SECONDS}.
"""

RESPAWN_MAX_DELAY_SECONDS = 30.0
"""
The longest delay before a worker is started again; a worker that served
this long or longer before it ended starts the count over.
"""

STOP_MARGIN_SECONDS = 2.0
"""
How long past the grace period a stopping worker may take to exit before
it is killed (SIGKILL).
"""


class _Slot:
    """
    One place in the pool: the process that fills it now, and its respawn
    state.
    """

    def __init__(self, index, delay_seconds):
        self.index = index
        self.process = None
        self.delay_seconds = delay_seconds
        self.respawn_call = None


@implementer(ICertificateAuthority)
class WorkerPoolAuthority(Service):
    """
    The CA as a pool of worker processes, a child of sentry_tx's
    MultiService in place of L{CertificateAuthorityService}.

    Nothing is spawned before C{start} (twistd forks after C{makeService}).

    @ivar config: the L{SentryConfig} in service.
    @ivar bundle: the L{TrustBundle} every worker serves, or None before
        start.
    @ivar port: the gRPC port every worker bound, once started.

    @param config: the L{SentryConfig} (C{port} 0 lets the first worker pick
        a free port, which the others then share).
    @param reactor: the reactor: processes, clock and thread pool.
    @param trust_store: the L{ITrustStore} the bundle is loaded from.
    @param metrics: the L{SentryMetrics} C{/metrics} serves; the workers'
        sign counters are added to it.
    @param workers: how many worker processes, at least 1.
    @param on_start_failure: called with the Failure when C{startService}'s
        start fails (the root service makes it fatal).
    @param configuration_source: an L{IConfigurationSource} that completes
        the config at start, or None when the config is complete already.
    @param spawn: starts one worker: called with the L{WorkerProcess}, the
        argument list and the environment, returns its process transport;
        C{reactor.spawnProcess} with the worker's stdin and stdout as pipes
        and the parent's stderr as its own by default.
    @param worker_argv: the command that runs a worker, without its
        options; C{[sys.executable, "-m", WORKER_MODULE]} by default.
    @param environ: the workers' environment; L{os.environ} by default.
    @param on_worker_serving: called with C{(index, pid)} each time a
        worker answers its L{Start}, at start and after each respawn.
    @param local_factory: builds the authority that serves in this process
        beside the workers, from C{(config, trust_store)} (a
        L{CertificateAuthorityService} binding with SO_REUSEPORT, counting
        in this process's metrics), or None when only workers serve.
    @param respawn_initial_delay_seconds: see L{RESPAWN_INITIAL_DELAY_SECONDS}.
    @param respawn_max_delay_seconds: see L{RESPAWN_MAX_DELAY_SECONDS}.
    @param metrics_pull_interval_seconds: see
        L{METRICS_PULL_INTERVAL_SECONDS}.
    @param jwt_minter: the L{sentry_tx.jwt.minting.JWTMinter} the trust
        store installs the JWT signing material in (C{--jwt-enabled}), or
        None: its material is pushed to the workers with the bundle.
    """

    name = "ca"
    _log = Logger()

    def __init__(
        self,
        config,
        reactor,
        trust_store,
        metrics,
        workers,
        on_start_failure=None,
        configuration_source=None,
        spawn=None,
        worker_argv=None,
        environ=None,
        on_worker_serving=None,
        respawn_initial_delay_seconds=RESPAWN_INITIAL_DELAY_SECONDS,
        respawn_max_delay_seconds=RESPAWN_MAX_DELAY_SECONDS,
        metrics_pull_interval_seconds=METRICS_PULL_INTERVAL_SECONDS,
        local_factory=None,
        jwt_minter=None,
    ):
        if workers < 1:
            raise ValueError(f"a worker pool needs at least one worker, not {workers}")
        self._local_factory = local_factory
        self._jwt_minter = jwt_minter
        # The JWT material the workers serve: (key PEM, JWKS) or None.
        self._pushed_jwt = None
        self._local = None
        self._local_store = None
        self.config = config
        self.bundle = None
        self.port = None
        self._reactor = reactor
        self._trust_store = trust_store
        self._metrics = metrics
        self._workers = workers
        self._on_start_failure = on_start_failure
        self._configuration_source = configuration_source
        self._spawn_process = spawn if spawn is not None else self._spawn_with_reactor
        self._worker_argv = list(
            worker_argv
            if worker_argv is not None
            else [sys.executable, "-m", WORKER_MODULE]
        )
        self._environ = environ
        self._on_worker_serving = on_worker_serving
        self._respawn_initial_delay_seconds = respawn_initial_delay_seconds
        self._respawn_max_delay_seconds = respawn_max_delay_seconds
        self._metrics_pull_interval_seconds = metrics_pull_interval_seconds
        self._slots = []
        self._started = False
        self._serving = False
        self._stopping = False
        self._pull = None
        # While starting: Deferreds fired when the start is over.
        self._start_gate = StartGate()
        self._reloads = SerialReloads(self._reload)

    # IService

    def startService(self):
        super().startService()
        d = self.start(self.config)
        d.addErrback(self._start_failed)

    def stopService(self):
        super().stopService()
        return self.stop()

    def _start_failed(self, failure):
        if self._stopping:
            self._log.info(
                "worker pool stopped while starting: {error}",
                error=failure.getErrorMessage(),
            )
        elif self._on_start_failure is not None:
            self._on_start_failure(failure)
        else:
            self._log.failure("worker pool failed to start", failure)

    # ICertificateAuthority

    @property
    def ready(self):
        """
        With a local authority: True once it serves (workers join as they
        start), and while it or a worker serves.  Without: True once every
        worker answered its first L{Start}, and then as long as at least one
        worker serves.
        """
        return (
            self._serving
            and not self._stopping
            and (
                (self._local is not None and self._local.ready)
                or any(
                    slot.process is not None and slot.process.serving
                    for slot in self._slots
                )
            )
        )

    def processes(self):
        """
        The worker processes running now, by index (a worker waiting to be
        respawned is missing).

        @return: a L{list} of L{WorkerProcess}.
        """
        return [slot.process for slot in self._slots if slot.process is not None]

    def _now(self):
        return datetime.fromtimestamp(self._reactor.seconds(), timezone.utc)

    def start(self, config):
        if self._started:
            return fail(AlreadyRunningError("the certificate authority is running"))
        self._started = True
        self._stopping = False
        self._start_gate.begin()
        d = self._start(config)
        d.addErrback(self._reset_after_failed_start)
        d.addBoth(self._start_gate.end)
        return d

    @inlineCallbacks
    def _start(self, config):
        if self._configuration_source is not None:
            config = yield self._configuration_source.resolve(config)
        self.config = config
        bundle = yield self._trust_store.load_or_generate(self._now())
        self._check_not_stopping()
        self._install(bundle)
        self._slots = [
            _Slot(index, self._respawn_initial_delay_seconds)
            for index in range(self._workers)
        ]
        # Every serving process binds with SO_REUSEPORT, which would share
        # the port with another sentry_tx of this user: refuse a port that
        # is taken, as a single process would (the root's PortCheck did so
        # at start; a restart of the pool checks again).
        check_port_free(GRPC_PORT_FLAG, config.listen_address, config.port)
        # The first to serve binds the port asked for (0 picks a free one):
        # this process when it serves, else the first worker; the others
        # then bind the port it reports.
        if self._local_factory is not None:
            self._local_store = PushedTrustStore(bundle)
            self._local = self._local_factory(config, self._local_store)
            yield self._local.start(config)
            self.port = self._local.port
            self._check_not_stopping()
            # This process serves: the pool is ready now, and the workers
            # join the port as they start (one that cannot start is
            # started again, as after a crash).
            self._serving = True
            for slot in self._slots:
                self._start_in_background(slot)
        else:
            self.port = yield self._start_worker(self._spawn(self._slots[0]), config)
            self._check_not_stopping()
            others = [self._spawn(slot) for slot in self._slots[1:]]
            try:
                yield gatherResults(
                    [
                        self._start_worker(process, self._bound_config())
                        for process in others
                    ],
                    consumeErrors=True,
                )
            except FirstError as e:
                e.subFailure.raiseException()
        self._check_not_stopping()
        self._serving = True
        self._pull = LoopingCall(self.collect_counters)
        self._pull.clock = self._reactor
        self._pull.start(self._metrics_pull_interval_seconds, now=False)
        self._log.info(
            "gRPC server listening on {target} in {processes} serving processes"
            " ({workers} worker processes{and_this_one});"
            " issuer {issuer} valid until {not_after}",
            target=listen_target(config.listen_address, self.port),
            processes=self._workers + (self._local is not None),
            and_this_one=" and this one" if self._local is not None else "",
            workers=self._workers,
            issuer=bundle.issuer.subject.rfc4514_string(),
            not_after=bundle.issuer.not_valid_after_utc.isoformat(),
        )

    def _check_not_stopping(self):
        if self._stopping:
            raise WorkerError("the worker pool was stopped while it started")

    def _reset_after_failed_start(self, failure):
        d = self._stop_workers()
        d.addCallback(lambda _: self._stop_local())

        def reset(_):
            self._started = self._serving = False
            return failure

        return d.addCallback(reset)

    def _bound_config(self):
        """
        The configuration every worker serves: the port bound by the first.
        """
        return replace(self.config, port=self.port)

    def _jwt_material(self):
        """
        The JWT signing key and JWKS in service here, as stored, or None.
        """
        if self._jwt_minter is None or self._jwt_minter.material is None:
            return None
        material = self._jwt_minter.material
        return material.key_pem, material.jwks_json

    def _jwt_arguments(self):
        """
        The L{Start} and L{Reload} arguments that carry the JWT material
        (none when JWTs are off); remembered as what the workers serve.
        """
        self._pushed_jwt = self._jwt_material()
        if self._pushed_jwt is None:
            return {}
        key_pem, jwks_json = self._pushed_jwt
        return {"jwt_key_pem": key_pem, "jwks_json": jwks_json}

    def _install(self, bundle):
        self.bundle = bundle
        self._metrics.record_bundle(bundle)

    def _in_thread(self, f, *args):
        return deferToThreadPool(self._reactor, self._reactor.getThreadPool(), f, *args)

    # Processes

    def _spawn_with_reactor(self, process, argv, environ):
        return self._reactor.spawnProcess(
            process,
            argv[0],
            argv,
            env=environ,
            childFDs={0: "w", 1: "r", 2: 2},
        )

    def _spawn(self, slot):
        """
        Start a worker process for C{slot}; it is not serving until its
        L{Start} is answered.
        """
        process = WorkerProcess(slot.index)
        argv = self._worker_argv + ["--log-level", self.config.log_level]
        if self.config.log_as_json:
            argv.append("--log-as-json")
        environ = dict(os.environ if self._environ is None else self._environ)
        self._spawn_process(process, argv, environ)
        slot.process = process
        self._log.debug(
            "worker {index} started as pid {pid}", index=slot.index, pid=process.pid
        )
        process.wait_ended().addCallback(self._worker_ended, slot, process)
        return process

    @inlineCallbacks
    def _start_worker(self, process, config):
        """
        Send L{Start} with C{config} and the current bundle.

        @return: a Deferred firing with the port the worker bound, or
            failing with L{WorkerError}.
        """
        bundle = self.bundle
        anchors_pem, chain_pem, key_pem = bundle_to_pems(bundle)
        try:
            answer = yield process.call(
                Start,
                config_json=config_to_json(config),
                anchors_pem=anchors_pem,
                chain_pem=chain_pem,
                key_pem=key_pem,
                **self._jwt_arguments(),
            )
        except (WorkerRefused, amp.RemoteAmpError) as e:
            raise WorkerError(
                f"worker {process.index} (pid {process.pid}) could not start: {e}"
            ) from None
        except Exception:
            status = yield self._exit_status(process)
            raise WorkerError(
                f"worker {process.index} (pid {process.pid}) ended before it"
                f" started ({status}); see its log above"
            ) from None
        if process.retiring or process.ended:
            raise WorkerError(
                f"worker {process.index} (pid {process.pid}) was stopped while it started"
            )
        process.port = answer["port"]
        process.serving = True
        process.started_at = self._reactor.seconds()
        if self.bundle is not bundle:
            # A reload ran while this worker started: give it the new bundle.
            yield self._reload_worker(process)
        if self._on_worker_serving is not None:
            self._on_worker_serving(process.index, process.pid)
        return process.port

    def _exit_status(self, process):
        """
        @return: a Deferred firing with how C{process} ended, in words, once
            it has (or C{"still running"} after L{KILL_WAIT_SECONDS}).
        """
        d = process.wait_ended()
        d.addTimeout(KILL_WAIT_SECONDS, self._reactor)
        return d.addCallbacks(describe_exit, lambda _: "still running")

    def _worker_ended(self, reason, slot, process):
        if slot.process is process:
            slot.process = None
        if process.retiring or self._stopping or not self._started:
            self._log.info(
                "worker {index} (pid {pid}) exited: {status}",
                index=slot.index,
                pid=process.pid,
                status=describe_exit(reason),
            )
        else:
            self._log.error(
                "worker {index} (pid {pid}) ended unexpectedly: {status}",
                index=slot.index,
                pid=process.pid,
                status=describe_exit(reason),
            )
        if self._serving and not self._stopping and slot.process is None:
            self._schedule_respawn(slot, process)

    def _schedule_respawn(self, slot, ended=None):
        if ended is not None and ended.started_at is not None:
            served_seconds = self._reactor.seconds() - ended.started_at
            if served_seconds >= self._respawn_max_delay_seconds:
                slot.delay_seconds = self._respawn_initial_delay_seconds
        delay = slot.delay_seconds
        slot.delay_seconds = min(delay * 2, self._respawn_max_delay_seconds)
        self._log.info(
            "starting worker {index} again in {delay} s", index=slot.index, delay=delay
        )
        slot.respawn_call = self._reactor.callLater(delay, self._respawn, slot)

    def _respawn(self, slot):
        slot.respawn_call = None
        if self._stopping or not self._serving:
            return
        self._start_in_background(slot, again=True)

    def _start_in_background(self, slot, again=False):
        """
        Spawn and start a worker for C{slot} while the pool serves; one that
        cannot start is killed, and its end schedules the next attempt.
        """
        try:
            process = self._spawn(slot)
        except Exception:
            self._log.failure("cannot start worker {index}", index=slot.index)
            self._schedule_respawn(slot)
            return
        d = self._start_worker(process, self._bound_config())

        def started(port):
            self._log.info(
                "worker {index} (pid {pid}) serves{again} on port {port}",
                index=slot.index,
                pid=process.pid,
                port=port,
                again=" again" if again else "",
            )

        def failed(failure):
            if self._stopping:
                return
            self._log.error(
                "worker {index} (pid {pid}) did not start: {error}",
                index=slot.index,
                pid=process.pid,
                error=failure.getErrorMessage(),
            )
            # Its end schedules the next attempt, with a longer delay.
            process.retiring = True
            process.kill()

        d.addCallbacks(started, failed)

    def _retire(self, process):
        """
        Tell C{process} to stop, add its last counts, and close its stdin;
        kill it if it has not exited L{STOP_MARGIN_SECONDS} after the grace
        period.

        @return: a Deferred that fires (never fails) once it has ended, or
            once it could not be reaped L{KILL_WAIT_SECONDS} after the kill.
        """
        if not process.retiring and not process.ended:
            process.retiring = True
            process.serving = False
            stopped = process.call(Stop)
            stopped.addCallback(
                lambda answer: add_counter_deltas(self._metrics, answer)
            )
            stopped.addErrback(
                lambda failure: self._log.debug(
                    "worker {index} did not answer Stop: {error}",
                    index=process.index,
                    error=failure.getErrorMessage(),
                )
            )
            stopped.addBoth(lambda _: process.close_stdin())
            kill = self._reactor.callLater(
                SHUTDOWN_GRACE_SECONDS + STOP_MARGIN_SECONDS, self._kill, process
            )
            process.wait_ended().addCallback(
                lambda _: kill.cancel() if kill.active() else None
            )
        ended = process.wait_ended()
        ended.addTimeout(
            SHUTDOWN_GRACE_SECONDS + STOP_MARGIN_SECONDS + KILL_WAIT_SECONDS,
            self._reactor,
        )
        ended.addCallbacks(lambda _: None, self._not_reaped, errbackArgs=(process,))
        return ended

    def _kill(self, process):
        self._log.warn(
            "worker {index} (pid {pid}) did not exit {seconds} s after it was"
            " told to stop; killing it",
            index=process.index,
            pid=process.pid,
            seconds=SHUTDOWN_GRACE_SECONDS + STOP_MARGIN_SECONDS,
        )
        process.kill()

    def _not_reaped(self, failure, process):
        failure.trap(TimeoutError)
        self._log.error(
            "worker {index} (pid {pid}) was killed but has not ended; giving up on it",
            index=process.index,
            pid=process.pid,
        )

    # Metrics

    def collect_counters(self):
        """
        Add every serving worker's counter increments to the metrics now
        (done every L{METRICS_PULL_INTERVAL_SECONDS} while serving).

        @return: a Deferred that fires (never fails) once every worker
            answered or was given up on.
        """
        pulls = []
        for process in self.processes():
            if not process.serving:
                continue
            d = process.call(Counters)
            d.addTimeout(COUNTERS_TIMEOUT_SECONDS, self._reactor)
            d.addCallback(lambda answer: add_counter_deltas(self._metrics, answer))
            d.addErrback(self._counters_failed, process)
            pulls.append(d)
        return DeferredList(pulls)

    def _counters_failed(self, failure, process):
        self._log.warn(
            "could not read the counters of worker {index} (pid {pid}): {error}",
            index=process.index,
            pid=process.pid,
            error=failure.getErrorMessage(),
        )

    # Stop

    def stop(self):
        self._stopping = True
        if self._pull is not None and self._pull.running:
            self._pull.stop()
        self._pull = None
        workers = len(self.processes())
        if workers:
            self._log.info(
                "stopping {workers} worker processes; calls in flight have"
                " {grace} s to finish",
                workers=workers,
                grace=SHUTDOWN_GRACE_SECONDS,
            )
        d = DeferredList([self._stop_workers(), self._stop_local()])

        def stopped(_):
            self._started = self._serving = False

        return d.addCallback(stopped)

    def _stop_local(self):
        """
        Stop the authority serving in this process (its calls in flight have
        the grace period), if there is one.

        @return: a Deferred that fires (never fails) once it stopped.
        """
        local, self._local = self._local, None
        if local is None:
            d = Deferred()
            d.callback(None)
            return d
        d = local.stop()
        d.addErrback(
            lambda failure: self._log.failure(
                "the gRPC server of this process did not stop cleanly", failure
            )
        )
        return d

    def _stop_workers(self):
        for slot in self._slots:
            if slot.respawn_call is not None and slot.respawn_call.active():
                slot.respawn_call.cancel()
            slot.respawn_call = None
        return DeferredList([self._retire(process) for process in self.processes()])

    # Reload

    def restart(self, config):
        if self._start_gate.starting:
            # Still starting: reload once the start is over, as the
            # single-process authority does.
            return self._start_gate.after_start().addCallback(
                lambda _: self.restart(config)
            )
        if not self._serving or self._stopping:
            return fail(NotRunningError("the certificate authority is not running"))
        return self._reloads.request(config)

    @inlineCallbacks
    def _reload(self, config):
        try:
            bundle = yield self._trust_store.load(self._now())
            yield self._in_thread(check_bundle_for_workers, bundle, config, self._now())
        except Exception as e:
            self._metrics.issuercert_reload_failed.inc()
            self._log.error(
                "issuer credentials refused; the previous bundle stays in service: {error}",
                error=str(e),
            )
            raise
        if (
            config == self.config
            and bundle_to_pems(bundle) == bundle_to_pems(self.bundle)
            and self._jwt_material() == self._pushed_jwt
        ):
            # The files were touched but say the same: nothing to push.
            self._log.info("issuer credentials unchanged")
            return
        self.config = config
        self._install(bundle)
        targets = [process for process in self.processes() if process.serving]
        yield DeferredList(
            [self._reload_local()]
            + [self._reload_worker(process) for process in targets]
        )
        self._log.info(
            "issuer credentials reloaded in {workers} worker processes; issuer"
            " {issuer} valid until {not_after}",
            workers=len(targets),
            issuer=bundle.issuer.subject.rfc4514_string(),
            not_after=bundle.issuer.not_valid_after_utc.isoformat(),
        )

    def _reload_local(self):
        """
        Put the current config and bundle in service in this process.

        @return: a Deferred that fires (never fails) once done; a refusal is
            logged (the bundle was checked before, so it means a fault).
        """
        if self._local is None:
            d = Deferred()
            d.callback(None)
            return d
        self._local_store.bundle = self.bundle
        d = self._local.restart(self._bound_config())
        d.addErrback(
            lambda failure: self._log.failure(
                "this process did not take the new trust bundle", failure
            )
        )
        return d

    def _reload_worker(self, process):
        """
        Send L{Reload} with the current config and bundle; a worker that
        does not take them is stopped (and, by its end, respawned with them)
        so that no worker keeps serving another bundle.

        @return: a Deferred that fires (never fails) once the worker took
            the bundle or was told to stop.
        """
        anchors_pem, chain_pem, key_pem = bundle_to_pems(self.bundle)
        d = process.call(
            Reload,
            config_json=config_to_json(self._bound_config()),
            anchors_pem=anchors_pem,
            chain_pem=chain_pem,
            key_pem=key_pem,
            **self._jwt_arguments(),
        )

        def failed(failure):
            if process.ended or process.retiring:
                return None
            self._log.error(
                "worker {index} (pid {pid}) did not take the new trust bundle:"
                " {error}; restarting it",
                index=process.index,
                pid=process.pid,
                error=failure.getErrorMessage(),
            )
            self._retire(process)

        return d.addCallbacks(lambda _: None, failed)
