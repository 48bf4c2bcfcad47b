"""
Tests for L{sentry_tx.ca.bundle}: loading, verifying and generating trust
bundles.
"""

import os
import random
import subprocess
from datetime import timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from twisted.trial.unittest import SynchronousTestCase

from sentry_tx.ca import x509profile
from sentry_tx.ca.bundle import (
    GeneratedBundle,
    TrustBundle,
    generate_bundle,
    is_self_signed,
    load_bundle,
)
from sentry_tx.errors import BundleError
from sentry_tx.testing.certificates import (
    FIXED_NOW,
    certificate_pem,
    make_certificate,
    make_chain,
    make_private_key,
    pem_encode,
    private_key_pem,
)

OPENSSL = "/usr/bin/openssl"
SKEW = timedelta(minutes=15)
# DER of the named curve OID prime256v1, as `openssl ecparam` writes it.
P256_PARAMETERS_DER = bytes.fromhex("06082a8648ce3d030107")


class LoadErrorMixin:
    """
    Helpers to assert that L{load_bundle} refuses a bundle.
    """

    def assertRefused(self, anchors, chain, key, source, *fragments, now=FIXED_NOW):
        """
        Assert that loading fails with a L{BundleError} whose source is
        C{source} and whose message holds every fragment.
        """
        error = self.assertRaises(BundleError, load_bundle, anchors, chain, key, now)
        self.assertEqual(error.source, source)
        for fragment in fragments:
            self.assertIn(fragment, error.problem)
        self.assertTrue(str(error).startswith(f"{source}: "))
        return error


class AnchorsRefusedTests(LoadErrorMixin, SynchronousTestCase):
    """
    C{ca.crt} problems, each refused with its own message.
    """

    def setUp(self):
        self.chain = make_chain()
        self.issuer_pem = self.chain.issuer_chain_pem()
        self.key_pem = self.chain.issuer_key_pem()

    def test_empty(self):
        """An empty anchors file holds no certificate."""
        self.assertRefused(
            b"", self.issuer_pem, self.key_pem, "ca.crt", "no certificate"
        )

    def test_only_comments(self):
        """Comments alone are no certificate."""
        self.assertRefused(
            b"# roots go here\n\n", self.issuer_pem, self.key_pem, "ca.crt",
            "no certificate",
        )

    def test_non_certificate_block(self):
        """A private key block in the anchors is refused."""
        anchors = self.chain.anchors_pem + self.key_pem
        self.assertRefused(
            anchors, self.issuer_pem, self.key_pem, "ca.crt",
            "expected a CERTIFICATE block", "'PRIVATE KEY'",
        )

    def test_not_self_signed(self):
        """An anchor that is not self-signed is refused."""
        anchors = self.chain.anchors_pem + certificate_pem(self.chain.issuer)
        self.assertRefused(
            anchors, self.issuer_pem, self.key_pem, "ca.crt", "is not self-signed"
        )

    def test_stray_text(self):
        """Text other than comments outside the PEM blocks is refused."""
        anchors = b"subject=O=example.org\n" + self.chain.anchors_pem
        self.assertRefused(
            anchors,
            self.issuer_pem,
            self.key_pem,
            "ca.crt",
            "line 1",
            "unexpected text",
        )

    def test_unparsable_certificate(self):
        """A CERTIFICATE block whose DER is not a certificate is refused."""
        anchors = pem_encode("CERTIFICATE", b"\x30\x03\x02\x01\x00")
        self.assertRefused(
            anchors, self.issuer_pem, self.key_pem, "ca.crt", "does not parse"
        )

    def test_bad_base64(self):
        """A block that is not base64 is refused."""
        anchors = b"-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n"
        self.assertRefused(
            anchors, self.issuer_pem, self.key_pem, "ca.crt", "not valid base64"
        )

    def test_truncated(self):
        """A block without its END line is refused."""
        anchors = self.chain.anchors_pem.rsplit(b"-----END", 1)[0]
        self.assertRefused(
            anchors, self.issuer_pem, self.key_pem, "ca.crt", "has no END line"
        )

    def test_expired_root(self):
        """A chain that reaches only an expired root is refused, naming ca.crt."""
        chain = make_chain(
            not_before=FIXED_NOW - timedelta(days=400),
            not_after=FIXED_NOW - timedelta(days=1),
            issuer_not_after=FIXED_NOW + timedelta(days=30),
        )
        self.assertRefused(
            chain.anchors_pem, chain.issuer_chain_pem(), chain.issuer_key_pem(),
            "ca.crt", "expired at", (FIXED_NOW - timedelta(days=1)).isoformat(),
        )

    def test_root_path_length(self):
        """A root whose path length forbids the chain's intermediates is refused."""
        root_key = make_private_key()
        root = make_certificate(root_key, "root", path_length=0)
        middle_key = make_private_key()
        middle = make_certificate(
            middle_key, "middle", signer=root, signer_key=root_key
        )
        issuer_key = make_private_key()
        issuer = make_certificate(
            issuer_key, "issuer", signer=middle, signer_key=middle_key, path_length=0
        )
        self.assertRefused(
            certificate_pem(root), certificate_pem(issuer, middle),
            private_key_pem(issuer_key), "ca.crt", "allows 0 intermediate",
        )


