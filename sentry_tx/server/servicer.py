# -*- test-case-name: tests.test_servicer,tests.test_fuzz,tests.test_limits -*-
"""
The SignCertificate pipeline (SPEC section 5), served by C{grpc.aio} on the
gRPC loop (L{sentry_tx.server.loop}).

The pipeline runs inline on the loop: parsing and signing take less time
than a hop to a thread pool would cost.  A validator that runs on the loop
(C{runs_on_loop}: KUBERNETES, whose TokenReview is made with the loop's own
HTTP client) is awaited there, within the deadline; a validator that needs
the reactor (C{needs_reactor}: JWKS fetching its key set with treq) is handed
to the reactor thread with C{callFromThread} and awaited as a future the
reactor completes; a validator that is pure computation (INSECURE) is called
inline and must answer at once.

Every error the pipeline ends a call with is mapped to its status in one
table, L{ERROR_STATUS}.

A call denied for the caller's own sake (L{DENIAL_CODES}) is logged, one
line each, as the operator's audit trail: who asked (peer, namespace/id)
and why it was refused, each cut by L{quote_input}.  Refusals because of
load (UNAVAILABLE, RESOURCE_EXHAUSTED) are counted, not logged.

The request's shape (L{sentry_tx.identity.rules.request_shape_problem}) is
checked first, before the validator: a request that breaks a limit is
INVALID_ARGUMENT whatever else is wrong with it, counted as reason
C{validator}, and nothing is validated, deduplicated or signed for it.  Its
audience count is checked on the parsed message, before the request is
even copied out of it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, NoReturn, Protocol, TypeVar

import grpc
from google.protobuf.message import DecodeError
from google.protobuf.timestamp_pb2 import Timestamp
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from sentry_tx._proto import sentry_pb2
from sentry_tx.ca.authority import issue_workload_certificate
from sentry_tx.ca.csr import parse_csr
from sentry_tx.errors import (
    CSRError,
    IssuerExpiredError,
    ValidationError,
    ValidatorOverloadedError,
    ValidatorUnavailableError,
)
from sentry_tx.identity.caller import VALIDATOR_UNKNOWN, SignRequest
from sentry_tx.identity.rules import audience_count_problem, request_shape_problem
from sentry_tx.logs import quote_input
from sentry_tx.metrics import (
    FAILURE_REASON_CERT_PARSE,
    FAILURE_REASON_CERT_SIGN,
    FAILURE_REASON_VALIDATOR,
    OUTCOME_SUCCESS,
)
from sentry_tx.server.loop import on_reactor

if TYPE_CHECKING:
    from sentry_tx.ca.bundle import TrustBundle
    from sentry_tx.config import SentryConfig
    from sentry_tx.identity.caller import CallerIdentity
    from sentry_tx.interfaces import IIdentityValidator, IServingReactor
    from sentry_tx.jwt.minting import JWTMinter
    from sentry_tx.metrics import SentryMetrics

    # What grpc.aio hands the method: the request is read as bytes, or EOF.
    Context = grpc.aio.ServicerContext[
        bytes | grpc.aio._EOF, sentry_pb2.SignCertificateResponse
    ]

_T = TypeVar("_T")

Metadata = tuple[tuple[str, str], ...]
"""
gRPC trailing metadata: key/value pairs.
"""


SERVICE_NAME = "dapr.proto.sentry.v1.CA"
METHOD_NAME = "SignCertificate"

VALIDATION_TIMEOUT_SECONDS = 10.0
"""
The longest a validator may take, from the call's arrival; a client's
earlier deadline shortens it.
"""

REQUEST_ARRIVAL_TIMEOUT_SECONDS = 10.0
"""
How long a call may wait for its request message once its headers arrived;
a call whose request has not arrived by then is ended with
DEADLINE_EXCEEDED and its stream freed (a silent stream holds nothing
longer).
"""

RETRY_PUSHBACK_METADATA_KEY = "grpc-retry-pushback-ms"

NO_DEFAULT_VALIDATOR = "a validator name must be specified in this environment"
VALIDATOR_NOT_ENABLED = "the requested validator is not enabled"
MALFORMED_REQUEST = "failed to parse request"
NO_REQUEST = "failed to parse request: no request message"
REQUEST_NOT_ARRIVED = "the request message did not arrive in time"
STOPPING = "the certificate authority is stopping; retry"
SIGNING_FAILED = "failed to sign certificate"
VALIDATION_FAILED = "failed to validate the caller"
VALIDATION_TIMED_OUT = "timed out validating the caller"
JWT_FAILED = "failed to generate JWT"

DENIAL_CODES = frozenset(
    (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.INVALID_ARGUMENT)
)
"""
The statuses of a call refused because of what the caller sent or who it
is; each such call is logged in one line.
"""


@dataclass(frozen=True)
class InService:
    """
    What a call signs with, published as one immutable object: a call reads
    it once, so a call that started before a swap finishes with what it
    started with.

    @ivar bundle: the L{TrustBundle}.
    @ivar config: the L{SentryConfig} (TTL, clock skew, own namespace).
    """

    bundle: TrustBundle
    config: SentryConfig


class InServiceHolder(Protocol):
    """
    What the servicer reads of the authority: the L{InService} of now.
    """

    @property
    def in_service(self) -> InService | None:
        """
        What a call that starts now signs with (None before the first
        bundle is in service, when no call is served).
        """


class Refusal(Exception):
    """
    End the call with C{code} and C{message}, counted under C{reason}, with
    C{trailing_metadata} (a tuple of key/value pairs).
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        reason: str,
        trailing_metadata: Iterable[tuple[str, str]] = (),
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason
        self.trailing_metadata = tuple(trailing_metadata)


