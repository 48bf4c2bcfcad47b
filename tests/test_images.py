"""
Tests for L{sentry_tx.identity.images} and the container images extension
that L{sentry_tx.ca.x509profile} stamps into KUBERNETES leaves: the list
taken from a Pod, its bytes compared with what Go's C{json.Marshal} writes
for the same list, the DER OCTET STRING around them read back by asn1crypto,
the bound on a pod's cache entry, and no extension with the other
validators.

The expected bytes below were written by Go's C{encoding/json}
(C{json.Marshal} of Dapr's C{[]images.ContainerImage}); they are literals
so that a change of the encoder here cannot move them with it.
"""

import asyncio
import json
import re
from datetime import timedelta

import jwt as pyjwt
from asn1crypto.core import OctetString
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from sentry_tx.ca import x509profile
from sentry_tx.ca.authority import issue_workload_certificate
from sentry_tx.config import MTLSConfig, SentryConfig
from sentry_tx.errors import ValidationError
from sentry_tx.identity.caller import CallerIdentity, SignRequest
from sentry_tx.identity.images import (
    IMAGES_TOO_LARGE,
    MAX_POD_ENTRY_BYTES,
    ContainerImage,
    container_images,
    go_json_string,
    images_to_stamp,
    kept_images,
    marshal,
)
from sentry_tx.identity.insecure import InsecureValidator
from sentry_tx.identity.jwks import JWKSOptions, JWKSValidator
from sentry_tx.kube.informer import PodRecord
from sentry_tx.metrics import SentryMetrics
from sentry_tx.server.servicer import VALIDATION_TIMEOUT_SECONDS, CAServicer
from sentry_tx.testing.authority import FakeCertificateAuthority
from sentry_tx.testing.certificates import FIXED_NOW, make_bundle, pem_encode
from sentry_tx.testing.clocks import ImmediateReactor, inline_file_work
from sentry_tx.testing.container_images import (
    CONTAINER_IMAGES_OID,
    images_extension,
    images_json,
    images_list,
    pod_document,
    sidecar_pod,
)
from sentry_tx.testing.hypothesis_profiles import show_notes

GO_WITH_STATUSES = (
    b'[{"role":"daprd","containerName":"daprd","image":"ghcr.io/dapr/daprd:1.16.0",'
    b'"digest":"sha256:3f1c9a0e5b7d2c4e6a8b0d1f3e5c7a9b'
    b'2d4f6e8a0c1b3d5f7e9a2c4b6d8f0e1a"},'
    b'{"role":"app","containerName":"cart","image":"registry.example.com/shop/cart:v2",'
    b'"digest":"sha256:bbb222"},'
    b'{"role":"app","containerName":"helper","image":"busybox:1.36",'
    b'"digest":"sha256:ccc333"}]'
)
"""
Go's C{json.Marshal} of the images of L{sidecar_pod} with its statuses.
"""

GO_WITHOUT_STATUSES = (
    b'[{"role":"daprd","containerName":"daprd","image":"ghcr.io/dapr/daprd:1.16.0"},'
    b'{"role":"app","containerName":"cart",'
    b'"image":"registry.example.com/shop/cart:v2"},'
    b'{"role":"app","containerName":"helper","image":"busybox:1.36"}]'
)
"""
Go's C{json.Marshal} of the images of L{sidecar_pod} before it started.
"""

TTL = timedelta(hours=24)
MTLS = MTLSConfig(workload_cert_ttl=TTL, allowed_clock_skew=timedelta(minutes=15))
SENTRY_ID = "spiffe://example.org/ns/dapr-system/dapr-sentry"


def images_of(pod):
    """
    The images of C{pod} as plain tuples, for readable comparisons.
    """
    return [
        (image.role, image.container_name, image.image, image.digest)
        for image in container_images(pod)
    ]


