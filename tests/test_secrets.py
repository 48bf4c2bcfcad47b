"""
Tests that the issuer's private key never leaves sentry_tx: not in a log
event, not in a response, not in an exception message; that a generated
root key is never written; and that a failed generation leaves no partial
bundle behind.

Key file and directory modes (0600, 0700) and the warning for a key file
others can read are tested in tests/test_store.py (GenerationTests.
test_modes, test_modes_despite_umask; FailClosedTests.
test_loose_key_mode_warns).
"""

import base64
import dataclasses
import errno
import os
from datetime import timedelta

import grpc
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from sentry_tx._proto import sentry_pb2
from sentry_tx.ca.bundle import load_bundle
from sentry_tx.ca.store import FileTrustStore
from sentry_tx.config import SentryConfig
from sentry_tx.errors import BundleError, ValidationError, ValidatorUnavailableError
from sentry_tx.identity.caller import (
    VALIDATOR_INSECURE,
    VALIDATOR_JWKS,
    VALIDATOR_KUBERNETES,
)
from sentry_tx.identity.insecure import InsecureValidator
from sentry_tx.metrics import SentryMetrics
from sentry_tx.server.service import CertificateAuthorityService
from sentry_tx.server.servicer import CAServicer, Refusal
from sentry_tx.testing.authority import FakeCertificateAuthority, FakeValidator
from sentry_tx.testing.certificates import (
    FIXED_NOW,
    flip_bit,
    make_chain,
    make_csr,
    pem_encode,
    sign_request,
)
from sentry_tx.testing.clocks import ImmediateReactor
from sentry_tx.testing.grpc_client import GrpcTestClient
from sentry_tx.testing.hypothesis_profiles import show_notes

PEM_KEY_LABEL = "PRIVATE KEY"
WINDOW_CHARACTERS = 16
NAMES = ("ca.crt", "issuer.crt", "issuer.key")


