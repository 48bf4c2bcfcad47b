# -*- test-case-name: tests.test_identity -*-
"""
The request rules every validator applies (SPEC section 5, step 2).

The texts are Dapr's where Dapr has them; sentry_tx adds two rules (app-id
and namespace characters) so that a caller's mistake is never reported as an
internal error later on.

Before any of them, the request's shape (L{request_shape_problem}): limits
on what would make later work grow (the count, size and characters of
C{jwt_audiences}), checked in time that does not grow with what is refused,
before the validator runs.  Dapr has no such limits.
"""

import re
from collections.abc import Collection
from typing import Protocol

from sentry_tx.errors import ValidationError
from sentry_tx.identity.caller import CallerIdentity, SignRequest

MAX_APP_ID_LENGTH = 64
MAX_NAMESPACE_LENGTH = 63
MAX_TRUST_DOMAIN_BYTES = 255
DEFAULT_WORKLOAD_TRUST_DOMAIN = "public"

MAX_JWT_AUDIENCES = 16
"""
The most audiences one request's tokens may have, the trust domain included
(each costs one signature, RSA-2048 by default: more would let one caller
buy seconds of CPU with one call).
"""

MAX_REQUESTED_JWT_AUDIENCES = MAX_JWT_AUDIENCES - 1
"""
The most entries a request's C{jwt_audiences} may hold, duplicates included:
the trust domain is added to them, so no request that passes the shape
check can end with too many audiences after it was signed.
"""

MAX_JWT_AUDIENCE_BYTES = 1024
"""
The longest audience accepted, in UTF-8 bytes.
"""

_APP_ID_CHARACTERS = re.compile(r"[A-Za-z0-9_-]*\Z")
_NAMESPACE_CHARACTERS = re.compile(r"[A-Za-z0-9._-]+\Z")
_TRUST_DOMAIN_CHARACTERS = re.compile(r"[a-z0-9._-]*\Z")


class HasJWTAudiences(Protocol):
    """
    What L{request_shape_problem} reads of a request.
    """

    @property
    def jwt_audiences(self) -> Collection[str]: ...


def audience_count_problem(count: int) -> str | None:
    """
    The message for a request with C{count} entries in C{jwt_audiences},
    or None when that is few enough.
    """
    if count > MAX_REQUESTED_JWT_AUDIENCES:
        return (
            f"too many JWT audiences ({count}; at most"
            f" {MAX_REQUESTED_JWT_AUDIENCES}, the trust domain is added to them)"
        )
    return None


def audience_problem(audience: str) -> str | None:
    """
    The message for one requested audience that cannot be used, or None.
    Printable means L{str.isprintable}: no control characters (newline,
    NUL), no format characters (bidi overrides, zero-width), no separators
    but the space, nothing unassigned.  The message never quotes the
    audience.
    """
    if not audience:
        return "a JWT audience must not be empty"
    if (
        len(audience) > MAX_JWT_AUDIENCE_BYTES
        or len(audience.encode("utf-8")) > MAX_JWT_AUDIENCE_BYTES
    ):
        return f"a JWT audience is longer than {MAX_JWT_AUDIENCE_BYTES} bytes"
    if not audience.isprintable():
        return "a JWT audience must be printable text"
    return None


def request_shape_problem(request: HasJWTAudiences) -> str | None:
    """
    The first limit C{request} breaks, or None.  The caller's mistake,
    refused before the validator runs and before anything is deduplicated
    or signed.

    @param request: a L{sentry_tx.identity.caller.SignRequest} (or anything
        with a sized, iterable C{jwt_audiences}).
    """
    return jwt_audiences_problem(request.jwt_audiences)


def jwt_audiences_problem(audiences: Collection[str]) -> str | None:
    """
    The first limit the requested C{audiences} break, or None: their count
    first (in constant time), then each one (at most
    L{MAX_REQUESTED_JWT_AUDIENCES} of them, once the count passed).
    """
    problem = audience_count_problem(len(audiences))
    if problem is not None:
        return problem
    for audience in audiences:
        problem = audience_problem(audience)
        if problem is not None:
            return problem
    return None


def request_problems(request: SignRequest) -> list[str]:
    """
    Every common rule the request breaks, in Dapr's order.

    @param request: a L{sentry_tx.identity.caller.SignRequest}.
    @return: a list of messages, empty when the request is well formed.
    """
    problems: list[str] = []
    app_id = request.id
    if not app_id:
        problems.append("parameter app-id cannot be empty")
    else:
        if "." in app_id:
            problems.append("parameter app-id cannot contain dots")
        if len(app_id) > MAX_APP_ID_LENGTH:
            problems.append(f"app ID must be {MAX_APP_ID_LENGTH} characters or less")
        if not _APP_ID_CHARACTERS.match(app_id.replace(".", "")):
            problems.append("parameter app-id contains invalid characters")
    if not request.csr:
        problems.append("CSR is required")
    namespace = request.namespace
    if not namespace:
        problems.append("namespace is required")
    elif not namespace_is_valid(namespace):
        problems.append("parameter namespace is invalid")
    return problems


def namespace_is_valid(namespace: str) -> bool:
    """
    Whether C{namespace} is a valid SPIFFE path segment of at most 63
    characters.
    """
    return (
        len(namespace) <= MAX_NAMESPACE_LENGTH
        and namespace not in (".", "..")
        and _NAMESPACE_CHARACTERS.match(namespace) is not None
    )


def trust_domain_problem(trust_domain: str) -> str | None:
    """
    The message for a requested trust domain that cannot be used, or None.
    """
    if not _TRUST_DOMAIN_CHARACTERS.match(trust_domain):
        return (
            "trust domain characters are limited to lowercase letters, "
            "numbers, dots, dashes, and underscores"
        )
    if len(trust_domain.encode("utf-8")) > MAX_TRUST_DOMAIN_BYTES:
        return "trust domain is too long"
    return None


def check_request(request: SignRequest) -> CallerIdentity:
    """
    Apply the common rules and the trust-domain rules.

    @return: the L{CallerIdentity} the request asks for (trust domain
        C{public} when it names none).
    @raise ValidationError: with the joined C{invalid request:} message, or
        the trust-domain message alone.
    """
    problems = request_problems(request)
    if problems:
        raise ValidationError("invalid request: " + "\n".join(problems))
    trust_domain = request.trust_domain or DEFAULT_WORKLOAD_TRUST_DOMAIN
    problem = trust_domain_problem(trust_domain)
    if problem is not None:
        raise ValidationError(problem)
    return CallerIdentity(
        trust_domain=trust_domain, namespace=request.namespace, app_id=request.id
    )
