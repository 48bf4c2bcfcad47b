"""
Tests for L{sentry_tx.kube.informer}: list, then watch from the list's
version; resume, re-list on 410 Gone, back off on a broken watch; bounded
lines, bounded silence, bounded memory.
"""

import json
from urllib.parse import parse_qs, urlsplit

from twisted.internet import defer
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from sentry_tx.kube.errors import KubernetesAPIError, KubernetesUnavailableError
from sentry_tx.kube.informer import (
    CONFIGURATIONS_PATH,
    MAX_KEPT_STRING_CHARACTERS,
    MAX_LIST_PAGE_BYTES,
    PODS_PATH,
    RELIST_BACKOFF_INITIAL_SECONDS,
    RELIST_BACKOFF_MAX_SECONDS,
    WATCH_IDLE_TIMEOUT_SECONDS,
    WATCH_SERVER_TIMEOUT_SECONDS,
    Informer,
    InformerService,
    PodRecord,
    configuration_informer,
    pod_informer,
)
from sentry_tx.testing.kubernetes import kubernetes_client_for, start_fake_kubernetes
from sentry_tx.testing.scripted_kubernetes import (
    ScriptedKubernetesClient,
    ScriptedResponse,
)


def pod(namespace, name, version, account="app", uid=None, annotations=None):
    return {
        "metadata": {
            "namespace": namespace,
            "name": name,
            "uid": uid or f"uid-{name}",
            "resourceVersion": str(version),
            "annotations": annotations or {},
            "labels": {"big": "x" * 1000},
        },
        "spec": {"serviceAccountName": account, "containers": [{"name": "c"}]},
        "status": {"phase": "Running"},
    }


def page(items, version, continue_token=None):
    metadata = {"resourceVersion": str(version)}
    if continue_token:
        metadata["continue"] = continue_token
    return {"kind": "PodList", "metadata": metadata, "items": items}


def query(path):
    return {key: values[0] for key, values in parse_qs(urlsplit(path).query).items()}


