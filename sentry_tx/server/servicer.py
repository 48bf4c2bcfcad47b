"""
The SignCertificate pipeline (SPEC section 5), as a grpcio servicer.

grpcio calls L{CAServicer.SignCertificate} in one of its worker threads.  A
validator that needs the reactor (it talks to the Kubernetes API with treq)
runs there: the worker waits for it with C{blockingCallFromThread}, bounded by
L{VALIDATION_TIMEOUT_SECONDS}.  A validator that is pure computation
(INSECURE) runs in the worker thread, as parsing and signing do: crossing to
the reactor for it would cost a fifth of the throughput and buy nothing.
"""

from datetime import datetime, timezone

import grpc
from google.protobuf.message import DecodeError
from google.protobuf.timestamp_pb2 import Timestamp
from twisted.internet.threads import blockingCallFromThread
from twisted.logger import Logger
from twisted.python.failure import Failure

from sentry_tx._proto import sentry_pb2, sentry_pb2_grpc
from sentry_tx.ca.authority import issue_workload_certificate
from sentry_tx.ca.csr import parse_csr
from sentry_tx.errors import (
    CSRError,
    IssuerExpiredError,
    ValidationError,
    ValidatorOverloadedError,
    ValidatorUnavailableError,
)
from sentry_tx.identity import VALIDATOR_UNKNOWN, SignRequest
from sentry_tx.metrics import (
    FAILURE_REASON_CERT_PARSE,
    FAILURE_REASON_CERT_SIGN,
    FAILURE_REASON_VALIDATOR,
    OUTCOME_SUCCESS,
)

SERVICE_NAME = "dapr.proto.sentry.v1.CA"
METHOD_NAME = "SignCertificate"

VALIDATION_TIMEOUT_SECONDS = 10.0

RETRY_PUSHBACK_TRAILER = "grpc-retry-pushback-ms"
"""
The trailing metadata of a RESOURCE_EXHAUSTED refusal: how many milliseconds
the caller should wait before retrying (grpc clients with a retry policy
honour it).
"""

NO_DEFAULT_VALIDATOR = "a validator name must be specified in this environment"
VALIDATOR_NOT_ENABLED = "the requested validator is not enabled"
MALFORMED_REQUEST = "failed to parse request"
SIGNING_FAILED = "failed to sign certificate"
VALIDATION_FAILED = "failed to validate the caller"
VALIDATION_TIMED_OUT = "timed out validating the caller"
JWT_FAILED = "failed to generate JWT"


class Refusal(Exception):
    """
    End the call with C{code} and C{message}, counted under C{reason}.
    """

    def __init__(self, code, message, reason, trailing_metadata=()):
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason
        self.trailing_metadata = tuple(trailing_metadata)