class IssuerChainRefusedTests(LoadErrorMixin, SynchronousTestCase):
    """
    C{issuer.crt} problems, each refused with its own message.
    """

    def setUp(self):
        self.chain = make_chain()

    def _refused(self, chain, *fragments, now=FIXED_NOW, issuer_pem=None):
        if issuer_pem is None:
            issuer_pem = chain.issuer_chain_pem()
        return self.assertRefused(
            chain.anchors_pem, issuer_pem, chain.issuer_key_pem(), "issuer.crt",
            *fragments, now=now,
        )

    def test_empty(self):
        """An empty issuer file holds no certificate."""
        self._refused(self.chain, "no certificate", issuer_pem=b"\n")

    def test_self_signed(self):
        """A self-signed issuer (the root itself) is refused."""
        self._refused(
            self.chain, "is self-signed", "ca.crt",
            issuer_pem=certificate_pem(self.chain.root),
        )

    def test_root_twice(self):
        """Dropping a trailing root never leaves a self-signed issuer in service."""
        self._refused(
            self.chain, "is self-signed",
            issuer_pem=certificate_pem(self.chain.root, self.chain.root),
        )

    def test_not_ca(self):
        """An issuer with basic constraints CA:FALSE is refused."""
        self._refused(make_chain(ca=False), "is not a CA")

    def test_no_basic_constraints(self):
        """An issuer without basic constraints is refused."""
        self._refused(make_chain(basic_constraints=False), "no basic constraints")

    def test_no_key_cert_sign(self):
        """An issuer whose key usage lacks keyCertSign is refused."""
        self._refused(make_chain(key_cert_sign=False), "keyCertSign")

    def test_chain_break(self):
        """An issuer followed by a certificate that did not sign it is refused."""
        other = make_chain(intermediates=1)
        issuer_pem = certificate_pem(self.chain.issuer, other.intermediates[0])
        error = self.assertRefused(
            self.chain.anchors_pem + other.anchors_pem, issuer_pem,
            self.chain.issuer_key_pem(), "issuer.crt", "the chain is broken",
        )
        self.assertIn("line 1", error.problem)

    def test_intermediate_not_ca(self):
        """An intermediate that is not a CA may not sign the issuer."""
        root_key = make_private_key()
        root = make_certificate(root_key, "root")
        middle_key = make_private_key()
        middle = make_certificate(
            middle_key, "middle", signer=root, signer_key=root_key, ca=False
        )
        issuer_key = make_private_key()
        issuer = make_certificate(
            issuer_key, "issuer", signer=middle, signer_key=middle_key
        )
        self.assertRefused(
            certificate_pem(root), certificate_pem(issuer, middle),
            private_key_pem(issuer_key), "issuer.crt", "'O=middle'", "is not a CA",
        )

    def test_no_anchor(self):
        """A chain that leads to none of the anchors is refused."""
        other = make_chain()
        self.assertRefused(
            other.anchors_pem, self.chain.issuer_chain_pem(),
            self.chain.issuer_key_pem(), "issuer.crt", "does not lead to any root",
        )

    def test_trailing_unknown_root(self):
        """A trailing root in issuer.crt that is not an anchor does not count."""
        other = make_chain()
        self.assertRefused(
            other.anchors_pem, self.chain.issuer_chain_pem(include_root=True),
            self.chain.issuer_key_pem(), "issuer.crt", "does not lead to any root",
        )

    def test_expired(self):
        """An expired issuer is refused, saying when it expired."""
        not_after = FIXED_NOW - timedelta(seconds=1)
        chain = make_chain(issuer_not_after=not_after)
        self._refused(chain, "expired at", not_after.isoformat())

    def test_not_yet_valid(self):
        """An issuer whose NotBefore is still to come is refused."""
        not_before = FIXED_NOW + timedelta(hours=1)
        chain = make_chain(issuer_not_before=not_before)
        self._refused(chain, "is not valid before", not_before.isoformat())

    def test_expired_intermediate(self):
        """An expired intermediate is refused even when the issuer is valid."""
        chain = make_chain(
            intermediates=1,
            not_after=FIXED_NOW - timedelta(days=1),
            issuer_not_after=FIXED_NOW + timedelta(days=1),
        )
        self._refused(chain, "intermediate 0", "expired at")