class KeyMaterial:
    """
    Every form in which an ECDSA private key could leak: its PEM documents
    (PKCS#8 and SEC1), its private number in decimal and hex, and any 16
    characters of the base64 of those documents or 32 of the hex of their
    DER that encode only bytes of the private number (the rest of a key
    document, like the curve's OID and the public key, is public).
    """

    def __init__(self, key):
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        value = key.private_numbers().private_value
        scalar = value.to_bytes((key.curve.key_size + 7) // 8, "big")
        self._whole = [str(value), f"{value:x}"]
        self._windows = set()
        for private_format in (
            serialization.PrivateFormat.PKCS8,
            serialization.PrivateFormat.TraditionalOpenSSL,
        ):
            self._whole.append(
                key.private_bytes(
                    serialization.Encoding.PEM,
                    private_format,
                    serialization.NoEncryption(),
                ).decode("ascii")
            )
            der = key.private_bytes(
                serialization.Encoding.DER, private_format, serialization.NoEncryption()
            )
            start = der.index(scalar)
            end = start + len(scalar)
            # Base64 characters 4k..4k+3 encode bytes 3k..3k+2.
            body = base64.b64encode(der).decode("ascii")
            first, last = -(-start // 3) * 4, end // 3 * 4
            self._add_windows(body[first:last], WINDOW_CHARACTERS)
            self._add_windows(der[start:end].hex(), 2 * WINDOW_CHARACTERS)

    def _add_windows(self, text, width):
        for start in range(len(text) - width + 1):
            self._windows.add(text[start : start + width])

    def found_in(self, text):
        """
        What of the key C{text} (C{str} or C{bytes}) contains, or None.
        """
        if isinstance(text, bytes):
            text = text.decode("latin-1")
        for whole in self._whole:
            if whole in text:
                return whole
        for start in range(len(text) - WINDOW_CHARACTERS + 1):
            window = text[start : start + WINDOW_CHARACTERS]
            if window in self._windows:
                return window
        for start in range(len(text) - 2 * WINDOW_CHARACTERS + 1):
            window = text[start : start + 2 * WINDOW_CHARACTERS].lower()
            if window in self._windows:
                return window
        return None


def event_texts(event):
    """
    Every text a log event carries: its formatted message, and each field's
    C{str} and C{repr} (a failure's traceback).
    """
    yield formatEvent(event)
    for value in event.values():
        if isinstance(value, Failure):
            yield value.getTraceback()
            yield str(value.value)
        elif isinstance(value, bytes):
            yield value.decode("latin-1")
        else:
            yield str(value)
            yield repr(value)


class SecretsAssertions:
    """
    Assertions that a text, an event or a message shows no key.
    """

    def assert_no_key(self, text, keys, where):
        """
        C{text} shows none of C{keys} (L{KeyMaterial}s).
        """
        for key in keys:
            leaked = key.found_in(text)
            if leaked is not None:
                self.fail(f"{where} shows key material {leaked!r}: {text[:300]!r}")

    def assert_events_clean(self, events, keys):
        """
        No event shows any of C{keys} nor a PEM private key label.
        """
        self.assertTrue(events)
        for event in events:
            for text in event_texts(event):
                self.assert_no_key(text, keys, "a log event")
                self.assertNotIn(PEM_KEY_LABEL, text, "a log event names a private key")


class ServicerSecretsTests(SecretsAssertions, SynchronousTestCase):
    """
    Calls that succeed, every kind of refusal and a signing failure, with
    the issuer key checked for in every log event, refusal and response.
    """

    def setUp(self):
        self.chain = make_chain()
        self.bundle = self.chain.load()
        self.keys = [KeyMaterial(self.chain.issuer_key)]

    def servicer(
        self, bundle=None, validators=None, default=VALIDATOR_INSECURE, now=FIXED_NOW
    ):
        """
        A servicer over a fake authority of C{bundle} (the setUp one).
        """
        if validators is None:
            validators = {VALIDATOR_INSECURE: InsecureValidator()}
        return CAServicer(
            ImmediateReactor(now.timestamp()),
            FakeCertificateAuthority(bundle or self.bundle, SentryConfig()),
            validators,
            default,
            SentryMetrics(),
        )

    def call(self, servicer, **fields):
        """
        Sign a request (valid unless C{fields} say otherwise) and return the
        response or the L{Refusal}, checked for key material.
        """
        import asyncio

        loop = asyncio.new_event_loop()
        self.addCleanup(loop.close)
        try:
            response = loop.run_until_complete(
                servicer.sign(sign_request(**fields), FIXED_NOW.timestamp() + 10)
            )
        except Refusal as refusal:
            self.assert_no_key(str(refusal), self.keys, "a refusal")
            self.assert_no_key(refusal.message, self.keys, "a refusal")
            return refusal
        self.assert_no_key(response.SerializeToString(), self.keys, "a response")
        return response

    def test_every_outcome(self):
        """No outcome of a call shows the key in a log event, refusal or response."""
        bad_hash = dataclasses.replace(self.bundle, signature_hash="not a hash")
        crash = RuntimeError("validator crashed")
        validators = {
            VALIDATOR_INSECURE: InsecureValidator(),
            VALIDATOR_KUBERNETES: FakeValidator(
                VALIDATOR_KUBERNETES, error=ValidationError("token rejected")
            ),
            VALIDATOR_JWKS: FakeValidator(
                VALIDATOR_JWKS, error=ValidatorUnavailableError("API down")
            ),
        }
        with capturedLogs() as events:
            outcomes = [
                self.call(self.servicer()),
                self.call(self.servicer(default=None)),
                self.call(self.servicer(), token_validator=7),
                self.call(self.servicer(), id="", csr=b""),
                self.call(self.servicer(), trust_domain="UPPER"),
                self.call(self.servicer(validators=validators), token_validator=2),
                self.call(self.servicer(validators=validators), token_validator=3),
                self.call(
                    self.servicer(
                        validators={
                            VALIDATOR_INSECURE: FakeValidator(
                                VALIDATOR_INSECURE, error=crash
                            )
                        }
                    )
                ),
                self.call(self.servicer(), csr=b"no PEM here"),
                self.call(
                    self.servicer(), csr=pem_encode("CERTIFICATE REQUEST", b"\x30\x03")
                ),
                self.call(self.servicer(), csr=make_csr(corrupt_signature=True)[1]),
                self.call(self.servicer(), csr=make_csr("rsa-1024")[1]),
                self.call(self.servicer(now=FIXED_NOW + timedelta(days=400))),
                self.call(self.servicer(bundle=bad_hash)),
            ]
        codes = [
            outcome.code if isinstance(outcome, Refusal) else grpc.StatusCode.OK
            for outcome in outcomes
        ]
        self.assertEqual(
            codes,
            [grpc.StatusCode.OK]
            + [grpc.StatusCode.INVALID_ARGUMENT] * 2
            + [grpc.StatusCode.PERMISSION_DENIED] * 3
            + [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL]
            + [grpc.StatusCode.INVALID_ARGUMENT] * 4
            + [grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INTERNAL],
        )
        self.assertTrue(any("log_failure" in event for event in events))
        self.assert_events_clean(events, self.keys)
        # The validator crash and the signing failure are logged as errors.
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError, TypeError)), 2)


