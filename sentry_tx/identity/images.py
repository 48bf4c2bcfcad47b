# -*- test-case-name: tests.test_images -*-
"""
The container images of the calling pod, as Dapr master stamps them into
the SVIDs it issues with the KUBERNETES validator (dapr/dapr #10282,
C{pkg/sentry/server/images} and C{containerImages} in its Kubernetes
validator).

  - L{container_images}: a Pod object (the JSON the API server sends) to
    the list of L{ContainerImage}s: the native-sidecar init containers
    (C{restartPolicy: Always}) first, then the containers; role C{daprd} for
    the container named C{daprd}, C{app} for every other; the digest from
    the matching status's C{imageID}, after its last C{@}, or the whole ID
    when it is a bare C{sha256:} one; empty (and left out) when unknown.
  - L{marshal}: that list as the exact bytes Go's C{json.Marshal} writes
    for Dapr's C{[]images.ContainerImage}: compact, fields in the order
    C{role}, C{containerName}, C{image}, C{digest} (C{omitempty}), strings
    escaped as Go 1.22 and later escape them.  The bytes are signed, so a
    verifier that compares them with its own Go encoding must find them
    equal.
  - L{kept_images}: what the pod informer keeps of a pod's images: those
    bytes, or None when they would make the pod's entry larger than
    L{MAX_POD_ENTRY_BYTES}; L{images_to_stamp} refuses such a pod a
    certificate rather than stamping a cut or missing value.

The certificate extension itself (OID C{1.3.6.1.4.1.57683.100.1}, a DER
OCTET STRING of these bytes) is built by L{sentry_tx.ca.x509profile}, the one
module that builds certificates.
"""

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sentry_tx.errors import ValidationError
from sentry_tx.kube.errors import json_object

ROLE_DAPRD = "daprd"
ROLE_APP = "app"

DAPRD_CONTAINER_NAME = "daprd"
"""
The name of the sidecar container Dapr's injector adds (C{role: daprd}).
"""

NATIVE_SIDECAR_RESTART_POLICY = "Always"
"""
The C{restartPolicy} of an init container that is a native sidecar (it
runs beside the containers; daprd runs so in native-sidecar mode).
"""

BARE_DIGEST_PREFIX = "sha256:"

MAX_POD_ENTRY_BYTES = 16 * 1024
"""
The largest pod entry the informer keeps whole: the UTF-8 bytes of its
identity strings (uid, service account, the kept annotations' keys and
values) and of its images' JSON together.  About 50 containers with long
image references fit; a pod whose entry would be larger keeps no images and
is refused a certificate (L{images_to_stamp}).
"""

IMAGES_TOO_LARGE = (
    "the pod's container images are too large to be stamped into its"
    f" certificate (its entry would exceed {MAX_POD_ENTRY_BYTES} bytes)"
)


@dataclass(frozen=True)
class ContainerImage:
    """
    One container of the calling pod, as Dapr's C{images.ContainerImage}.

    @ivar role: L{ROLE_DAPRD} or L{ROLE_APP}.
    @ivar container_name: the container's name.
    @ivar image: the image reference of the pod's spec, as written there.
    @ivar digest: C{sha256:...} from the container's status, or C{""} when
        unknown (the container has not started, or the pod has no status).
    """

    role: str
    container_name: str
    image: str
    digest: str = ""



def _list(value: object) -> list[Any]:
    return value if isinstance(value, list) else []


def _string(value: object) -> str:
    # A field that is missing (or of another type) reads as Go's zero value.
    return value if isinstance(value, str) else ""


def _digest(image_id: str) -> str:
    at = image_id.rfind("@")
    if at >= 0:
        return image_id[at + 1 :]
    if image_id.startswith(BARE_DIGEST_PREFIX):
        return image_id
    return ""


def _image(container: dict[str, Any], statuses: list[Any]) -> ContainerImage:
    name = _string(container.get("name"))
    digest = ""
    for entry in statuses:
        status = json_object(entry)
        if _string(status.get("name")) == name:
            # The first status of that name decides, as in Dapr.
            digest = _digest(_string(status.get("imageID")))
            break
    return ContainerImage(
        role=ROLE_DAPRD if name == DAPRD_CONTAINER_NAME else ROLE_APP,
        container_name=name,
        image=_string(container.get("image")),
        digest=digest,
    )