class KeyRefusedTests(LoadErrorMixin, SynchronousTestCase):
    """
    C{issuer.key} problems, each refused with its own message that never
    includes key material.
    """

    def setUp(self):
        self.chain = make_chain()

    def _refused(self, key_pem, *fragments):
        error = self.assertRefused(
            self.chain.anchors_pem, self.chain.issuer_chain_pem(), key_pem,
            "issuer.key", *fragments,
        )
        for line in key_pem.splitlines():
            if line and not line.startswith(b"-----"):
                self.assertNotIn(line.decode("ascii", "replace"), str(error))
        return error

    def test_wrong_key(self):
        """A key that is not the issuer's is refused."""
        self._refused(private_key_pem(make_private_key()), "does not belong")

    def test_encrypted_pkcs8(self):
        """An encrypted PKCS#8 key is refused as encrypted."""
        self._refused(self.chain.issuer_key_pem(password=b"secret"), "encrypted")

    def test_encrypted_traditional(self):
        """An encrypted SEC1 key (Proc-Type header) is refused as encrypted."""
        self._refused(
            self.chain.issuer_key_pem("sec1", password=b"secret"), "encrypted"
        )

    def test_garbage(self):
        """A PRIVATE KEY block that does not parse is refused."""
        self._refused(pem_encode("PRIVATE KEY", os.urandom(120)), "does not parse")

    def test_truncated(self):
        """A truncated real key is refused without echoing it."""
        der = self.chain.issuer_key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        self._refused(pem_encode("PRIVATE KEY", der[:-10]), "does not parse")

    def test_empty(self):
        """An empty key file holds no private key."""
        self._refused(b"", "no private key")

    def test_certificate(self):
        """A certificate in the key file is refused."""
        self._refused(certificate_pem(self.chain.issuer), "expected a private key")

    def test_two_keys(self):
        """A key file with two keys is refused."""
        self._refused(self.chain.issuer_key_pem() * 2, "exactly one")

    def test_label_mismatch(self):
        """An EC key under an RSA PRIVATE KEY label is refused."""
        sec1 = self.chain.issuer_key_pem("sec1").replace(b" EC ", b" RSA ")
        self._refused(sec1, "RSA PRIVATE KEY block holds an ECDSA")

    def test_unsupported_key(self):
        """An issuer key sentry_tx cannot sign with (P-192) is refused."""
        chain = make_chain("ecdsa-p192")
        error = self.assertRefused(
            chain.anchors_pem, chain.issuer_chain_pem(), chain.issuer_key_pem(),
            "issuer.key", "cannot sign",
        )
        self.assertIn("secp192r1", error.problem)


