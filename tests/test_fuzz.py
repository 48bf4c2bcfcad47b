"""
Property-based tests (hypothesis) of the whole SignCertificate path.

Most examples go through L{CAServicer.sign} with the real
L{InsecureValidator}, a real bundle and an L{ImmediateReactor}, after a
round trip through the protobuf wire format; fewer go through a real gRPC
server on 127.0.0.1 with a real client.  The inputs are hostile: random
bytes, truncations, bit flips, repeated blocks, huge and non-ASCII strings,
NUL bytes, C{/} and C{..}, in every field and in the PEM and DER of the CSR.

The invariants, checked against an oracle written here from SPEC section 5
(not from L{sentry_tx.identity.rules}):

  - a caller's mistake is INVALID_ARGUMENT or PERMISSION_DENIED, with the
    status and message the spec gives, never INTERNAL or UNKNOWN (and over
    gRPC, RESOURCE_EXHAUSTED exactly when the message is over the limit);
  - nothing is signed unless every rule passed and the CSR is a valid,
    supported one;
  - a signed certificate's URI SAN parses back to exactly
    C{spiffe://<trust domain>/ns/<namespace>/<id>} of the request (trust
    domain C{public} when it named none), for the CSR's public key, signed
    by the issuer;
  - every call is counted once, under the right reason.

Profiles (L{sentry_tx.testing.hypothesis_profiles}): C{ci} by default; for a long run::

    HYPOTHESIS_PROFILE=long .venv/bin/python -m twisted.trial tests.test_fuzz

which also prints, at exit, how many examples each property ran and their
outcomes.
"""

import atexit
import base64
import collections
import functools
import re
import sys
import unicodedata
import warnings
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from hypothesis import example, given, note, settings
from hypothesis import strategies as st
from hypothesis.errors import HypothesisWarning
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from sentry_tx._proto import sentry_pb2
from sentry_tx.config import MTLSConfig, SentryConfig
from sentry_tx.identity.caller import VALIDATOR_INSECURE, SignRequest
from sentry_tx.identity.insecure import InsecureValidator
from sentry_tx.metrics import SentryMetrics
from sentry_tx.server.service import MAX_REQUEST_BYTES, CertificateAuthorityService
from sentry_tx.server.servicer import CAServicer, Refusal
from sentry_tx.testing import hypothesis_profiles
from sentry_tx.testing.authority import FakeCertificateAuthority, FakeTrustStore
from sentry_tx.testing.certificates import (
    FIXED_NOW,
    flip_bit,
    make_bundle,
    make_chain,
    make_csr,
    pem_encode,
    public_key_der,
)
from sentry_tx.testing.clocks import ImmediateReactor
from sentry_tx.testing.grpc_client import AbortingContext, GrpcTestClient, run_now
from sentry_tx.testing.hypothesis_profiles import show_notes

OK = grpc.StatusCode.OK
INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT
PERMISSION_DENIED = grpc.StatusCode.PERMISSION_DENIED
RESOURCE_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED

SIGN_METHOD = "/dapr.proto.sentry.v1.CA/SignCertificate"
OWN_NAMESPACE = "dapr-system"
SERVER_NAME = f"dapr-sentry.{OWN_NAMESPACE}.svc"
DEFAULT_TRUST_DOMAIN = "public"

# Examples hold strings of up to 200 kB on purpose.
warnings.filterwarnings("ignore", "Generating overly large repr", HypothesisWarning)

# What each property ran, by outcome (status code name), and the generated
# inputs it skipped; printed at exit under a profile longer than ci.
EXAMPLES = collections.defaultdict(collections.Counter)


def _report_examples():
    if settings.default.max_examples <= hypothesis_profiles.CI_MAX_EXAMPLES:
        return
    if not EXAMPLES:
        return
    print("\nfuzz examples run, by property and outcome:", file=sys.stderr)
    total = 0
    for name in sorted(EXAMPLES):
        counts = EXAMPLES[name]
        ran = sum(counts.values())
        total += ran
        outcomes = ", ".join(f"{key} {value}" for key, value in sorted(counts.items()))
        print(f"  {name}: {ran} ({outcomes})", file=sys.stderr)
    print(f"  total: {total}", file=sys.stderr)


atexit.register(_report_examples)


# The oracle: SPEC section 5, steps 1-3, written out again.

