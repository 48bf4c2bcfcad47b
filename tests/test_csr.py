"""
Tests for L{sentry_tx.ca.csr}: reading a caller's certificate signing request.
"""

import base64
import os
import random

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from twisted.trial.unittest import SynchronousTestCase

from sentry_tx.ca.csr import parse_csr
from sentry_tx.errors import CSRError
from sentry_tx.testing import make_csr, make_private_key, pem_encode

INVALID = "invalid certificate signing request"


def _public_der(key):
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _der(pem):
    """
    The DER inside a one-block PEM document.
    """
    return base64.b64decode(b"".join(pem.splitlines()[1:-1]))


class AcceptedTests(SynchronousTestCase):
    """
    CSRs that parse, and the key they yield.
    """

    def _accepts(self, key_type, key_class):
        key, csr = make_csr(key_type)
        public_key = parse_csr(csr)
        self.assertIsInstance(public_key, key_class)
        self.assertEqual(_public_der(public_key), _public_der(key.public_key()))

    def test_p256(self):
        """An ECDSA P-256 CSR yields its public key."""
        self._accepts("ecdsa-p256", ec.EllipticCurvePublicKey)

    def test_p384(self):
        """An ECDSA P-384 CSR yields its public key."""
        self._accepts("ecdsa-p384", ec.EllipticCurvePublicKey)

    def test_p521(self):
        """An ECDSA P-521 CSR yields its public key."""
        self._accepts("ecdsa-p521", ec.EllipticCurvePublicKey)

    def test_ed25519(self):
        """An Ed25519 CSR yields its public key."""
        self._accepts("ed25519", ed25519.Ed25519PublicKey)

    def test_rsa_2048(self):
        """An RSA 2048-bit CSR yields its public key."""
        self._accepts("rsa-2048", rsa.RSAPublicKey)

    def test_certificate_label(self):
        """A CSR under the label CERTIFICATE, as old sidecars send it, is accepted."""
        key, csr = make_csr(label="CERTIFICATE")
        public_key = parse_csr(csr)
        self.assertEqual(_public_der(public_key), _public_der(key.public_key()))

    def test_leading_text(self):
        """Comments and other text before the PEM block are skipped."""
        key, csr = make_csr()
        data = b"# my request\nsome words\n\n" + csr
        self.assertEqual(_public_der(parse_csr(data)), _public_der(key.public_key()))

    def test_first_block_counts(self):
        """Only the first PEM block is read; what follows is ignored."""
        key, csr = make_csr()
        data = csr + make_csr()[1] + b"junk"
        self.assertEqual(_public_der(parse_csr(data)), _public_der(key.public_key()))


class RefusedTests(SynchronousTestCase):
    """
    CSRs refused, each with Dapr's exact message.
    """

    def assertRefused(self, data, message):
        """
        Assert that C{parse_csr(data)} raises L{CSRError} with C{message}.
        """
        error = self.assertRaises(CSRError, parse_csr, data)
        self.assertEqual(str(error), message)
        return error

    def test_empty(self):
        """No data at all is an invalid request."""
        self.assertRefused(b"", INVALID)

    def test_no_pem(self):
        """Data without a PEM block is an invalid request."""
        self.assertRefused(b"hello, sentry", INVALID)

    def test_der(self):
        """A bare DER CSR (no PEM armour) is an invalid request."""
        self.assertRefused(_der(make_csr()[1]), INVALID)

    def test_wrong_label(self):
        """A block labelled neither CERTIFICATE REQUEST nor CERTIFICATE is invalid."""
        self.assertRefused(
            make_csr(label="NEW CERTIFICATE REQUEST")[1], INVALID
        )

    def test_private_key_block(self):
        """A private key sent as the CSR is an invalid request."""
        key = make_private_key()
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        self.assertRefused(pem, INVALID)

    def test_unterminated_block(self):
        """A block without its END line is an invalid request."""
        _, pem = make_csr()
        self.assertRefused(pem.rsplit(b"-----END", 1)[0], INVALID)

    def test_bad_base64(self):
        """A block that is not base64 is an invalid request."""
        self.assertRefused(
            b"-----BEGIN CERTIFICATE REQUEST-----\n%%%%\n"
            b"-----END CERTIFICATE REQUEST-----\n",
            INVALID,
        )

    def test_unparsable_der(self):
        """DER that is not a CSR fails to parse, with the parser's detail."""
        error = self.assertRaises(
            CSRError, parse_csr, pem_encode("CERTIFICATE REQUEST", b"\x30\x03\x02\x01\x00")
        )
        self.assertTrue(
            str(error).startswith("failed to parse certificate signing request: ")
        )
        self.assertGreater(
            len(str(error)), len("failed to parse certificate signing request: ")
        )

    def test_bad_signature(self):
        """A CSR whose signature does not verify is refused."""
        for key_type in ("ecdsa-p256", "ed25519", "rsa-2048"):
            self.assertRefused(
                make_csr(key_type, corrupt_signature=True)[1],
                "invalid signature",
            )

    def test_rsa_1024(self):
        """An RSA key under 2048 bits is unsupported."""
        self.assertRefused(make_csr("rsa-1024")[1], "unsupported public key")

    def test_p192(self):
        """An ECDSA P-192 key is unsupported."""
        self.assertRefused(
            make_csr("ecdsa-p192")[1], "unsupported public key"
        )

    def test_not_bytes(self):
        """A str is not a CSR."""
        self.assertRefused("-----BEGIN CERTIFICATE REQUEST-----", INVALID)


class FuzzTests(SynchronousTestCase):
    """
    Whatever the bytes, L{parse_csr} refuses with L{CSRError} and nothing else.
    """

    def _only_csr_error(self, data):
        """
        Assert that L{parse_csr} refuses C{data} with a L{CSRError} carrying a
        message for the caller: a parsed CSR, or any other exception, fails.
        """
        error = self.assertRaises(CSRError, parse_csr, data)
        self.assertTrue(str(error), "a CSRError without a message")

    def test_random_bytes(self):
        """Random bytes, bare or inside PEM armour, are refused with CSRError."""
        rng = random.Random(8557)
        for length in range(0, 400, 7):
            blob = bytes(rng.getrandbits(8) for _ in range(length))
            self._only_csr_error(blob)
            self._only_csr_error(pem_encode("CERTIFICATE REQUEST", blob))
            self._only_csr_error(b"-----BEGIN CERTIFICATE REQUEST-----\n" + blob)

    def test_truncations_and_bit_flips(self):
        """Every truncation and many bit flips of a real CSR are refused with CSRError."""
        rng = random.Random(50001)
        _, valid = make_csr()
        der = _der(valid)
        for cut in range(len(der)):
            self._only_csr_error(pem_encode("CERTIFICATE REQUEST", der[:cut]))
        # Every cut of the PEM text that loses more than its final newline
        # (without it the document is whole, and parses).
        self.assertTrue(valid.endswith(b"-----\n"))
        for cut in range(len(valid) - 1):
            self._only_csr_error(valid[:cut])
        for _ in range(300):
            flipped = bytearray(der)
            position = rng.randrange(len(flipped))
            flipped[position] ^= 1 << rng.randrange(8)
            self._only_csr_error(pem_encode("CERTIFICATE REQUEST", bytes(flipped)))

    def test_os_random(self):
        """Bytes from the OS random source are refused with CSRError."""
        for _ in range(50):
            self._only_csr_error(os.urandom(256))