class AcceptedTests(SynchronousTestCase):
    """
    Bundles that load, and what the loaded L{TrustBundle} holds.
    """

    def test_simple(self):
        """A root, an issuer and its key load into a bundle."""
        chain = make_chain()
        bundle = chain.load()
        self.assertEqual(bundle.anchors, (chain.root,))
        self.assertEqual(bundle.issuer_chain, (chain.issuer,))
        self.assertEqual(bundle.issuer, chain.issuer)
        self.assertEqual(bundle.anchors_pem, certificate_pem(chain.root))
        self.assertEqual(bundle.issuer_chain_pem, certificate_pem(chain.issuer))
        self.assertIsInstance(bundle.signature_hash, hashes.SHA256)
        self.assertEqual(bundle.issuer_name, chain.issuer.subject)

    def test_several_roots(self):
        """Several roots load; the chain may lead to any of them."""
        other = make_chain()
        chain = make_chain()
        bundle = load_bundle(
            other.anchors_pem + chain.anchors_pem,
            chain.issuer_chain_pem(),
            chain.issuer_key_pem(),
            FIXED_NOW,
        )
        self.assertEqual(bundle.anchors, (other.root, chain.root))
        self.assertEqual(
            bundle.anchors_pem, certificate_pem(other.root, chain.root)
        )

    def test_intermediate_chain_trailing_root_dropped(self):
        """Issuer, intermediate and trailing root load as issuer and intermediate."""
        chain = make_chain(intermediates=1)
        bundle = load_bundle(
            chain.anchors_pem,
            chain.issuer_chain_pem(include_root=True),
            chain.issuer_key_pem(),
            FIXED_NOW,
        )
        self.assertEqual(bundle.issuer_chain, (chain.issuer, chain.intermediates[0]))
        self.assertEqual(
            bundle.issuer_chain_pem,
            certificate_pem(chain.issuer, chain.intermediates[0]),
        )

    def test_two_intermediates(self):
        """A chain through two intermediates loads."""
        chain = make_chain(intermediates=2)
        bundle = chain.load()
        self.assertEqual(len(bundle.issuer_chain), 3)

    def test_sec1_key(self):
        """An EC PRIVATE KEY (SEC1) loads."""
        chain = make_chain()
        bundle = load_bundle(
            chain.anchors_pem, chain.issuer_chain_pem(), chain.issuer_key_pem("sec1"),
            FIXED_NOW,
        )
        self.assertIsInstance(bundle.issuer_key, ec.EllipticCurvePrivateKey)

    def test_sec1_key_with_parameters(self):
        """
        An EC PARAMETERS block before the key, as openssl ecparam writes, is skipped.
        """
        chain = make_chain()
        key_pem = pem_encode(
            "EC PARAMETERS", P256_PARAMETERS_DER
        ) + chain.issuer_key_pem("sec1")
        bundle = load_bundle(
            chain.anchors_pem, chain.issuer_chain_pem(), key_pem, FIXED_NOW
        )
        self.assertEqual(
            bundle.issuer_key.private_numbers(), chain.issuer_key.private_numbers()
        )

    def test_pkcs1_key(self):
        """An RSA PRIVATE KEY (PKCS#1) loads and signs with SHA-256."""
        chain = make_chain("rsa-2048")
        key_pem = chain.issuer_key_pem("pkcs1")
        self.assertIn(b"BEGIN RSA PRIVATE KEY", key_pem)
        bundle = load_bundle(
            chain.anchors_pem, chain.issuer_chain_pem(), key_pem, FIXED_NOW
        )
        self.assertIsInstance(bundle.signature_hash, hashes.SHA256)

    def test_pkcs8_key(self):
        """A PRIVATE KEY (PKCS#8) loads."""
        chain = make_chain()
        key_pem = chain.issuer_key_pem("pkcs8")
        self.assertIn(b"BEGIN PRIVATE KEY", key_pem)
        load_bundle(chain.anchors_pem, chain.issuer_chain_pem(), key_pem, FIXED_NOW)

    def test_p384_issuer(self):
        """A P-384 issuer signs with SHA-384."""
        self.assertIsInstance(
            make_chain("ecdsa-p384").load().signature_hash, hashes.SHA384
        )

    def test_ed25519_issuer(self):
        """An Ed25519 issuer takes no separate hash."""
        bundle = make_chain("ed25519").load()
        self.assertIsNone(bundle.signature_hash)
        self.assertIsInstance(bundle.issuer_key, ed25519.Ed25519PrivateKey)

    def test_comments_and_blank_lines(self):
        """Comment and blank lines around blocks, and CRLF line ends, are tolerated."""
        chain = make_chain(intermediates=1)

        def decorate(pem):
            blocks = pem.replace(b"-----\n-----", b"-----\n\n# next\n-----")
            return (b"# managed by hand\n\n" + blocks + b"\n# end\n").replace(
                b"\n", b"\r\n"
            )

        bundle = load_bundle(
            decorate(chain.anchors_pem),
            decorate(chain.issuer_chain_pem()),
            decorate(chain.issuer_key_pem()),
            FIXED_NOW,
        )
        self.assertEqual(bundle.issuer_chain, (chain.issuer, chain.intermediates[0]))

    def test_sources_named(self):
        """Errors name the source given for the part at fault."""
        chain = make_chain()
        error = self.assertRaises(
            BundleError,
            load_bundle,
            chain.anchors_pem,
            chain.issuer_chain_pem(),
            b"",
            FIXED_NOW,
            sources=("/etc/a", "/etc/b", "/etc/c"),
        )
        self.assertEqual(error.source, "/etc/c")

    def test_valid_at_edges(self):
        """
        A chain loads at the very first and very last second of its validity,
        and is refused one second before and one second after.
        """
        chain = make_chain()
        first = chain.issuer.not_valid_before_utc
        last = chain.issuer.not_valid_after_utc
        for now in (first, last):
            bundle = chain.load(now)
            self.assertEqual(bundle.issuer, chain.issuer)
            self.assertEqual(bundle.anchors, (chain.root,))
        early = self.assertRaises(BundleError, chain.load, first - timedelta(seconds=1))
        self.assertIn("is not valid before", early.problem)
        late = self.assertRaises(BundleError, chain.load, last + timedelta(seconds=1))
        self.assertIn("expired at", late.problem)

    def test_naive_now_refused(self):
        """A naive C{now} is a programming error."""
        chain = make_chain()
        self.assertRaises(ValueError, chain.load, FIXED_NOW.replace(tzinfo=None))