class ContainerImagesTests(SynchronousTestCase):
    """
    L{container_images} lists a Pod's containers as Dapr's
    C{containerImages} does.
    """

    def test_native_sidecar_first(self):
        """
        Native-sidecar init containers come first, then the containers; a
        one-shot init container is left out; C{daprd} is the daprd role,
        every other container the app role.
        """
        self.assertEqual(
            [image[:2] for image in images_of(sidecar_pod())],
            [("daprd", "daprd"), ("app", "cart"), ("app", "helper")],
        )

    def test_daprd_as_a_container(self):
        """
        A daprd injected as an ordinary container keeps the pod's order and
        the daprd role; a native sidecar not named daprd is an app.
        """
        pod = pod_document(
            init_containers=[
                {"name": "proxy", "image": "envoy:1", "restartPolicy": "Always"},
                {"name": "setup", "image": "setup:1", "restartPolicy": "Never"},
            ],
            containers=[
                {"name": "app", "image": "myapp:v1"},
                {"name": "daprd", "image": "daprd:1.16.0"},
            ],
        )
        self.assertEqual(
            images_of(pod),
            [
                ("app", "proxy", "envoy:1", ""),
                ("app", "app", "myapp:v1", ""),
                ("daprd", "daprd", "daprd:1.16.0", ""),
            ],
        )

    def test_digests(self):
        """
        The digest is what follows the last C{@} of the matching status's
        imageID, or a bare C{sha256:} ID whole; anything else, an empty ID,
        or no status of that name leaves it empty; the first status of a
        name decides; init containers match init container statuses only.
        """
        names = ["at", "two-at", "bare", "other", "empty", "none", "twice"]
        pod = pod_document(
            init_containers=[
                {"name": "side", "image": "side:1", "restartPolicy": "Always"}
            ],
            containers=[{"name": name, "image": f"{name}:1"} for name in names],
            container_statuses=[
                {"name": "side", "imageID": "sha256:not-the-init-status"},
                {"name": "at", "imageID": "docker-pullable://r.example/a@sha256:aaa"},
                {"name": "two-at", "imageID": "r.example/a@b@sha256:bbb"},
                {"name": "bare", "imageID": "sha256:ccc"},
                {"name": "other", "imageID": "not-a-digest"},
                {"name": "empty", "imageID": ""},
                {"name": "twice", "imageID": "x@sha256:first"},
                {"name": "twice", "imageID": "x@sha256:second"},
            ],
            init_container_statuses=[{"name": "side", "imageID": "s@sha256:ddd"}],
        )
        self.assertEqual(
            [(image[1], image[3]) for image in images_of(pod)],
            [
                ("side", "sha256:ddd"),
                ("at", "sha256:aaa"),
                ("two-at", "sha256:bbb"),
                ("bare", "sha256:ccc"),
                ("other", ""),
                ("empty", ""),
                ("none", ""),
                ("twice", "sha256:first"),
            ],
        )

    def test_no_containers(self):
        """
        A pod without containers (or only one-shot init containers) has
        none, and keeps no images to stamp.
        """
        pod = pod_document(init_containers=[{"name": "setup", "image": "s:1"}])
        self.assertEqual(container_images(pod), ())
        self.assertEqual(container_images({}), ())
        self.assertEqual(kept_images(pod), b"")

    def test_missing_fields(self):
        """
        Missing or mistyped fields read as Go's zero value, the empty
        string; entries that are not objects are empty containers.
        """
        pod = {
            "spec": {"containers": [{"image": 7}, "junk"]},
            "status": {"containerStatuses": "junk"},
        }
        self.assertEqual(
            container_images(pod),
            (ContainerImage("app", "", ""), ContainerImage("app", "", "")),
        )