@dataclass(frozen=True)
class ErrorStatus:
    """
    How one kind of pipeline error ends a call: its status code, the failure
    reason it is counted under, and the trailing metadata it adds (a
    function of the error, or None).  The message is the error's own.
    """

    code: grpc.StatusCode
    reason: str
    trailers: Callable[[Exception], Metadata] | None = None


def _retry_pushback(error: Exception) -> Metadata:
    assert isinstance(error, ValidatorOverloadedError)  # see ERROR_STATUS
    return ((RETRY_PUSHBACK_METADATA_KEY, str(int(error.retry_after_ms))),)


ERROR_STATUS: dict[type[Exception], ErrorStatus] = {
    ValidationError: ErrorStatus(
        grpc.StatusCode.PERMISSION_DENIED, FAILURE_REASON_VALIDATOR
    ),
    ValidatorUnavailableError: ErrorStatus(
        grpc.StatusCode.UNAVAILABLE, FAILURE_REASON_VALIDATOR
    ),
    ValidatorOverloadedError: ErrorStatus(
        grpc.StatusCode.RESOURCE_EXHAUSTED, FAILURE_REASON_VALIDATOR, _retry_pushback
    ),
    CSRError: ErrorStatus(grpc.StatusCode.INVALID_ARGUMENT, FAILURE_REASON_CERT_PARSE),
    IssuerExpiredError: ErrorStatus(
        grpc.StatusCode.FAILED_PRECONDITION, FAILURE_REASON_CERT_SIGN
    ),
}
"""
Every error the pipeline expects, by class, and the status it ends a call
with.  Anything else is INTERNAL with a fixed message (its cause is logged).
"""


def refusal_for(error: Exception) -> Refusal | None:
    """
    The L{Refusal} that C{error} ends a call with, by L{ERROR_STATUS}, or
    None when it is not an error the pipeline expects.
    """
    for cls in type(error).__mro__:
        status = ERROR_STATUS.get(cls)
        if status is not None:
            trailers = () if status.trailers is None else status.trailers(error)
            return Refusal(status.code, str(error), status.reason, trailers)
    return None