class TrustBundleTests(SynchronousTestCase):
    """
    Tests for L{TrustBundle}'s derived values.
    """

    def test_chain_not_after(self):
        """chain_not_after is the earliest NotAfter of the issuer chain."""
        chain = make_chain(
            intermediates=1,
            not_after=FIXED_NOW + timedelta(days=10),
            issuer_not_after=FIXED_NOW + timedelta(days=20),
        )
        bundle = chain.load()
        self.assertEqual(bundle.chain_not_after, FIXED_NOW + timedelta(days=10))
        self.assertEqual(bundle.chain_not_after.utcoffset(), timedelta(0))

    def test_roots_not_after(self):
        """
        roots_not_after is the NotAfter of the root the issuer chain leads to, not of
        another anchor (a replaced root).
        """
        chain = make_chain(not_after=FIXED_NOW + timedelta(days=50))
        early = make_chain(not_after=FIXED_NOW + timedelta(days=5))
        bundle = load_bundle(
            chain.anchors_pem + early.anchors_pem,
            chain.issuer_chain_pem(),
            chain.issuer_key_pem(),
            FIXED_NOW,
        )
        self.assertEqual(bundle.active_anchors, (chain.root,))
        self.assertEqual(bundle.roots_not_after, FIXED_NOW + timedelta(days=50))

    def test_authority_key_identifier(self):
        """The leaves' AKI is the issuer's SKI."""
        bundle = make_chain().load()
        ski = bundle.issuer.extensions.get_extension_for_class(
            x509.SubjectKeyIdentifier
        )
        self.assertEqual(
            bundle.authority_key_identifier.key_identifier, ski.value.digest
        )

    def test_authority_key_identifier_without_ski(self):
        """For an issuer without SKI the AKI is computed from its key."""
        bundle = make_chain(subject_key_identifier=False).load()
        self.assertEqual(
            bundle.authority_key_identifier,
            x509.AuthorityKeyIdentifier.from_issuer_public_key(
                bundle.issuer.public_key()
            ),
        )

    def test_repr_hides_key(self):
        """Neither the bundle's repr nor its str shows the issuer key."""
        chain = make_chain()
        bundle = chain.load()
        key_pem = chain.issuer_key_pem()
        body = key_pem.splitlines()[1].decode("ascii")
        for text in (repr(bundle), str(bundle)):
            self.assertNotIn("PRIVATE", text)
            self.assertNotIn(body, text)
            self.assertNotIn("issuer_key", text)


