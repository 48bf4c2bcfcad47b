# -*- test-case-name: tests.test_kube_admission,tests.test_kube_validator -*-
"""
The KUBERNETES validator: the caller proves who it is with the pod's
service-account token, and the API server vouches for it.

The checks, in order (each refusal is a L{ValidationError} whose message
says which check failed; the caller gets it with PERMISSION_DENIED):

  1. the common request rules (L{rules.check_request}, messages unchanged);
  2. a token is present;
  3. a TokenReview (C{POST /apis/authentication.k8s.io/v1/tokenreviews})
     with the audiences C{dapr.io/sentry} and
     C{spiffe://<sentry trust domain>/ns/<sentry namespace>/dapr-sentry}, or
     those of C{--token-audience}; it must say C{authenticated}, without
     error, and confirm one of those audiences in C{status.audiences};
  4. the username is C{system:serviceaccount:<namespace>:<account>}, and
     that namespace is the request's;
  5. the pod: the C{kubernetes.io.pod.name} claim of the token (the
     TokenReview proved its signature, so its payload is read without
     verifying it again), or the review's
     C{status.user.extra["authentication.kubernetes.io/pod-name"]}; a token
     naming no pod (a legacy Secret token) is refused;
  6. the pod exists in the request's namespace, runs as that service
     account, and (when the token names a pod uid) is that very pod, not
     one recreated under the same name;
  7. the expected app id: the pod's C{dapr.io/app-id} annotation, else its
     name; for a pod annotated C{dapr.io/control-plane: <x>}, C{dapr-<x>},
     allowed only in sentry_tx's namespace, for Dapr's control-plane
     services, and never together with C{dapr.io/app-id}; the request's id
     must be it;
  8. the pod's container images were small enough to keep whole (they are
     stamped into the certificate: L{sentry_tx.identity.images});
  9. the trust domain: sentry_tx's for the control plane; else
     C{spec.accessControl.trustDomain} of the Configuration named by the
     pod's C{dapr.io/config} annotation, in the pod's namespace; else
     C{public}.

As Dapr does, the request's own C{trust_domain} is ignored beyond the common
rules: the identity signed carries the trust domain derived in step 9, which
only the cluster's operators control.

An API server that cannot be reached, does not answer in time, answers 429
or 5xx, or refuses sentry_tx's own requests (401, 403: a deployment fault,
logged as an error) makes the call UNAVAILABLE
(L{ValidatorUnavailableError}): the caller retries.

Every call makes exactly one TokenReview, never cached (the API server is the
authority on revocation), and never resent.  Pods and Configurations come
from informer caches (L{sentry_tx.kube.informer}) when given, as Dapr's
validator reads them: a pod the cache has not seen yet (or has seen under
another uid than the token's) is read with one GET, as is a Configuration
the cache lacks.  Until the caches have synced once, a call waits for them
(within its deadline) and then fails with "validator not ready"
(UNAVAILABLE), as Dapr's does.

Where it runs: in sentry_tx, on the gRPC loop (L{OnGrpcLoop}): C{validate}
is a coroutine the servicer awaits there, its TokenReview is made with the
loop's aiohttp client (L{sentry_tx.kube.loop_client}), the caches are read
as the immutable mappings the informers publish from the reactor, and
admission runs on the loop too; only a call that arrives before the caches
have synced once waits for them through the bridge to the reactor.  Built
with L{OnReactor} (the default), the same checks run on the reactor with the
treq client, and C{validate} returns a Deferred.

Time: C{validate} takes the call's C{deadline}; it gives up
L{ANSWER_MARGIN_SECONDS} before it, so that the answer can still be signed
and sent.  Each API call's timeout is what is left of that; TokenReviews go
through a L{ReviewAdmission} (at most so many in flight, a bounded queue),
whose refusals are L{ValidatorOverloadedError} (RESOURCE_EXHAUSTED with a
retry hint).
"""