class CAServicer(sentry_pb2_grpc.CAServicer):
    """
    Answers C{dapr.proto.sentry.v1.CA/SignCertificate}.

    @param reactor: the reactor validators run on; also the clock (its
        C{seconds()} is read from worker threads, which is thread-safe).
    @param authority: the L{ICertificateAuthority} whose C{bundle} signs; the
        bundle is read once per call, so a call that started before a swap
        finishes with the bundle it started with.
    @param validators: a mapping from C{TokenValidator} numbers to enabled
        L{IIdentityValidator}s.
    @param default_validator: the number used for C{UNKNOWN}, or None when
        this environment has no default.
    @param metrics: the L{SentryMetrics}.

    The TTL, clock skew and sentry_tx's own namespace are read from the
    authority's C{config} at each call, so that a restart can change them.
    """

    _log = Logger()

    def __init__(
        self,
        reactor,
        authority,
        validators,
        default_validator,
        metrics,
        validation_timeout_seconds=VALIDATION_TIMEOUT_SECONDS,
        jwt_minter=None,
    ):
        self._jwt_minter = jwt_minter
        self._reactor = reactor
        self._authority = authority
        self._validators = dict(validators)
        self._default_validator = default_validator
        self._metrics = metrics
        self._validation_timeout_seconds = validation_timeout_seconds

    def SignCertificate(self, request, context, arrived=None):
        """
        The gRPC method: run the pipeline, or abort the call with its status.

        @param arrived: when grpcio received the call (reactor clock), if
            known: the time it then waited for a worker thread counts
            against its validation timeout.
        """
        now = self._reactor.seconds()
        remaining = context.time_remaining()
        if arrived is not None and arrived < now:
            # The client's time left is read now; the validation timeout
            # runs from the call's arrival.
            remaining = (
                (now - arrived) + remaining if remaining is not None else None
            )
            now = arrived
        deadline = self.deadline(now, remaining)
        try:
            return self.sign(SignRequest.from_proto(request), deadline)
        except Refusal as refusal:
            if refusal.trailing_metadata:
                context.set_trailing_metadata(refusal.trailing_metadata)
            context.abort(refusal.code, refusal.message)

    def deadline(self, now, time_remaining):
        """
        When validation must have answered: the earlier of the client's
        deadline and C{now} plus the validation timeout.

        @param now: when the call started here (reactor clock).
        @param time_remaining: the client's time left, in seconds, or None
            when it set no deadline.
        """
        deadline = now + self._validation_timeout_seconds
        if time_remaining is not None:
            deadline = min(deadline, now + time_remaining)
        return deadline

    def SignCertificateMessage(self, data, context, arrived=None):
        """
        The gRPC method as served: the request arrives as bytes and is
        parsed here, so that a message that is not a valid
        C{SignCertificateRequest} is the caller's mistake (INVALID_ARGUMENT,
        counted), not grpcio's "Exception deserializing request!" (INTERNAL,
        uncounted).
        """
        try:
            request = sentry_pb2.SignCertificateRequest.FromString(data)
        except DecodeError as e:
            self._metrics.sign_request_received.inc()
            self._metrics.sign_failure.labels(reason=FAILURE_REASON_VALIDATOR).inc()
            self._metrics.sign_timer().done(FAILURE_REASON_VALIDATOR)
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"{MALFORMED_REQUEST}: {e}"
            )
        return self.SignCertificate(request, context, arrived)

    def clock_seconds(self):
        """
        The reactor clock's time (thread-safe to read).
        """
        return self._reactor.seconds()

    def sign(self, request, deadline=None):
        """
        Run the pipeline for one L{SignRequest} in the calling thread.

        @param deadline: when validation must have answered (reactor
            clock); the validation timeout from now by default.
        @return: a C{SignCertificateResponse}.
        @raise Refusal: with the status the call ends with.
        """
        self._metrics.sign_request_received.inc()
        if deadline is None:
            deadline = self.deadline(self._reactor.seconds(), None)
        timer = self._metrics.sign_timer()
        try:
            response = self._sign(request, deadline)
        except Refusal as refusal:
            self._metrics.sign_failure.labels(reason=refusal.reason).inc()
            timer.done(refusal.reason)
            raise
        self._metrics.sign_success.inc()
        timer.done(OUTCOME_SUCCESS)
        return response

    def _sign(self, request, deadline):
        validator = self._choose_validator(request.token_validator)
        identity = self._validate(validator, request, deadline)
        try:
            public_key = parse_csr(request.csr)
        except CSRError as e:
            raise Refusal(
                grpc.StatusCode.INVALID_ARGUMENT, str(e), FAILURE_REASON_CERT_PARSE
            )
        bundle, config = self._authority.bundle, self._authority.config
        now = datetime.fromtimestamp(self._reactor.seconds(), timezone.utc)
        try:
            issued = issue_workload_certificate(
                bundle, identity, public_key, now, config.mtls, config.namespace
            )
        except IssuerExpiredError as e:
            raise Refusal(
                grpc.StatusCode.FAILED_PRECONDITION, str(e), FAILURE_REASON_CERT_SIGN
            )
        except Exception:
            self._log.failure(
                "failed to sign a certificate for {spiffe_id}",
                spiffe_id=identity.spiffe_id,
            )
            raise Refusal(
                grpc.StatusCode.INTERNAL, SIGNING_FAILED, FAILURE_REASON_CERT_SIGN
            )
        self._log.debug(
            "signed certificate for {spiffe_id}, valid until {not_after}",
            spiffe_id=identity.spiffe_id,
            not_after=issued.not_after.isoformat(),
        )
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

    def _fill_jwts(self, response, identity, request, now, config):
        """
        The JWT hook (issue 11): the minter fills C{jwt} and
        C{per_audience_jwts}.
        """
        from sentry_tx.jwt.minting import JWTAudienceError

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
                grpc.StatusCode.INVALID_ARGUMENT, str(e), FAILURE_REASON_CERT_SIGN
            )
        except Exception:
            self._log.failure(
                "failed to generate a JWT for {spiffe_id}",
                spiffe_id=identity.spiffe_id,
            )
            raise Refusal(grpc.StatusCode.INTERNAL, JWT_FAILED, FAILURE_REASON_CERT_SIGN)

    def _choose_validator(self, number):
        if number == VALIDATOR_UNKNOWN:
            number = self._default_validator
            if number is None:
                raise Refusal(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    NO_DEFAULT_VALIDATOR,
                    FAILURE_REASON_VALIDATOR,
                )
        validator = self._validators.get(number)
        if validator is None:
            raise Refusal(
                grpc.StatusCode.INVALID_ARGUMENT,
                VALIDATOR_NOT_ENABLED,
                FAILURE_REASON_VALIDATOR,
            )
        return validator

    def _validate(self, validator, request, deadline):
        try:
            if validator.needs_reactor:
                return blockingCallFromThread(
                    self._reactor,
                    self._validate_on_reactor,
                    validator,
                    request,
                    deadline,
                )
            return _fired_result(validator.validate(request, deadline))
        except ValidationError as e:
            raise Refusal(
                grpc.StatusCode.PERMISSION_DENIED, str(e), FAILURE_REASON_VALIDATOR
            )
        except ValidatorOverloadedError as e:
            raise Refusal(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                str(e),
                FAILURE_REASON_VALIDATOR,
                ((RETRY_PUSHBACK_TRAILER, str(e.retry_after_ms)),),
            )
        except ValidatorUnavailableError as e:
            raise Refusal(
                grpc.StatusCode.UNAVAILABLE, str(e), FAILURE_REASON_VALIDATOR
            )
        except Exception:
            self._log.failure("validator {name} failed", name=validator.name)
            raise Refusal(
                grpc.StatusCode.INTERNAL, VALIDATION_FAILED, FAILURE_REASON_VALIDATOR
            )

    def _validate_on_reactor(self, validator, request, deadline):
        d = validator.validate(request, deadline)
        # The validator gives up by the deadline itself; this is the
        # backstop for one that does not.
        d.addTimeout(
            max(0.0, deadline - self._reactor.seconds()),
            self._reactor,
            onTimeoutCancel=_raise_unavailable,
        )
        return d