class InformerTests(SynchronousTestCase):
    """
    L{Informer} against a scripted client on a L{Clock}.
    """

    def setUp(self):
        self.clock = Clock()
        self.client = ScriptedKubernetesClient(self.clock)
        self.informer = pod_informer(self.clock, self.client, page_size=2)
        self.informer.start()
        self.addCleanup(self.informer.stop)

    def _answer_list(self, *pages):
        for each in pages:
            (call,) = self.client.pending("GET")
            call[4].callback(each)

    def _watch(self):
        (call,) = self.client.pending("WATCH")
        response = ScriptedResponse()
        call[4].callback(response)
        return call[1], response

    def test_list_in_pages_then_watch_from_its_version(self):
        """
        The informer lists in pages (C{limit}, C{continue}), is ready after
        the last page, and then watches from the list's resourceVersion.
        """
        self.assertFalse(self.informer.ready)
        (first,) = self.client.pending("GET")
        self.assertEqual(urlsplit(first[1]).path, PODS_PATH)
        self.assertEqual(query(first[1]), {"limit": "2"})
        first[4].callback(page([pod("a", "p1", 5), pod("a", "p2", 6)], 10, "next"))
        self.assertFalse(self.informer.ready)
        (second,) = self.client.pending("GET")
        self.assertEqual(query(second[1]), {"limit": "2", "continue": "next"})
        second[4].callback(page([pod("b", "p3", 7)], 10))
        self.assertEqual(self.client.response_caps, [MAX_LIST_PAGE_BYTES] * 2)
        self.assertTrue(self.informer.ready)
        self.assertEqual(len(self.informer), 3)
        self.assertEqual(self.informer.get("b", "p3").uid, "uid-p3")
        path, _ = self._watch()
        self.assertEqual(urlsplit(path).path, PODS_PATH)
        self.assertEqual(
            query(path),
            {
                "watch": "1",
                "resourceVersion": "10",
                "allowWatchBookmarks": "true",
                "timeoutSeconds": str(WATCH_SERVER_TIMEOUT_SECONDS),
            },
        )

    def test_watch_events(self):
        """
        ADDED and MODIFIED events store the pod, DELETED removes it, and
        every event (BOOKMARK too) advances the version watched from.
        """
        self._answer_list(page([pod("a", "p1", 5)], 10))
        _, response = self._watch()
        response.send(
            {"type": "ADDED", "object": pod("a", "new", 11, account="x")},
            {"type": "MODIFIED", "object": pod("a", "p1", 12, account="y")},
            {"type": "DELETED", "object": pod("a", "new", 13)},
        )
        self.assertIsNone(self.informer.get("a", "new"))
        self.assertEqual(self.informer.get("a", "p1").service_account, "y")
        response.send(
            {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "20"}}}
        )
        self.assertEqual(self.informer.resource_version, "20")
        # A watch the server ends after a while resumes from there, no list.
        self.clock.advance(WATCH_SERVER_TIMEOUT_SECONDS)
        response.end()
        path, _ = self._watch()
        self.assertEqual(query(path)["resourceVersion"], "20")
        self.assertEqual(self.informer.lists, 1)

    def test_changes_publish_new_snapshots(self):
        """
        Each change publishes a new immutable mapping: a snapshot read
        before an event (as the gRPC loop reads it) never changes.
        """
        self._answer_list(page([pod("a", "p1", 5)], 10))
        before = self.informer.snapshot
        _, response = self._watch()
        response.send(
            {"type": "ADDED", "object": pod("a", "new", 11)},
            {"type": "DELETED", "object": pod("a", "p1", 12)},
        )
        self.assertEqual(set(before), {("a", "p1")})
        self.assertEqual(set(self.informer.snapshot), {("a", "new")})
        with self.assertRaises(TypeError):
            before[("a", "x")] = None

    def test_unchanged_event_keeps_snapshot(self):
        """
        A MODIFIED event that changes nothing the cache keeps (the pod's
        status) publishes no new snapshot; one that changes a kept field
        does.
        """
        self._answer_list(page([pod("a", "p1", 5)], 10))
        before = self.informer.snapshot
        _, response = self._watch()
        status_only = pod("a", "p1", 11)
        status_only["status"] = {"phase": "Succeeded"}
        response.send({"type": "MODIFIED", "object": status_only})
        self.assertIs(self.informer.snapshot, before)
        response.send({"type": "MODIFIED", "object": pod("a", "p1", 12, account="b")})
        self.assertIsNot(self.informer.snapshot, before)
        self.assertEqual(
            self.informer.snapshot[("a", "p1")].service_account, "b"
        )

    def test_gone_event_relists_at_once(self):
        """
        An ERROR event with a 410 Status (the version is too old) makes the
        informer list again at once, keeping the old cache meanwhile.
        """
        self._answer_list(page([pod("a", "p1", 5)], 10))
        _, response = self._watch()
        response.send(
            {
                "type": "ERROR",
                "object": {"kind": "Status", "code": 410, "message": "too old"},
            }
        )
        self.assertTrue(response.stopped)
        (relist,) = self.client.pending("GET")
        self.assertNotIn("resourceVersion", query(relist[1]))
        self.assertIsNotNone(self.informer.get("a", "p1"))
        relist[4].callback(page([pod("a", "p2", 30)], 31))
        self.assertIsNone(self.informer.get("a", "p1"))
        self.assertIsNotNone(self.informer.get("a", "p2"))
        path, _ = self._watch()
        self.assertEqual(query(path)["resourceVersion"], "31")

    def test_gone_answer_relists_at_once(self):
        """
        A watch answered HTTP 410 also lists again at once.
        """
        self._answer_list(page([], 10))
        (call,) = self.client.pending("WATCH")
        call[4].errback(KubernetesAPIError(410, "Gone", "too old"))
        self.assertEqual(len(self.client.pending("GET")), 1)

    def test_gone_list_backs_off(self):
        """
        A list page answered 410 (an expired continue token) is retried
        after the backoff, not at once, so that it cannot loop.
        """
        (call,) = self.client.pending("GET")
        call[4].callback(page([pod("a", "p1", 5)], 10, "next"))
        (call,) = self.client.pending("GET")
        call[4].errback(KubernetesAPIError(410, "Expired", "continue token expired"))
        self.assertEqual(self.client.pending(), [])
        self.clock.advance(RELIST_BACKOFF_INITIAL_SECONDS)
        (call,) = self.client.pending("GET")
        self.assertNotIn("continue", query(call[1]))

    def test_broken_watch_relists_with_backoff(self):
        """
        A cut watch lists again after a backoff that doubles with each
        failure in a row, up to a maximum, and is reset by a good list.
        """
        self._answer_list(page([], 10))
        _, response = self._watch()
        response.cut()
        self.assertEqual(self.client.pending("GET"), [])
        self.clock.advance(RELIST_BACKOFF_INITIAL_SECONDS)
        (relist,) = self.client.pending("GET")
        relist[4].errback(KubernetesUnavailableError("refused"))
        self.clock.advance(RELIST_BACKOFF_INITIAL_SECONDS * 2 - 0.01)
        self.assertEqual(self.client.pending("GET"), [])
        self.clock.advance(0.01)
        delays = []
        for _ in range(10):
            (relist,) = self.client.pending("GET")
            relist[4].errback(KubernetesUnavailableError("refused"))
            (timer,) = self.clock.getDelayedCalls()
            delays.append(timer.getTime() - self.clock.seconds())
            self.clock.advance(delays[-1])
        self.assertEqual(delays[0], RELIST_BACKOFF_INITIAL_SECONDS * 4)
        self.assertEqual(delays[-1], RELIST_BACKOFF_MAX_SECONDS)
        self._answer_list(page([], 40))
        _, response = self._watch()
        response.cut()
        (timer,) = self.clock.getDelayedCalls()
        self.assertEqual(
            timer.getTime() - self.clock.seconds(), RELIST_BACKOFF_INITIAL_SECONDS
        )

    def test_watch_ended_at_once_backs_off(self):
        """
        A watch the server ends as soon as it starts is not resumed in a
        loop: the informer backs off.
        """
        self._answer_list(page([], 10))
        _, response = self._watch()
        response.end()
        self.assertEqual(self.client.pending(), [])
        self.clock.advance(RELIST_BACKOFF_INITIAL_SECONDS)
        self.assertEqual(len(self.client.pending("GET")), 1)

    def test_event_line_bounded(self):
        """
        An event line longer than the bound breaks the watch (closed, then a
        backoff), without being kept.
        """
        informer = pod_informer(self.clock, self.client, max_event_bytes=100)
        self.informer.stop()
        informer.start()
        self.addCleanup(informer.stop)
        (call,) = self.client.pending("GET")
        call[4].callback(page([], 10))
        _, response = self._watch()
        response.protocol.dataReceived(b"{" + b"x" * 200)
        self.assertTrue(response.stopped)
        self.assertEqual(self.client.pending(), [])
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)

    def test_event_split_across_reads(self):
        """
        An event split across reads is applied once its line is complete;
        several events in one read are all applied.
        """
        self._answer_list(page([], 10))
        _, response = self._watch()
        line = json.dumps({"type": "ADDED", "object": pod("a", "p", 11)}).encode()
        response.protocol.dataReceived(line[:20])
        self.assertIsNone(self.informer.get("a", "p"))
        response.protocol.dataReceived(line[20:] + b"\n")
        self.assertIsNotNone(self.informer.get("a", "p"))
        # Several events in one read, the last cut in three.
        lines = [
            json.dumps({"type": "ADDED", "object": pod("a", f"q{i}", 12 + i)}).encode()
            for i in range(3)
        ]
        response.protocol.dataReceived(
            lines[0] + b"\n" + lines[1] + b"\n" + lines[2][:5]
        )
        self.assertIsNotNone(self.informer.get("a", "q1"))
        self.assertIsNone(self.informer.get("a", "q2"))
        response.protocol.dataReceived(lines[2][5:30])
        response.protocol.dataReceived(lines[2][30:] + b"\n")
        self.assertEqual(self.informer.get("a", "q2").uid, "uid-q2")
        self.assertEqual(self.informer.resource_version, "14")

    def test_silent_watch_broken(self):
        """
        A watch that sends nothing for the idle timeout is closed and the
        informer lists again after the backoff; each byte restarts that
        timer.
        """
        self._answer_list(page([], 10))
        _, response = self._watch()
        self.clock.advance(WATCH_IDLE_TIMEOUT_SECONDS - 1)
        response.send(
            {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "11"}}}
        )
        self.clock.advance(WATCH_IDLE_TIMEOUT_SECONDS - 1)
        self.assertFalse(response.stopped)
        self.clock.advance(1)
        self.assertTrue(response.stopped)
        self.clock.advance(RELIST_BACKOFF_INITIAL_SECONDS)
        self.assertEqual(len(self.client.pending("GET")), 1)

    def test_wait_synced(self):
        """
        C{wait_synced} fires True when the list completes, False at its
        deadline, and at once when already synced.
        """
        late = self.informer.wait_synced(self.clock.seconds() + 5)
        early = self.informer.wait_synced(self.clock.seconds() + 1)
        self.clock.advance(1)
        self.assertIs(self.successResultOf(early), False)
        self.assertNoResult(late)
        self._answer_list(page([], 10))
        self.assertIs(self.successResultOf(late), True)
        self.assertIs(self.successResultOf(self.informer.wait_synced(0)), True)

    def test_stop(self):
        """
        Stopping cancels the watch, leaves no timer, and tells waiters the
        sync will not come.
        """
        waiting = self.informer.wait_synced(self.clock.seconds() + 5)
        self.informer.stop()
        self.assertIs(self.successResultOf(waiting), False)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        informer = pod_informer(self.clock, self.client)
        informer.start()
        (call,) = self.client.pending("GET")
        call[4].callback(page([], 3))
        _, response = self._watch()
        informer.stop()
        self.assertTrue(response.stopped)
        self.assertEqual(self.client.pending(), [])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_memory_bounded(self):
        """
        Only the uid, the service account and the three annotations the
        validator reads are kept, each value cut to a bound.
        """
        record = PodRecord.from_pod(
            pod(
                "a",
                "p",
                1,
                annotations={
                    "dapr.io/app-id": "x" * 10_000,
                    "dapr.io/config": "cfg",
                    "unrelated": "y" * 10_000,
                },
            )
        )
        self.assertEqual(set(record.annotations), {"dapr.io/app-id", "dapr.io/config"})
        self.assertEqual(
            len(record.annotations["dapr.io/app-id"]), MAX_KEPT_STRING_CHARACTERS
        )
        self.assertFalse(hasattr(record, "__dict__"))
        self.assertEqual(
            PodRecord.from_pod({"metadata": {}}).service_account, "default"
        )

    def test_service_ready(self):
        """
        L{InformerService} starts and stops its informers and is ready only
        when all have synced.
        """
        self.informer.stop()
        client = ScriptedKubernetesClient(self.clock)
        pods = pod_informer(self.clock, client)
        configurations = configuration_informer(self.clock, client)
        service = InformerService((pods, configurations))
        service.startService()
        self.addCleanup(service.stopService)
        gets = client.pending("GET")
        self.assertEqual(
            sorted(urlsplit(call[1]).path for call in gets),
            sorted([PODS_PATH, CONFIGURATIONS_PATH]),
        )
        gets[0][4].callback(page([], 1))
        self.assertFalse(service.ready)
        gets[1][4].callback(
            {
                "metadata": {"resourceVersion": "2"},
                "items": [
                    {
                        "metadata": {"namespace": "a", "name": "c"},
                        "spec": {"accessControl": {"trustDomain": "example.org"}},
                    }
                ],
            }
        )
        self.assertTrue(service.ready)
        self.assertEqual(configurations.get("a", "c"), "example.org")