import asyncio
import base64
import binascii
import json
from collections.abc import Awaitable, Coroutine, Iterable, Mapping
from typing import Any, Protocol, cast

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from sentry_tx.errors import (
    ConfigError,
    ValidationError,
    ValidatorOverloadedError,
    ValidatorUnavailableError,
)
from sentry_tx.identity.admission import (
    DEADLINE_PASSED,
    MIN_RETRY_AFTER_MILLISECONDS,
    Release,
    ReviewAdmission,
)
from sentry_tx.identity.caller import VALIDATOR_KUBERNETES, CallerIdentity, SignRequest
from sentry_tx.identity.images import images_to_stamp
from sentry_tx.identity.rules import (
    DEFAULT_WORKLOAD_TRUST_DOMAIN,
    check_request,
    trust_domain_problem,
)
from sentry_tx.interfaces import IIdentityValidator
from sentry_tx.kube.errors import KubernetesAPIError, KubernetesError, json_object
from sentry_tx.kube.informer import Informer, PodRecord, configuration_trust_domain
from sentry_tx.kube.paths import TOKEN_REVIEW_PATH, configuration_path, core_path
from sentry_tx.server.loop import on_reactor

# One validation timeout: the servicer's, used here when a caller of
# validate() passes no deadline (the servicer always passes one).
from sentry_tx.server.servicer import VALIDATION_TIMEOUT_SECONDS

ANSWER_MARGIN_SECONDS = 0.5
"""
The validator gives up this long before the call's deadline, so that a
refusal (or the certificate) still reaches the caller in time.  Measured in
the 2,000-caller storm (bench/kube_storm.py, today's threaded gRPC hosting
on the loaded 2-core machine): an answer took up to 0.6 s to reach the
caller after the validator gave up with a 0.1 s margin.
"""

VALIDATOR_NOT_READY = "validator not ready"

_MISSING = object()

LEGACY_SENTRY_AUDIENCE = "dapr.io/sentry"
"""
The audience older sidecars request for their token, as Dapr's.
"""

APP_ID_ANNOTATION = "dapr.io/app-id"
CONFIG_ANNOTATION = "dapr.io/config"
CONTROL_PLANE_ANNOTATION = "dapr.io/control-plane"

CONTROL_PLANE_SERVICES = frozenset(
    ("injector", "operator", "placement", "scheduler", "sentry")
)
"""
The values of C{dapr.io/control-plane} that name one of Dapr's services.
"""

POD_NAME_EXTRA = "authentication.kubernetes.io/pod-name"
POD_UID_EXTRA = "authentication.kubernetes.io/pod-uid"

SERVICE_ACCOUNT_USERNAME_PREFIX = "system:serviceaccount:"

MAX_TOKEN_BYTES = 16 * 1024
"""
The longest token sent for review (service-account tokens are about 1 KiB).
"""

# The refusals: what the caller reads after PERMISSION_DENIED.
NO_TOKEN = "token is required for the KUBERNETES validator"
TOKEN_TOO_LONG = f"token is longer than {MAX_TOKEN_BYTES} bytes"
TOKEN_REVIEW_FAILED = "token review failed: {error}"
TOKEN_NOT_AUTHENTICATED = "token review failed: the token is not authenticated"
TOKEN_WRONG_AUDIENCE = (
    "token review failed: the token is not for an audience of sentry ({audiences})"
)
BAD_USERNAME = (
    "provided token is not a properly structured service account token"
    " (username {username!r})"
)
NAMESPACE_MISMATCH = (
    "namespace mismatch: the token's service account is in namespace"
    " {token_namespace!r}, the request is for {namespace!r}"
)
NO_POD_CLAIM = (
    "the token names no pod (kubernetes.io pod name claim missing): use a"
    " projected service account token"
)
POD_CLAIM_MISMATCH = "the token's pod claims disagree ({claim!r}, {extra!r})"
POD_NOT_FOUND = "pod {namespace}/{pod} of the token not found"
POD_UID_MISMATCH = (
    "pod {namespace}/{pod} is not the pod the token was issued for (uid mismatch)"
)
SERVICE_ACCOUNT_MISMATCH = (
    "pod service account mismatch: pod {namespace}/{pod} runs as {pod_account!r},"
    " the token is for {token_account!r}"
)
APP_ID_MISMATCH = "app-id mismatch: expected {expected!r}, received {received!r}"
CONTROL_PLANE_NAMESPACE = (
    "control plane service in namespace {namespace!r} is not allowed"
)
CONTROL_PLANE_UNKNOWN = "unknown control plane service {service!r} (pod {pod!r})"
CONTROL_PLANE_WITH_APP_ID = (
    "control plane service pod {pod!r} cannot have annotation " + APP_ID_ANNOTATION
)
CONFIGURATION_NOT_FOUND = (
    "configuration {namespace}/{name} named by the pod's "
    + CONFIG_ANNOTATION
    + " annotation not found"
)
BAD_CONFIGURATION_TRUST_DOMAIN = (
    "configuration {namespace}/{name} has an invalid"
    " spec.accessControl.trustDomain: {problem}"
)


