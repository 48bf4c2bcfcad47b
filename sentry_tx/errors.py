# -*- test-case-name: tests.test_servicer,tests.test_config,tests.test_bundle -*-
"""
Exceptions that carry a message meant for a person: an operator (config,
bundle) or a caller (validation, CSR).  None of them ever carries key material.
"""


class ConfigError(Exception):
    """
    A flag or a Configuration field has a bad value.

    @ivar field: the flag (C{--port}) or field (C{spec.mtls.workloadCertTTL}).
    @ivar problem: what is wrong, in words.
    """

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


class BundleError(Exception):
    """
    The trust bundle cannot be used.

    @ivar source: which file (a path) or Secret key is wrong.
    @ivar problem: what is wrong, in words.
    """

    def __init__(self, source: str, problem: str) -> None:
        super().__init__(f"{source}: {problem}")
        self.source = source
        self.problem = problem


class ValidationError(Exception):
    """
    The caller could not be validated; C{str()} is the message sent to it with
    PERMISSION_DENIED.
    """


class CSRError(Exception):
    """
    The certificate signing request is unusable; C{str()} is the message sent
    to the caller with INVALID_ARGUMENT.
    """


class IssuerExpiredError(Exception):
    """
    The issuer certificate in service has expired (FAILED_PRECONDITION).
    """

    def __init__(self) -> None:
        super().__init__("issuer certificate has expired")


class ValidatorUnavailableError(Exception):
    """
    The validator could not reach what it checks against (the Kubernetes API
    is down or slow); the caller should retry (UNAVAILABLE).
    """


class ListenError(Exception):
    """
    A listener cannot bind its port (in use, not permitted, no such
    address).  The root service reports it as one line naming the flag and
    the port, then exits 1; every listener (gRPC, healthz, metrics, and any
    other) raises this type for a failed bind.

    @ivar flag: the flag that chose the port (C{--healthz-port}).
    @ivar port: the port number.
    @ivar address: the bind address; empty for all interfaces.
    @ivar problem: what is wrong, in words (C{address already in use}).
    """

    def __init__(self, flag: str, port: int, address: str, problem: str) -> None:
        where = f"{address} port {port}" if address else f"port {port}"
        super().__init__(f"{flag}: cannot listen on {where}: {problem}")
        self.flag = flag
        self.port = port
        self.address = address
        self.problem = problem


class ValidatorOverloadedError(Exception):
    """
    The validator is at its admission limit (or the call's deadline left no
    time to work on it); the caller should retry after C{retry_after_ms}
    (RESOURCE_EXHAUSTED, with the trailer C{grpc-retry-pushback-ms}).

    @ivar retry_after_ms: how long the caller should wait before retrying,
        in whole milliseconds.
    """

    def __init__(self, message: str, retry_after_ms: float) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_ms = max(0, int(retry_after_ms))
