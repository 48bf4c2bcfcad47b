# -*- test-case-name: tests.test_kube_informer,tests.test_images -*-
"""
Informer caches of the Kubernetes API: what the KUBERNETES validator needs of
every Pod and Dapr Configuration in the cluster, kept current by a watch, as
Dapr's validator keeps them (controller-runtime's cache).

An L{Informer} lists its resource (in pages), then watches it from the
list's C{resourceVersion}; a watch the server ends normally is resumed from
the last version seen; a C{410 Gone} (the version is too old) re-lists at
once; any other failure (the API is down, the stream broke or went silent,
an event too large) re-lists after a backoff that doubles up to
L{RELIST_BACKOFF_MAX_SECONDS}.  Only the fields the validator reads are kept
(L{pod_record}, L{configuration_record}), so memory grows with the number of
objects, not with their size.

The cache is published as an immutable mapping: each change (a list, a
watch event) replaces it with a new one by one assignment, so that the
validator on the gRPC loop reads it (L{Informer.get}, L{Informer.snapshot})
without a hop to the reactor and without a lock.  An event copies the
mapping: with 10,000 pods, about 0.2 ms per event.

Everything here runs on the reactor thread and never waits without a bound:
each list page and the start of each watch are bounded by the client's
request timeout, the server is asked to end each watch after
L{WATCH_SERVER_TIMEOUT_SECONDS}, a watch that delivers no byte for
L{WATCH_IDLE_TIMEOUT_SECONDS} is closed, and no event line may exceed
L{MAX_WATCH_EVENT_BYTES}.
"""

import json
from collections.abc import Callable, Generator, Iterable, Mapping
from types import MappingProxyType
from typing import Any, Generic, TypeVar, cast, overload
from urllib.parse import urlencode

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, inlineCallbacks
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.iweb import IResponse

from sentry_tx.errors import ConfigError
from sentry_tx.identity.images import kept_images
from sentry_tx.kube.client import MAX_KUBERNETES_RESPONSE_BYTES, KubernetesClient
from sentry_tx.kube.errors import KubernetesAPIError, KubernetesError, json_object

PODS_PATH = "/api/v1/pods"
CONFIGURATIONS_PATH = "/apis/dapr.io/v1alpha1/configurations"

LIST_PAGE_SIZE = 100
"""
Objects asked for per list page (C{limit}).
"""

MAX_LIST_PAGE_BYTES = 32 * 1024 * 1024
"""
The largest list page read: L{LIST_PAGE_SIZE} pods of up to 320 KiB of JSON
each (a pod with large managedFields and annotations); a page is parsed and
reduced to what the validator needs, then dropped.
"""

WATCH_SERVER_TIMEOUT_SECONDS = 240
"""
The C{timeoutSeconds} asked of the API server for each watch: it then ends
the watch, and the informer resumes it from the last version seen.
"""

WATCH_IDLE_TIMEOUT_SECONDS = 300.0
"""
A watch that delivers no byte for this long is taken as broken (the server
should have ended it after L{WATCH_SERVER_TIMEOUT_SECONDS}), and the
resource is listed again.
"""

MAX_WATCH_EVENT_BYTES = MAX_KUBERNETES_RESPONSE_BYTES
"""
The longest event line read from a watch; a longer one breaks the watch.
"""

MIN_WATCH_SECONDS = 1.0
"""
A watch that the server ends sooner than this after it started counts as a
failure (backoff), so that a server that closes every watch at once is not
called in a loop.
"""

RELIST_BACKOFF_INITIAL_SECONDS = 0.5
RELIST_BACKOFF_MAX_SECONDS = 30.0
"""
After a failed list or a broken watch, the informer lists again after
L{RELIST_BACKOFF_INITIAL_SECONDS}, doubled at each consecutive failure up to
this.
"""

MAX_KEPT_STRING_CHARACTERS = 256
"""
The longest annotation value or trust domain kept; a longer value (none of
the ones the validator reads can be valid at that length) is cut to this,
so that it still fails the validator's checks but cannot grow the cache.
Container images are never cut (they are signed): a pod's whole entry is
bounded instead (L{sentry_tx.identity.images.MAX_POD_ENTRY_BYTES}).
"""

APP_ID_ANNOTATION = "dapr.io/app-id"
CONFIG_ANNOTATION = "dapr.io/config"
CONTROL_PLANE_ANNOTATION = "dapr.io/control-plane"
KEPT_POD_ANNOTATIONS = (APP_ID_ANNOTATION, CONFIG_ANNOTATION, CONTROL_PLANE_ANNOTATION)