class _Discard(Protocol):
    """
    Reads a body and drops it.
    """


class ObservedInformer(Informer):
    """
    An informer that tells the test when it has listed or applied an event.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.changed = defer.Deferred()

    def _notify(self):
        changed, self.changed = self.changed, defer.Deferred()
        changed.callback(None)

    def _listed(self, result):
        super()._listed(result)
        self._notify()

    def _apply(self, kind, document):
        super()._apply(kind, document)
        self._notify()


class InformerOverHTTPTests(TestCase):
    """
    The informer with the real client against L{FakeKubernetesAPI}: the
    fake lists and watches as the informer expects.
    """

    timeout = 20

    def setUp(self):
        from sentry_tx.kube.informer import pod_record

        self.fake = start_fake_kubernetes(self)
        self.client = kubernetes_client_for(self, self.fake)
        self.fake.add_pod("apps", "p1", "app")
        self.fake.add_pod("apps", "p2", "app")
        self.fake.add_pod("other", "p3", "other")
        self.informer = ObservedInformer(
            self.client.reactor, self.client, PODS_PATH, pod_record, "pod", page_size=2
        )
        self.informer.start()
        self.addCleanup(self.informer.stop)

    @defer.inlineCallbacks
    def _until(self, condition):
        while not condition():
            yield self.informer.changed

    @defer.inlineCallbacks
    def test_list_and_watch(self):
        """
        Every pod of every namespace is listed (over two pages); a pod
        added, changed or deleted later reaches the cache by the watch.
        """
        yield self._until(lambda: self.informer.ready)
        self.assertEqual(len(self.informer), 3)
        # Two pages of two (the watch's own GET may have arrived too).
        self.assertEqual(self.informer.lists, 1)
        self.assertGreaterEqual(self.fake.requests.count(("GET", PODS_PATH)), 2)
        # Whether the watch is open yet or not, it starts from the list's
        # version and so sees this pod.
        self.fake.add_pod("apps", "p4", "late")
        yield self._until(lambda: self.informer.get("apps", "p4") is not None)
        self.assertEqual(self.informer.get("apps", "p4").service_account, "late")
        self.fake.delete_object("pods", "apps", "p1")
        yield self._until(lambda: self.informer.get("apps", "p1") is None)

    @defer.inlineCallbacks
    def test_watch_headers_before_events(self):
        """
        A watch's headers come before any event (the client's header
        timeout must not end a quiet watch).
        """
        yield self._until(lambda: self.informer.ready)
        response = yield self.client.open_stream(
            PODS_PATH + "?watch=1&resourceVersion=999999", timeout_seconds=5
        )
        self.assertEqual(response.code, 200)
        response.deliverBody(_Discard())
        self.fake.break_watches()

    @defer.inlineCallbacks
    def test_gone_relists(self):
        """
        A watch from a version older than the server's history gets an
        ERROR event with 410 Gone, and the informer lists again.
        """
        from sentry_tx.kube.informer import pod_record

        yield self._until(lambda: self.informer.ready)
        self.fake.add_pod("apps", "p5", "app")
        self.fake.expire_history()
        informer = ObservedInformer(
            self.client.reactor, self.client, PODS_PATH, pod_record, "pod"
        )
        self.addCleanup(informer.stop)
        # Resume from an old version, as after a long disconnection.
        informer._running = True
        informer.resource_version = "1"
        informer._watch()
        yield informer.changed
        self.assertEqual(informer.lists, 1)
        self.assertTrue(informer.ready)
        self.assertIsNotNone(informer.get("apps", "p5"))