class ServiceSecretsTests(SecretsAssertions, TestCase):
    """
    A CA generating its bundle into files, serving, reloading, warning about
    a loose key mode and refusing a wrong key: nothing it logs shows a key.
    """

    @inlineCallbacks
    def test_start_reload_refused_reload(self):
        """Generation, start, calls and reloads (good and refused) never log a key."""
        from twisted.internet import reactor

        directory = self.mktemp()
        paths = [os.path.join(directory, name) for name in NAMES]
        config = SentryConfig(
            trust_domain="cluster.local", listen_address="127.0.0.1", port=0
        )
        store = FileTrustStore(
            reactor, *paths, "cluster.local", "default", timedelta(minutes=15)
        )
        ca = CertificateAuthorityService(
            config,
            reactor,
            store,
            {VALIDATOR_INSECURE: InsecureValidator()},
            VALIDATOR_INSECURE,
            SentryMetrics(),
        )
        wrong_key = make_chain().issuer_key_pem()
        with capturedLogs() as events:
            yield ca.start(config)
            self.addCleanup(ca.stop)
            with open(paths[0], "rb") as f:
                anchors_pem = f.read()
            client = GrpcTestClient(f"127.0.0.1:{ca.port}", anchors_pem)
            self.addCleanup(client.close)
            response = yield deferToThread(
                client.sign,
                sentry_pb2.SignCertificateRequest(
                    id="myapp",
                    namespace="default",
                    certificate_signing_request=make_csr()[1],
                ),
            )
            yield self.assertFailure(
                deferToThread(
                    client.sign, sentry_pb2.SignCertificateRequest(namespace="x")
                ),
                grpc.RpcError,
            )
            os.chmod(paths[2], 0o644)
            yield ca.restart(config)
            with open(paths[2], "rb") as f:
                issuer_key_pem = f.read()
            with open(paths[2], "wb") as f:
                f.write(wrong_key)
            yield self.assertFailure(ca.restart(config), BundleError)
        keys = [
            KeyMaterial(
                serialization.load_pem_private_key(issuer_key_pem, password=None)
            ),
            KeyMaterial(serialization.load_pem_private_key(wrong_key, password=None)),
        ]
        texts = [formatEvent(event) for event in events]
        self.assertTrue(any("generated a new trust bundle" in t for t in texts))
        self.assertTrue(any("accessible to group or others" in t for t in texts))
        self.assertTrue(
            any(
                "issuer credentials reloaded" in t
                or "issuer credentials unchanged" in t
                for t in texts
            )
        )
        self.assertTrue(any("issuer credentials refused" in t for t in texts))
        self.assert_no_key(response.SerializeToString(), keys, "a response")
        self.assert_events_clean(events, keys)


