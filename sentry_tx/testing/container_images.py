"""
Test support for the container images stamped into SVIDs
(L{sentry_tx.identity.images}): Pod objects with containers and statuses,
and a reader of the extension that parses it with asn1crypto, a DER parser
independent of the one that wrote it (cryptography's).
"""

import json
from collections.abc import Iterable, Mapping
from typing import Any

from asn1crypto.core import OctetString
from cryptography import x509

CONTAINER_IMAGES_OID = "1.3.6.1.4.1.57683.100.1"
"""
Dapr's OID, written out here rather than imported, so that a change to the
production constant fails the tests instead of moving with them.
"""

DAPRD_IMAGE = "ghcr.io/dapr/daprd:1.16.0"
DAPRD_IMAGE_ID = (
    "ghcr.io/dapr/daprd@sha256:"
    "3f1c9a0e5b7d2c4e6a8b0d1f3e5c7a9b2d4f6e8a0c1b3d5f7e9a2c4b6d8f0e1a"
)
APP_IMAGE = "registry.example.com/shop/cart:v2"
APP_IMAGE_ID = "docker-pullable://registry.example.com/shop/cart@sha256:bbb222"
HELPER_IMAGE = "busybox:1.36"
HELPER_IMAGE_ID = "sha256:ccc333"


def pod_document(
    containers: Iterable[dict[str, str]] = (),
    init_containers: Iterable[dict[str, str]] = (),
    container_statuses: Iterable[dict[str, str]] | None = None,
    init_container_statuses: Iterable[dict[str, str]] | None = None,
    service_account: str = "default",
    annotations: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """
    A Pod object as the API server sends it, with C{containers} and
    C{init_containers} (lists of container dicts) and, when given, their
    statuses (lists of C{{"name", "imageID"}} dicts).
    """
    spec: dict[str, Any] = {
        "serviceAccountName": service_account,
        "containers": list(containers),
    }
    if init_containers:
        spec["initContainers"] = list(init_containers)
    status: dict[str, Any] = {"phase": "Running" if container_statuses else "Pending"}
    if container_statuses is not None:
        status["containerStatuses"] = list(container_statuses)
    if init_container_statuses is not None:
        status["initContainerStatuses"] = list(init_container_statuses)
    return {
        "metadata": {"annotations": dict(annotations or {})},
        "spec": spec,
        "status": status,
    }


def sidecar_pod(
    with_statuses: bool = True,
    service_account: str = "default",
    annotations: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """
    A Dapr pod in native-sidecar mode: a one-shot init container
    C{migrate}, daprd as an init container with C{restartPolicy: Always},
    the app C{cart} and a C{helper} container; with their statuses (daprd
    and the app pulled by digest, the helper's a bare C{sha256:} ID), or
    none (the pod has not started).
    """
    statuses: list[dict[str, str]] | None = None
    init_statuses: list[dict[str, str]] | None = None
    if with_statuses:
        init_statuses = [
            {"name": "migrate", "imageID": "docker.io/library/migrate@sha256:ddd444"},
            {"name": "daprd", "imageID": DAPRD_IMAGE_ID},
        ]
        statuses = [
            {"name": "cart", "imageID": APP_IMAGE_ID},
            {"name": "helper", "imageID": HELPER_IMAGE_ID},
        ]
    return pod_document(
        init_containers=[
            {"name": "migrate", "image": "migrate:v1"},
            {"name": "daprd", "image": DAPRD_IMAGE, "restartPolicy": "Always"},
        ],
        containers=[
            {"name": "cart", "image": APP_IMAGE},
            {"name": "helper", "image": HELPER_IMAGE},
        ],
        container_statuses=statuses,
        init_container_statuses=init_statuses,
        service_account=service_account,
        annotations=annotations,
    )


def images_extension(
    certificate: x509.Certificate,
) -> x509.Extension[x509.ExtensionType] | None:
    """
    The container images extension of C{certificate}, or None.
    """
    oid = x509.ObjectIdentifier(CONTAINER_IMAGES_OID)
    try:
        return certificate.extensions.get_extension_for_oid(oid)
    except x509.ExtensionNotFound:
        return None


def images_json(certificate: x509.Certificate) -> bytes | None:
    """
    The JSON bytes inside the container images extension of C{certificate}
    (its value parsed as a DER OCTET STRING by asn1crypto, which must
    consume it all), or None when it has none.
    """
    extension = images_extension(certificate)
    if extension is None:
        return None
    value = extension.value
    if not isinstance(value, x509.UnrecognizedExtension):
        raise TypeError(f"the images extension parsed as {type(value).__name__}")
    parsed = OctetString.load(value.value, strict=True)
    native: bytes = parsed.native
    return native


def images_list(certificate: x509.Certificate) -> list[Any] | None:
    """
    The container images of C{certificate} decoded by C{json}, or None.
    """
    data = images_json(certificate)
    if data is None:
        return None
    images: list[Any] = json.loads(data)
    return images