_APP_ID = re.compile(r"[A-Za-z0-9_-]*")
_NAMESPACE = re.compile(r"[A-Za-z0-9._-]+")
_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]*")
CSR_MESSAGES = (
    "invalid certificate signing request",
    "invalid signature",
    "unsupported public key",
)
CSR_PARSE_PREFIX = "failed to parse certificate signing request: "


def expected_shape_refusal(audiences):
    """
    The C{(code, message)} the request-shape check (before step 1) ends a
    request with C{audiences} with, or None: at most 15 entries, each
    non-empty, at most 1024 UTF-8 bytes, and printable.
    """
    if len(audiences) > 15:
        return INVALID_ARGUMENT, (
            f"too many JWT audiences ({len(audiences)}; at most 15,"
            " the trust domain is added to them)"
        )
    for audience in audiences:
        if audience == "":
            return INVALID_ARGUMENT, "a JWT audience must not be empty"
        if len(audience.encode("utf-8")) > 1024:
            return INVALID_ARGUMENT, "a JWT audience is longer than 1024 bytes"
        if not all(_printable(character) for character in audience):
            return INVALID_ARGUMENT, "a JWT audience must be printable text"
    return None


def _printable(character):
    # Not a control, format, surrogate, private-use or unassigned code
    # point, and not a separator other than the space.
    category = unicodedata.category(character)
    return character == " " or category[0] not in "CZ"


def expected_refusal(request, enabled=(0, VALIDATOR_INSECURE)):
    """
    The C{(code, message)} the shape check and SPEC section 5 steps 1 and
    2 end C{request} with, or None when they pass it on to the CSR.
    """
    shape = expected_shape_refusal(request.jwt_audiences)
    if shape is not None:
        return shape
    if request.token_validator not in enabled:
        return INVALID_ARGUMENT, "the requested validator is not enabled"
    problems = []
    app_id, namespace = request.id, request.namespace
    if not app_id:
        problems.append("parameter app-id cannot be empty")
    else:
        if "." in app_id:
            problems.append("parameter app-id cannot contain dots")
        if len(app_id) > 64:
            problems.append("app ID must be 64 characters or less")
        # Dots have their own message above.
        if not _APP_ID.fullmatch(app_id.replace(".", "")):
            problems.append("parameter app-id contains invalid characters")
    if not request.csr:
        problems.append("CSR is required")
    if not namespace:
        problems.append("namespace is required")
    elif (
        len(namespace) > 63
        or namespace in (".", "..")
        or not _NAMESPACE.fullmatch(namespace)
    ):
        problems.append("parameter namespace is invalid")
    if problems:
        return PERMISSION_DENIED, "invalid request: " + "\n".join(problems)
    trust_domain = request.trust_domain or DEFAULT_TRUST_DOMAIN
    if not _TRUST_DOMAIN.fullmatch(trust_domain):
        return PERMISSION_DENIED, (
            "trust domain characters are limited to lowercase letters, "
            "numbers, dots, dashes, and underscores"
        )
    if len(trust_domain.encode("utf-8")) > 255:
        return PERMISSION_DENIED, "trust domain is too long"
    return None


def _is_supported(key):
    if isinstance(key, ec.EllipticCurvePublicKey):
        return key.curve.name in ("secp256r1", "secp384r1", "secp521r1")
    if isinstance(key, rsa.RSAPublicKey):
        return key.key_size >= 2048
    return isinstance(key, ed25519.Ed25519PublicKey)


def first_block_csr_key(data):
    """
    The SubjectPublicKeyInfo DER of the CSR in the first PEM block of
    C{data}, if that block is labelled C{CERTIFICATE REQUEST} or
    C{CERTIFICATE}, decodes, parses, has a valid signature and a supported
    key; else None.  A signed leaf must be for this key.
    """
    lines = [line.strip() for line in data.split(b"\n")]
    index = next(
        (
            i
            for i, line in enumerate(lines)
            if line.startswith(b"-----BEGIN ") and line.endswith(b"-----")
        ),
        None,
    )
    if index is None:
        return None
    line = lines[index]
    label = line[len(b"-----BEGIN ") : -len(b"-----")]
    if label not in (b"CERTIFICATE REQUEST", b"CERTIFICATE"):
        return None
    body = []
    for line in lines[index + 1 :]:
        if line.startswith(b"-----END "):
            break
        if line and b":" not in line:
            body.append(line)
    else:
        return None
    try:
        csr = x509.load_der_x509_csr(base64.b64decode(b"".join(body), validate=True))
        key = csr.public_key()
        if not (csr.is_signature_valid and _is_supported(key)):
            return None
    except Exception:
        return None
    return public_key_der(key)


