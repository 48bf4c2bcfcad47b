# -*- test-case-name: tests.test_kube_admission,tests.test_kube_client -*-
"""
The Kubernetes API paths sentry_tx calls: TokenReviews, core resources
(Secrets, ConfigMaps, Pods) and Dapr's Configuration.
"""

from urllib.parse import quote

TOKEN_REVIEW_PATH = "/apis/authentication.k8s.io/v1/tokenreviews"


def core_path(namespace: str, plural: str, name: str | None = None) -> str:
    """
    The path of a core (C{v1}) resource collection, or of one object.

    @param namespace: the namespace.
    @param plural: C{"pods"}, C{"secrets"}, C{"configmaps"}.
    @param name: the object's name, or None for the collection.
    """
    path = f"/api/v1/namespaces/{quote(namespace, safe='')}/{plural}"
    return path if name is None else f"{path}/{quote(name, safe='')}"


def configuration_path(namespace: str, name: str) -> str:
    """
    The path of the Dapr C{Configuration} C{name} in C{namespace}.
    """
    return (
        f"/apis/dapr.io/v1alpha1/namespaces/{quote(namespace, safe='')}"
        f"/configurations/{quote(name, safe='')}"
    )
