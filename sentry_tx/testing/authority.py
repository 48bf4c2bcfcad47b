"""
Verified fakes of sentry_tx's interfaces: an identity validator, a
certificate authority (plain, observed, refusing) and a trust store, each
checked against its interface in C{tests/test_testing.py}; and a JWT minter
that records what it was asked to fill.
"""

import asyncio
from collections.abc import Coroutine, Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.python.failure import Failure
from zope.interface import implementer

from sentry_tx.ca.bundle import TrustBundle
from sentry_tx.config import SentryConfig
from sentry_tx.errors import BundleError
from sentry_tx.identity.caller import CallerIdentity, SignRequest
from sentry_tx.interfaces import ICertificateAuthority, IIdentityValidator, ITrustStore

if TYPE_CHECKING:
    from sentry_tx._proto.sentry_pb2 import SignCertificateResponse
    from sentry_tx.jwt.minting import JWTMinter
    from sentry_tx.server.servicer import InService


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
        self,
        name: int = 1,
        error: Exception | None = None,
        pending: bool = False,
        needs_reactor: bool = True,
        runs_on_loop: bool = False,
    ) -> None:
        self.name = name
        self.runs_on_loop = runs_on_loop
        self.needs_reactor = needs_reactor and not runs_on_loop
        self.error = error
        self.requests: list[SignRequest] = []
        self.deadlines: list[float | None] = []
        self._pending = pending
        self.pending: list[
            Deferred[CallerIdentity] | asyncio.Future[CallerIdentity]
        ] = []

    # IIdentityValidator names only the Deferred form; a runs_on_loop
    # validator returns a coroutine, as the real loop validators do.
    def validate(  # type: ignore[override]
        self, request: SignRequest, deadline: float | None = None
    ) -> Deferred[CallerIdentity] | Coroutine[Any, Any, CallerIdentity]:
        self.requests.append(request)
        self.deadlines.append(deadline)
        if self.runs_on_loop:
            return self._on_loop(request)
        if self._pending:
            d: Deferred[CallerIdentity] = Deferred()
            self.pending.append(d)
            return d
        if self.error is not None:
            return fail(self.error)
        return succeed(self._identity(request))

    async def _on_loop(self, request: SignRequest) -> CallerIdentity:
        if self._pending:
            future: asyncio.Future[CallerIdentity] = (
                asyncio.get_running_loop().create_future()
            )
            self.pending.append(future)
            return await future
        if self.error is not None:
            raise self.error
        return self._identity(request)

    @staticmethod
    def _identity(request: SignRequest) -> CallerIdentity:
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

    def __init__(
        self, bundle: TrustBundle | None = None, config: SentryConfig | None = None
    ) -> None:
        self.bundle = bundle
        self.config = config if config is not None else SentryConfig()
        self.ready = False
        self.calls: list[tuple[str] | tuple[str, SentryConfig]] = []
        self.in_service_reads = 0

    @property
    def in_service(self) -> "InService | None":
        """
        The bundle and config, as the servicer reads them; None while there
        is no bundle (as the real authority's before its first load).
        """
        from sentry_tx.server.servicer import InService

        self.in_service_reads += 1
        if self.bundle is None:
            return None
        return InService(self.bundle, self.config)

    def start(self, config: SentryConfig) -> Deferred[None]:
        self.calls.append(("start", config))
        self.config = config
        self.ready = True
        return succeed(None)

    def stop(self) -> Deferred[None]:
        self.calls.append(("stop",))
        self.ready = False
        return succeed(None)

    def restart(self, config: SentryConfig) -> Deferred[None]:
        self.calls.append(("restart", config))
        self.config = config
        return succeed(None)


@implementer(ITrustStore)
class FakeTrustStore:
    """
    A trust store holding bundles in memory: C{load} and C{load_or_generate}
    answer with C{bundle}, or fail with C{error} when it is set.
    """

    watch_directories: tuple[str, ...] = ()

    def __init__(
        self, bundle: TrustBundle | None = None, error: Exception | None = None
    ) -> None:
        self.bundle = bundle
        self.error = error
        self.loads = 0

    def load(self, now: datetime) -> Deferred[TrustBundle]:
        self.loads += 1
        if self.error is not None:
            return fail(self.error)
        if self.bundle is None:
            # A trust store never fires with None (ITrustStore).
            return fail(BundleError("memory", "holds no trust bundle"))
        return succeed(self.bundle)

    def load_or_generate(self, now: datetime) -> Deferred[TrustBundle]:
        return self.load(now)


@implementer(ICertificateAuthority)
class ObservedAuthority:
    """
    An authority that forwards everything to another and tells a test when a
    restart it was asked for has finished.

    @ivar outcomes: C{(succeeded, result or Failure)} of every finished
        restart.
    """

    def __init__(self, authority: FakeCertificateAuthority) -> None:
        self._authority = authority
        self.outcomes: list[tuple[bool, object]] = []
        self._waiting: list[Deferred[tuple[bool, object]]] = []

    @property
    def config(self) -> SentryConfig:
        return self._authority.config

    @property
    def bundle(self) -> TrustBundle | None:
        return self._authority.bundle

    @property
    def ready(self) -> bool:
        return self._authority.ready

    def start(self, config: SentryConfig) -> Deferred[None]:
        return self._authority.start(config)

    def stop(self) -> Deferred[None]:
        return self._authority.stop()

    def restart(self, config: SentryConfig) -> Deferred[None]:
        d = self._authority.restart(config)
        d.addBoth(self._finished)
        return d

    def when_restarted(self) -> Deferred[tuple[bool, object]]:
        """
        @return: a Deferred that fires with the C{(succeeded, result or
            Failure)} of the next restart to finish; it never fails.
        """
        d: Deferred[tuple[bool, object]] = Deferred()
        self._waiting.append(d)
        return d

    def _finished(self, result: object) -> object:
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

    def __init__(
        self,
        error: Exception,
        bundle: TrustBundle | None = None,
        config: SentryConfig | None = None,
    ) -> None:
        super().__init__(bundle, config)
        self.error = error

    def restart(self, config: SentryConfig) -> Deferred[None]:
        self.calls.append(("restart", config))
        return fail(self.error)


class RecordingMinter:
    """
    A L{sentry_tx.jwt.minting.JWTMinter} seen from the servicer: records the
    audiences of every C{fill} (where they are deduplicated), then fills
    through C{minter}.

    @ivar filled: the C{requested_audiences} of every call, in order.
    """

    def __init__(self, minter: "JWTMinter") -> None:
        self._minter = minter
        self.filled: list[tuple[str, ...]] = []

    def fill(
        self,
        response: "SignCertificateResponse",
        identity: CallerIdentity,
        requested_audiences: Sequence[str],
        now_seconds: float,
        clock_skew: timedelta,
    ) -> None:
        self.filled.append(tuple(requested_audiences))
        self._minter.fill(
            response, identity, requested_audiences, now_seconds, clock_skew
        )
