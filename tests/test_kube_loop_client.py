"""
Tests for L{sentry_tx.kube.loop_client} (the aiohttp client of the gRPC
loop) against the fake API server on 127.0.0.1, and for the KUBERNETES
validator running on the loop with it (L{OnGrpcLoop}).
"""

import asyncio
import os

from cryptography.hazmat.primitives.serialization import Encoding
from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase

from sentry_tx.errors import ConfigError, ValidatorOverloadedError
from sentry_tx.identity.admission import TOO_LATE, ReviewAdmission
from sentry_tx.identity.caller import VALIDATOR_KUBERNETES, SignRequest
from sentry_tx.identity.kubernetes import KubernetesValidator, OnGrpcLoop
from sentry_tx.kube.connection import ClusterConnection, StaticToken
from sentry_tx.kube.errors import KubernetesAPIError, KubernetesUnavailableError
from sentry_tx.kube.incluster import in_cluster_connection
from sentry_tx.kube.loop_client import LoopKubernetesClient
from sentry_tx.kube.paths import TOKEN_REVIEW_PATH, core_path
from sentry_tx.server.loop import LoopClock
from sentry_tx.testing.certificates import TEST_NAMESPACE, TEST_TRUST_DOMAIN, make_csr
from sentry_tx.testing.kubeconfig import make_self_signed_server_certificate
from sentry_tx.testing.kubernetes import loop_client_for, start_fake_kubernetes
from sentry_tx.testing.kubernetes_tokens import FAKE_API_TOKEN
from sentry_tx.testing.loops import start_grpc_loop

SECRET_PATH = core_path(TEST_NAMESPACE, "secrets", "s")
APPS = "apps"
POD = "myapp-0"
ACCOUNT = "myapp"
_, CSR = make_csr()


def _review_body(token):
    return {
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenReview",
        "spec": {"token": token, "audiences": ["dapr.io/sentry"]},
    }