class GoMarshalTests(SynchronousTestCase):
    """
    L{marshal} writes the bytes Go's C{json.Marshal} writes.
    """

    def test_with_statuses(self):
        """
        Compact, fields in Go's order, digests where known.
        """
        self.assertEqual(marshal(container_images(sidecar_pod())), GO_WITH_STATUSES)

    def test_without_statuses(self):
        """
        An empty digest is left out (C{omitempty}).
        """
        self.assertEqual(
            marshal(container_images(sidecar_pod(with_statuses=False))),
            GO_WITHOUT_STATUSES,
        )

    def test_escaping(self):
        """
        <, > and & are escaped as \\u003c, \\u003e, \\u0026; the quote, the
        backslash, \\n, \\r and \\t by their short forms, other control
        characters as \\u00xx (lowercase), U+2028 and U+2029 escaped; DEL
        and every other character written as UTF-8.
        """
        image = 'a<b>&c"d\\e\n\r\t\x01\x1f\x7f/\u00e9\u2028\u2029\U0001f600'
        self.assertEqual(
            marshal([ContainerImage("app", "x", image)]),
            b'[{"role":"app","containerName":"x","image":"a\\u003cb\\u003e\\u0026c'
            b'\\"d\\\\e\\n\\r\\t\\u0001\\u001f\x7f/\xc3\xa9\\u2028\\u2029'
            b'\xf0\x9f\x98\x80"}]',
        )

    def test_backspace_and_form_feed(self):
        """
        Backspace and form feed take their short forms, as Go 1.22 and
        later (Dapr master's Go) write them.
        """
        self.assertEqual(go_json_string("\b\f"), b'"\\b\\f"')

    def test_lone_surrogates(self):
        """
        A lone surrogate from a \\ud800-style escape in the API's JSON is
        written as U+FFFD, as Go writes the string its decoder made of the
        same JSON; a pair is one character.
        """
        text = json.loads(r'"a\ud800b\udc00\ud83d\ude00"')
        self.assertEqual(
            go_json_string(text),
            b'"a\xef\xbf\xbdb\xef\xbf\xbd\xf0\x9f\x98\x80"',
        )


    @show_notes
    @given(st.text())
    def test_any_string(self, text):
        """
        Any string is written as JSON that reads back as that string (lone
        surrogates as U+FFFD), with no control character, <, >, &, U+2028
        or U+2029 left raw.
        """
        data = go_json_string(text)
        self.assertEqual(json.loads(data), re.sub("[\ud800-\udfff]", "\ufffd", text))
        self.assertIsNone(
            re.search("[\x00-\x1f<>&\u2028\u2029]", data.decode("utf-8"))
        )


class KeptImagesTests(SynchronousTestCase):
    """
    The pod cache keeps images whole, within a bound on the whole entry.
    """

    def long_image_pod(self, image_length):
        prefix = "registry.example.com/"
        return pod_document(
            containers=[
                {"name": "app", "image": prefix + "a" * (image_length - len(prefix))}
            ]
        )

    def test_long_image_kept_whole(self):
        """
        An image reference far longer than the 256 characters other kept
        strings are cut to is kept and stamped whole.
        """
        record = PodRecord.from_pod(self.long_image_pod(4000))
        self.assertEqual(len(json.loads(record.images)[0]["image"]), 4000)

    def test_whole_entry_bound(self):
        """
        The images' JSON and the entry's identity strings together may take
        L{MAX_POD_ENTRY_BYTES}, and not one byte more; identity strings
        count.
        """
        overhead = len(marshal([ContainerImage("app", "app", "")]))
        fits = self.long_image_pod(MAX_POD_ENTRY_BYTES - overhead)
        self.assertEqual(len(kept_images(fits)), MAX_POD_ENTRY_BYTES)
        self.assertIsNone(kept_images(fits, ("x",)))
        self.assertIsNone(kept_images(self.long_image_pod(MAX_POD_ENTRY_BYTES)))

    def test_record_counts_identity(self):
        """
        A pod record counts its uid, service account and kept annotations
        against the bound.
        """
        overhead = len(marshal([ContainerImage("app", "app", "")]))
        # The account is "default" (7 bytes); the pod has no uid.
        pod = self.long_image_pod(MAX_POD_ENTRY_BYTES - overhead - len("default"))
        self.assertEqual(PodRecord.from_pod(pod).service_account, "default")
        self.assertIsNotNone(PodRecord.from_pod(pod).images)
        pod["metadata"]["uid"] = "u"
        self.assertIsNone(PodRecord.from_pod(pod).images)
        del pod["metadata"]["uid"]
        pod["metadata"]["annotations"]["dapr.io/app-id"] = ""
        self.assertIsNone(PodRecord.from_pod(pod).images)

    def test_refused_rather_than_cut(self):
        """
        A pod whose images were too large to keep is refused a certificate,
        rather than given one with a cut or missing value.
        """
        record = PodRecord.from_pod(self.long_image_pod(MAX_POD_ENTRY_BYTES))
        error = self.assertRaises(ValidationError, images_to_stamp, record.images)
        self.assertEqual(str(error), IMAGES_TOO_LARGE)
        self.assertEqual(images_to_stamp(b""), b"")


