"""
Tests for L{sentry_tx.identity.kubernetes}: every check of the KUBERNETES
validator, against the fake API server.
"""

import json

from cryptography import x509
from twisted.internet import defer, reactor
from twisted.logger import formatEvent
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from sentry_tx.ca.authority import issue_workload_certificate
from sentry_tx.config import MTLSConfig
from sentry_tx.errors import ValidationError, ValidatorUnavailableError
from sentry_tx.identity.caller import VALIDATOR_KUBERNETES, SignRequest
from sentry_tx.identity.images import IMAGES_TOO_LARGE, MAX_POD_ENTRY_BYTES
from sentry_tx.identity.kubernetes import (
    ANSWER_MARGIN_SECONDS,
    KubernetesValidator,
    token_payload,
)
from sentry_tx.interfaces import IIdentityValidator
from sentry_tx.kube.informer import pod_informer
from sentry_tx.testing.certificates import (
    FIXED_NOW,
    TEST_NAMESPACE,
    TEST_TRUST_DOMAIN,
    make_bundle,
    make_csr,
    make_private_key,
)
from sentry_tx.testing.container_images import (
    images_json,
    images_list,
    pod_document,
    sidecar_pod,
)
from sentry_tx.testing.kubernetes import kubernetes_client_for, start_fake_kubernetes
from sentry_tx.testing.kubernetes_tokens import (
    FAKE_API_DEFAULT_AUDIENCES,
    FakeReviewedToken,
    make_service_account_token,
)
from sentry_tx.testing.logs import capture_logs

APPS = "apps"
POD = "myapp-7d9f"
ACCOUNT = "myapp-account"
_, CSR = make_csr()