def spiffe_id_parts(uri):
    """
    C{(trust domain, namespace, id)} of C{spiffe://<td>/ns/<ns>/<id>}, or
    None if C{uri} is not exactly of that form.
    """
    prefix = "spiffe://"
    if not uri.startswith(prefix):
        return None
    parts = uri[len(prefix) :].split("/")
    if len(parts) != 4 or parts[1] != "ns":
        return None
    return parts[0], parts[2], parts[3]


def expected_dns_names(request):
    """
    The DNS SANs SPEC section 7 gives a leaf for C{request}.
    """
    namespace, app_id = request.namespace, request.id
    trust_domain = request.trust_domain or DEFAULT_TRUST_DOMAIN
    if namespace != OWN_NAMESPACE:
        return []
    return {
        "dapr-injector": [f"dapr-sidecar-injector.{namespace}.svc"],
        "dapr-operator": [f"dapr-webhook.{namespace}.svc"],
        "dapr-scheduler": [
            f"dapr-scheduler-server-{n}.dapr-scheduler-server.{namespace}.svc."
            f"{trust_domain}"
            for n in range(3)
        ],
    }.get(app_id, [])


def check_signed(test, request, response, bundle):
    """
    Every invariant of a signed answer to C{request}.
    """
    test.assertIsNone(expected_refusal(request), "signed a refused request")
    chain = x509.load_pem_x509_certificates(response.workload_certificate)
    leaf = chain[0]
    test.assertEqual(chain[1:], list(bundle.issuer_chain))
    test.assertEqual(list(response.trust_chain_certificates), [bundle.anchors_pem])
    leaf.verify_directly_issued_by(bundle.issuer)
    test.assertEqual(
        public_key_der(leaf.public_key()),
        first_block_csr_key(request.csr),
        "signed a key that is not the first block's valid CSR's",
    )
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    test.assertTrue(san.critical)
    uris = san.value.get_values_for_type(x509.UniformResourceIdentifier)
    test.assertEqual(len(uris), 1)
    test.assertEqual(
        spiffe_id_parts(uris[0]),
        (
            request.trust_domain or DEFAULT_TRUST_DOMAIN,
            request.namespace,
            request.id,
        ),
    )
    test.assertEqual(
        san.value.get_values_for_type(x509.DNSName), expected_dns_names(request)
    )
    test.assertEqual(len(list(san.value)), 1 + len(expected_dns_names(request)))
    test.assertEqual(leaf.subject, x509.Name([]))
    constraints = leaf.extensions.get_extension_for_class(x509.BasicConstraints)
    test.assertFalse(constraints.value.ca)
    test.assertEqual(
        response.valid_until.ToDatetime(tzinfo=UTC),
        leaf.not_valid_after_utc,
    )


def check_refused(test, request, code, message, csr_sample=None):
    """
    Every invariant of a refusal of C{request} with C{code} and C{message}.
    """
    expected = expected_refusal(request)
    if expected is not None:
        test.assertEqual((code, message), expected)
        return
    # Steps 1-2 passed: only the CSR can be at fault.
    test.assertEqual(code, INVALID_ARGUMENT, message)
    test.assertTrue(
        message in CSR_MESSAGES or message.startswith(CSR_PARSE_PREFIX), message
    )
    if csr_sample is not None and csr_sample.expected_error is None:
        test.fail(f"an untouched valid CSR was refused: {message}")
    if csr_sample is not None:
        test.assertTrue(
            message == csr_sample.expected_error
            or message.startswith(csr_sample.expected_error),
            message,
        )


# Inputs.

_SPECIAL_STRINGS = (
    "",
    ".",
    "..",
    "...",
    "/",
    "//",
    "../",
    "/..",
    "a/b",
    "../../etc/passwd",
    "%2e%2e",
    "%2F",
    "\x00",
    "a\x00",
    "\x00a",
    "\n",
    "a\n",
    "a\r\n",
    " ",
    "a b",
    "\t",
    "-",
    "_",
    "a.b",
    "a..b",
    ".a",
    "a.",
    "A",
    "a",
    "0",
    "\u00e9",
    "\u00df",
    "\u0130",
    "\u212a",
    "\uff41",
    "\u0430",
    "\u202e",
    "\u200b",
    "\ufeff",
    "\U0001f600",
    "spiffe://evil/ns/x/y",
    "x/ns/y",
    "#",
    "?",
    "@",
    ":",
    "*",
    "%",
    "\\",
    "dapr-sentry",
    "dapr-operator",
    "dapr-injector",
    "dapr-scheduler",
    "dapr-placement",
    "default",
    OWN_NAMESPACE,
    DEFAULT_TRUST_DOMAIN,
    "example.org",
    "cluster.local",
    "localhost",
)