class GenerateTests(SynchronousTestCase):
    """
    Tests for L{generate_bundle}.
    """

    def setUp(self):
        self.generated = generate_bundle("example.org", "dapr-system", FIXED_NOW, SKEW)

    def test_loads(self):
        """The generated PEM loads back into the same bundle."""
        bundle = load_bundle(
            self.generated.anchors_pem,
            self.generated.issuer_chain_pem,
            self.generated.issuer_key_pem,
            FIXED_NOW,
        )
        self.assertEqual(bundle.anchors, self.generated.bundle.anchors)
        self.assertEqual(bundle.issuer_chain, self.generated.bundle.issuer_chain)

    def test_shape(self):
        """One self-signed root, one issuer it signed, ECDSA P-256 keys."""
        bundle = self.generated.bundle
        self.assertEqual(len(bundle.anchors), 1)
        self.assertEqual(len(bundle.issuer_chain), 1)
        self.assertTrue(is_self_signed(bundle.anchors[0]))
        self.assertFalse(is_self_signed(bundle.issuer))
        bundle.issuer.verify_directly_issued_by(bundle.anchors[0])
        self.assertIsInstance(bundle.issuer_key, ec.EllipticCurvePrivateKey)
        self.assertIsInstance(bundle.issuer_key.curve, ec.SECP256R1)
        self.assertIsInstance(bundle.anchors[0].public_key(), ec.EllipticCurvePublicKey)
        self.assertEqual(bundle.anchors[0].subject.rfc4514_string(), "O=example.org")
        self.assertEqual(
            bundle.issuer.subject.rfc4514_string(),
            "O=spiffe://example.org/ns/dapr-system/dapr-sentry",
        )

    def test_validity(self):
        """Root and issuer start at now minus the skew and last 365 days."""
        for cert in (*self.generated.bundle.anchors, self.generated.bundle.issuer):
            self.assertEqual(cert.not_valid_before_utc, FIXED_NOW - SKEW)
            self.assertEqual(
                cert.not_valid_after_utc, FIXED_NOW + timedelta(days=365)
            )

    def test_root_key_not_kept(self):
        """The generated bundle holds only the issuer key, not the root's."""
        self.assertEqual(
            [f for f in GeneratedBundle.__dataclass_fields__],
            ["bundle", "anchors_pem", "issuer_chain_pem", "issuer_key_pem"],
        )
        self.assertEqual(self.generated.issuer_key_pem.count(b"BEGIN"), 1)
        self.assertIn(b"-----BEGIN PRIVATE KEY-----", self.generated.issuer_key_pem)

    def test_repr_hides_key(self):
        """The generated bundle's repr does not show the key PEM."""
        self.assertNotIn("PRIVATE", repr(self.generated))

    def test_ed25519(self):
        """Ed25519 on request: both keys Ed25519."""
        generated = generate_bundle(
            "example.org", "dapr-system", FIXED_NOW, SKEW, key_type="ed25519"
        )
        self.assertIsInstance(generated.bundle.issuer_key, ed25519.Ed25519PrivateKey)
        self.assertIsInstance(
            generated.bundle.anchors[0].public_key(), ed25519.Ed25519PublicKey
        )
        self.assertIsNone(generated.bundle.signature_hash)
        load_bundle(
            generated.anchors_pem,
            generated.issuer_chain_pem,
            generated.issuer_key_pem,
            FIXED_NOW,
        )

    def test_unknown_key_type(self):
        """An unknown key type is refused."""
        self.assertRaises(
            ValueError, generate_bundle, "example.org", "default", FIXED_NOW, SKEW,
            "rsa-1024",
        )

    def test_distinct(self):
        """Two generations share no key and no serial."""
        other = generate_bundle("example.org", "dapr-system", FIXED_NOW, SKEW)
        self.assertNotEqual(
            other.bundle.issuer.serial_number,
            self.generated.bundle.issuer.serial_number,
        )
        self.assertNotEqual(other.issuer_key_pem, self.generated.issuer_key_pem)