def container_images(pod: dict[str, Any]) -> tuple[ContainerImage, ...]:
    """
    The images of a Pod's containers, in Dapr's order.

    @param pod: a Pod object, as decoded from the API server's JSON.
    @return: a tuple of L{ContainerImage}, empty for a pod without
        containers.
    """
    spec = json_object(pod.get("spec"))
    status = json_object(pod.get("status"))
    init_statuses = _list(status.get("initContainerStatuses"))
    statuses = _list(status.get("containerStatuses"))
    images = [
        _image(container, init_statuses)
        for container in map(json_object, _list(spec.get("initContainers")))
        if container.get("restartPolicy") == NATIVE_SIDECAR_RESTART_POLICY
    ]
    images.extend(
        _image(container, statuses)
        for container in map(json_object, _list(spec.get("containers")))
    )
    return tuple(images)


# Go's encoding/json (encodeState.string with escapeHTML, as json.Marshal
# calls it): ASCII control characters, the quote and the backslash, the
# HTML characters <, > and &, and U+2028 / U+2029 are escaped; every other
# character is written as its UTF-8 bytes.
_GO_ESCAPED = re.compile('[\x00-\x1f"\\\\<>&\u2028\u2029\ud800-\udfff]')

_GO_SHORT_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    # Go 1.22 and later (Dapr master builds with 1.26); older Go wrote
    # \u0008 and \u000c.
    "\b": "\\b",
    "\f": "\\f",
    "\n": "\\n",
    "\r": "\\r",
    "\t": "\\t",
}


def _go_escape(match: re.Match[str]) -> str:
    character = match.group()
    short = _GO_SHORT_ESCAPES.get(character)
    if short is not None:
        return short
    if "\ud800" <= character <= "\udfff":
        # A lone surrogate, which only a \ud800-style escape in the API
        # server's JSON can give Python.  Go's decoder turns that escape
        # into U+FFFD, a valid character its encoder writes as is: so do we.
        # (Go's own "\ufffd" escape is for bytes that are not UTF-8, which a
        # Python string cannot hold.)
        return "\ufffd"
    return f"\\u{ord(character):04x}"


def go_json_string(text: str) -> bytes:
    """
    C{text} as Go's C{json.Marshal} writes a string, quotes included.

    @param text: a L{str}.
    @return: L{bytes}, UTF-8.
    """
    return ('"' + _GO_ESCAPED.sub(_go_escape, text) + '"').encode("utf-8")


def marshal(images: Sequence[ContainerImage]) -> bytes:
    """
    The bytes Go's C{json.Marshal} writes for Dapr's
    C{[]images.ContainerImage} holding C{images}.

    @param images: a sequence of L{ContainerImage}, not empty (Dapr adds no
        extension for an empty list, and Go would write C{null} for it).
    @return: L{bytes}.
    """
    entries = []
    for image in images:
        entry = (
            b'{"role":'
            + go_json_string(image.role)
            + b',"containerName":'
            + go_json_string(image.container_name)
            + b',"image":'
            + go_json_string(image.image)
        )
        if image.digest:
            entry += b',"digest":' + go_json_string(image.digest)
        entries.append(entry + b"}")
    return b"[" + b",".join(entries) + b"]"


def kept_images(
    pod: dict[str, Any], identity_strings: Iterable[str] = ()
) -> bytes | None:
    """
    What a pod's cache entry keeps of its images: their L{marshal}led JSON
    (C{b""} for a pod without containers), or None when that JSON and
    C{identity_strings} together exceed L{MAX_POD_ENTRY_BYTES}.

    @param pod: a Pod object.
    @param identity_strings: the other strings the entry keeps.
    """
    images = container_images(pod)
    if not images:
        return b""
    used = sum(len(text.encode("utf-8", "surrogatepass")) for text in identity_strings)
    data = marshal(images)
    if used + len(data) > MAX_POD_ENTRY_BYTES:
        return None
    return data


def images_to_stamp(kept: bytes | None) -> bytes:
    """
    The images JSON to stamp into a certificate, from L{kept_images}.

    @raise ValidationError: with L{IMAGES_TOO_LARGE} when the pod's images
        were too large to keep: it gets no certificate rather than one
        without its images.
    """
    if kept is None:
        raise ValidationError(IMAGES_TOO_LARGE)
    return kept