class LoopKubernetesClientTests(TestCase):
    """
    L{LoopKubernetesClient} keeps the reactor client's guarantees on the
    gRPC loop.
    """

    timeout = 30

    def setUp(self):
        self.fake = start_fake_kubernetes(self)
        self.fake.add_secret(TEST_NAMESPACE, "s")
        self.fake.add_pod(APPS, POD, ACCOUNT, {"dapr.io/app-id": "myapp"})
        self.grpc_loop = start_grpc_loop(self)
        self.client = loop_client_for(self, self.fake)

    def _on_loop(self, f, *args, **kwargs):
        async def call():
            return await f(*args, **kwargs)

        return self.grpc_loop.run(call)

    @defer.inlineCallbacks
    def test_token_review(self):
        """
        A TokenReview is posted as JSON, over TLS verified against the
        cluster's CA, with sentry_tx's bearer token; the answer is decoded.
        """
        token = self.fake.issue_token(APPS, ACCOUNT, POD)
        review = yield self._on_loop(
            self.client.create,
            TOKEN_REVIEW_PATH,
            _review_body(token),
            timeout_seconds=5,
        )
        self.assertIs(review["status"]["authenticated"], True)
        self.assertEqual(self.fake.reviews[0]["token"], token)
        self.assertEqual(self.fake.requests, [("POST", TOKEN_REVIEW_PATH)])

    @defer.inlineCallbacks
    def test_untrusted_server(self):
        """
        An API server whose certificate does not chain to the configured CA
        is no usable answer.
        """
        other, _ = make_self_signed_server_certificate()
        client = LoopKubernetesClient(
            reactor,
            lambda: ClusterConnection(
                server=self.fake.url,
                description="test",
                trust_roots_pem=other.public_bytes(Encoding.PEM),
                token=StaticToken(FAKE_API_TOKEN),
            ),
        )
        error = yield self.assertFailure(
            self._on_loop(client.get, SECRET_PATH), KubernetesUnavailableError
        )
        self.assertIn(f"GET {SECRET_PATH}", str(error))
        self.assertEqual(self.fake.requests, [])

    @defer.inlineCallbacks
    def test_not_found(self):
        """
        An error answer is a L{KubernetesAPIError} with the Status's reason.
        """
        error = yield self.assertFailure(
            self._on_loop(self.client.get, core_path(APPS, "pods", "gone")),
            KubernetesAPIError,
        )
        self.assertTrue(error.is_not_found)
        self.assertEqual(error.reason, "NotFound")

    @defer.inlineCallbacks
    def test_wrong_token(self):
        """
        A token the server refuses is a 401, not retried when the token
        cannot change.
        """
        self.fake.api_tokens = {"another"}
        error = yield self.assertFailure(
            self._on_loop(self.client.get, SECRET_PATH), KubernetesAPIError
        )
        self.assertEqual(error.status, 401)
        self.assertEqual(len(self.fake.requests), 1)

    @defer.inlineCallbacks
    def test_response_too_large(self):
        """
        An answer larger than the limit is refused.
        """
        client = loop_client_for(self, self.fake, max_response_bytes=64)
        error = yield self.assertFailure(
            self._on_loop(client.get, SECRET_PATH), KubernetesUnavailableError
        )
        self.assertIn("larger than 64 bytes", str(error))

    @defer.inlineCallbacks
    def test_deadline(self):
        """
        A call gets no more than its timeout: a review the server has not
        answered by then fails as unavailable.
        """
        self.fake.tokenreview_latency_seconds = 30.0
        token = self.fake.issue_token(APPS, ACCOUNT, POD)
        error = yield self.assertFailure(
            self._on_loop(
                self.client.create,
                TOKEN_REVIEW_PATH,
                _review_body(token),
                timeout_seconds=0.05,
            ),
            KubernetesUnavailableError,
        )
        self.assertIn("no answer within 0.05 s", str(error))

    @defer.inlineCallbacks
    def test_token_reread_after_401(self):
        """
        A 401 makes the client re-read a rotated token file at once and try
        again, even within the check interval.
        """
        directory = os.path.abspath(self.mktemp())
        environ = self.fake.write_service_account(directory, token="first")
        self.fake.api_tokens = {"first"}
        client = LoopKubernetesClient(
            reactor, lambda: in_cluster_connection(environ, reactor, directory, 3600)
        )
        yield self._on_loop(client.get, SECRET_PATH)
        self.fake.rotate_service_account_token(directory, "second")
        secret = yield self._on_loop(client.get, SECRET_PATH)
        self.assertEqual(secret["metadata"]["name"], "s")
        self.assertEqual(len(self.fake.requests), 3)

    @defer.inlineCallbacks
    def test_one_pool_reused(self):
        """
        Sequential calls reuse one pooled connection of one pool.
        """
        for _ in range(5):
            yield self._on_loop(self.client.get, SECRET_PATH)
        self.assertEqual(len(self.fake._channels), 1)
        self.assertEqual(self.client.pools_opened, 1)

    @defer.inlineCallbacks
    def test_pool_closed_with_loop(self):
        """
        When the loop stops, the pool's connections are closed.
        """
        yield self._on_loop(self.client.get, SECRET_PATH)
        closed = list(self.fake._channels.values())
        self.assertEqual(len(closed), 1)
        yield self.grpc_loop.stop()
        yield defer.gatherResults(closed)
        self.assertEqual(self.fake._channels, {})

    @defer.inlineCallbacks
    def test_settings_unreadable(self):
        """
        Connection settings that cannot be read fail the call with their
        L{ConfigError}.
        """

        def broken():
            raise ConfigError("kubeconfig", "missing")

        client = LoopKubernetesClient(reactor, broken)
        yield self.assertFailure(self._on_loop(client.get, SECRET_PATH), ConfigError)