class OpenSSLVerifyTests(SynchronousTestCase):
    """
    The generated bundle and its leaves pass C{openssl verify -x509_strict}.
    """

    if not os.path.exists(OPENSSL):
        skip = f"{OPENSSL} is not installed"

    def _verify(self, key_type):
        generated = generate_bundle(
            "example.org", "dapr-system", FIXED_NOW, SKEW, key_type=key_type
        )
        bundle = generated.bundle
        not_before, not_after = x509profile.leaf_validity(
            FIXED_NOW, timedelta(hours=24), SKEW, bundle.chain_not_after
        )
        leaf = x509profile.build_leaf(
            bundle,
            make_private_key().public_key(),
            x509profile.spiffe_id("example.org", "default", "app"),
            ["app.example"],
            not_before,
            not_after,
        )
        directory = self.mktemp()
        os.makedirs(directory)
        files = {
            "ca.crt": generated.anchors_pem,
            "issuer.crt": generated.issuer_chain_pem,
            "leaf.crt": certificate_pem(leaf),
        }
        for name, data in files.items():
            with open(os.path.join(directory, name), "wb") as f:
                f.write(data)
        at = str(int(FIXED_NOW.timestamp()))

        def openssl_verify(*args):
            result = subprocess.run(
                [OPENSSL, "verify", "-x509_strict", "-attime", at, *args],
                cwd=directory,
                capture_output=True,
                text=True,
            )
            self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
            return result.stdout

        self.assertIn(
            "issuer.crt: OK", openssl_verify("-CAfile", "ca.crt", "issuer.crt")
        )
        self.assertIn(
            "leaf.crt: OK",
            openssl_verify("-CAfile", "ca.crt", "-untrusted", "issuer.crt", "leaf.crt"),
        )

    def test_p256(self):
        """A generated P-256 bundle and its leaf verify strictly with openssl."""
        self._verify("ecdsa-p256")

    def test_ed25519(self):
        """A generated Ed25519 bundle and its leaf verify strictly with openssl."""
        self._verify("ed25519")


class TrustBundleConstructionTests(SynchronousTestCase):
    """
    Tests for L{TrustBundle.from_certificates}.
    """

    def test_unsupported_key(self):
        """A key sentry_tx cannot sign with is refused at construction."""
        chain = make_chain("rsa-1024")
        self.assertRaises(
            ValueError,
            TrustBundle.from_certificates,
            (chain.root,),
            (chain.issuer,),
            chain.issuer_key,
        )


class CorruptionTests(SynchronousTestCase):
    """
    Whatever the bytes, L{load_bundle} refuses with L{BundleError} only.
    """

    def _only_bundle_error(self, anchors, chain, key, broken):
        """
        Assert that L{load_bundle} refuses the three parts with a
        L{BundleError} naming the part at index C{broken}: an accepted
        bundle, or any other exception, fails.
        """
        sources = ("anchors", "chain", "key")
        error = self.assertRaises(
            BundleError, load_bundle, anchors, chain, key, FIXED_NOW, sources=sources
        )
        self.assertEqual(error.source, sources[broken], error.problem)

    def test_bit_flips(self):
        """
        Every bit flip in the anchors' or issuer's DER is refused with BundleError.
        """
        rng = random.Random(365)
        chain = make_chain()
        key_pem = chain.issuer_key_pem()
        root_der = chain.root.public_bytes(serialization.Encoding.DER)
        issuer_der = chain.issuer.public_bytes(serialization.Encoding.DER)
        for _ in range(300):
            for target in ("root", "issuer"):
                der = bytearray(root_der if target == "root" else issuer_der)
                der[rng.randrange(len(der))] ^= 1 << rng.randrange(8)
                flipped = pem_encode("CERTIFICATE", bytes(der))
                if target == "root":
                    self._only_bundle_error(
                        flipped, chain.issuer_chain_pem(), key_pem, broken=0
                    )
                else:
                    self._only_bundle_error(
                        chain.anchors_pem, flipped, key_pem, broken=1
                    )

    def test_random_parts(self):
        """
        Random bytes in any part, bare or in PEM armour, are refused with BundleError.
        """
        rng = random.Random(8557)
        chain = make_chain()
        parts = [chain.anchors_pem, chain.issuer_chain_pem(), chain.issuer_key_pem()]
        labels = ["CERTIFICATE", "CERTIFICATE", "PRIVATE KEY"]
        for length in range(0, 300, 11):
            blob = bytes(rng.getrandbits(8) for _ in range(length))
            for index in range(3):
                for garbage in (blob, pem_encode(labels[index], blob)):
                    corrupted = list(parts)
                    corrupted[index] = garbage
                    self._only_bundle_error(*corrupted, broken=index)