_GONE = 410

Key = tuple[str, str]
"""
An object's C{(namespace, name)}.
"""

_V = TypeVar("_V")
_D = TypeVar("_D")



def _kept(value: object) -> str | None:
    if not isinstance(value, str):
        return None
    return value[:MAX_KEPT_STRING_CHARACTERS]


class PodRecord:
    """
    What the validator needs of a Pod.

    @ivar uid: C{metadata.uid}.
    @ivar service_account: C{spec.serviceAccountName} (C{default} when
        unset, as Kubernetes does).
    @ivar annotations: only the annotations in L{KEPT_POD_ANNOTATIONS}.
    @ivar images: the container images' JSON to stamp, or None when too
        large to keep (L{sentry_tx.identity.images.kept_images}).
    """

    __slots__ = ("uid", "service_account", "annotations", "images")

    def __init__(
        self,
        uid: str,
        service_account: str,
        annotations: dict[str, str],
        images: bytes | None = b"",
    ) -> None:
        self.uid = uid
        self.service_account = service_account
        self.annotations = annotations
        self.images = images

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PodRecord):
            return NotImplemented
        return (
            self.uid == other.uid
            and self.service_account == other.service_account
            and self.annotations == other.annotations
            and self.images == other.images
        )

    __hash__ = None  # type: ignore[assignment]

    @classmethod
    def from_pod(cls, pod: dict[str, Any]) -> "PodRecord":
        """
        The record of a Pod object (from the cache or a GET).
        """
        metadata = json_object(pod.get("metadata"))
        annotations = json_object(metadata.get("annotations"))
        kept: dict[str, str] = {}
        for key in KEPT_POD_ANNOTATIONS:
            value = annotations.get(key)
            if value is not None:
                kept[key] = _kept(value) or ""
        uid = _kept(metadata.get("uid")) or ""
        account = _kept(json_object(pod.get("spec")).get("serviceAccountName"))
        account = account or "default"
        identity = (uid, account, *kept, *kept.values())
        return cls(uid, account, kept, kept_images(pod, identity))


def _key(document: Mapping[str, Any]) -> Key | None:
    metadata = json_object(document.get("metadata"))
    namespace, name = metadata.get("namespace"), metadata.get("name")
    if not isinstance(namespace, str) or not isinstance(name, str):
        return None
    return (namespace, name)


def pod_record(document: dict[str, Any]) -> tuple[Key, PodRecord] | None:
    """
    C{((namespace, name), PodRecord)} of a Pod, or None if it has no name.
    """
    key = _key(document)
    return None if key is None else (key, PodRecord.from_pod(document))


def configuration_trust_domain(document: Mapping[str, Any]) -> str | bool | None:
    """
    A Configuration's C{spec.accessControl.trustDomain}: None when unset or
    empty; a string (cut to L{MAX_KEPT_STRING_CHARACTERS}, still too long to
    be valid when it was longer); True for any other value, which the
    validator refuses as "not a string".
    """
    access_control = json_object(json_object(document.get("spec")).get("accessControl"))
    value = access_control.get("trustDomain")
    if not value:
        return None
    if isinstance(value, str):
        return value[:MAX_KEPT_STRING_CHARACTERS]
    return True


def configuration_record(
    document: dict[str, Any],
) -> tuple[Key, str | bool | None] | None:
    """
    C{((namespace, name), trust domain)} of a Configuration, or None.
    """
    key = _key(document)
    return None if key is None else (key, configuration_trust_domain(document))


class _WatchBroken(Exception):
    """
    The watch stream broke: the connection failed, it went silent, or it sent
    something unreadable.
    """


class _WatchGone(Exception):
    """
    The server answered C{410 Gone}: the version watched from is too old.
    """


