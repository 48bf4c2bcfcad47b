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

    def __init__(self, code, message, reason):
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason


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

    def SignCertificate(self, request, context):
        """
        The gRPC method: run the pipeline, or abort the call with its status.
        """
        try:
            return self.sign(SignRequest.from_proto(request))
        except Refusal as refusal:
            context.abort(refusal.code, refusal.message)

    def SignCertificateMessage(self, data, context):
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
        return self.SignCertificate(request, context)

    def sign(self, request):
        """
        Run the pipeline for one L{SignRequest} in the calling thread.

        @return: a C{SignCertificateResponse}.
        @raise Refusal: with the status the call ends with.
        """
        self._metrics.sign_request_received.inc()
        timer = self._metrics.sign_timer()
        try:
            response = self._sign(request)
        except Refusal as refusal:
            self._metrics.sign_failure.labels(reason=refusal.reason).inc()
            timer.done(refusal.reason)
            raise
        self._metrics.sign_success.inc()
        timer.done(OUTCOME_SUCCESS)
        return response

    def _sign(self, request):
        validator = self._choose_validator(request.token_validator)
        identity = self._validate(validator, request)
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

    def _validate(self, validator, request):
        try:
            if validator.needs_reactor:
                return blockingCallFromThread(
                    self._reactor, self._validate_on_reactor, validator, request
                )
            return _fired_result(validator.validate(request))
        except ValidationError as e:
            raise Refusal(
                grpc.StatusCode.PERMISSION_DENIED, str(e), FAILURE_REASON_VALIDATOR
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

    def _validate_on_reactor(self, validator, request):
        d = validator.validate(request)
        d.addTimeout(
            self._validation_timeout_seconds,
            self._reactor,
            onTimeoutCancel=_raise_unavailable,
        )
        return d


def rpc_handler(servicer):
    """
    The grpcio handler of C{dapr.proto.sentry.v1.CA} for C{servicer}.

    The request is handed over as bytes (see
    L{CAServicer.SignCertificateMessage}); the response is serialised by
    grpcio.
    """
    return grpc.method_handlers_generic_handler(
        SERVICE_NAME,
        {
            METHOD_NAME: grpc.unary_unary_rpc_method_handler(
                servicer.SignCertificateMessage,
                request_deserializer=None,
                response_serializer=sentry_pb2.SignCertificateResponse.SerializeToString,
            )
        },
    )


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