class DerOctetStringTests(SynchronousTestCase):
    """
    L{x509profile.der_octet_string} is DER, in the short and long length
    forms.
    """

    def test_lengths(self):
        """
        Each length encodes minimally and asn1crypto reads back the data.
        """
        for length, header in [
            (0, b"\x04\x00"),
            (127, b"\x04\x7f"),
            (128, b"\x04\x81\x80"),
            (255, b"\x04\x81\xff"),
            (256, b"\x04\x82\x01\x00"),
            (70000, b"\x04\x83\x01\x11\x70"),
        ]:
            data = bytes(range(256)) * (length // 256) + bytes(range(length % 256))
            encoded = x509profile.der_octet_string(data)
            self.assertEqual(encoded[: len(header)], header)
            self.assertEqual(OctetString.load(encoded, strict=True).native, data)


class LeafExtensionTests(SynchronousTestCase):
    """
    Leaves for a native-sidecar pod carry the images extension: non-critical,
    last, its value a DER OCTET STRING of Go's bytes.
    """

    def setUp(self):
        self.bundle = make_bundle()
        self.public_key = ec.generate_private_key(ec.SECP256R1()).public_key()

    def leaf(self, container_images=b""):
        identity = CallerIdentity(
            trust_domain="public",
            namespace="shop",
            app_id="cart",
            container_images=container_images,
        )
        issued = issue_workload_certificate(
            self.bundle, identity, self.public_key, FIXED_NOW, MTLS, "dapr-system"
        )
        return x509.load_pem_x509_certificates(issued.certificate_chain_pem)[0]

    def test_with_statuses(self):
        """
        The extension holds Go's bytes for the pod with its statuses,
        digests included; json reads the same list back.
        """
        leaf = self.leaf(PodRecord.from_pod(sidecar_pod()).images)
        self.assertEqual(images_json(leaf), GO_WITH_STATUSES)
        self.assertEqual(
            images_list(leaf)[0],
            {
                "role": "daprd",
                "containerName": "daprd",
                "image": "ghcr.io/dapr/daprd:1.16.0",
                "digest": "sha256:3f1c9a0e5b7d2c4e6a8b0d1f3e5c7a9b"
                "2d4f6e8a0c1b3d5f7e9a2c4b6d8f0e1a",
            },
        )

    def test_without_statuses(self):
        """
        Before the pod's containers started, the extension holds the images
        without digests.
        """
        leaf = self.leaf(kept_images(sidecar_pod(with_statuses=False)))
        self.assertEqual(images_json(leaf), GO_WITHOUT_STATUSES)
        self.assertEqual(
            [entry["containerName"] for entry in images_list(leaf)],
            ["daprd", "cart", "helper"],
        )

    def test_non_critical_and_last(self):
        """
        The extension is non-critical, comes after the profile's others, and
        cryptography sees it as unrecognized (a verifier that does not know
        it may ignore it).
        """
        leaf = self.leaf(GO_WITH_STATUSES)
        extension = images_extension(leaf)
        self.assertFalse(extension.critical)
        self.assertIsInstance(extension.value, x509.UnrecognizedExtension)
        self.assertEqual(leaf.extensions[-1].oid.dotted_string, CONTAINER_IMAGES_OID)
        self.assertEqual(len(leaf.extensions), 6)

    def test_signed(self):
        """
        The leaf with the extension verifies against the issuer.
        """
        leaf = self.leaf(GO_WITH_STATUSES)
        leaf.verify_directly_issued_by(self.bundle.issuer)

    def test_none_for_an_empty_list(self):
        """
        A pod without containers gets no extension.
        """
        self.assertIsNone(images_extension(self.leaf(kept_images(pod_document()))))


def csr_asking_for_images(key):
    """
    A CSR that asks for a container images extension of its own choosing.
    """
    forged = x509profile.der_octet_string(b'[{"role":"daprd","image":"evil"}]')
    oid = x509.ObjectIdentifier(CONTAINER_IMAGES_OID)
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(x509.UnrecognizedExtension(oid, forged), critical=False)
        .sign(key, hashes.SHA256())
    )
    return pem_encode("CERTIFICATE REQUEST", csr.public_bytes(Encoding.DER))


