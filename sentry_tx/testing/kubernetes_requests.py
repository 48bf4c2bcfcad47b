"""
How the fake Kubernetes API server (L{sentry_tx.testing.kubernetes}) answers
one request: it authenticates sentry_tx, routes the path, and gives
Kubernetes' list, watch, get, create, update and TokenReview answers, with
C{Status} objects for errors.
"""

import copy
import json
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography.x509.oid import NameOID
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.web.server import Request

from sentry_tx.testing.kubernetes_tokens import (
    FAKE_API_SERVER_AUDIENCE,
    FakeReviewedToken,
)

Document = dict[str, Any]
"""
A Kubernetes object (or any JSON object) as the fake keeps and sends it.
"""

Event = tuple[int, str, str, Document]
"""
A watch event in the history: C{(resource version, type, plural, object)}.
"""


class FakeAPIRequest(Request):
    """
    A request to the fake API server: a watch keeps its scope and its
    C{timeoutSeconds} timer on it.
    """

    watch_scope: tuple[str, str | None] = ("", None)
    watch_timer: IDelayedCall | None = None


API_GROUPS = {
    "pods": ("v1", "Pod"),
    "secrets": ("v1", "Secret"),
    "configmaps": ("v1", "ConfigMap"),
    "configurations": ("dapr.io/v1alpha1", "Configuration"),
}


def _status(
    code: int, reason: str, message: str, details: Document | None = None
) -> Document:
    """
    A Kubernetes C{Status} object for an error.
    """
    status: Document = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
    if details:
        status["details"] = details
    return status


class _RequestState:
    """
    What the fake knows of one request while it answers it: the timer of a
    delayed answer, and whether the client went away.
    """

    def __init__(self) -> None:
        self.delayed: IDelayedCall | None = None
        self.lost = False


@dataclass(frozen=True)
class _WatchStart:
    """
    What the fake answers a watch request with: start streaming.
    """

    plural: str
    namespace: str | None
    resource_version: str | None
    timeout_seconds: float | None


class _FakeAnswer(Exception):
    """
    Raised while handling a request to answer it with C{code} and C{body}.
    """

    def __init__(self, code: int, body: Document) -> None:
        super().__init__(code)
        self.code = code
        self.body = body