def default_audiences(trust_domain: str, namespace: str) -> tuple[str, str]:
    """
    The audiences a sidecar's token is reviewed for: Dapr's legacy audience
    and sentry_tx's SPIFFE ID.
    """
    return (
        LEGACY_SENTRY_AUDIENCE,
        f"spiffe://{trust_domain}/ns/{namespace}/dapr-sentry",
    )


def token_payload(token: str) -> dict[str, Any]:
    """
    The claims of a JWT, decoded without verifying its signature.

    Only for a token the API server has just authenticated.

    @return: a dict, empty when the token is not a JWT with a JSON object
        payload.
    """
    segments = token.split(".")
    if len(segments) != 3:
        return {}
    payload = segments[1]
    try:
        decoded = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
        claims = json.loads(decoded)
    except (binascii.Error, ValueError):
        return {}
    return claims if isinstance(claims, dict) else {}



def _first_string(values: object) -> str:
    """
    The first element of a TokenReview C{extra} value (a list of strings).
    """
    if isinstance(values, list) and values and isinstance(values[0], str):
        return values[0]
    return ""


class ValidatorClient(Protocol):
    """
    What the validator needs of a Kubernetes API client: the
    L{sentry_tx.kube.client.KubernetesClient} (Deferreds) or the
    L{sentry_tx.kube.loop_client.LoopKubernetesClient} (coroutines).
    """

    @property
    def reactor(self) -> IReactorTime: ...

    def get(
        self, path: str, timeout_seconds: float | None = None
    ) -> Awaitable[Any]: ...

    def create(
        self,
        path: str,
        body: object,
        retry_lost_response: bool = False,
        timeout_seconds: float | None = None,
    ) -> Awaitable[Any]: ...


class Waits(Protocol):
    """
    How the validator waits for admission and the first sync: L{OnReactor}
    or L{OnGrpcLoop}.
    """

    runs_on_loop: bool

    def admitted(
        self, admission: ReviewAdmission, deadline: float
    ) -> Awaitable[Release]: ...

    def synced(self, informer: Informer[Any], deadline: float) -> Awaitable[bool]: ...


class OnReactor:
    """
    How the validator waits when it runs on the reactor: its collaborators
    answer with Deferreds, awaited as they are.
    """

    runs_on_loop = False

    def admitted(
        self, admission: ReviewAdmission, deadline: float
    ) -> "Deferred[Release]":
        """
        A slot of C{admission} (L{ReviewAdmission.acquire}).
        """
        return admission.acquire(deadline)

    def synced(self, informer: Informer[Any], deadline: float) -> "Deferred[bool]":
        """
        Whether C{informer} has synced by C{deadline}.
        """
        return informer.wait_synced(deadline)


class OnGrpcLoop:
    """
    How the validator waits when it runs on the gRPC loop: admission's
    Deferreds (fired on the loop, whose clock it runs on) become loop
    futures; the first sync of an informer is awaited through the bridge to
    the reactor (L{on_reactor}), the informer's thread.

    @param reactor: the reactor the informers run on.
    """

    runs_on_loop = True

    def __init__(self, reactor: IReactorFromThreads) -> None:
        self._reactor = reactor

    async def admitted(self, admission: ReviewAdmission, deadline: float) -> Release:
        """
        A slot of C{admission}: at once when one is free; else through the
        queue, where a slot granted to a call that was cancelled meanwhile
        is given back, never lost.
        """
        release = admission.try_acquire(deadline)
        if release is not None:
            return release
        future = _slot_future(admission.acquire(deadline), asyncio.get_running_loop())
        try:
            return await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled() and future.exception() is None:
                future.result()(None)
            raise

    async def synced(self, informer: Informer[Any], deadline: float) -> bool:
        """
        Whether C{informer} has synced by C{deadline} (asked on the reactor).
        """
        if informer.ready:
            return True
        synced: bool = await on_reactor(
            self._reactor,
            asyncio.get_running_loop(),
            informer.wait_synced,
            deadline,
        )
        return synced