class OtherValidatorsTests(SynchronousTestCase):
    """
    INSECURE and JWKS callers get no images extension, whatever their CSR
    asks for: the images come from the pod the KUBERNETES validator read,
    never from the request.
    """

    def setUp(self):
        self.reactor = ImmediateReactor(FIXED_NOW.timestamp())
        self.loop = asyncio.new_event_loop()
        self.addCleanup(self.loop.close)
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.authority = FakeCertificateAuthority(
            make_bundle(), SentryConfig(mtls=MTLS)
        )

    def sign(self, validator, **fields):
        servicer = CAServicer(
            self.reactor,
            self.authority,
            {validator.name: validator},
            validator.name,
            SentryMetrics(),
        )
        values = dict(
            id="myapp",
            token="",
            trust_domain="",
            namespace="default",
            csr=csr_asking_for_images(self.key),
            token_validator=validator.name,
        )
        values.update(fields)
        deadline = self.reactor.seconds() + VALIDATION_TIMEOUT_SECONDS
        response = self.loop.run_until_complete(
            servicer.sign(SignRequest(**values), deadline)
        )
        return x509.load_pem_x509_certificates(response.workload_certificate)[0]

    def test_insecure(self):
        """
        An INSECURE caller's leaf has no images extension.
        """
        leaf = self.sign(InsecureValidator())
        self.assertEqual(
            leaf.extensions[-1].oid, x509.oid.ExtensionOID.AUTHORITY_KEY_IDENTIFIER
        )
        self.assertIsNone(images_extension(leaf))

    def test_jwks(self):
        """
        A JWKS caller's leaf has no images extension.
        """
        jwk = pyjwt.algorithms.ECAlgorithm.to_jwk(self.key.public_key(), as_dict=True)
        jwk.update(kid="k1", use="sig")
        validator = JWKSValidator(
            self.reactor,
            JWKSOptions(source=json.dumps({"keys": [jwk]})),
            SENTRY_ID,
            file_work=inline_file_work(self.reactor),
        )
        validator.startService()
        self.addCleanup(validator.stopService)
        now = int(self.reactor.seconds())
        token = pyjwt.encode(
            {
                "sub": "spiffe://public/ns/default/myapp",
                "aud": [SENTRY_ID],
                "iat": now,
                "exp": now + 600,
            },
            self.key,
            algorithm="ES256",
            headers={"kid": "k1"},
        )
        leaf = self.sign(validator, token=token)
        self.assertIsNone(images_extension(leaf))
