"""
Service-account tokens for the fake Kubernetes API server: tokens it issues
and reviews (L{make_service_account_token}, L{FakeReviewedToken}) and the
token sentry_tx itself presents (L{FAKE_API_TOKEN}).
"""

import base64
import json
import os
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sentry_tx.testing.certificates import TEST_NAMESPACE, TEST_TRUST_DOMAIN

FAKE_API_TOKEN = "sentry-tx-fake-api-token"
"""
The bearer token the fake API server accepts from sentry_tx by default.
"""

FAKE_API_SERVER_AUDIENCE = "https://kubernetes.default.svc.cluster.local"
"""
The audience of tokens reviewed without audiences (the API server's own).
"""

FAKE_API_DEFAULT_AUDIENCES = (
    "dapr.io/sentry",
    f"spiffe://{TEST_TRUST_DOMAIN}/ns/{TEST_NAMESPACE}/dapr-sentry",
)
"""
The audiences a workload token gets by default: those sentry_tx reviews for
with trust domain L{TEST_TRUST_DOMAIN} in L{TEST_NAMESPACE}.
"""


def _base64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def make_service_account_token(
    namespace: str,
    service_account: str,
    pod_name: str | None = None,
    pod_uid: str | None = None,
    audiences: Iterable[str] = FAKE_API_DEFAULT_AUDIENCES,
) -> str:
    """
    A token shaped like a projected service-account token (a JWT whose
    payload has the C{kubernetes.io} claims), with a random signature: only
    L{FakeKubernetesAPI}'s TokenReview can vouch for it.

    @param pod_name: the pod it is bound to, or None for a token bound to
        no pod (as a legacy Secret token).
    """
    kubernetes_claims: dict[str, Any] = {
        "namespace": namespace,
        "serviceaccount": {"name": service_account, "uid": secrets.token_hex(8)},
    }
    claims = {
        "aud": list(audiences),
        "exp": 4102444800,
        "iat": 1767225600,
        "iss": "https://kubernetes.default.svc.cluster.local",
        "sub": f"system:serviceaccount:{namespace}:{service_account}",
        "kubernetes.io": kubernetes_claims,
    }
    if pod_name is not None:
        kubernetes_claims["pod"] = {"name": pod_name, "uid": pod_uid or ""}
    header = {"alg": "RS256", "kid": "fake"}
    return ".".join(
        (
            _base64url(json.dumps(header).encode()),
            _base64url(json.dumps(claims).encode()),
            _base64url(os.urandom(64)),
        )
    )


@dataclass
class FakeReviewedToken:
    """
    What the fake TokenReview knows about a token it vouches for.

    @ivar pod_extra: whether the review names the pod in
        C{status.user.extra}, as Kubernetes 1.30+ does.
    @ivar username: the username the review reports, when not the service
        account's.
    @ivar authenticated: when False, the review answers "not
        authenticated" without an error.
    """

    namespace: str
    service_account: str
    pod_name: str | None = None
    pod_uid: str | None = None
    audiences: tuple[str, ...] = FAKE_API_DEFAULT_AUDIENCES
    pod_extra: bool = True
    username: str | None = None
    authenticated: bool = True