_ID_ALPHABET = "abcXYZ019_-"
_NAMESPACE_ALPHABET = "abcXYZ019_-."
_TRUST_DOMAIN_ALPHABET = "abcxyz019_-."

special_strings = st.sampled_from(_SPECIAL_STRINGS)
huge_strings = st.builds(
    lambda unit, count: unit * count,
    st.sampled_from(["a", "\u00e9", "\x00", "../", "ab-", "A", "/"]),
    st.integers(min_value=60, max_value=70_000),
)
hostile_text = st.one_of(
    special_strings,
    st.text(max_size=40),
    st.lists(special_strings, min_size=2, max_size=6).map("".join),
    huge_strings,
)


def _near_valid(alphabet, boundary):
    """
    Strings of C{alphabet} of any size up to just past C{boundary}, and runs
    of one character right around it.
    """
    return st.one_of(
        st.text(alphabet=alphabet, max_size=boundary + 3),
        st.builds(
            lambda character, count: character * count,
            st.sampled_from(alphabet),
            st.integers(min_value=boundary - 2, max_value=boundary + 2),
        ),
    )


hostile_characters = st.one_of(
    st.sampled_from([text for text in _SPECIAL_STRINGS if len(text) == 1]),
    st.characters(),
)


def _one_hostile(valid):
    """
    A string of C{valid} with one hostile character put in, often at an
    end (where an anchored pattern is weakest).
    """

    def put(text, character, where):
        at = len(text) if where == "end" else where % (len(text) + 1)
        return text[:at] + character + text[at:]

    return st.builds(
        put,
        valid,
        hostile_characters,
        st.one_of(st.just(0), st.just("end"), st.integers(0, 300)),
    )


app_ids = st.one_of(
    hostile_text,
    _near_valid(_ID_ALPHABET, 64),
    _one_hostile(st.text(alphabet=_ID_ALPHABET, min_size=1, max_size=64)),
)
namespaces = st.one_of(
    hostile_text,
    _near_valid(_NAMESPACE_ALPHABET, 63),
    _one_hostile(st.text(alphabet=_NAMESPACE_ALPHABET, min_size=1, max_size=63)),
)
trust_domains = st.one_of(
    hostile_text,
    _near_valid(_TRUST_DOMAIN_ALPHABET, 255),
    _one_hostile(st.text(alphabet=_TRUST_DOMAIN_ALPHABET, max_size=255)),
    st.just(""),
)
token_validators = st.one_of(
    st.just(0),
    st.just(VALIDATOR_INSECURE),
    st.sampled_from([2, 3]),
    st.integers(min_value=-(2**31), max_value=2**31 - 1),
)

valid_app_ids = st.text(alphabet=_ID_ALPHABET, min_size=1, max_size=64)
valid_namespaces = st.one_of(
    st.text(alphabet=_NAMESPACE_ALPHABET, min_size=1, max_size=63).filter(
        lambda namespace: namespace not in (".", "..")
    ),
    st.sampled_from(["default", OWN_NAMESPACE]),
)
valid_trust_domains = st.one_of(
    st.text(alphabet=_TRUST_DOMAIN_ALPHABET, max_size=255),
    st.sampled_from(["", "public", "example.org", ".."]),
)
control_plane_ids = st.sampled_from(
    ["dapr-injector", "dapr-operator", "dapr-scheduler", "dapr-sentry"]
)


@dataclass(frozen=True)
class CSRSample:
    """
    A CSR the mutations start from.

    @ivar expected_error: the message it is refused with untouched, or None
        when it is valid.
    """

    name: str
    pem: bytes
    der: bytes
    label: str
    expected_error: object