class CAServicer:
    """
    Answers C{dapr.proto.sentry.v1.CA/SignCertificate} on the gRPC loop.

    @param reactor: the reactor validators that need it run on; also the
        clock (its C{seconds()} is read on the loop, which is thread-safe).
    @param authority: an object whose C{in_service} attribute is the
        L{InService} to sign with, read once per call.
    @param validators: a mapping from C{TokenValidator} numbers to enabled
        L{IIdentityValidator}s.
    @param default_validator: the number used for C{UNKNOWN}, or None when
        this environment has no default.
    @param metrics: the L{SentryMetrics}.
    @param request_arrival_timeout_seconds: see
        L{REQUEST_ARRIVAL_TIMEOUT_SECONDS}.
    @param jwt_minter: the L{sentry_tx.jwt.minting.JWTMinter} that fills
        C{jwt} and C{per_audience_jwts} (C{--jwt-enabled}), or None.
    """

    _log = Logger()

    def __init__(
        self,
        reactor: IServingReactor,
        authority: InServiceHolder,
        validators: Mapping[int, IIdentityValidator],
        default_validator: int | None,
        metrics: SentryMetrics,
        validation_timeout_seconds: float = VALIDATION_TIMEOUT_SECONDS,
        request_arrival_timeout_seconds: float = REQUEST_ARRIVAL_TIMEOUT_SECONDS,
        jwt_minter: JWTMinter | None = None,
    ) -> None:
        self._jwt_minter = jwt_minter
        # Set on the gRPC loop when sentry_tx starts to stop (see L{drain}):
        # a call that starts after that is refused here with UNAVAILABLE.
        self.stopping = False
        self.in_flight = 0
        self._idle: asyncio.Event | None = None
        self._reactor = reactor
        self._authority = authority
        self._validators = dict(validators)
        self._default_validator = default_validator
        self._metrics = metrics
        self._validation_timeout_seconds = validation_timeout_seconds
        self._request_arrival_timeout_seconds = request_arrival_timeout_seconds

    async def SignCertificateStream(
        self, request_iterator: AsyncIterator[bytes], context: Context
    ) -> sentry_pb2.SignCertificateResponse:
        """
        The gRPC method as served: called when the call's headers arrive,
        it waits at most C{request_arrival_timeout_seconds} for the request
        message, as bytes, then answers it (L{SignCertificateMessage}).
        The validation timeout runs from the headers' arrival: time spent
        waiting for the message counts against it.
        """
        if self.stopping:
            await context.abort(grpc.StatusCode.UNAVAILABLE, STOPPING)
        self.in_flight += 1
        try:
            arrival = self._reactor.seconds()
            try:
                async with asyncio.timeout(self._request_arrival_timeout_seconds):
                    data = await context.read()
            except TimeoutError:
                await context.abort(
                    grpc.StatusCode.DEADLINE_EXCEEDED, REQUEST_NOT_ARRIVED
                )
            # grpc.aio.EOF, the only thing read that is not bytes.
            if not isinstance(data, bytes):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, NO_REQUEST)
            return await self.SignCertificateMessage(data, context, arrival)
        finally:
            self.in_flight -= 1
            if self.in_flight == 0 and self._idle is not None:
                self._idle.set()

    async def drain(self, grace_seconds: float) -> None:
        """
        On the gRPC loop: refuse every call that starts from now on with
        UNAVAILABLE, and wait until the calls in flight have ended, for at
        most C{grace_seconds}.  The server is stopped afterwards, when
        nothing is in flight: grpc core's own shutdown cancels a call that
        arrives while it runs (CANCELLED), so it should have none to race.
        """
        self.stopping = True
        if self.in_flight == 0:
            return
        self._idle = asyncio.Event()
        try:
            async with asyncio.timeout(grace_seconds):
                await self._idle.wait()
        except TimeoutError:
            pass

    async def SignCertificateMessage(
        self, data: bytes, context: Context, arrival: float | None = None
    ) -> sentry_pb2.SignCertificateResponse:
        """
        Parse C{data} and answer it, or abort the call with its status.  A
        message that is not a valid C{SignCertificateRequest} is the
        caller's mistake (INVALID_ARGUMENT, counted), not grpcio's
        "Exception deserializing request!" (INTERNAL, uncounted).

        @param arrival: when the call's headers arrived (reactor clock);
            now by default.
        """
        if arrival is None:
            arrival = self._reactor.seconds()
        try:
            request = sentry_pb2.SignCertificateRequest.FromString(data)
        except DecodeError as e:
            await self._refuse_message(context, f"{MALFORMED_REQUEST}: {e}")
        # In constant time, before SignRequest copies every audience.
        problem = audience_count_problem(len(request.jwt_audiences))
        if problem is not None:
            await self._refuse_message(context, problem)
        # The validation timeout runs from the headers' arrival; the
        # client's time left is read now, so it counts from now.
        deadline = arrival + self._validation_timeout_seconds
        remaining = context.time_remaining()
        if remaining is not None:
            deadline = min(deadline, self._reactor.seconds() + remaining)
        try:
            return await self.sign(SignRequest.from_proto(request), deadline)
        except Refusal as refusal:
            self._log_denial(context, request, refusal.code, refusal.message)
            await context.abort(
                refusal.code, refusal.message, refusal.trailing_metadata
            )

    def _log_denial(
        self,
        context: Context,
        request: sentry_pb2.SignCertificateRequest | None,
        code: grpc.StatusCode,
        message: str,
    ) -> None:
        """
        One line for a call refused with one of L{DENIAL_CODES}: the peer,
        the namespace/id asked for (C{request}, or None when it did not
        parse) and the message the caller gets, each cut to
        L{sentry_tx.logs.MAX_QUOTED_CHARACTERS}.
        """
        if code not in DENIAL_CODES:
            return
        caller = "-" if request is None else f"{request.namespace}/{request.id}"
        self._log.info(
            "denied SignCertificate from {peer} for {caller}: {code} {reason}",
            peer=quote_input(context.peer()),
            caller=quote_input(caller),
            code=code.name,
            reason=quote_input(message),
        )

    async def _refuse_message(self, context: Context, message: str) -> None:
        """
        End a call whose message was refused before it became a
        L{SignRequest}: INVALID_ARGUMENT with C{message}, counted as
        received and as a C{validator} failure.
        """
        self._metrics.sign_request_received.inc()
        self._metrics.sign_failure.labels(reason=FAILURE_REASON_VALIDATOR).inc()
        self._metrics.sign_timer().done(FAILURE_REASON_VALIDATOR)
        self._log_denial(context, None, grpc.StatusCode.INVALID_ARGUMENT, message)
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)

    async def sign(
        self, request: SignRequest, deadline: float
    ) -> sentry_pb2.SignCertificateResponse:
        """
        Run the pipeline for one L{SignRequest}.

        @param deadline: when validation must be over, on the reactor's
            clock.
        @return: a C{SignCertificateResponse}.
        @raise Refusal: with the status the call ends with.
        """
        self._metrics.sign_request_received.inc()
        timer = self._metrics.sign_timer()
        try:
            response = await self._sign(request, deadline)
        except Refusal as refusal:
            self._metrics.sign_failure.labels(reason=refusal.reason).inc()
            timer.done(refusal.reason)
            raise
        self._metrics.sign_success.inc()
        timer.done(OUTCOME_SUCCESS)
        return response

    async def _sign(
        self, request: SignRequest, deadline: float
    ) -> sentry_pb2.SignCertificateResponse:
        problem = request_shape_problem(request)
        if problem is not None:
            raise Refusal(
                grpc.StatusCode.INVALID_ARGUMENT, problem, FAILURE_REASON_VALIDATOR
            )
        validator = self._choose_validator(request.token_validator)
        identity = await self._validate(validator, request, deadline)
        in_service = self._authority.in_service
        try:
            if in_service is None:
                raise RuntimeError("no trust bundle in service")
            public_key = parse_csr(request.csr)
            now = datetime.fromtimestamp(self._reactor.seconds(), UTC)
            config = in_service.config
            issued = issue_workload_certificate(
                in_service.bundle,
                identity,
                public_key,
                now,
                config.mtls,
                config.namespace,
            )
        except Exception as e:
            refusal = refusal_for(e)
            if refusal is None:
                self._log.failure(
                    "failed to sign a certificate for {spiffe_id}",
                    spiffe_id=quote_input(identity.spiffe_id),
                )
                refusal = Refusal(
                    grpc.StatusCode.INTERNAL, SIGNING_FAILED, FAILURE_REASON_CERT_SIGN
                )
            raise refusal from None
        valid_until = Timestamp()
        valid_until.FromDatetime(issued.not_after)
        response = sentry_pb2.SignCertificateResponse(
            workload_certificate=issued.certificate_chain_pem,
            trust_chain_certificates=[issued.trust_anchors_pem],
            valid_until=valid_until,
        )
        if self._jwt_minter is not None:
            self._fill_jwts(response, identity, request, now, config)
        return response

    def _fill_jwts(
        self,
        response: sentry_pb2.SignCertificateResponse,
        identity: CallerIdentity,
        request: SignRequest,
        now: datetime,
        config: SentryConfig,
    ) -> None:
        """
        Fill C{jwt} and C{per_audience_jwts} (SPEC section 11) through the
        minter.  Audiences the minter refuses are the caller's mistake
        (INVALID_ARGUMENT, reason C{validator}, as the shape check that
        refuses them first); any other failure is INTERNAL "failed to
        generate JWT", its cause logged.
        """
        from sentry_tx.jwt.minting import JWTAudienceError

        if self._jwt_minter is None:
            return
        try:
            self._jwt_minter.fill(
                response,
                identity,
                request.jwt_audiences,
                now.timestamp(),
                config.mtls.allowed_clock_skew,
            )
        except JWTAudienceError as e:
            raise Refusal(
                grpc.StatusCode.INVALID_ARGUMENT, str(e), FAILURE_REASON_VALIDATOR
            ) from None
        except Exception:
            self._log.failure(
                "failed to generate a JWT for {spiffe_id}",
                spiffe_id=quote_input(identity.spiffe_id),
            )
            raise Refusal(
                grpc.StatusCode.INTERNAL, JWT_FAILED, FAILURE_REASON_CERT_SIGN
            ) from None

    def _choose_validator(self, number: int) -> IIdentityValidator:
        if number == VALIDATOR_UNKNOWN:
            default = self._default_validator
            if default is None:
                raise Refusal(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    NO_DEFAULT_VALIDATOR,
                    FAILURE_REASON_VALIDATOR,
                )
            number = default
        validator = self._validators.get(number)
        if validator is None:
            raise Refusal(
                grpc.StatusCode.INVALID_ARGUMENT,
                VALIDATOR_NOT_ENABLED,
                FAILURE_REASON_VALIDATOR,
            )
        return validator

    async def _validate(
        self, validator: IIdentityValidator, request: SignRequest, deadline: float
    ) -> CallerIdentity:
        try:
            if getattr(validator, "runs_on_loop", False):
                return await self._validate_on_loop(validator, request, deadline)
            if validator.needs_reactor:
                identity: CallerIdentity = await on_reactor(
                    self._reactor,
                    asyncio.get_running_loop(),
                    self._validate_on_reactor,
                    validator,
                    request,
                    deadline,
                )
                return identity
            return _fired_result(validator.validate(request, deadline))
        except Exception as e:
            refusal = refusal_for(e)
            if refusal is None or refusal.reason != FAILURE_REASON_VALIDATOR:
                self._log.failure(
                    "validator {name} failed", Failure(e), name=validator.name
                )
                refusal = Refusal(
                    grpc.StatusCode.INTERNAL,
                    VALIDATION_FAILED,
                    FAILURE_REASON_VALIDATOR,
                )
            raise refusal from None

    async def _validate_on_loop(
        self, validator: IIdentityValidator, request: SignRequest, deadline: float
    ) -> CallerIdentity:
        try:
            remaining = max(deadline - self._reactor.seconds(), 0.0)
            async with asyncio.timeout(remaining):
                return await validator.validate(request, deadline)
        except TimeoutError:
            raise ValidatorUnavailableError(VALIDATION_TIMED_OUT) from None

    def _validate_on_reactor(
        self, validator: IIdentityValidator, request: SignRequest, deadline: float
    ) -> Deferred[CallerIdentity]:
        d = validator.validate(request, deadline)
        d.addTimeout(
            max(deadline - self._reactor.seconds(), 0.0),
            self._reactor,
            onTimeoutCancel=_raise_unavailable,
        )
        return d