class _WatchStream(Protocol):
    """
    Reads a watch's body: one JSON event per line, each handed to
    C{on_event} as it arrives.  C{finished} fires when the server ends the
    stream, or fails with L{_WatchBroken} / L{_WatchGone}.
    """

    def __init__(
        self,
        reactor: IReactorTime,
        on_event: Callable[[object, dict[str, Any]], None],
        finished: "Deferred[None]",
        max_line_bytes: int,
        idle_seconds: float,
    ) -> None:
        self._reactor = reactor
        self._on_event = on_event
        self._finished: Deferred[None] | None = finished
        self._max_line_bytes = max_line_bytes
        self._idle_seconds = idle_seconds
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._idle: IDelayedCall | None = None
        self._error: Exception | None = None

    def connectionMade(self) -> None:
        self._idle = self._reactor.callLater(self._idle_seconds, self._went_idle)

    def dataReceived(self, data: bytes) -> None:
        if self._error is not None:
            return
        if self._idle is not None and self._idle.active():
            self._idle.reset(self._idle_seconds)
        # The start of a line is kept as a list of pieces (no copying of a
        # growing buffer); the lines of this piece are found by index.
        start = 0
        while self._error is None:
            end = data.find(b"\n", start)
            if end < 0:
                break
            line = data[start:end]
            if self._pending:
                line = b"".join(self._pending) + line
                self._pending, self._pending_bytes = [], 0
            start = end + 1
            if len(line) > self._max_line_bytes:
                self._fail(self._too_long())
                return
            if line.strip():
                self._event(line)
        if self._error is None and start < len(data):
            self._pending.append(data[start:])
            self._pending_bytes += len(data) - start
            if self._pending_bytes > self._max_line_bytes:
                self._fail(self._too_long())

    def _too_long(self) -> "_WatchBroken":
        return _WatchBroken(f"an event longer than {self._max_line_bytes} bytes")

    def _event(self, line: bytes) -> None:
        try:
            event = json.loads(line)
        except ValueError:
            self._fail(_WatchBroken("an event that is not JSON"))
            return
        if not isinstance(event, dict):
            self._fail(_WatchBroken("an event that is not a JSON object"))
            return
        kind = event.get("type")
        document = json_object(event.get("object"))
        if kind == "ERROR":
            if document.get("code") == _GONE:
                self._fail(_WatchGone(str(document.get("message") or "Gone")))
            else:
                self._fail(_WatchBroken(f"an ERROR event: {document.get('message')}"))
            return
        self._on_event(kind, document)

    def _went_idle(self) -> None:
        self._idle = None
        self._fail(_WatchBroken(f"no byte for {self._idle_seconds:g} s"))

    def _stop_producing(self) -> bool:
        """
        Close the connection, when there is one (a response body's
        transport is a producer: C{IResponse.deliverBody}).
        """
        if self.transport is None:
            return False
        cast(IPushProducer, self.transport).stopProducing()
        return True

    def _fail(self, error: Exception) -> None:
        self._error = error
        self._pending, self._pending_bytes = [], 0
        if not self._stop_producing():
            self._finish()

    def abort(self) -> None:
        """
        Stop reading (the informer stops): the connection is closed.
        """
        self._finished = None
        self._stop_producing()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._idle is not None and self._idle.active():
            self._idle.cancel()
        self._idle = None
        if self._error is None and not reason.check(ResponseDone):
            self._error = _WatchBroken(reason.getErrorMessage())
        self._finish()

    def _finish(self) -> None:
        finished, self._finished = self._finished, None
        if finished is None:
            return
        if self._error is not None:
            finished.errback(self._error)
        else:
            finished.callback(None)


