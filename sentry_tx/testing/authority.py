"""
Verified fakes of sentry_tx's interfaces: an identity validator, a
certificate authority (plain, observed, refusing) and a trust store, each
checked against its interface in C{tests/test_testing.py}; and a JWT minter
that records what it was asked to fill.
"""

import asyncio

from twisted.internet.defer import Deferred, fail, succeed
from twisted.python.failure import Failure
from zope.interface import implementer

from sentry_tx.config import SentryConfig
from sentry_tx.identity.caller import CallerIdentity
from sentry_tx.interfaces import ICertificateAuthority, IIdentityValidator, ITrustStore


@implementer(IIdentityValidator)
class FakeValidator:
    """
    A validator that answers with a fixed identity or refusal, and records
    the requests it saw.

    @param name: the TokenValidator number it answers to.
    @param error: when not None, every validation fails with it.
    @param pending: when True, C{validate} returns a Deferred that never
        fires by itself (for timeout tests); they are kept in C{pending}.
    @param needs_reactor: whether the servicer must call it on the reactor.
    @param runs_on_loop: whether it runs on the gRPC loop: C{validate} then
        returns a coroutine, and with C{pending} awaits a loop future kept in
        C{pending}.
    """

    def __init__(
        self, name=1, error=None, pending=False, needs_reactor=True, runs_on_loop=False
    ):
        self.name = name
        self.runs_on_loop = runs_on_loop
        self.needs_reactor = needs_reactor and not runs_on_loop
        self.error = error
        self.requests = []
        self.deadlines = []
        self._pending = pending
        self.pending = []

    def validate(self, request, deadline=None):
        self.requests.append(request)
        self.deadlines.append(deadline)
        if self.runs_on_loop:
            return self._on_loop(request)
        if self._pending:
            d = Deferred()
            self.pending.append(d)
            return d
        if self.error is not None:
            return fail(self.error)
        return succeed(self._identity(request))

    async def _on_loop(self, request):
        if self._pending:
            future = asyncio.get_running_loop().create_future()
            self.pending.append(future)
            return await future
        if self.error is not None:
            raise self.error
        return self._identity(request)

    @staticmethod
    def _identity(request):
        return CallerIdentity(
            trust_domain=request.trust_domain or "public",
            namespace=request.namespace,
            app_id=request.id,
        )


@implementer(ICertificateAuthority)
class FakeCertificateAuthority:
    """
    An authority with a fixed bundle that records start, stop and restart.

    @ivar in_service_reads: how many times C{in_service} was read (the
        servicer reads it once per call it signs, after validation).
    """

    def __init__(self, bundle=None, config=None):
        self.bundle = bundle
        self.config = config if config is not None else SentryConfig()
        self.ready = False
        self.calls = []
        self.in_service_reads = 0

    @property
    def in_service(self):
        """
        The bundle and config, as the servicer reads them.
        """
        from sentry_tx.server.servicer import InService

        self.in_service_reads += 1
        return InService(self.bundle, self.config)

    def start(self, config):
        self.calls.append(("start", config))
        self.config = config
        self.ready = True
        return succeed(None)

    def stop(self):
        self.calls.append(("stop",))
        self.ready = False
        return succeed(None)

    def restart(self, config):
        self.calls.append(("restart", config))
        self.config = config
        return succeed(None)


@implementer(ITrustStore)
class FakeTrustStore:
    """
    A trust store holding bundles in memory: C{load} and C{load_or_generate}
    answer with C{bundle}, or fail with C{error} when it is set.
    """

    watch_directories = ()

    def __init__(self, bundle=None, error=None):
        self.bundle = bundle
        self.error = error
        self.loads = 0

    def load(self, now):
        self.loads += 1
        if self.error is not None:
            return fail(self.error)
        return succeed(self.bundle)

    def load_or_generate(self, now):
        return self.load(now)


@implementer(ICertificateAuthority)
class ObservedAuthority:
    """
    An authority that forwards everything to another and tells a test when a
    restart it was asked for has finished.

    @ivar outcomes: C{(succeeded, result or Failure)} of every finished
        restart.
    """

    def __init__(self, authority):
        self._authority = authority
        self.outcomes = []
        self._waiting = []

    @property
    def config(self):
        return self._authority.config

    @property
    def bundle(self):
        return self._authority.bundle

    @property
    def ready(self):
        return self._authority.ready

    def start(self, config):
        return self._authority.start(config)

    def stop(self):
        return self._authority.stop()

    def restart(self, config):
        d = self._authority.restart(config)
        d.addBoth(self._finished)
        return d

    def when_restarted(self):
        """
        @return: a Deferred that fires with the C{(succeeded, result or
            Failure)} of the next restart to finish; it never fails.
        """
        d = Deferred()
        self._waiting.append(d)
        return d

    def _finished(self, result):
        outcome = (not isinstance(result, Failure), result)
        self.outcomes.append(outcome)
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(outcome)
        return result


class RefusingCertificateAuthority(FakeCertificateAuthority):
    """
    A L{FakeCertificateAuthority} whose every restart fails with C{error},
    as a refused bundle does.
    """

    def __init__(self, error, bundle=None, config=None):
        super().__init__(bundle, config)
        self.error = error

    def restart(self, config):
        self.calls.append(("restart", config))
        return fail(self.error)


class RecordingMinter:
    """
    A L{sentry_tx.jwt.minting.JWTMinter} seen from the servicer: records the
    audiences of every C{fill} (where they are deduplicated), then fills
    through C{minter}.

    @ivar filled: the C{requested_audiences} of every call, in order.
    """

    def __init__(self, minter):
        self._minter = minter
        self.filled = []

    def fill(self, response, identity, requested_audiences, now_seconds, clock_skew):
        self.filled.append(tuple(requested_audiences))
        return self._minter.fill(
            response, identity, requested_audiences, now_seconds, clock_skew
        )
