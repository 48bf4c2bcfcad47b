"""
Tests of the KUBERNETES validator under load, on a L{Clock}: one TokenReview
per call, pods from the cache (one GET for a missed one), deadline
accounting, admission with a retry hint, and an API that hangs, is slow or
refuses connections.  Also the servicer's side: the deadline it passes and
RESOURCE_EXHAUSTED with C{grpc-retry-pushback-ms}, over real gRPC too.
"""

import asyncio
from datetime import UTC, timedelta

import grpc
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from sentry_tx._proto import sentry_pb2
from sentry_tx.ca.bundle import generate_bundle
from sentry_tx.config import SentryConfig
from sentry_tx.errors import (
    ValidationError,
    ValidatorOverloadedError,
    ValidatorUnavailableError,
)
from sentry_tx.identity.admission import (
    DEADLINE_PASSED,
    MIN_RETRY_AFTER_MILLISECONDS,
    QUEUE_FULL,
    TOO_LATE,
    ReviewAdmission,
)
from sentry_tx.identity.caller import (
    VALIDATOR_INSECURE,
    VALIDATOR_KUBERNETES,
    SignRequest,
)
from sentry_tx.identity.kubernetes import (
    ANSWER_MARGIN_SECONDS,
    VALIDATOR_NOT_READY,
    KubernetesValidator,
)
from sentry_tx.kube.errors import KubernetesUnavailableError
from sentry_tx.kube.informer import configuration_informer, pod_informer
from sentry_tx.kube.paths import TOKEN_REVIEW_PATH
from sentry_tx.metrics import SentryMetrics
from sentry_tx.server.service import CertificateAuthorityService
from sentry_tx.server.servicer import (
    RETRY_PUSHBACK_METADATA_KEY,
    VALIDATION_TIMEOUT_SECONDS,
    CAServicer,
)
from sentry_tx.testing.authority import (
    FakeCertificateAuthority,
    FakeTrustStore,
    FakeValidator,
)
from sentry_tx.testing.certificates import make_bundle, make_csr
from sentry_tx.testing.grpc_client import AbortingContext, GrpcTestClient, run_now
from sentry_tx.testing.kubernetes_tokens import make_service_account_token
from sentry_tx.testing.scripted_kubernetes import ScriptedKubernetesClient

NAMESPACE = "apps"
ACCOUNT = "app"
_, CSR = make_csr()


def review(pod_name, uid):
    return {
        "status": {
            "authenticated": True,
            "audiences": ["dapr.io/sentry"],
            "user": {
                "username": f"system:serviceaccount:{NAMESPACE}:{ACCOUNT}",
                "extra": {
                    "authentication.kubernetes.io/pod-name": [pod_name],
                    "authentication.kubernetes.io/pod-uid": [uid],
                },
            },
        }
    }


def pod(name, uid, annotations=None):
    return {
        "metadata": {
            "namespace": NAMESPACE,
            "name": name,
            "uid": uid,
            "annotations": annotations or {},
        },
        "spec": {"serviceAccountName": ACCOUNT},
    }