def _slot_future(
    d: "Deferred[Release]", loop: asyncio.AbstractEventLoop
) -> "asyncio.Future[Release]":
    """
    A loop future of admission's Deferred C{d}; cancelling it cancels C{d}
    (the call leaves the queue), and a slot C{d} grants after the future
    was cancelled is released at once.
    """
    future: asyncio.Future[Release] = loop.create_future()

    def granted(release: Release) -> None:
        if future.cancelled():
            release(None)
        else:
            future.set_result(release)

    def refused(failure: Failure) -> None:
        if not future.cancelled():
            # An errback's Failure always holds its exception.
            future.set_exception(cast(BaseException, failure.value))

    def left(done: "asyncio.Future[Release]") -> None:
        if done.cancelled():
            d.cancel()

    d.addCallbacks(granted, refused)
    future.add_done_callback(left)
    return future


@implementer(IIdentityValidator)
class KubernetesValidator:
    """
    Validates callers with the Kubernetes API (see the module docstring).

    @param client: the API client whose C{create} and C{get} it awaits: the
        L{sentry_tx.kube.loop_client.LoopKubernetesClient} with
        L{OnGrpcLoop}, the L{sentry_tx.kube.client.KubernetesClient} with
        L{OnReactor}.
    @param sentry_trust_domain: sentry_tx's trust domain (control plane).
    @param sentry_namespace: sentry_tx's namespace (control plane).
    @param audiences: the TokenReview audiences (C{--token-audience}); the
        defaults of L{default_audiences} when empty.
    @param reactor: the clock deadlines are read on; the client's by
        default.
    @param pods: the pod L{sentry_tx.kube.informer.Informer}, or None to GET
        every pod.
    @param configurations: the Configuration informer, or None to GET them.
    @param admission: the L{ReviewAdmission} of TokenReviews, or None for
        no limit (on the thread the validator runs on, with its clock).
    @param waits: L{OnReactor} (the default) or L{OnGrpcLoop}: where it
        runs, and so how it waits for admission and the first sync.

    @ivar ready: True once the informers (if any) have synced once.
    """

    name = VALIDATOR_KUBERNETES
    _log = Logger()

    def __init__(
        self,
        client: ValidatorClient,
        sentry_trust_domain: str,
        sentry_namespace: str,
        audiences: Iterable[str] = (),
        reactor: IReactorTime | None = None,
        pods: Informer[PodRecord] | None = None,
        configurations: Informer[str | bool | None] | None = None,
        admission: ReviewAdmission | None = None,
        waits: Waits | None = None,
    ) -> None:
        self._waits: Waits = OnReactor() if waits is None else waits
        self.runs_on_loop = self._waits.runs_on_loop
        self.needs_reactor = not self.runs_on_loop
        self._client = client
        self._reactor = client.reactor if reactor is None else reactor
        self._pods = pods
        self._configurations = configurations
        self._informers: tuple[Informer[Any], ...] = tuple(
            i for i in (pods, configurations) if i is not None
        )
        self._admission = admission
        self._sentry_trust_domain = sentry_trust_domain
        self._sentry_namespace = sentry_namespace
        self.audiences: tuple[str, ...] = tuple(audiences) or default_audiences(
            sentry_trust_domain, sentry_namespace
        )

    @property
    def ready(self) -> bool:
        return all(informer.ready for informer in self._informers)

    # On the gRPC loop (runs_on_loop) this returns a coroutine, which
    # IIdentityValidator.validate does not declare (it names a Deferred):
    # the servicer awaits it there.
    def validate(  # type: ignore[override]
        self, request: SignRequest, deadline: float | None = None
    ) -> "Deferred[CallerIdentity] | Coroutine[Any, Any, CallerIdentity]":
        """
        Run every check, in order.

        @param request: a L{sentry_tx.identity.caller.SignRequest}.
        @param deadline: when the answer must come (reactor clock); by
            default L{VALIDATION_TIMEOUT_SECONDS} from now.  The validator
            gives up L{ANSWER_MARGIN_SECONDS} before it; the servicer also
            cancels the returned Deferred at the deadline, which cancels the
            API request in flight.
        @return: the L{CallerIdentity} to sign, or the error
            (L{ValidationError}, L{ValidatorUnavailableError} or
            L{ValidatorOverloadedError}): a coroutine on the gRPC loop
            (L{OnGrpcLoop}), else a Deferred.
        """
        checks = self._validate(request, deadline)
        if self.runs_on_loop:
            return checks
        return Deferred.fromCoroutine(checks)

    async def _validate(
        self, request: SignRequest, deadline: float | None
    ) -> CallerIdentity:
        now = self._reactor.seconds()
        if deadline is None:
            deadline = now + VALIDATION_TIMEOUT_SECONDS
        give_up_at = deadline - ANSWER_MARGIN_SECONDS
        if give_up_at <= now:
            raise ValidatorOverloadedError(
                DEADLINE_PASSED, MIN_RETRY_AFTER_MILLISECONDS
            )
        check_request(request)
        token = request.token
        if not token:
            raise ValidationError(NO_TOKEN)
        if len(token.encode("utf-8")) > MAX_TOKEN_BYTES:
            raise ValidationError(TOKEN_TOO_LONG)
        for informer in self._informers:
            if not informer.ready:
                synced = await self._waits.synced(informer, give_up_at)
                if not synced:
                    raise ValidatorUnavailableError(VALIDATOR_NOT_READY)
        status = await self._review(token, give_up_at)
        _, account = self._service_account(status, request)
        pod_name, pod_uid = self._pod_of_token(token, status)
        pod = await self._pod(request.namespace, pod_name, pod_uid, give_up_at)
        if pod_uid and pod.uid != pod_uid:
            raise ValidationError(
                POD_UID_MISMATCH.format(namespace=request.namespace, pod=pod_name)
            )
        pod_account = pod.service_account
        if pod_account != account:
            raise ValidationError(
                SERVICE_ACCOUNT_MISMATCH.format(
                    namespace=request.namespace,
                    pod=pod_name,
                    pod_account=pod_account,
                    token_account=account,
                )
            )
        annotations = pod.annotations
        expected_id, is_control_plane = self._expected_id(
            pod_name, request.namespace, annotations
        )
        if request.id != expected_id:
            raise ValidationError(
                APP_ID_MISMATCH.format(expected=expected_id, received=request.id)
            )
        container_images = images_to_stamp(pod.images)
        if is_control_plane:
            trust_domain = self._sentry_trust_domain
        else:
            trust_domain = await self._workload_trust_domain(
                request.namespace, annotations.get(CONFIG_ANNOTATION), give_up_at
            )
        if request.trust_domain and request.trust_domain != trust_domain:
            self._log.debug(
                "{namespace}/{app_id} asked for trust domain {requested}; it"
                " gets {trust_domain}",
                namespace=request.namespace,
                app_id=request.id,
                requested=request.trust_domain,
                trust_domain=trust_domain,
            )
        return CallerIdentity(
            trust_domain=trust_domain,
            namespace=request.namespace,
            app_id=request.id,
            container_images=container_images,
        )

    # The API calls

    def _unavailable(self, error: Exception) -> ValidatorUnavailableError:
        """
        The L{ValidatorUnavailableError} for an API call that failed through
        no fault of the caller's.  A refusal of sentry_tx's own request
        (401, 403, 400...) is a deployment fault and is logged as an error.
        """
        if isinstance(error, KubernetesAPIError):
            if not error.is_transient:
                self._log.error(
                    "the Kubernetes API refused a validation request: {error}",
                    error=str(error),
                )
            return ValidatorUnavailableError(
                f"cannot validate the caller: the Kubernetes API answered HTTP"
                f" {error.status} {error.reason}"
            )
        if isinstance(error, ConfigError):
            self._log.error(
                "cannot reach the Kubernetes API to validate a caller: {error}",
                error=str(error),
            )
            return ValidatorUnavailableError(
                "cannot validate the caller: the Kubernetes API is unavailable"
            )
        return ValidatorUnavailableError(
            f"cannot validate the caller: the Kubernetes API is unavailable ({error})"
        )

    def _time_left(self, give_up_at: float) -> float:
        """
        The seconds left until C{give_up_at}.

        @raise ValidatorUnavailableError: when none are.
        """
        left = give_up_at - self._reactor.seconds()
        if left <= 0:
            raise ValidatorUnavailableError(
                "cannot validate the caller: no time is left before the call's deadline"
            )
        return left

    async def _pod(
        self, namespace: str, name: str, uid: str, give_up_at: float
    ) -> PodRecord:
        """
        The L{PodRecord} of C{namespace/name}: from the cache when it holds
        that pod (with the token's uid), else from one GET.
        """
        if self._pods is not None:
            record = self._pods.get(namespace, name)
            if record is not None and (not uid or record.uid == uid):
                return record
        document = await self._get(
            core_path(namespace, "pods", name),
            POD_NOT_FOUND.format(namespace=namespace, pod=name),
            give_up_at,
        )
        return PodRecord.from_pod(document)

    async def _get(
        self, path: str, not_found_message: str, give_up_at: float
    ) -> Any:
        """
        GET C{path}; a 404 is a refusal with C{not_found_message}.
        """
        timeout_seconds = self._time_left(give_up_at)
        try:
            document = await self._client.get(path, timeout_seconds=timeout_seconds)
        except KubernetesAPIError as e:
            if e.is_not_found:
                raise ValidationError(not_found_message) from None
            raise self._unavailable(e) from None
        except (KubernetesError, ConfigError) as e:
            raise self._unavailable(e) from None
        return document

    async def _review(self, token: str, give_up_at: float) -> dict[str, Any]:
        """
        The status of the call's one TokenReview of C{token}, once admitted.

        @raise ValidationError: when it is not authenticated for one of
            C{self.audiences}.
        """
        release: Release | None = None
        if self._admission is not None:
            release = await self._waits.admitted(self._admission, give_up_at)
        started = self._reactor.seconds()
        duration: float | None = None
        try:
            review = await self._client.create(
                TOKEN_REVIEW_PATH,
                {
                    "apiVersion": "authentication.k8s.io/v1",
                    "kind": "TokenReview",
                    "spec": {"token": token, "audiences": list(self.audiences)},
                },
                # Never resent: a review whose answer was lost may have been
                # made, and each call costs the API server one review only.
                retry_lost_response=False,
                timeout_seconds=self._time_left(give_up_at),
            )
            duration = self._reactor.seconds() - started
        except (KubernetesError, ConfigError) as e:
            duration = self._reactor.seconds() - started
            raise self._unavailable(e) from None
        finally:
            if release is not None:
                release(duration)
        status = json_object(review.get("status"))
        if status.get("error"):
            raise ValidationError(TOKEN_REVIEW_FAILED.format(error=status["error"]))
        if status.get("authenticated") is not True:
            raise ValidationError(TOKEN_NOT_AUTHENTICATED)
        confirmed = status.get("audiences")
        if not isinstance(confirmed, list) or not set(confirmed) & set(self.audiences):
            # An empty list means the token is only good for the API server
            # itself (or the authenticator ignores audiences): not for us.
            raise ValidationError(
                TOKEN_WRONG_AUDIENCE.format(audiences=", ".join(self.audiences))
            )
        return status

    # The checks

    def _service_account(
        self, status: Mapping[str, Any], request: SignRequest
    ) -> tuple[str, str]:
        """
        The namespace and name of the token's service account.

        @raise ValidationError: for another kind of user, or another
            namespace than the request's.
        """
        username = json_object(status.get("user")).get("username") or ""
        parts = username.split(":") if isinstance(username, str) else []
        if (
            len(parts) != 4
            or not username.startswith(SERVICE_ACCOUNT_USERNAME_PREFIX)
            or not parts[2]
            or not parts[3]
        ):
            raise ValidationError(BAD_USERNAME.format(username=username))
        if parts[2] != request.namespace:
            raise ValidationError(
                NAMESPACE_MISMATCH.format(
                    token_namespace=parts[2], namespace=request.namespace
                )
            )
        return parts[2], parts[3]

    def _pod_of_token(self, token: str, status: Mapping[str, Any]) -> tuple[str, str]:
        """
        The name (and uid, or "") of the pod the token was issued for.

        @raise ValidationError: when it names none, or its claim and the
            review disagree.
        """
        pod_claim = json_object(
            json_object(token_payload(token).get("kubernetes.io")).get("pod")
        )
        name_claim, uid_claim = pod_claim.get("name"), pod_claim.get("uid")
        claim_name = name_claim if isinstance(name_claim, str) else ""
        claim_uid = uid_claim if isinstance(uid_claim, str) else ""
        extra = json_object(json_object(status.get("user")).get("extra"))
        extra_name = _first_string(extra.get(POD_NAME_EXTRA))
        extra_uid = _first_string(extra.get(POD_UID_EXTRA))
        if claim_name and extra_name and claim_name != extra_name:
            raise ValidationError(
                POD_CLAIM_MISMATCH.format(claim=claim_name, extra=extra_name)
            )
        if claim_uid and extra_uid and claim_uid != extra_uid:
            raise ValidationError(
                POD_CLAIM_MISMATCH.format(claim=claim_uid, extra=extra_uid)
            )
        name = extra_name or claim_name
        if not name:
            raise ValidationError(NO_POD_CLAIM)
        return name, extra_uid or claim_uid

    def _expected_id(
        self, pod_name: str, namespace: str, annotations: Mapping[str, str]
    ) -> tuple[str, bool]:
        """
        The app id the pod may ask for, and whether it is the control
        plane's.

        @raise ValidationError: for a misused control-plane annotation.
        """
        control_plane = annotations.get(CONTROL_PLANE_ANNOTATION)
        app_id = annotations.get(APP_ID_ANNOTATION)
        if control_plane is not None:
            if namespace != self._sentry_namespace:
                raise ValidationError(
                    CONTROL_PLANE_NAMESPACE.format(namespace=namespace)
                )
            if control_plane not in CONTROL_PLANE_SERVICES:
                raise ValidationError(
                    CONTROL_PLANE_UNKNOWN.format(service=control_plane, pod=pod_name)
                )
            if app_id is not None:
                raise ValidationError(CONTROL_PLANE_WITH_APP_ID.format(pod=pod_name))
            return f"dapr-{control_plane}", True
        if app_id:
            return str(app_id), False
        return pod_name, False

    async def _workload_trust_domain(
        self, namespace: str, config_name: str | None, give_up_at: float
    ) -> str:
        """
        The trust domain of the Configuration C{config_name} in
        C{namespace} (from the cache, else one GET), or C{public}.

        @raise ValidationError: when the Configuration does not exist or its
            trust domain is invalid.
        """
        if not config_name:
            return DEFAULT_WORKLOAD_TRUST_DOMAIN
        trust_domain = _MISSING
        if self._configurations is not None:
            trust_domain = self._configurations.get(namespace, config_name, _MISSING)
        if trust_domain is _MISSING:
            configuration = await self._get(
                configuration_path(namespace, config_name),
                CONFIGURATION_NOT_FOUND.format(namespace=namespace, name=config_name),
                give_up_at,
            )
            trust_domain = configuration_trust_domain(configuration)
        if not trust_domain:
            return DEFAULT_WORKLOAD_TRUST_DOMAIN
        if isinstance(trust_domain, str):
            problem = trust_domain_problem(trust_domain)
            if problem is None:
                return trust_domain
        else:
            problem = "not a string"
        raise ValidationError(
            BAD_CONFIGURATION_TRUST_DOMAIN.format(
                namespace=namespace, name=config_name, problem=problem
            )
        )