class BundleErrorSecretsTests(SecretsAssertions, SynchronousTestCase):
    """
    BundleError messages about bad key files never quote the key.
    """

    def setUp(self):
        self.chain = make_chain()
        self.key_pem = self.chain.issuer_key_pem()
        self.keys = [KeyMaterial(self.chain.issuer_key)]
        self.der = self.chain.issuer_key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def load(self, anchors=None, chain=None, key=None):
        """
        L{load_bundle} with the chain's parts, some replaced.
        """
        return load_bundle(
            anchors if anchors is not None else self.chain.anchors_pem,
            chain if chain is not None else self.chain.issuer_chain_pem(),
            key if key is not None else self.key_pem,
            FIXED_NOW,
        )

    def assert_refused_cleanly(self, **parts):
        """
        Loading with C{parts} fails with a BundleError that shows no key.
        """
        error = self.assertRaises(BundleError, self.load, **parts)
        self.assert_no_key(str(error), self.keys, "a BundleError")
        return error

    def bad_key_files(self):
        """
        Key files broken in every way an operator or a disk could.
        """
        pem, der = self.key_pem, self.der
        lines = pem.split(b"\n")
        body_start = len(lines[0]) + 1
        other = make_chain()
        yield from (pem[: len(pem) * n // 4] for n in (1, 2, 3))
        yield pem[:-10]
        # The whole PEM on one line, as when newlines are lost in a paste.
        yield pem.replace(b"\n", b"")
        yield from (
            flip_bit(pem, body_start + at, bit)
            for at in (0, 30, 70, 120)
            for bit in (0, 5)
        )
        yield from (
            pem_encode("PRIVATE KEY", flip_bit(der, at)) for at in (0, 7, 20, 40)
        )
        yield pem_encode("PRIVATE KEY", der[: len(der) // 2])
        yield pem_encode("PRIVATE KEY", der * 2)
        yield pem_encode("RSA PRIVATE KEY", der)
        yield pem_encode("CERTIFICATE", der)
        yield pem + pem
        yield pem + b"trailing text\n"
        yield b"leading text\n" + pem
        yield self.chain.issuer_key_pem(password=b"secret")
        yield self.chain.issuer_key_pem(key_format="sec1", password=b"secret")
        yield other.issuer_key_pem()

    def test_bad_key_files(self):
        """Every kind of bad key file is refused without quoting the key."""
        for key in self.bad_key_files():
            self.assert_refused_cleanly(key=key)

    def test_key_in_certificate_files(self):
        """A key in a certificate file is refused without quoting it."""
        relabelled = pem_encode("CERTIFICATE", self.der)
        for document in (self.key_pem, relabelled):
            self.assert_refused_cleanly(anchors=document)
            self.assert_refused_cleanly(chain=document)

    def test_file_store_messages(self):
        """The file store's refusal of a bad key names the file and shows no key."""
        directory = self.mktemp()
        os.makedirs(directory)
        self.chain.write(directory)
        with open(os.path.join(directory, "issuer.key"), "wb") as f:
            f.write(self.key_pem[:-40])
        store = FileTrustStore(
            None,
            *(os.path.join(directory, name) for name in NAMES),
            "example.org",
            "default",
            timedelta(minutes=15),
        )
        error = self.assertRaises(BundleError, store.load_sync, FIXED_NOW)
        self.assertEqual(error.source, os.path.join(directory, "issuer.key"))
        self.assert_no_key(str(error), self.keys, "a BundleError")

    @show_notes
    @given(st.data())
    def test_mutated_key_files(self, data):
        """A mutated key file loads as the same key or is refused without quoting it."""
        pem = self.key_pem
        at = data.draw(st.integers(0, len(pem) - 1))
        mutation = data.draw(st.sampled_from(["truncate", "flip", "repeat"]))
        if mutation == "truncate":
            mutated = pem[:at]
        elif mutation == "flip":
            mutated = flip_bit(pem, at, data.draw(st.integers(0, 7)))
        else:
            end = data.draw(st.integers(at, len(pem)))
            mutated = pem[:at] + pem[at:end] * data.draw(st.integers(2, 5)) + pem[end:]
        try:
            bundle = self.load(key=mutated)
        except BundleError as error:
            self.assert_no_key(str(error), self.keys, "a BundleError")
        else:
            self.assertEqual(
                bundle.issuer_key.private_numbers(),
                self.chain.issuer_key.private_numbers(),
            )


class GenerationSecretsTests(SynchronousTestCase):
    """
    What generation writes, and what a failed one leaves.
    """

    def make_store(self, directory, _open=os.open):
        """
        A L{FileTrustStore} over the three files in C{directory}.
        """
        self.paths = tuple(os.path.join(directory, name) for name in NAMES)
        return FileTrustStore(
            None,
            *self.paths,
            "example.org",
            "default",
            timedelta(minutes=15),
            _open=_open,
        )

    def test_root_key_not_written(self):
        """
        Generation writes one private key, the issuer's; the root's is never stored.
        """
        directory = self.mktemp()
        bundle = self.make_store(directory).load_or_generate_sync(FIXED_NOW)
        keys = []
        for name in sorted(os.listdir(directory)):
            with open(os.path.join(directory, name), "rb") as f:
                content = f.read()
            if PEM_KEY_LABEL.encode("ascii") in content:
                keys.append((name, serialization.load_pem_private_key(content, None)))
        self.assertEqual([name for name, _ in keys], ["issuer.key"])
        public = serialization.PublicFormat.SubjectPublicKeyInfo
        encoding = serialization.Encoding.DER
        self.assertEqual(
            keys[0][1].public_key().public_bytes(encoding, public),
            bundle.issuer.public_key().public_bytes(encoding, public),
        )

    def test_read_only_file_system(self):
        """A read-only file system during generation leaves no file and says so."""
        directory = self.mktemp()
        os.makedirs(directory)
        calls = []

        def read_only(path, flags, mode=0o777):
            calls.append(path)
            if len(calls) == 2:
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)
            return os.open(path, flags, mode)

        store = self.make_store(directory, read_only)
        error = self.assertRaises(BundleError, store.load_or_generate_sync, FIXED_NOW)
        self.assertEqual(error.source, self.paths[1])
        self.assertIn("EROFS", error.problem)
        self.assertEqual(os.listdir(directory), [])

    def test_renamed_files_rolled_back(self):
        """
        A failed last rename removes the files already renamed; the operator's stays.
        """
        directory = self.mktemp()
        os.makedirs(directory)
        calls = []

        def operator_writes_key(path, flags, mode=0o777):
            calls.append(path)
            if len(calls) == 3:
                with open(self.paths[2], "wb") as f:
                    f.write(b"operator's key")
            return os.open(path, flags, mode)

        store = self.make_store(directory, operator_writes_key)
        error = self.assertRaises(BundleError, store.load_or_generate_sync, FIXED_NOW)
        self.assertEqual(error.source, self.paths[2])
        self.assertEqual(os.listdir(directory), ["issuer.key"])
        with open(self.paths[2], "rb") as f:
            self.assertEqual(f.read(), b"operator's key")