@functools.cache
def csr_samples():
    """
    Valid CSRs of every supported key type and label, and refused ones.
    """
    samples = []

    def add(name, key, label="CERTIFICATE REQUEST", error=None, **options):
        _, pem = make_csr(key, label=label, **options)
        der = base64.b64decode(b"".join(pem.split(b"\n")[1:-2]))
        samples.append(CSRSample(name, pem, der, label, error))

    for key_type in ("ecdsa-p256", "ecdsa-p384", "ecdsa-p521", "ed25519", "rsa-2048"):
        add(key_type, key_type)
    add("old-label", "ecdsa-p256", label="CERTIFICATE")
    add("p192", "ecdsa-p192", error="unsupported public key")
    add("rsa-1024", "rsa-1024", error="unsupported public key")
    add(
        "bad-signature", "ecdsa-p256", error="invalid signature", corrupt_signature=True
    )
    certificate = make_bundle().issuer
    der = certificate.public_bytes(serialization.Encoding.DER)
    samples.append(
        CSRSample(
            "a-certificate",
            pem_encode("CERTIFICATE", der),
            der,
            "CERTIFICATE",
            CSR_PARSE_PREFIX,
        )
    )
    return tuple(samples)


_LABELS = (
    "CERTIFICATE REQUEST",
    "CERTIFICATE",
    "NEW CERTIFICATE REQUEST",
    "PRIVATE KEY",
    "certificate request",
    "",
    "CERTIFICATE REQUEST ",
)


@dataclass(frozen=True)
class CSRInput:
    """
    The bytes sent as C{certificate_signing_request}, and what they came
    from (C{sample} is None unless they are a sample untouched).
    """

    data: bytes
    operation: str
    sample: object


def _position(draw, data):
    return draw(st.integers(min_value=0, max_value=max(len(data) - 1, 0)))