class _ArrivalStampingHandler(grpc.GenericRpcHandler):
    """
    grpcio's handler of C{dapr.proto.sentry.v1.CA}: grpcio asks it for the
    method's handler in its serving thread as the call arrives, before the
    call waits for a worker thread, so the arrival time is taken here.
    """

    _full_name = f"/{SERVICE_NAME}/{METHOD_NAME}"

    def __init__(self, servicer):
        self._servicer = servicer

    def service(self, handler_call_details):
        if handler_call_details.method != self._full_name:
            return None
        arrived = self._servicer.clock_seconds()
        sign = self._servicer.SignCertificateMessage
        return grpc.unary_unary_rpc_method_handler(
            lambda data, context: sign(data, context, arrived),
            request_deserializer=None,
            response_serializer=sentry_pb2.SignCertificateResponse.SerializeToString,
        )


def rpc_handler(servicer):
    """
    The grpcio handler of C{dapr.proto.sentry.v1.CA} for C{servicer}.

    The request is handed over as bytes (see
    L{CAServicer.SignCertificateMessage}); the response is serialised by
    grpcio.  The call's arrival time is passed along, so that the time it
    waits for a worker thread counts against its validation timeout.
    """
    return _ArrivalStampingHandler(servicer)


def _fired_result(d):
    """
    The result of a Deferred that has already fired (raised if a failure).
    """
    results = []
    d.addBoth(results.append)
    if not results:
        raise RuntimeError("a validator that needs no reactor did not answer at once")
    result = results[0]
    if isinstance(result, Failure):
        result.raiseException()
    return result


def _raise_unavailable(result, timeout):
    """
    C{onTimeoutCancel} for validation: a validator that did not answer in
    time makes the call UNAVAILABLE (the caller should retry), not INTERNAL.
    """
    raise ValidatorUnavailableError(VALIDATION_TIMED_OUT)