class Informer(Generic[_V]):
    """
    A cache of one resource, kept by list and watch (see the module
    docstring).

    @param reactor: the clock (C{IReactorTime}).
    @param client: the L{sentry_tx.kube.client.KubernetesClient} (C{get},
        C{open_stream}).
    @param path: the collection's path, for all namespaces.
    @param extract: gives C{(key, value)} to keep for an object, or None to
        keep nothing.
    @param description: what is cached, for logs.

    @ivar ready: True once a list has completed (the cache has synced once);
        it stays True while later watches and lists go on.
    """

    _log = Logger()

    def __init__(
        self,
        reactor: IReactorTime,
        client: KubernetesClient,
        path: str,
        extract: Callable[[dict[str, Any]], tuple[Key, _V] | None],
        description: str,
        page_size: int = LIST_PAGE_SIZE,
        max_event_bytes: int = MAX_WATCH_EVENT_BYTES,
        idle_seconds: float = WATCH_IDLE_TIMEOUT_SECONDS,
    ) -> None:
        self._reactor = reactor
        self._client = client
        self._path = path
        self._extract = extract
        self.description = description
        self._page_size = page_size
        self._max_event_bytes = max_event_bytes
        self._idle_seconds = idle_seconds
        self.ready = False
        self.resource_version: str | None = None
        self.lists = 0
        self.watches = 0
        self._items: Mapping[Key, _V] = MappingProxyType({})
        self._running = False
        self._operation: Deferred[Any] | None = None
        self._stream: _WatchStream | None = None
        self._timer: IDelayedCall | None = None
        self._failures = 0
        self._watching = False
        self._sync_waiters: list[tuple[Deferred[bool], IDelayedCall]] = []

    def __len__(self) -> int:
        return len(self._items)

    @overload
    def get(self, namespace: str, name: str) -> _V | None: ...

    @overload
    def get(self, namespace: str, name: str, default: _D) -> _V | _D: ...

    def get(self, namespace: str, name: str, default: object = None) -> object:
        """
        The cached value of C{namespace/name}, or C{default} when the cache
        holds no such object.  Safe from any thread.
        """
        return self._items.get((namespace, name), default)

    @property
    def snapshot(self) -> Mapping[Key, _V]:
        """
        The cache as it is now: an immutable mapping of C{(namespace, name)}
        to the kept value, never changed after it is published (a change
        publishes a new one).  Safe from any thread.
        """
        return self._items

    def start(self) -> None:
        """
        Start listing and watching (once).
        """
        if self._running:
            return
        self._running = True
        self._list()

    def stop(self) -> None:
        """
        Stop: the list or watch in progress is cancelled, no retry is
        scheduled, and callers waiting for the first sync are told it will
        not come (their Deferreds fire with False).
        """
        self._running = False
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._stream is not None:
            stream, self._stream = self._stream, None
            stream.abort()
        if self._operation is not None:
            operation, self._operation = self._operation, None
            operation.cancel()
        waiters, self._sync_waiters = self._sync_waiters, []
        for waiter, timer in waiters:
            if timer.active():
                timer.cancel()
            waiter.callback(False)

    def wait_synced(self, deadline: float) -> "Deferred[bool]":
        """
        Wait until the cache has synced once, at most until C{deadline} (on
        the reactor's clock).

        @return: Deferred firing with True once synced, or with False at
            C{deadline} or when the informer stops.
        """
        d: Deferred[bool] = Deferred()
        if self.ready:
            d.callback(True)
            return d
        if not self._running or deadline <= self._reactor.seconds():
            d.callback(False)
            return d

        def give_up() -> None:
            self._sync_waiters.remove(entry)
            d.callback(False)

        timer = self._reactor.callLater(deadline - self._reactor.seconds(), give_up)
        entry = (d, timer)
        self._sync_waiters.append(entry)
        return d

    # Listing

    def _list(self) -> None:
        self._timer = None
        if not self._running:
            return
        self.lists += 1
        self._watching = False
        self._operation = self._list_pages()
        self._operation.addCallbacks(self._listed, self._failed)

    @inlineCallbacks
    def _list_pages(
        self,
    ) -> Generator["Deferred[Any]", Any, tuple[dict[Key, _V], str | None]]:
        items: dict[Key, _V] = {}
        continue_token = None
        version = None
        while True:
            query: dict[str, str] = {"limit": str(self._page_size)}
            if continue_token:
                query["continue"] = continue_token
            page = yield self._client.get(
                f"{self._path}?{urlencode(query)}",
                max_response_bytes=MAX_LIST_PAGE_BYTES,
            )
            for document in page.get("items") or ():
                if isinstance(document, dict):
                    kept = self._extract(document)
                    if kept is not None:
                        items[kept[0]] = kept[1]
            metadata = json_object(page.get("metadata"))
            version = metadata.get("resourceVersion") or version
            continue_token = metadata.get("continue")
            if not continue_token:
                return items, version

    def _listed(self, result: tuple[dict[Key, _V], str | None]) -> None:
        self._operation = None
        items, version = result
        self._items = MappingProxyType(items)
        self.resource_version = version
        first = not self.ready
        self.ready = True
        self._failures = 0
        if first:
            self._log.info(
                "{description} cache synced: {count} objects",
                description=self.description,
                count=len(items),
            )
        waiters, self._sync_waiters = self._sync_waiters, []
        for waiter, timer in waiters:
            if timer.active():
                timer.cancel()
            waiter.callback(True)
        self._watch()

    # Watching

    def _watch(self) -> None:
        if not self._running:
            return
        self.watches += 1
        self._watching = True
        query = {
            "watch": "1",
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(WATCH_SERVER_TIMEOUT_SECONDS),
        }
        if self.resource_version:
            query["resourceVersion"] = self.resource_version
        started = self._reactor.seconds()
        self._operation = self._client.open_stream(f"{self._path}?{urlencode(query)}")
        self._operation.addCallback(self._read_stream)
        self._operation.addCallbacks(
            lambda _: self._watch_ended(started), self._failed
        )

    def _read_stream(self, response: IResponse) -> "Deferred[None]":
        finished: Deferred[None] = Deferred(lambda d: stream.abort())
        stream = _WatchStream(
            self._reactor,
            self._apply,
            finished,
            self._max_event_bytes,
            self._idle_seconds,
        )
        self._stream = stream
        response.deliverBody(stream)
        return finished

    def _apply(self, kind: object, document: dict[str, Any]) -> None:
        version = json_object(document.get("metadata")).get("resourceVersion")
        if isinstance(version, str) and version:
            self.resource_version = version
        if kind == "BOOKMARK":
            return
        if kind in ("ADDED", "MODIFIED"):
            kept = self._extract(document)
            # Most MODIFIED events (a pod's status) change nothing kept: the
            # snapshot is copied (O(items)) only when something did.
            if kept is not None and self._items.get(kept[0]) != kept[1]:
                items = dict(self._items)
                items[kept[0]] = kept[1]
                self._items = MappingProxyType(items)
        elif kind == "DELETED":
            key = _key(document)
            if key is not None and key in self._items:
                items = dict(self._items)
                del items[key]
                self._items = MappingProxyType(items)

    def _watch_ended(self, started: float) -> None:
        self._operation = None
        self._stream = None
        if not self._running:
            return
        if self._reactor.seconds() - started < MIN_WATCH_SECONDS:
            self._retry_later("the watch ended at once")
        else:
            self._watch()

    # Failures

    def _failed(self, failure: Failure) -> None:
        self._operation = None
        self._stream = None
        if not self._running or failure.check(CancelledError):
            return None
        gone = failure.check(_WatchGone) or (
            isinstance(failure.value, KubernetesAPIError)
            and failure.value.status == _GONE
        )
        if gone and self._watching:
            # A watch from a version the server no longer has: list again
            # now.  (A list answered 410, an expired continue token, backs
            # off like any other failure, so it cannot loop.)
            self._log.info(
                "{description} watch: resource version too old; listing again",
                description=self.description,
            )
            self.resource_version = None
            self._list()
            return None
        if failure.check(_WatchBroken, KubernetesError, ConfigError):
            reason = failure.getErrorMessage()
        else:
            self._log.failure(
                "{description} informer failed", failure, description=self.description
            )
            reason = failure.getErrorMessage()
        self._retry_later(reason)
        return None

    def _retry_later(self, reason: str) -> None:
        self._failures += 1
        delay = min(
            RELIST_BACKOFF_MAX_SECONDS,
            RELIST_BACKOFF_INITIAL_SECONDS * 2 ** (self._failures - 1),
        )
        self._log.warn(
            "{description} list/watch failed ({reason}); listing again in"
            " {delay:g} s",
            description=self.description,
            reason=reason,
            delay=delay,
        )
        self._timer = self._reactor.callLater(delay, self._list)


class InformerService(Service):
    """
    Starts informers with sentry_tx and stops them before the API client
    closes.

    @ivar ready: True once every informer has synced once (a healthz
        source).
    """

    name = "kubernetes-informers"

    def __init__(self, informers: Iterable[Informer[Any]]) -> None:
        self.informers = tuple(informers)

    @property
    def ready(self) -> bool:
        return all(informer.ready for informer in self.informers)

    def startService(self) -> None:
        super().startService()
        for informer in self.informers:
            informer.start()

    def stopService(self) -> None:
        super().stopService()
        for informer in self.informers:
            informer.stop()


def pod_informer(
    reactor: IReactorTime, client: KubernetesClient, **options: Any
) -> Informer[PodRecord]:
    """
    The informer of every Pod in the cluster (L{PodRecord}s).
    """
    return Informer(reactor, client, PODS_PATH, pod_record, "pod", **options)


def configuration_informer(
    reactor: IReactorTime, client: KubernetesClient, **options: Any
) -> Informer[str | bool | None]:
    """
    The informer of every Dapr Configuration (their trust domains).
    """
    return Informer(
        reactor,
        client,
        CONFIGURATIONS_PATH,
        configuration_record,
        "configuration",
        **options,
    )