class ValidatorUnderLoadTests(SynchronousTestCase):
    """
    L{KubernetesValidator} with informers, admission and deadlines.
    """

    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1000)
        self.api = ScriptedKubernetesClient(self.clock)
        self.watch_api = ScriptedKubernetesClient(self.clock)
        self.pods = pod_informer(self.clock, self.watch_api)
        self.configurations = configuration_informer(self.clock, self.watch_api)
        self.admission = ReviewAdmission(self.clock, limit=1, queue_limit=2)
        self.validator = KubernetesValidator(
            self.api,
            "cluster.local",
            "dapr-system",
            reactor=self.clock,
            pods=self.pods,
            configurations=self.configurations,
            admission=self.admission,
        )
        self.addCleanup(self.pods.stop)
        self.addCleanup(self.configurations.stop)

    def _sync(self, pods=(), configurations=()):
        self.pods.start()
        self.configurations.start()
        answers = {
            "/api/v1/pods": list(pods),
            "/apis/dapr.io/v1alpha1/configurations": list(configurations),
        }
        for _method, path, _, _, d in self.watch_api.pending("GET"):
            d.callback(
                {
                    "metadata": {"resourceVersion": "1"},
                    "items": answers[path.split("?")[0]],
                }
            )

    def _validate(self, name="p1", uid="u1", deadline_in=VALIDATION_TIMEOUT_SECONDS):
        token = make_service_account_token(NAMESPACE, ACCOUNT, name, uid)
        request = SignRequest(
            id=name,
            token=token,
            trust_domain="",
            namespace=NAMESPACE,
            csr=CSR,
            token_validator=VALIDATOR_KUBERNETES,
        )
        return self.validator.validate(request, self.clock.seconds() + deadline_in)

    def _reviews(self):
        return self.api.pending("POST")

    def test_cached_pod_one_review_no_get(self):
        """
        A pod in the cache costs one TokenReview and nothing else; the
        review's timeout is what the deadline leaves, less the margin.
        """
        self._sync([pod("p1", "u1")])
        d = self._validate()
        (call,) = self._reviews()
        self.assertEqual(call[1], TOKEN_REVIEW_PATH)
        self.assertAlmostEqual(
            call[3], VALIDATION_TIMEOUT_SECONDS - ANSWER_MARGIN_SECONDS
        )
        call[4].callback(review("p1", "u1"))
        identity = self.successResultOf(d)
        self.assertEqual(identity.app_id, "p1")
        self.assertEqual([c[0] for c in self.api.calls], ["POST"])

    def test_missed_pod_one_get(self):
        """
        A pod the cache has not seen yet is read with one GET, not refused.
        """
        self._sync()
        d = self._validate()
        self._reviews()[0][4].callback(review("p1", "u1"))
        (get,) = self.api.pending("GET")
        self.assertEqual(get[1], f"/api/v1/namespaces/{NAMESPACE}/pods/p1")
        get[4].callback(pod("p1", "u1"))
        self.assertEqual(self.successResultOf(d).app_id, "p1")
        self.assertEqual([c[0] for c in self.api.calls], ["POST", "GET"])

    def test_recreated_pod_read_again(self):
        """
        A cached pod with another uid than the token's (recreated under the
        same name, the event not here yet) is read again with one GET; the
        uid is still checked.
        """
        self._sync([pod("p1", "old")])
        d = self._validate(uid="new")
        self._reviews()[0][4].callback(review("p1", "new"))
        (get,) = self.api.pending("GET")
        get[4].callback(pod("p1", "other"))
        self.failureResultOf(d, ValidationError)

    def test_configuration_from_cache_or_get(self):
        """
        The trust domain comes from the cached Configuration; one the cache
        lacks is read with one GET.
        """
        self._sync(
            [
                pod("p1", "u1", {"dapr.io/config": "cached"}),
                pod("p2", "u2", {"dapr.io/config": "new"}),
            ],
            [
                {
                    "metadata": {"namespace": NAMESPACE, "name": "cached"},
                    "spec": {"accessControl": {"trustDomain": "cached.org"}},
                }
            ],
        )
        d = self._validate()
        self._reviews()[0][4].callback(review("p1", "u1"))
        self.assertEqual(self.successResultOf(d).trust_domain, "cached.org")
        d = self._validate("p2", "u2")
        self._reviews()[0][4].callback(review("p2", "u2"))
        (get,) = self.api.pending("GET")
        self.assertIn("/configurations/new", get[1])
        get[4].callback({"spec": {"accessControl": {"trustDomain": "new.org"}}})
        self.assertEqual(self.successResultOf(d).trust_domain, "new.org")

    def test_not_synced(self):
        """
        Before the caches have synced, a call waits for them; when they do
        not sync by its deadline, it is UNAVAILABLE "validator not ready",
        without any API call.
        """
        self.assertFalse(self.validator.ready)
        self.pods.start()
        self.configurations.start()
        d = self._validate(deadline_in=5)
        self.clock.advance(5 - ANSWER_MARGIN_SECONDS - 0.01)
        self.assertNoResult(d)
        self.clock.advance(0.01)
        error = self.failureResultOf(d, ValidatorUnavailableError)
        self.assertEqual(str(error.value), VALIDATOR_NOT_READY)
        self.assertEqual(self.api.calls, [])

    def test_sync_while_waiting(self):
        """
        A call waiting for the first sync goes on when it comes, and the
        time it waited counts against its deadline.
        """
        self.pods.start()
        self.configurations.start()
        d = self._validate()
        self.clock.advance(3)
        self._sync([pod("p1", "u1")])
        (call,) = self._reviews()
        self.assertAlmostEqual(
            call[3], VALIDATION_TIMEOUT_SECONDS - ANSWER_MARGIN_SECONDS - 3
        )
        call[4].callback(review("p1", "u1"))
        self.assertEqual(self.successResultOf(d).app_id, "p1")
        self.assertTrue(self.validator.ready)

    def test_deadline_passed(self):
        """
        A call whose deadline has passed (or leaves less than the answer
        margin) is not worked on: RESOURCE_EXHAUSTED's error at once, no
        API call.
        """
        self._sync([pod("p1", "u1")])
        for deadline_in in (-1, 0, ANSWER_MARGIN_SECONDS):
            error = self.failureResultOf(
                self._validate(deadline_in=deadline_in), ValidatorOverloadedError
            )
            self.assertEqual(str(error.value), DEADLINE_PASSED)
            self.assertEqual(error.value.retry_after_ms, MIN_RETRY_AFTER_MILLISECONDS)
        self.assertEqual(self.api.calls, [])

    def test_queue_time_counts(self):
        """
        A call queued behind the in-flight limit gets, once admitted, only
        what its deadline has left for its TokenReview.
        """
        self._sync([pod("p1", "u1"), pod("p2", "u2")])
        first = self._validate()
        second = self._validate("p2", "u2")
        (call,) = self._reviews()
        self.assertEqual(self.admission.queued, 1)
        self.clock.advance(3)
        call[4].callback(review("p1", "u1"))
        self.successResultOf(first)
        (call,) = self._reviews()
        self.assertAlmostEqual(
            call[3], VALIDATION_TIMEOUT_SECONDS - ANSWER_MARGIN_SECONDS - 3
        )
        call[4].callback(review("p2", "u2"))
        self.successResultOf(second)
        self.assertEqual(self.admission.in_flight, 0)

    def test_try_acquire(self):
        """
        C{try_acquire} gives a slot at once only when one is free, nobody
        waits and the deadline has not passed; otherwise None, and nothing
        is taken.
        """
        deadline = self.clock.seconds() + 5
        self.assertIsNone(self.admission.try_acquire(self.clock.seconds()))
        release = self.admission.try_acquire(deadline)
        self.assertEqual(self.admission.in_flight, 1)
        self.assertIsNone(self.admission.try_acquire(deadline))
        release(None)
        queued = self.admission.acquire(deadline)
        self.assertEqual(self.admission.in_flight, 1)
        self.successResultOf(queued)(None)
        self.assertEqual(self.admission.in_flight, 0)

    def test_queue_full(self):
        """
        Beyond the in-flight limit and the queue, a call is refused at once
        with a retry hint; the reviews in flight never exceed the limit.
        """
        self._sync([pod("p1", "u1")])
        held = [self._validate() for _ in range(3)]
        refused = self.failureResultOf(self._validate(), ValidatorOverloadedError)
        self.assertEqual(str(refused.value), QUEUE_FULL)
        self.assertGreaterEqual(
            refused.value.retry_after_ms, MIN_RETRY_AFTER_MILLISECONDS
        )
        self.assertEqual(len(self._reviews()), 1)
        for d in held:
            self._reviews()[0][4].callback(review("p1", "u1"))
            self.successResultOf(d)
        self.assertEqual(self.admission.peak_in_flight, 1)

    def test_too_late(self):
        """
        With reviews measured at 4 s, a call whose deadline cannot be met
        behind the one in flight is refused at once, with a hint of about
        the time the queue needs.
        """
        self._sync([pod("p1", "u1")])
        d = self._validate()
        self.clock.advance(4)
        self._reviews()[0][4].callback(review("p1", "u1"))
        self.successResultOf(d)
        self.assertEqual(self.admission.latency_seconds, 4)
        busy = self._validate()
        refused = self.failureResultOf(
            self._validate(deadline_in=6), ValidatorOverloadedError
        )
        self.assertEqual(str(refused.value), TOO_LATE)
        self.assertEqual(refused.value.retry_after_ms, 4000)
        # One that can wait long enough is queued.
        queued = self._validate(deadline_in=10)
        self.assertNoResult(queued)
        self.assertEqual(self.admission.queued, 1)
        self._reviews()[0][4].callback(review("p1", "u1"))
        self.successResultOf(busy)

    def test_queue_pruned_when_latency_known(self):
        """
        Calls queued before any latency was measured are refused as soon as
        a review shows they cannot be reviewed in time, not at their
        deadline; the call whose turn has come is reviewed.
        """
        self._sync([pod("p1", "u1")])
        self.admission.queue_limit = 3
        first, second, third, fourth = [self._validate() for _ in range(4)]
        self.clock.advance(3)
        self._reviews()[0][4].callback(review("p1", "u1"))
        self.successResultOf(first)
        # Reviews take 3 s: the second ends at 6 s, the third at 9 s (in
        # time), the fourth would end at 12 s, past its 9.9 s.
        refused = self.failureResultOf(fourth, ValidatorOverloadedError)
        self.assertEqual(str(refused.value), TOO_LATE)
        self.assertNoResult(third)
        for d in (second, third):
            self.clock.advance(3)
            self._reviews()[0][4].callback(review("p1", "u1"))
            self.successResultOf(d)

    def test_turn_too_late(self):
        """
        A queued call whose turn comes when less than a review's measured
        latency is left is refused, and the slot goes to the next call.
        """
        self._sync([pod("p1", "u1")])
        d = self._validate()
        self.clock.advance(2)
        self._reviews()[0][4].callback(review("p1", "u1"))
        self.successResultOf(d)
        busy = self._validate()
        short = self._validate(deadline_in=5)
        long = self._validate(deadline_in=9)
        self.assertNoResult(short)
        self.clock.advance(3.5)
        self._reviews()[0][4].callback(review("p1", "u1"))
        self.successResultOf(busy)
        self.failureResultOf(short, ValidatorOverloadedError)
        self.assertEqual(len(self._reviews()), 1)
        self._reviews()[0][4].callback(review("p1", "u1"))
        self.successResultOf(long)

    def test_cold_api_server(self):
        """
        Before any review has ended, the time the oldest one has run is the
        latency planned with: a queued call that could not be reviewed in
        time even so is refused as soon as that is known, well before its
        deadline.
        """
        self._sync([pod("p1", "u1")])
        first = self._validate()
        queued = self._validate(deadline_in=4.9 + ANSWER_MARGIN_SECONDS)
        self.clock.advance(2.3)
        self.assertNoResult(queued)
        self.clock.advance(0.3)
        refused = self.failureResultOf(queued, ValidatorOverloadedError)
        self.assertEqual(str(refused.value), TOO_LATE)
        self.assertGreaterEqual(refused.value.retry_after_ms, 2500)
        self._reviews()[0][4].callback(review("p1", "u1"))
        self.successResultOf(first)
        self.assertEqual(self.admission.in_flight, 0)

    def test_queued_until_deadline(self):
        """
        A queued call whose deadline comes before its turn leaves the queue
        with RESOURCE_EXHAUSTED's error, and takes no slot.
        """
        self._sync([pod("p1", "u1")])
        first = self._validate()
        queued = self._validate(deadline_in=2)
        self.clock.advance(2 - ANSWER_MARGIN_SECONDS)
        self.failureResultOf(queued, ValidatorOverloadedError)
        self.assertEqual(self.admission.queued, 0)
        self._reviews()[0][4].callback(review("p1", "u1"))
        self.successResultOf(first)
        self.assertEqual(self.admission.in_flight, 0)

    def test_api_hangs(self):
        """
        An API that never answers: the call is UNAVAILABLE when its time is
        up (before its deadline), and the slot goes to the next call.
        """
        self._sync([pod("p1", "u1")])
        hung = self._validate()
        queued = self._validate(deadline_in=20)
        self.clock.advance(VALIDATION_TIMEOUT_SECONDS - ANSWER_MARGIN_SECONDS)
        error = self.failureResultOf(hung, ValidatorUnavailableError)
        self.assertIn("no answer within", str(error.value))
        (call,) = self._reviews()
        call[4].callback(review("p1", "u1"))
        self.successResultOf(queued)

    def test_api_slow(self):
        """
        An API that takes 5 s per review still signs (the review's timeout
        is the deadline's, not a shorter fixed one).
        """
        self._sync([pod("p1", "u1")])
        d = self._validate()
        self.clock.advance(5)
        self._reviews()[0][4].callback(review("p1", "u1"))
        self.assertEqual(self.successResultOf(d).app_id, "p1")

    def test_api_refuses_connections(self):
        """
        An API that refuses connections makes the call UNAVAILABLE at once,
        and frees its slot.
        """
        self._sync([pod("p1", "u1")])
        d = self._validate()
        queued = self._validate()
        self._reviews()[0][4].errback(
            KubernetesUnavailableError("POST: ConnectionRefusedError: refused")
        )
        self.failureResultOf(d, ValidatorUnavailableError)
        self.assertEqual(len(self._reviews()), 1)
        self._reviews()[0][4].callback(review("p1", "u1"))
        self.successResultOf(queued)


