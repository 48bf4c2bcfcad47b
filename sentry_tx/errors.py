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

    def __init__(self, field, problem):
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


class BundleError(Exception):
    """
    The trust bundle cannot be used.

    @ivar source: which file (a path) or Secret key is wrong.
    @ivar problem: what is wrong, in words.
    """

    def __init__(self, source, problem):
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

    def __init__(self):
        super().__init__("issuer certificate has expired")


class ValidatorUnavailableError(Exception):
    """
    The validator could not reach what it checks against (the Kubernetes API
    is down or slow); the caller should retry (UNAVAILABLE).
    """


class ValidatorOverloadedError(Exception):
    """
    The validator cannot take more work now (its queue to the Kubernetes API
    is full); the caller should retry after C{retry_after_ms} milliseconds
    (RESOURCE_EXHAUSTED with the C{grpc-retry-pushback-ms} trailer).

    @ivar message: sent to the caller.
    @ivar retry_after_ms: how long the caller should wait, in milliseconds.
    """

    def __init__(self, message, retry_after_ms):
        super().__init__(message)
        self.message = message
        self.retry_after_ms = retry_after_ms