class KubernetesAPIRequests:
    """
    The request side of L{sentry_tx.testing.kubernetes.FakeKubernetesAPI}, a
    mixin: the state it reads and writes (objects, tokens, the failure and
    latency switches, watches) is the fake's own, declared here and
    assigned by L{sentry_tx.testing.kubernetes.FakeKubernetesAPI}.
    """

    _reactor: IReactorTime
    requests: list[tuple[str, str]]
    reviews: list[Document]
    conflicts: int
    forbidden: set[tuple[str, str | None]]
    api_tokens: set[str]
    client_common_names: set[str]
    tls: bool | None
    tokenreview_latency_seconds: float
    pod_latency_seconds: float
    audience_aware: bool
    before_write: Callable[[str, str, str, str], object] | None
    objects: dict[tuple[str, str, str], Document]
    tokens: dict[str, FakeReviewedToken]
    watches: list[FakeAPIRequest]
    _history: list[Event]
    _compacted: int
    _failure: tuple[int, str, str] | str | None
    _barriers: dict[tuple[str, str | None], tuple[int, list[Callable[[], None]]]]
    _delayed: set[IDelayedCall]
    # The fake's own methods.
    _last_version: Callable[[], int]
    _send_event: Callable[[FakeAPIRequest, str, Document], None]
    _watch_matches: Callable[[FakeAPIRequest, Event], bool]
    _end_watch: Callable[[FakeAPIRequest], None]
    get_object: Callable[[str, str, str], Document | None]
    put_object: Callable[[str, str, str, Document], Document]

    def _receive(self, request: FakeAPIRequest) -> None:
        method = request.method.decode("ascii")
        path = request.path.decode("utf-8")
        self.requests.append((method, path))
        segments = [segment for segment in path.split("/") if segment]
        plural = self._plural(segments)
        state = _RequestState()

        def lost(_: object) -> None:
            state.lost = True
            delayed = state.delayed
            if delayed is not None and delayed.active():
                delayed.cancel()
                self._delayed.discard(delayed)

        request.notifyFinish().addErrback(lost)

        def answer() -> None:
            delayed = state.delayed
            if delayed is not None:
                self._delayed.discard(delayed)
            if state.lost:
                return
            code, body = self._handle(request, method, segments, plural)
            if isinstance(body, _WatchStart):
                self._start_watch(request, body)
                return
            request.setResponseCode(code)
            request.setHeader(b"content-type", b"application/json")
            request.write(json.dumps(body).encode("utf-8"))
            request.finish()

        def answer_later() -> None:
            if self._failure == "hang":
                return
            latency = 0.0
            if plural == "tokenreviews":
                latency = self.tokenreview_latency_seconds
            elif plural == "pods" and method == "GET" and len(segments) == 6:
                latency = self.pod_latency_seconds
            if latency > 0:
                state.delayed = self._reactor.callLater(latency, answer)
                self._delayed.add(state.delayed)
            else:
                answer()

        barrier = self._barriers.get((method, plural))
        if barrier is not None:
            count, parked = barrier
            parked.append(answer_later)
            if len(parked) >= count:
                del self._barriers[(method, plural)]
                for each in parked:
                    each()
            return
        answer_later()

    @staticmethod
    def _plural(segments: list[str]) -> str | None:
        if segments[:4] == ["apis", "authentication.k8s.io", "v1", "tokenreviews"]:
            return "tokenreviews"
        if segments[:3] == ["api", "v1", "namespaces"] and len(segments) >= 5:
            return segments[4]
        if segments[:2] == ["api", "v1"] and len(segments) == 3:
            return segments[2]
        if segments[:3] == ["apis", "dapr.io", "v1alpha1"] and len(segments) == 4:
            return segments[3]
        if (
            segments[:4] == ["apis", "dapr.io", "v1alpha1", "namespaces"]
            and len(segments) >= 6
        ):
            return segments[5]
        return None

    def _handle(
        self,
        request: FakeAPIRequest,
        method: str,
        segments: list[str],
        plural: str | None,
    ) -> tuple[int, "Document | _WatchStart"]:
        try:
            if isinstance(self._failure, tuple):
                code, reason, message = self._failure
                raise _FakeAnswer(code, _status(code, reason, message))
            user = self._authenticate(request)
            if (method, plural) in self.forbidden:
                raise _FakeAnswer(
                    403,
                    _status(
                        403,
                        "Forbidden",
                        f'{plural} is forbidden: User "{user}" cannot {method.lower()}'
                        f' resource "{plural}"',
                    ),
                )
            return self._route(request, method, segments, plural)
        except _FakeAnswer as answer:
            if answer.code == 409:
                self.conflicts += 1
            return answer.code, answer.body

    def _authenticate(self, request: FakeAPIRequest) -> str:
        header = request.getHeader(b"authorization") or b""
        if (
            header.startswith(b"Bearer ")
            and header[7:].decode("latin-1") in self.api_tokens
        ):
            return "system:serviceaccount:dapr-system:dapr-sentry"
        transport = request.channel.transport
        get_peer_certificate = getattr(transport, "getPeerCertificate", None)
        peer = get_peer_certificate() if get_peer_certificate is not None else None
        if peer is not None:
            names = peer.to_cryptography().subject.get_attributes_for_oid(
                NameOID.COMMON_NAME
            )
            if names and names[0].value in self.client_common_names:
                return str(names[0].value)
        if not self.api_tokens and not self.tls:
            return "kubectl-proxy"
        raise _FakeAnswer(401, _status(401, "Unauthorized", "Unauthorized"))

    def _body(self, request: FakeAPIRequest) -> Document:
        try:
            content = request.content.read() if request.content is not None else b""
            body = json.loads(content or b"null")
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise _FakeAnswer(
                400, _status(400, "BadRequest", "the body is not a JSON object")
            )
        return body

    def _route(
        self,
        request: FakeAPIRequest,
        method: str,
        segments: list[str],
        plural: str | None,
    ) -> tuple[int, "Document | _WatchStart"]:
        if plural == "tokenreviews" and len(segments) == 4:
            if method != "POST":
                raise self._not_allowed(method)
            return 201, self._review(self._body(request))
        if plural in API_GROUPS and len(segments) in (3, 4) and method == "GET":
            # A cluster-wide collection: /api/v1/<plural>, /apis/.../<plural>.
            return self._collection(request, plural, None)
        if plural in API_GROUPS:
            namespace = segments[3] if segments[0] == "api" else segments[4]
            depth = 5 if segments[0] == "api" else 6
            if len(segments) == depth and method == "GET":
                return self._collection(request, plural, namespace)
            if len(segments) == depth and method == "POST":
                return 201, self._create(plural, namespace, self._body(request))
            if len(segments) == depth + 1:
                name = segments[depth]
                if method == "GET":
                    return 200, self._get(plural, namespace, name)
                if method == "PUT":
                    return 200, self._update(
                        plural, namespace, name, self._body(request)
                    )
                raise self._not_allowed(method)
        raise _FakeAnswer(
            404,
            _status(
                404, "NotFound", "the server could not find the requested resource"
            ),
        )

    @staticmethod
    def _argument(request: FakeAPIRequest, name: str) -> str | None:
        values = request.args.get(name.encode("ascii"))
        return values[0].decode("utf-8") if values else None

    def _collection(
        self, request: FakeAPIRequest, plural: str, namespace: str | None
    ) -> tuple[int, "Document | _WatchStart"]:
        if self._argument(request, "watch") in ("1", "true"):
            timeout = self._argument(request, "timeoutSeconds")
            return 200, _WatchStart(
                plural,
                namespace,
                self._argument(request, "resourceVersion"),
                float(timeout) if timeout else None,
            )
        return 200, self._list(request, plural, namespace)

    def _list(
        self, request: FakeAPIRequest, plural: str, namespace: str | None
    ) -> Document:
        keys = sorted(
            key
            for key in self.objects
            if key[0] == plural and (namespace is None or key[1] == namespace)
        )
        start = int(self._argument(request, "continue") or 0)
        limit = int(self._argument(request, "limit") or 0) or len(keys)
        page = keys[start : start + limit]
        metadata = {"resourceVersion": str(self._last_version())}
        if start + limit < len(keys):
            metadata["continue"] = str(start + limit)
        api_version, kind = API_GROUPS[plural]
        return {
            "apiVersion": api_version,
            "kind": f"{kind}List",
            "metadata": metadata,
            "items": [copy.deepcopy(self.objects[key]) for key in page],
        }

    def _start_watch(self, request: FakeAPIRequest, watch: _WatchStart) -> None:
        request.setResponseCode(200)
        request.setHeader(b"content-type", b"application/json")
        request.watch_scope = (watch.plural, watch.namespace)
        request.watch_timer = None
        # Headers go out at once, as the API server flushes them when a
        # watch starts: a client waits for them, then for events.
        request.write(b"")
        since = int(watch.resource_version or 0)
        if watch.resource_version and since < self._compacted:
            self._send_event(
                request,
                "ERROR",
                _status(410, "Expired", f"too old resource version: {since}"),
            )
            request.finish()
            return
        self.watches.append(request)
        request.notifyFinish().addBoth(
            lambda _: self.watches.remove(request) if request in self.watches else None
        )
        for event in list(self._history):
            if event[0] > since and self._watch_matches(request, event):
                self._send_event(request, event[1], event[3])
        if watch.timeout_seconds:
            request.watch_timer = self._reactor.callLater(
                watch.timeout_seconds, self._end_watch, request
            )
            self._delayed.add(request.watch_timer)

    @staticmethod
    def _not_allowed(method: str) -> _FakeAnswer:
        return _FakeAnswer(
            405,
            _status(
                405,
                "MethodNotAllowed",
                f"the server does not allow this method ({method})",
            ),
        )

    @staticmethod
    def _not_found(plural: str, name: str) -> _FakeAnswer:
        return _FakeAnswer(
            404,
            _status(
                404,
                "NotFound",
                f'{plural} "{name}" not found',
                {"name": name, "kind": plural},
            ),
        )

    def _get(self, plural: str, namespace: str, name: str) -> Document:
        document = self.get_object(plural, namespace, name)
        if document is None:
            raise self._not_found(plural, name)
        return document

    def _create(self, plural: str, namespace: str, body: Document) -> Document:
        name = (body.get("metadata") or {}).get("name")
        if not name:
            raise _FakeAnswer(
                422, _status(422, "Invalid", f"{plural}: metadata.name: Required value")
            )
        if self.before_write is not None:
            self.before_write("POST", plural, namespace, name)
        if (plural, namespace, name) in self.objects:
            raise _FakeAnswer(
                409,
                _status(
                    409,
                    "AlreadyExists",
                    f'{plural} "{name}" already exists',
                    {"name": name, "kind": plural},
                ),
            )
        metadata = body.setdefault("metadata", {})
        metadata.pop("resourceVersion", None)
        metadata.pop("uid", None)
        return self.put_object(plural, namespace, name, body)

    def _update(
        self, plural: str, namespace: str, name: str, body: Document
    ) -> Document:
        metadata = body.get("metadata") or {}
        if metadata.get("name") != name:
            raise _FakeAnswer(
                400,
                _status(
                    400, "BadRequest", "the name of the object does not match the URL"
                ),
            )
        if self.before_write is not None:
            self.before_write("PUT", plural, namespace, name)
        current = self.objects.get((plural, namespace, name))
        if current is None:
            raise self._not_found(plural, name)
        wanted = metadata.get("resourceVersion")
        if wanted and wanted != current["metadata"]["resourceVersion"]:
            raise _FakeAnswer(
                409,
                _status(
                    409,
                    "Conflict",
                    f'Operation cannot be fulfilled on {plural} "{name}": the object'
                    " has been modified; please apply your changes to the latest"
                    " version and try again",
                    {"name": name, "kind": plural},
                ),
            )
        body["metadata"]["uid"] = current["metadata"]["uid"]
        return self.put_object(plural, namespace, name, body)

    def _review(self, body: Document) -> Document:
        spec = body.get("spec") or {}
        self.reviews.append(copy.deepcopy(spec))
        wanted = spec.get("audiences") or [FAKE_API_SERVER_AUDIENCE]
        review: Document = {
            "kind": "TokenReview",
            "apiVersion": "authentication.k8s.io/v1",
            "metadata": {"creationTimestamp": None},
            "spec": spec,
        }
        token = spec.get("token")
        record = self.tokens.get(token) if isinstance(token, str) else None
        if record is None:
            review["status"] = {
                "user": {},
                "error": "[invalid bearer token, square/go-jose: error in"
                " cryptographic primitive]",
            }
            return review
        if not record.authenticated:
            review["status"] = {"authenticated": False, "user": {}}
            return review
        matching = [audience for audience in wanted if audience in record.audiences]
        if not matching:
            review["status"] = {
                "user": {},
                "error": "[invalid bearer token, token audiences"
                f" {list(record.audiences)} is invalid for the target audiences"
                f" {list(wanted)}]",
            }
            return review
        user: Document = {
            "username": record.username
            or f"system:serviceaccount:{record.namespace}:{record.service_account}",
            "uid": secrets.token_hex(8),
            "groups": [
                "system:serviceaccounts",
                f"system:serviceaccounts:{record.namespace}",
                "system:authenticated",
            ],
        }
        if record.pod_name is not None and record.pod_extra:
            user["extra"] = {
                "authentication.kubernetes.io/pod-name": [record.pod_name],
                "authentication.kubernetes.io/pod-uid": [record.pod_uid or ""],
            }
        review["status"] = {"authenticated": True, "user": user}
        if self.audience_aware:
            review["status"]["audiences"] = matching
        return review