@st.composite
def csr_inputs(draw, allow_huge=True):
    """
    A CSR sample, untouched or mutated in its PEM or its DER.
    """
    sample = draw(st.sampled_from(csr_samples()))
    pem, der = sample.pem, sample.der
    operations = [
        "as-is",
        "truncate",
        "drop-prefix",
        "flip-bit",
        "repeat-slice",
        "insert-bytes",
        "der-truncate",
        "der-flip-bit",
        "der-repeat-slice",
        "crlf",
        "no-newlines",
        "junk-before",
        "two-blocks",
        "relabel",
        "nul-bytes",
        "raw-der",
        "random",
        "empty",
    ]
    if allow_huge:
        operations.append("huge")
    operation = draw(st.sampled_from(operations))
    if operation == "as-is":
        return CSRInput(pem, operation, sample)
    if operation == "truncate":
        data = pem[: _position(draw, pem)]
    elif operation == "drop-prefix":
        data = pem[_position(draw, pem) + 1 :]
    elif operation == "flip-bit":
        at, bit = _position(draw, pem), draw(st.integers(0, 7))
        data = flip_bit(pem, at, bit)
    elif operation == "repeat-slice":
        start = _position(draw, pem)
        end = draw(st.integers(min_value=start, max_value=len(pem)))
        times = draw(st.integers(min_value=2, max_value=20))
        data = pem[:start] + pem[start:end] * times + pem[end:]
    elif operation == "insert-bytes":
        at = _position(draw, pem)
        data = pem[:at] + draw(st.binary(min_size=1, max_size=64)) + pem[at:]
    elif operation.startswith("der-"):
        at = _position(draw, der)
        if operation == "der-truncate":
            mutated = der[:at]
        elif operation == "der-flip-bit":
            bit = draw(st.integers(0, 7))
            mutated = flip_bit(der, at, bit)
        else:
            end = draw(st.integers(min_value=at, max_value=len(der)))
            times = draw(st.integers(min_value=2, max_value=20))
            mutated = der[:at] + der[at:end] * times + der[end:]
        data = pem_encode(sample.label, mutated)
    elif operation == "crlf":
        data = pem.replace(b"\n", b"\r\n")
    elif operation == "no-newlines":
        data = pem.replace(b"\n", b"")
    elif operation == "junk-before":
        junk = draw(
            st.one_of(
                st.just(b"# a comment\n\n"),
                st.binary(max_size=64),
                st.sampled_from(
                    [b"-----BEGIN X-----\n", b"-----END CERTIFICATE-----\n"]
                ),
            )
        )
        data = junk + pem
    elif operation == "two-blocks":
        other = draw(st.sampled_from(csr_samples())).pem
        data = draw(st.sampled_from([pem + other, other + pem]))
    elif operation == "relabel":
        data = pem_encode(draw(st.sampled_from(_LABELS)), der)
    elif operation == "nul-bytes":
        at = _position(draw, pem)
        data = pem[:at] + b"\x00" * draw(st.integers(1, 4)) + pem[at:]
    elif operation == "raw-der":
        data = der
    elif operation == "random":
        data = draw(st.binary(max_size=2048))
    elif operation == "empty":
        data = b""
    else:
        data = pem * (MAX_REQUEST_BYTES // len(pem) + draw(st.integers(0, 2)))
    return CSRInput(data, operation, sample if data == pem else None)


def _request_message(app_id, namespace, trust_domain, csr, validator, token, audiences):
    return sentry_pb2.SignCertificateRequest(
        id=app_id,
        token=token,
        trust_domain=trust_domain,
        namespace=namespace,
        certificate_signing_request=csr,
        token_validator=validator,
        jwt_audiences=audiences,
    )


request_messages = st.builds(
    lambda app_id, namespace, trust_domain, csr, validator, token, audiences: (
        _request_message(
            app_id, namespace, trust_domain, csr.data, validator, token, audiences
        ),
        csr,
    ),
    app_ids,
    namespaces,
    trust_domains,
    csr_inputs(),
    token_validators,
    st.one_of(st.just(""), hostile_text),
    st.one_of(
        st.lists(hostile_text, max_size=3),
        # Around the count limit, duplicates included.
        st.lists(st.sampled_from(["a", "b", "public"]), min_size=14, max_size=17),
    ),
)


def _varint(value):
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


@st.composite
def wire_fields(draw):
    """
    One protobuf field on the wire: a known or unknown number, with the
    right or a wrong wire type, and a hostile value.
    """
    number = draw(
        st.one_of(st.integers(1, 8), st.integers(9, 2**29 - 1))
    )
    wire_type = draw(st.sampled_from([0, 1, 2, 5]))
    key = _varint((number << 3) | wire_type)
    if wire_type == 0:
        return key + _varint(draw(st.integers(0, 2**64 - 1)))
    if wire_type == 1:
        return key + draw(st.binary(min_size=8, max_size=8))
    if wire_type == 5:
        return key + draw(st.binary(min_size=4, max_size=4))
    value = draw(
        st.one_of(
            hostile_text.map(lambda text: text.encode("utf-8")),
            st.binary(max_size=256),
            csr_inputs(allow_huge=False).map(lambda csr: csr.data),
        )
    )
    return key + _varint(len(value)) + value


wire_messages = st.builds(
    lambda base, fields: base + b"".join(fields),
    st.one_of(
        st.just(b""),
        request_messages.map(lambda pair: pair[0].SerializeToString()),
    ),
    st.lists(wire_fields(), max_size=6),
)


def _parse(wire):
    """
    The C{SignCertificateRequest} C{wire} decodes to, or None.
    """
    try:
        return sentry_pb2.SignCertificateRequest.FromString(wire)
    except Exception:
        return None


def _describe(request):
    """
    C{request} for a falsifying example's notes, long fields shortened.
    """

    def short(value):
        if len(value) <= 200:
            return repr(value)
        return f"{value[:100]!r}...({len(value)} long)...{value[-100:]!r}"

    return ", ".join(
        f"{name}={short(getattr(request, name))}"
        for name in ("id", "namespace", "trust_domain", "csr")
    ) + f", token_validator={request.token_validator}"


# The servicer, as in production but for the clock and the thread.


def _counts(metrics):
    failure = metrics.sign_failure
    return (
        metrics.sign_request_received._value.get(),
        metrics.sign_success._value.get(),
        failure.labels(reason="validator")._value.get(),
        failure.labels(reason="cert_parse")._value.get(),
        failure.labels(reason="cert_sign")._value.get(),
    )


@functools.cache
def _bundle():
    return make_bundle()


class ServicerFuzzTests(SynchronousTestCase):
    """
    L{CAServicer.sign} with the real INSECURE validator under hostile input.
    """

    def sign(self, message, csr=None, property_name=None):
        """
        Run C{message} through a fresh servicer and check every invariant.

        @return: the status code the call ended with.
        """
        bundle = _bundle()
        metrics = SentryMetrics()
        servicer = CAServicer(
            ImmediateReactor(FIXED_NOW.timestamp()),
            FakeCertificateAuthority(
                bundle,
                SentryConfig(
                    namespace=OWN_NAMESPACE,
                    mtls=MTLSConfig(workload_cert_ttl=timedelta(hours=1)),
                ),
            ),
            {VALIDATOR_INSECURE: InsecureValidator()},
            VALIDATOR_INSECURE,
            metrics,
        )
        # The wire round trip: what a servicer in grpcio receives.
        request = SignRequest.from_proto(
            sentry_pb2.SignCertificateRequest.FromString(message.SerializeToString())
        )
        note(f"request: {_describe(request)}")
        try:
            response = run_now(servicer.sign(request, FIXED_NOW.timestamp() + 10))
        except Refusal as refusal:
            check_refused(
                self,
                request,
                refusal.code,
                refusal.message,
                csr.sample if csr is not None else None,
            )
            reason = "cert_parse" if expected_refusal(request) is None else "validator"
            expected_counts = (
                1,
                0,
                int(reason == "validator"),
                int(reason == "cert_parse"),
                0,
            )
            self.assertEqual(_counts(metrics), expected_counts)
            code = refusal.code
        else:
            check_signed(self, request, response, bundle)
            self.assertEqual(_counts(metrics), (1, 1, 0, 0, 0))
            code = OK
        if property_name is not None:
            EXAMPLES[property_name][code.name] += 1
        return code

    @show_notes
    @given(request_messages)
    def test_hostile_requests(self, pair):
        """
        Hostile requests are signed only if every rule passed, else refused per spec.
        """
        message, csr = pair
        self.sign(message, csr, "servicer: hostile requests")

    @show_notes
    @given(
        valid_app_ids,
        valid_namespaces,
        valid_trust_domains,
        csr_inputs(allow_huge=False),
        st.sampled_from([0, VALIDATOR_INSECURE]),
    )
    def test_valid_parts_hostile_csr(
        self, app_id, namespace, trust_domain, csr, validator
    ):
        """With valid names only the CSR decides; an untouched valid one is signed."""
        message = _request_message(
            app_id, namespace, trust_domain, csr.data, validator, "", []
        )
        code = self.sign(message, csr, "servicer: valid parts, hostile CSR")
        if csr.sample is not None and csr.sample.expected_error is None:
            self.assertEqual(code, OK)

    @show_notes
    @given(app_ids, namespaces, trust_domains, st.sampled_from([0, VALIDATOR_INSECURE]))
    @example("myapp\n", "default", "", 0)
    @example("myapp", "default\n", "", 0)
    @example("myapp", "default", "example.org\n", 0)
    @example("a" * 64, "b" * 63, "c" * 255, 0)
    @example("a" * 65, "b" * 64, "c" * 256, 1)
    @example("my.app", "..", "..", 0)
    @example("\x00", "a/b", "A", 0)
    @example("\uff4dyapp", "default", "\u212a", 0)
    def test_hostile_names_valid_csr(self, app_id, namespace, trust_domain, validator):
        """
        With a valid CSR, hostile names are signed exactly when the rules pass them.
        """
        message = _request_message(
            app_id, namespace, trust_domain, csr_samples()[0].pem, validator, "", []
        )
        code = self.sign(message, None, "servicer: hostile names, valid CSR")
        if expected_refusal(SignRequest.from_proto(message)) is None:
            self.assertEqual(code, OK)

    @show_notes
    @given(
        control_plane_ids,
        st.sampled_from([OWN_NAMESPACE, "default", "x"]),
        valid_trust_domains,
    )
    def test_control_plane_names(self, app_id, namespace, trust_domain):
        """Control-plane ids get DNS names only in sentry_tx's own namespace."""
        message = _request_message(
            app_id, namespace, trust_domain, csr_samples()[0].pem, 0, "", []
        )
        code = self.sign(message, None, "servicer: control-plane names")
        self.assertEqual(code, OK)

    @show_notes
    @given(wire_messages)
    def test_hostile_wire_messages(self, wire):
        """
        Any wire bytes get only the spec's statuses; bytes that are not a request are
        INVALID_ARGUMENT.
        """
        message = _parse(wire)
        if message is not None:
            self.sign(message, None, "servicer: wire messages")
            return
        metrics = SentryMetrics()
        servicer = CAServicer(
            ImmediateReactor(FIXED_NOW.timestamp()),
            FakeCertificateAuthority(_bundle()),
            {VALIDATOR_INSECURE: InsecureValidator()},
            VALIDATOR_INSECURE,
            metrics,
        )
        context = AbortingContext()
        self.assertRaises(
            AbortingContext.Aborted,
            run_now,
            servicer.SignCertificateMessage(wire, context),
        )
        EXAMPLES["servicer: wire messages"][context.code.name] += 1
        self.assertEqual(context.code, INVALID_ARGUMENT, context.details)
        self.assertTrue(context.details.startswith("failed to parse request: "))
        self.assertEqual(metrics.sign_request_received._value.get(), 1)
        self.assertEqual(metrics.sign_success._value.get(), 0)


class GrpcFuzzTests(TestCase):
    """
    The same invariants through a real gRPC server and client: fewer
    examples, each a real TLS call.
    """

    @inlineCallbacks
    def setUp(self):
        from twisted.internet import reactor

        now = datetime.fromtimestamp(reactor.seconds(), UTC)
        self.bundle = make_chain(
            not_before=now - timedelta(days=1), not_after=now + timedelta(days=30)
        ).load(now)
        self.config = SentryConfig(
            trust_domain="cluster.local",
            listen_address="127.0.0.1",
            port=0,
            namespace=OWN_NAMESPACE,
            mtls=MTLSConfig(workload_cert_ttl=timedelta(hours=1)),
        )
        self.ca = CertificateAuthorityService(
            self.config,
            reactor,
            FakeTrustStore(self.bundle),
            {VALIDATOR_INSECURE: InsecureValidator()},
            VALIDATOR_INSECURE,
            SentryMetrics(),
        )
        yield self.ca.start(self.config)
        self.addCleanup(self.ca.stop)
        self.client = GrpcTestClient(
            f"127.0.0.1:{self.ca.port}", self.bundle.anchors_pem, SERVER_NAME
        )
        self.addCleanup(self.client.close)
        # A channel without the protobuf serializer, for raw request bytes.
        channel = grpc.secure_channel(
            self.client.target,
            grpc.ssl_channel_credentials(root_certificates=self.bundle.anchors_pem),
            options=[("grpc.ssl_target_name_override", SERVER_NAME)],
        )
        self.addCleanup(channel.close)
        self.raw_call = channel.unary_unary(SIGN_METHOD)

    def call(self, message, csr=None, property_name=None):
        """
        Send C{message} (blocking: in a thread) and check every invariant.
        """
        try:
            response = self.client.sign(message, timeout=10)
        except grpc.RpcError as error:
            code, details = error.code(), error.details()
        else:
            code, details = OK, None
        EXAMPLES[property_name][code.name] += 1
        self.check(message, code, details, response if code == OK else None, csr)

    def check(self, message, code, details, response, csr=None):
        """
        The invariants of one answer over gRPC.
        """
        if message.ByteSize() > MAX_REQUEST_BYTES:
            self.assertEqual(code, RESOURCE_EXHAUSTED, details)
            return
        request = SignRequest.from_proto(message)
        if code == OK:
            check_signed(self, request, response, self.bundle)
        else:
            check_refused(
                self, request, code, details, csr.sample if csr is not None else None
            )

    def run_property(self, strategy, test, fraction):
        """
        Run C{test} for examples of C{strategy} in a worker thread, where
        blocking gRPC calls belong.
        """

        @show_notes
        @settings(max_examples=hypothesis_profiles.scaled_examples(fraction))
        @given(strategy)
        def run(example):
            test(example)

        return deferToThread(run)

    def test_hostile_requests(self):
        """
        Over gRPC, hostile requests get the spec's statuses (or RESOURCE_EXHAUSTED).
        """
        return self.run_property(
            request_messages,
            lambda pair: self.call(pair[0], pair[1], "grpc: hostile requests"),
            0.25,
        )

    def test_hostile_wire_messages(self):
        """
        Over gRPC, raw bytes never get INTERNAL or UNKNOWN; bytes that are not a request
        are INVALID_ARGUMENT.
        """

        def send(wire):
            message = _parse(wire)
            try:
                answer = self.raw_call(wire, timeout=10)
            except grpc.RpcError as error:
                code, details, response = error.code(), error.details(), None
            else:
                code, details = OK, None
                response = sentry_pb2.SignCertificateResponse.FromString(answer)
            EXAMPLES["grpc: wire messages"][code.name] += 1
            if len(wire) > MAX_REQUEST_BYTES:
                self.assertEqual(code, RESOURCE_EXHAUSTED, details)
            elif message is None:
                self.assertEqual(code, INVALID_ARGUMENT, details)
            else:
                self.check(message, code, details, response)

        return self.run_property(wire_messages, send, 0.25)