class KubernetesValidatorTests(TestCase):
    """
    L{KubernetesValidator} proves callers with TokenReview, the Pod and its
    Configuration.
    """

    timeout = 30

    def setUp(self):
        self.fake = start_fake_kubernetes(self)
        self.client = kubernetes_client_for(self, self.fake)
        self.validator = KubernetesValidator(
            self.client, TEST_TRUST_DOMAIN, TEST_NAMESPACE
        )
        self.fake.add_pod(APPS, POD, ACCOUNT, {"dapr.io/app-id": "myapp"})
        self.token = self.fake.issue_token(APPS, ACCOUNT, POD)

    def _request(self, **fields):
        values = {
            "id": "myapp",
            "token": self.token,
            "trust_domain": "",
            "namespace": APPS,
            "csr": CSR,
            "token_validator": VALIDATOR_KUBERNETES,
        }
        values.update(fields)
        return SignRequest(**values)

    @defer.inlineCallbacks
    def _refused(self, message, error_class=ValidationError, **fields):
        error = yield self.assertFailure(
            self.validator.validate(self._request(**fields)), error_class
        )
        self.assertIn(message, str(error))
        return error

    def test_interface(self):
        """
        It provides L{IIdentityValidator} and answers to KUBERNETES.
        """
        verifyObject(IIdentityValidator, self.validator)
        self.assertEqual(self.validator.name, VALIDATOR_KUBERNETES)

    @defer.inlineCallbacks
    def test_valid(self):
        """
        A valid token of the pod that asks for its app id is accepted, in
        trust domain public.
        """
        identity = yield self.validator.validate(self._request())
        self.assertEqual(identity.spiffe_id, "spiffe://public/ns/apps/myapp")

    @defer.inlineCallbacks
    def test_review_audiences(self):
        """
        The review asks for Dapr's audience and sentry_tx's SPIFFE ID.
        """
        yield self.validator.validate(self._request())
        self.assertEqual(
            self.fake.reviews[0]["audiences"],
            [
                "dapr.io/sentry",
                f"spiffe://{TEST_TRUST_DOMAIN}/ns/{TEST_NAMESPACE}/dapr-sentry",
            ],
        )

    @defer.inlineCallbacks
    def test_token_audience_flag(self):
        """
        Configured audiences replace the defaults.
        """
        self.validator = KubernetesValidator(
            self.client, TEST_TRUST_DOMAIN, TEST_NAMESPACE, audiences=("custom",)
        )
        token = self.fake.issue_token(APPS, ACCOUNT, POD, audiences=("custom",))
        identity = yield self.validator.validate(self._request(token=token))
        self.assertEqual(identity.app_id, "myapp")
        self.assertEqual(self.fake.reviews[0]["audiences"], ["custom"])

    @defer.inlineCallbacks
    def test_common_rules_first(self):
        """
        The common rules run first, with their messages unchanged, before
        any API call.
        """
        yield self._refused(
            "invalid request: parameter app-id cannot be empty\nCSR is required",
            id="",
            csr=b"",
        )
        self.assertEqual(self.fake.requests, [])

    @defer.inlineCallbacks
    def test_trust_domain_rules(self):
        """
        A requested trust domain with bad characters is refused with the
        common message.
        """
        error = yield self._refused(
            "trust domain characters are limited", trust_domain="Bad!"
        )
        self.assertFalse(str(error).startswith("invalid request"))

    @defer.inlineCallbacks
    def test_no_token(self):
        """
        A request without a token is refused before any API call.
        """
        yield self._refused("token is required for the KUBERNETES validator", token="")
        self.assertEqual(self.fake.requests, [])

    @defer.inlineCallbacks
    def test_token_too_long(self):
        """
        A token longer than any service-account token is refused unsent.
        """
        yield self._refused("token is longer than", token="x" * 20000)
        self.assertEqual(self.fake.requests, [])

    @defer.inlineCallbacks
    def test_unknown_token(self):
        """
        A token the API server does not authenticate is refused with the
        review's error.
        """
        yield self._refused(
            "token review failed: [invalid bearer token",
            token=make_service_account_token(APPS, ACCOUNT, POD),
        )

    @defer.inlineCallbacks
    def test_wrong_audience(self):
        """
        A token issued for another audience (the API server's own) fails the
        review.
        """
        token = self.fake.issue_token(
            APPS, ACCOUNT, POD, audiences=("https://kubernetes.default.svc",)
        )
        yield self._refused("is invalid for the target audiences", token=token)

    @defer.inlineCallbacks
    def test_audience_not_confirmed(self):
        """
        An authenticated review that confirms none of sentry's audiences is
        refused.
        """
        self.fake.audience_aware = False
        yield self._refused("the token is not for an audience of sentry")

    @defer.inlineCallbacks
    def test_not_authenticated(self):
        """
        A review that is neither authenticated nor in error is refused.
        """
        self.fake.tokens[self.token].authenticated = False
        yield self._refused("the token is not authenticated")

    @defer.inlineCallbacks
    def test_not_a_service_account(self):
        """
        A token of a user that is not a service account is refused.
        """
        token = make_service_account_token(APPS, ACCOUNT, POD)
        self.fake.tokens[token] = FakeReviewedToken(
            APPS, ACCOUNT, POD, username="alice@example.org"
        )
        yield self._refused(
            "not a properly structured service account token", token=token
        )

    @defer.inlineCallbacks
    def test_namespace_mismatch(self):
        """
        A token of a service account in another namespace is refused.
        """
        self.fake.add_pod("other", POD, ACCOUNT, {"dapr.io/app-id": "myapp"})
        token = self.fake.issue_token("other", ACCOUNT, POD)
        yield self._refused(
            "namespace mismatch: the token's service account is in namespace 'other'",
            token=token,
        )

    @defer.inlineCallbacks
    def test_no_pod_in_token(self):
        """
        A token bound to no pod (a legacy Secret token) is refused.
        """
        token = self.fake.issue_token(APPS, ACCOUNT, pod_name=None)
        yield self._refused("the token names no pod", token=token)

    @defer.inlineCallbacks
    def test_pod_from_claim_only(self):
        """
        The pod name is taken from the token's kubernetes.io claim when the
        review does not name it.
        """
        token = self.fake.issue_token(APPS, ACCOUNT, POD, pod_extra=False)
        identity = yield self.validator.validate(self._request(token=token))
        self.assertEqual(identity.app_id, "myapp")

    @defer.inlineCallbacks
    def test_pod_from_review_only(self):
        """
        The pod name is taken from the review's user extra when the token's
        payload does not name it.
        """
        token = self.fake.issue_token(APPS, ACCOUNT, POD, pod_claim=False)
        identity = yield self.validator.validate(self._request(token=token))
        self.assertEqual(identity.app_id, "myapp")

    @defer.inlineCallbacks
    def test_pod_claims_disagree(self):
        """
        A token whose payload and review name different pods is refused.
        """
        token = self.fake.issue_token(APPS, ACCOUNT, POD)
        self.fake.tokens[token].pod_name = "another-pod"
        yield self._refused("the token's pod claims disagree", token=token)

    @defer.inlineCallbacks
    def test_pod_not_found(self):
        """
        A token of a pod that does not exist is refused.
        """
        token = self.fake.issue_token(APPS, ACCOUNT, "gone-pod", pod_uid="u1")
        yield self._refused("pod apps/gone-pod of the token not found", token=token)

    @defer.inlineCallbacks
    def test_pod_recreated(self):
        """
        A token of a pod since replaced by another of the same name is
        refused.
        """
        del self.fake.objects[("pods", APPS, POD)]
        self.fake.add_pod(APPS, POD, ACCOUNT, {"dapr.io/app-id": "myapp"})
        yield self._refused("is not the pod the token was issued for")

    @defer.inlineCallbacks
    def test_service_account_mismatch(self):
        """
        A pod running as another service account than the token's is
        refused.
        """
        token = self.fake.issue_token(APPS, "intruder", POD)
        yield self._refused(
            "pod service account mismatch: pod apps/myapp-7d9f runs as"
            " 'myapp-account', the token is for 'intruder'",
            token=token,
        )

    @defer.inlineCallbacks
    def test_app_id_mismatch(self):
        """
        A request for another app id than the pod's annotation is refused.
        """
        yield self._refused(
            "app-id mismatch: expected 'myapp', received 'otherapp'", id="otherapp"
        )

    @defer.inlineCallbacks
    def test_pod_name_as_app_id(self):
        """
        Without a dapr.io/app-id annotation the app id is the pod name.
        """
        self.fake.add_pod(APPS, "plain", ACCOUNT)
        token = self.fake.issue_token(APPS, ACCOUNT, "plain")
        identity = yield self.validator.validate(self._request(id="plain", token=token))
        self.assertEqual(identity.spiffe_id, "spiffe://public/ns/apps/plain")

    @defer.inlineCallbacks
    def test_requested_trust_domain_ignored(self):
        """
        The requested trust domain is ignored: the derived one is signed.
        """
        identity = yield self.validator.validate(self._request(trust_domain="evil.org"))
        self.assertEqual(identity.trust_domain, "public")

    @defer.inlineCallbacks
    def test_configuration_trust_domain(self):
        """
        The trust domain comes from the Configuration the pod names.
        """
        self.fake.add_pod(
            APPS,
            POD,
            ACCOUNT,
            {"dapr.io/app-id": "myapp", "dapr.io/config": "appconfig"},
        )
        self.fake.add_configuration(
            APPS, "appconfig", {"accessControl": {"trustDomain": "apps.example"}}
        )
        token = self.fake.issue_token(APPS, ACCOUNT, POD)
        identity = yield self.validator.validate(self._request(token=token))
        self.assertEqual(identity.spiffe_id, "spiffe://apps.example/ns/apps/myapp")

    @defer.inlineCallbacks
    def test_configuration_without_trust_domain(self):
        """
        A Configuration without accessControl.trustDomain gives public.
        """
        self.fake.add_pod(
            APPS,
            POD,
            ACCOUNT,
            {"dapr.io/app-id": "myapp", "dapr.io/config": "appconfig"},
        )
        self.fake.add_configuration(APPS, "appconfig", {"tracing": {}})
        token = self.fake.issue_token(APPS, ACCOUNT, POD)
        identity = yield self.validator.validate(self._request(token=token))
        self.assertEqual(identity.trust_domain, "public")

    @defer.inlineCallbacks
    def test_configuration_missing(self):
        """
        A pod naming a Configuration that does not exist is refused.
        """
        self.fake.add_pod(
            APPS, POD, ACCOUNT, {"dapr.io/app-id": "myapp", "dapr.io/config": "nope"}
        )
        token = self.fake.issue_token(APPS, ACCOUNT, POD)
        yield self._refused(
            "configuration apps/nope named by the pod's dapr.io/config annotation"
            " not found",
            token=token,
        )

    @defer.inlineCallbacks
    def test_configuration_bad_trust_domain(self):
        """
        A Configuration with an invalid trust domain is refused.
        """
        self.fake.add_pod(
            APPS, POD, ACCOUNT, {"dapr.io/app-id": "myapp", "dapr.io/config": "bad"}
        )
        self.fake.add_configuration(
            APPS, "bad", {"accessControl": {"trustDomain": "Bad!"}}
        )
        token = self.fake.issue_token(APPS, ACCOUNT, POD)
        yield self._refused(
            "has an invalid spec.accessControl.trustDomain", token=token
        )

    @defer.inlineCallbacks
    def test_control_plane(self):
        """
        A control-plane pod in sentry_tx's namespace gets dapr-<service> in
        sentry_tx's trust domain.
        """
        self.fake.add_pod(
            TEST_NAMESPACE,
            "dapr-operator-0",
            "dapr-operator",
            {"dapr.io/control-plane": "operator"},
        )
        token = self.fake.issue_token(
            TEST_NAMESPACE, "dapr-operator", "dapr-operator-0"
        )
        identity = yield self.validator.validate(
            self._request(id="dapr-operator", namespace=TEST_NAMESPACE, token=token)
        )
        self.assertEqual(
            identity.spiffe_id,
            f"spiffe://{TEST_TRUST_DOMAIN}/ns/{TEST_NAMESPACE}/dapr-operator",
        )

    @defer.inlineCallbacks
    def test_control_plane_elsewhere(self):
        """
        A control-plane annotation outside sentry_tx's namespace is refused.
        """
        self.fake.add_pod(
            APPS, "fake-op", ACCOUNT, {"dapr.io/control-plane": "operator"}
        )
        token = self.fake.issue_token(APPS, ACCOUNT, "fake-op")
        yield self._refused(
            "control plane service in namespace 'apps' is not allowed",
            id="dapr-operator",
            token=token,
        )

    @defer.inlineCallbacks
    def test_control_plane_unknown_service(self):
        """
        A control-plane annotation naming no Dapr service is refused.
        """
        self.fake.add_pod(
            TEST_NAMESPACE, "x-0", "x", {"dapr.io/control-plane": "database"}
        )
        token = self.fake.issue_token(TEST_NAMESPACE, "x", "x-0")
        yield self._refused(
            "unknown control plane service 'database'",
            id="dapr-database",
            namespace=TEST_NAMESPACE,
            token=token,
        )

    @defer.inlineCallbacks
    def test_control_plane_with_app_id(self):
        """
        A control-plane pod that also has dapr.io/app-id is refused.
        """
        self.fake.add_pod(
            TEST_NAMESPACE,
            "dapr-placement-0",
            "dapr-placement",
            {"dapr.io/control-plane": "placement", "dapr.io/app-id": "dapr-placement"},
        )
        token = self.fake.issue_token(
            TEST_NAMESPACE, "dapr-placement", "dapr-placement-0"
        )
        yield self._refused(
            "cannot have annotation dapr.io/app-id",
            id="dapr-placement",
            namespace=TEST_NAMESPACE,
            token=token,
        )

    @defer.inlineCallbacks
    def test_nothing_cached(self):
        """
        Each validation asks the API again: a pod deleted after a success is
        refused next time.
        """
        yield self.validator.validate(self._request())
        del self.fake.objects[("pods", APPS, POD)]
        yield self._refused("not found")
        self.assertEqual(
            [method for method, _ in self.fake.requests], ["POST", "GET", "POST", "GET"]
        )

    @defer.inlineCallbacks
    def test_latency(self):
        """
        Added API latency delays but does not fail validation.
        """
        self.fake.tokenreview_latency_seconds = 0.01
        self.fake.pod_latency_seconds = 0.01
        identity = yield self.validator.validate(self._request())
        self.assertEqual(identity.app_id, "myapp")

    @defer.inlineCallbacks
    def test_api_server_error(self):
        """
        A 5xx from the API makes the call UNAVAILABLE, not a refusal.
        """
        self.fake.fail_with(503, "ServiceUnavailable", "down")
        yield self._refused("HTTP 503 ServiceUnavailable", ValidatorUnavailableError)

    @defer.inlineCallbacks
    def test_pod_read_error(self):
        """
        A failed Pod read (not a 404) is UNAVAILABLE.
        """
        self.fake.forbidden.add(("GET", "pods"))
        yield self._refused("HTTP 403 Forbidden", ValidatorUnavailableError)

    @defer.inlineCallbacks
    def test_api_refuses_sentry(self):
        """
        A TokenReview refused by RBAC is UNAVAILABLE and logged as an error
        without the caller's token.
        """
        events = capture_logs(self)
        self.fake.forbidden.add(("POST", "tokenreviews"))
        yield self._refused("HTTP 403 Forbidden", ValidatorUnavailableError)
        messages = [formatEvent(event) for event in events]
        self.assertTrue(any("refused a validation request" in m for m in messages))
        self.assertFalse(any(self.token in m for m in messages))

    @defer.inlineCallbacks
    def test_api_timeout(self):
        """
        An API server that does not answer in time makes the call
        UNAVAILABLE; the TokenReview's timeout is what the call's deadline
        leaves, less the answer margin, not the client's own timeout.
        """
        from twisted.internet import reactor

        client = kubernetes_client_for(self, self.fake, request_timeout_seconds=30)
        validator = KubernetesValidator(client, TEST_TRUST_DOMAIN, TEST_NAMESPACE)
        self.fake.hang()
        error = yield self.assertFailure(
            validator.validate(
                self._request(), reactor.seconds() + ANSWER_MARGIN_SECONDS + 0.2
            ),
            ValidatorUnavailableError,
        )
        self.assertRegex(str(error), r"no answer within 0\.(19|2)\d* s")

    @defer.inlineCallbacks
    def test_api_unreachable(self):
        """
        An unreachable API server makes the call UNAVAILABLE.
        """
        yield self.fake.stop()
        yield self._refused(
            "the Kubernetes API is unavailable", ValidatorUnavailableError
        )


