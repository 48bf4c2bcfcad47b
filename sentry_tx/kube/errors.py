# -*- test-case-name: tests.test_kube_client,tests.test_kube_admission -*-
"""
How a call to the Kubernetes API fails: L{KubernetesAPIError} (the server
answered with an error) or L{KubernetesUnavailableError} (no usable answer),
never with a token or a key in the message.
"""

import json
from typing import Any

_ERROR_BODY_EXCERPT_CHARACTERS = 200


class KubernetesError(Exception):
    """
    A call to the Kubernetes API failed.
    """


class KubernetesAPIError(KubernetesError):
    """
    The API server answered a call with an error.

    @ivar status: the HTTP status code (C{404}).
    @ivar reason: the C{reason} of the C{Status} it sent (C{"NotFound"}), or
        the HTTP reason phrase when the body was not a C{Status}.
    @ivar message: the C{Status} message (C{'secrets "x" not found'}), or an
        excerpt of the body.
    @ivar method: the HTTP method of the call.
    @ivar path: the API path of the call.
    """

    def __init__(
        self, status: int, reason: str, message: str, method: str = "", path: str = ""
    ) -> None:
        self.status = status
        self.reason = reason
        self.message = message
        self.method = method
        self.path = path
        where = f"{method} {path}: " if method else ""
        super().__init__(
            f"{where}HTTP {status} {reason or 'error'}"
            + (f": {message}" if message else "")
        )

    @property
    def is_not_found(self) -> bool:
        """
        Whether the object does not exist (404).
        """
        return self.status == 404

    @property
    def is_conflict(self) -> bool:
        """
        Whether the call lost a race (409: a stale C{resourceVersion}, or an
        object that already exists).
        """
        return self.status == 409

    @property
    def is_transient(self) -> bool:
        """
        Whether retrying later may succeed (429 or 5xx).
        """
        return self.status == 429 or self.status >= 500


class KubernetesUnavailableError(KubernetesError):
    """
    No usable answer came from the API server: the connection failed, was
    cut, timed out, or its TLS could not be verified.
    """


def api_error(
    status: int, phrase: bytes | str | None, body: bytes, method: str, path: str
) -> KubernetesAPIError:
    """
    The L{KubernetesAPIError} for an error answer: the C{Status} object's
    reason and message when the body is one.
    """
    reason = (
        phrase.decode("latin-1") if isinstance(phrase, bytes) else str(phrase or "")
    )
    message = ""
    try:
        document = json.loads(body)
    except ValueError:
        document = None
    if isinstance(document, dict) and document.get("kind") == "Status":
        reason = str(document.get("reason") or reason)
        message = str(document.get("message") or "")
    else:
        excerpt = body[:_ERROR_BODY_EXCERPT_CHARACTERS].decode("utf-8", "replace")
        message = " ".join(excerpt.split())
    return KubernetesAPIError(status, reason, message, method, path)


def json_answer(
    status: int, phrase: bytes | str | None, body: bytes, method: str, path: str
) -> dict[str, Any]:
    """
    The JSON object of an answer: the decoded body of a 2xx answer.

    @raise KubernetesAPIError: for an error answer (L{api_error}), or a 2xx
        answer whose body is not a JSON object (C{InvalidResponse}).
    """
    if not 200 <= status < 300:
        raise api_error(status, phrase, body, method, path)
    try:
        document = json.loads(body)
    except ValueError:
        document = None
    if not isinstance(document, dict):
        raise KubernetesAPIError(
            status, "InvalidResponse", "the answer is not a JSON object", method, path
        )
    return document


def json_object(value: object) -> dict[str, Any]:
    """
    C{value} when it is a JSON object (a field of an API answer), else an
    empty one: what a missing or mistyped field reads as.
    """
    return value if isinstance(value, dict) else {}