class ValidatorOnLoopTests(TestCase):
    """
    The KUBERNETES validator on the gRPC loop (L{OnGrpcLoop}), with the
    loop's client and admission on the loop's timers.
    """

    timeout = 30

    def setUp(self):
        self.fake = start_fake_kubernetes(self)
        self.fake.add_pod(APPS, POD, ACCOUNT, {"dapr.io/app-id": "myapp"})
        self.grpc_loop = start_grpc_loop(self)
        self.admission = ReviewAdmission(LoopClock(reactor.seconds), limit=1)
        self.validator = KubernetesValidator(
            loop_client_for(self, self.fake),
            TEST_TRUST_DOMAIN,
            TEST_NAMESPACE,
            reactor=reactor,
            admission=self.admission,
            waits=OnGrpcLoop(reactor),
        )

    def _request(self):
        return SignRequest(
            id="myapp",
            token=self.fake.issue_token(APPS, ACCOUNT, POD),
            trust_domain="",
            namespace=APPS,
            csr=CSR,
            token_validator=VALIDATOR_KUBERNETES,
        )

    def test_runs_on_loop(self):
        """
        It says it runs on the loop, so the servicer awaits it there.
        """
        self.assertTrue(self.validator.runs_on_loop)
        self.assertFalse(self.validator.needs_reactor)

    @defer.inlineCallbacks
    def test_valid(self):
        """
        A valid caller is accepted on the loop with one TokenReview and the
        pod read with one GET (no cache given); no slot stays taken.
        """
        request = self._request()
        identity = yield self.grpc_loop.run(
            self.validator.validate, request, reactor.seconds() + 5
        )
        self.assertEqual(identity.spiffe_id, "spiffe://public/ns/apps/myapp")
        self.assertEqual(
            self.fake.requests,
            [("POST", TOKEN_REVIEW_PATH), ("GET", core_path(APPS, "pods", POD))],
        )
        self.assertEqual(self.admission.in_flight, 0)

    def _cancel_queued(self, release_first):
        """
        On the loop: take the only slot, queue a second call, cancel it, and
        give the slot back (before the cancellation has been processed when
        C{release_first}, so that the slot is granted to the cancelled call).

        @return: Deferred firing with the queue length seen while the call
            waited, then C{in_flight} and C{queued} once all is settled.
        """
        waits = OnGrpcLoop(reactor)
        admission = self.admission

        async def scenario():
            deadline = reactor.seconds() + 5
            release = await waits.admitted(admission, deadline)
            queued = asyncio.ensure_future(waits.admitted(admission, deadline))
            await asyncio.sleep(0)
            waited = admission.queued
            queued.cancel()
            if release_first:
                release(None)
            try:
                await queued
            except asyncio.CancelledError:
                pass
            await asyncio.sleep(0)
            if not release_first:
                left = admission.queued
                release(None)
                return [waited, left, admission.in_flight]
            return [waited, admission.in_flight, admission.queued]

        return self.grpc_loop.run(scenario)

    @defer.inlineCallbacks
    def test_slot_granted_to_cancelled_call_released(self):
        """
        A slot granted to a call that was cancelled in the same turn (its
        deadline passed) is given back at once, not lost.
        """
        seen = yield self._cancel_queued(release_first=True)
        self.assertEqual(seen, [1, 0, 0])

    @defer.inlineCallbacks
    def test_cancelled_while_queued_leaves(self):
        """
        A queued call that is cancelled leaves the queue.
        """
        seen = yield self._cancel_queued(release_first=False)
        self.assertEqual(seen, [1, 0, 0])

    @defer.inlineCallbacks
    def test_refusal_on_loop(self):
        """
        Admission's refusal reaches the caller on the loop as
        L{ValidatorOverloadedError}, with the loop's timers deciding.
        """
        waits = OnGrpcLoop(reactor)
        admission = self.admission
        admission.latency_seconds = 10.0

        async def late():
            release = await waits.admitted(admission, reactor.seconds() + 30)
            try:
                await waits.admitted(admission, reactor.seconds() + 1)
            finally:
                release(None)

        error = yield self.assertFailure(
            self.grpc_loop.run(late), ValidatorOverloadedError
        )
        self.assertEqual(str(error), TOO_LATE)