class ServicerDeadlineTests(SynchronousTestCase):
    """
    The servicer passes the deadline and turns overload into
    RESOURCE_EXHAUSTED with the pushback trailer.
    """

    def _servicer(self, validator):
        self.clock = Clock()
        self.clock.advance(500)
        return CAServicer(
            self.clock,
            FakeCertificateAuthority(make_bundle()),
            {VALIDATOR_INSECURE: validator},
            VALIDATOR_INSECURE,
            SentryMetrics(),
        )

    def _request(self):
        return sentry_pb2.SignCertificateRequest(
            id="app",
            namespace="ns",
            certificate_signing_request=CSR,
            token_validator=VALIDATOR_INSECURE,
        )

    def _answer(self, servicer, context, arrival=None):
        """
        Run the served pipeline for one request to its end (the validator
        answers at once); the abort, if any, is raised.
        """
        return run_now(
            servicer.SignCertificateMessage(
                self._request().SerializeToString(), context, arrival
            )
        )

    def test_deadline(self):
        """
        The deadline is the earlier of the client's and the validation
        timeout from the call's start.
        """
        validator = FakeValidator(VALIDATOR_INSECURE, needs_reactor=False)
        servicer = self._servicer(validator)
        for remaining, expected in (
            (None, VALIDATION_TIMEOUT_SECONDS),
            (3.0, 3.0),
            (60.0, VALIDATION_TIMEOUT_SECONDS),
        ):
            self._answer(servicer, AbortingContext(remaining=remaining))
            self.assertEqual(validator.deadlines[-1], 500 + expected)

    def test_deadline_from_arrival(self):
        """
        The validation timeout runs from the arrival of the call's headers:
        time spent waiting for the request message counts against it; the
        client's deadline (its time left, read once the message is here) is
        still honoured.
        """
        validator = FakeValidator(VALIDATOR_INSECURE, needs_reactor=False)
        servicer = self._servicer(validator)
        clock, message = self.clock, self._request().SerializeToString()

        class SlowMessage(AbortingContext):
            async def read(self):
                clock.advance(4)
                return message

        loop = asyncio.new_event_loop()
        self.addCleanup(loop.close)
        for remaining, expected in ((26.0, 10.0), (3.0, 7.0), (None, 10.0)):
            arrived = clock.seconds()
            loop.run_until_complete(
                servicer.SignCertificateStream(None, SlowMessage(remaining=remaining))
            )
            self.assertEqual(validator.deadlines[-1] - arrived, expected)

    def test_overloaded(self):
        """
        L{ValidatorOverloadedError} ends the call RESOURCE_EXHAUSTED with
        its message and C{grpc-retry-pushback-ms}, counted as a validator
        failure.
        """
        validator = FakeValidator(
            VALIDATOR_INSECURE,
            error=ValidatorOverloadedError("busy", 1234),
            needs_reactor=False,
        )
        servicer = self._servicer(validator)
        context = AbortingContext()
        self.assertRaises(AbortingContext.Aborted, self._answer, servicer, context)
        self.assertEqual(context.code, grpc.StatusCode.RESOURCE_EXHAUSTED)
        self.assertEqual(context.details, "busy")
        self.assertEqual(
            tuple(context.trailing_metadata), ((RETRY_PUSHBACK_METADATA_KEY, "1234"),)
        )