class ContainerImagesTests(TestCase):
    """
    The KUBERNETES validator proves the pod's container images, from the
    Pod it reads (a GET or the informer's cache), and refuses a pod whose
    images were too large to keep whole.
    """

    timeout = 30

    def setUp(self):
        self.fake = start_fake_kubernetes(self)
        self.client = kubernetes_client_for(self, self.fake)
        self.pods = pod_informer(reactor, self.client)
        self.addCleanup(self.pods.stop)
        self.validator = KubernetesValidator(
            self.client, TEST_TRUST_DOMAIN, TEST_NAMESPACE, pods=self.pods
        )

    def _put(self, document):
        self.fake.put_object("pods", APPS, POD, document)
        return SignRequest(
            id=POD,
            token=self.fake.issue_token(APPS, ACCOUNT, POD),
            trust_domain="",
            namespace=APPS,
            csr=CSR,
            token_validator=VALIDATOR_KUBERNETES,
        )

    @defer.inlineCallbacks
    def _synced(self):
        self.pods.start()
        synced = yield self.pods.wait_synced(reactor.seconds() + 10)
        self.assertTrue(synced)

    @defer.inlineCallbacks
    def test_images_from_a_get(self):
        """
        A pod the cache has not seen is read with one GET, and its images,
        native-sidecar daprd first, are what the identity carries.
        """
        request = self._put(sidecar_pod(service_account=ACCOUNT))
        self.validator = KubernetesValidator(
            self.client, TEST_TRUST_DOMAIN, TEST_NAMESPACE
        )
        identity = yield self.validator.validate(request)
        entries = json.loads(identity.container_images)
        self.assertEqual(
            [(entry["role"], entry["containerName"]) for entry in entries],
            [("daprd", "daprd"), ("app", "cart"), ("app", "helper")],
        )
        self.assertIn(
            ("GET", f"/api/v1/namespaces/{APPS}/pods/{POD}"), self.fake.requests
        )

    @defer.inlineCallbacks
    def test_images_from_the_cache_into_the_leaf(self):
        """
        A cached pod's images, kept uncut, reach the leaf's extension byte
        for byte, and no GET is made.
        """
        document = sidecar_pod(service_account=ACCOUNT)
        document["spec"]["containers"][1]["image"] = "r.example/" + "h" * 600 + ":1"
        request = self._put(document)
        yield self._synced()
        identity = yield self.validator.validate(request)
        self.assertNotIn(
            ("GET", f"/api/v1/namespaces/{APPS}/pods/{POD}"), self.fake.requests
        )
        issued = issue_workload_certificate(
            make_bundle(),
            identity,
            make_private_key().public_key(),
            FIXED_NOW,
            MTLSConfig(),
            TEST_NAMESPACE,
        )
        leaf = x509.load_pem_x509_certificates(issued.certificate_chain_pem)[0]
        self.assertEqual(images_json(leaf), identity.container_images)
        self.assertEqual(
            images_list(leaf)[2]["image"], "r.example/" + "h" * 600 + ":1"
        )

    @defer.inlineCallbacks
    def test_images_too_large(self):
        """
        A pod whose images would make its entry larger than the bound is
        refused, from the cache and from a GET alike.
        """
        request = self._put(
            pod_document(
                containers=[{"name": "app", "image": "x" * MAX_POD_ENTRY_BYTES}],
                service_account=ACCOUNT,
            )
        )
        yield self._synced()
        error = yield self.assertFailure(
            self.validator.validate(request), ValidationError
        )
        self.assertEqual(str(error), IMAGES_TOO_LARGE)
        self.validator = KubernetesValidator(
            self.client, TEST_TRUST_DOMAIN, TEST_NAMESPACE
        )
        error = yield self.assertFailure(
            self.validator.validate(request), ValidationError
        )
        self.assertEqual(str(error), IMAGES_TOO_LARGE)

    @defer.inlineCallbacks
    def test_no_containers(self):
        """
        A pod without containers stamps nothing.
        """
        request = self._put(pod_document(service_account=ACCOUNT))
        yield self._synced()
        identity = yield self.validator.validate(request)
        self.assertEqual(identity.container_images, b"")


class TokenPayloadTests(SynchronousTestCase):
    """
    L{token_payload} reads a JWT's claims without verifying it.
    """

    def test_claims(self):
        """
        The claims of a service-account token are read.
        """
        token = make_service_account_token("ns", "sa", "pod", "uid")
        claims = token_payload(token)
        self.assertEqual(claims["kubernetes.io"]["pod"], {"name": "pod", "uid": "uid"})
        self.assertEqual(claims["aud"], list(FAKE_API_DEFAULT_AUDIENCES))

    def test_not_a_jwt(self):
        """
        A token that is not three segments has no claims.
        """
        self.assertEqual(token_payload("opaque"), {})

    def test_bad_payload(self):
        """
        A payload that is not base64 JSON has no claims.
        """
        self.assertEqual(token_payload("a.%%%.c"), {})
        self.assertEqual(token_payload("a.bm90IGpzb24.c"), {})