def rpc_handler(servicer: CAServicer) -> grpc.GenericRpcHandler:
    """
    The grpcio handler of C{dapr.proto.sentry.v1.CA} for C{servicer}.

    The method is served as a client stream (see
    L{CAServicer.SignCertificateStream}) so that the servicer sees the call
    before its message arrives and can bound the wait; on the wire it is the
    unary call every client makes.  The request is handed over as bytes; the
    response is serialised by grpcio.
    """
    return grpc.method_handlers_generic_handler(
        SERVICE_NAME,
        {
            METHOD_NAME: grpc.stream_unary_rpc_method_handler(
                servicer.SignCertificateStream,
                request_deserializer=None,
                response_serializer=(
                    sentry_pb2.SignCertificateResponse.SerializeToString
                ),
            )
        },
    )


def _fired_result(d: Deferred[_T]) -> _T:
    """
    The result of a Deferred that has already fired (raised if a failure).
    """
    results: list[_T | Failure] = []
    d.addBoth(results.append)
    if not results:
        raise RuntimeError(
            "a validator that needs no reactor did not answer at once"
        )
    result = results[0]
    if isinstance(result, Failure):
        result.raiseException()
    return result


def _raise_unavailable(result: object, timeout: float) -> NoReturn:
    """
    C{onTimeoutCancel} for validation: a validator that did not answer in
    time makes the call UNAVAILABLE (the caller should retry), not INTERNAL.
    """
    raise ValidatorUnavailableError(VALIDATION_TIMED_OUT)