class OverloadOverGrpcTests(TestCase):
    """
    A real grpcio client receives the pushback trailer.
    """

    @inlineCallbacks
    def test_pushback_trailer(self):
        """
        The client sees RESOURCE_EXHAUSTED and C{grpc-retry-pushback-ms} in
        the trailing metadata.
        """
        from datetime import datetime

        generated = generate_bundle(
            "cluster.local", "default", datetime.now(UTC), timedelta(minutes=15)
        )
        config = SentryConfig(
            trust_domain="cluster.local", listen_address="127.0.0.1", port=0
        )
        validator = FakeValidator(
            VALIDATOR_INSECURE, error=ValidatorOverloadedError("busy", 250)
        )
        ca = CertificateAuthorityService(
            config,
            reactor,
            FakeTrustStore(generated.bundle),
            {VALIDATOR_INSECURE: validator},
            VALIDATOR_INSECURE,
            SentryMetrics(),
        )
        yield ca.start(config)
        self.addCleanup(ca.stop)
        client = GrpcTestClient(f"127.0.0.1:{ca.port}", generated.anchors_pem)
        self.addCleanup(client.close)
        request = sentry_pb2.SignCertificateRequest(
            id="app",
            namespace="ns",
            certificate_signing_request=CSR,
            token_validator=VALIDATOR_INSECURE,
        )
        error = yield self.assertFailure(
            deferToThread(client.sign, request), grpc.RpcError
        )
        self.assertEqual(error.code(), grpc.StatusCode.RESOURCE_EXHAUSTED)
        self.assertIn(
            (RETRY_PUSHBACK_METADATA_KEY, "250"), tuple(error.trailing_metadata())
        )
