"""
Tests for L{sentry_tx.ca.csr}: reading a caller's certificate signing request.
"""

import base64
import os
import random

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from twisted.trial.unittest import SynchronousTestCase

from sentry_tx.ca.csr import is_canonical_csr_pem, is_signature_valid, parse_csr
from sentry_tx.errors import CSRError
from sentry_tx.testing.certificates import (
    make_csr,
    make_private_key,
    pem_encode,
    public_key_der,
)

INVALID = "invalid certificate signing request"


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
        self.assertEqual(public_key_der(public_key), public_key_der(key.public_key()))

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
        self.assertEqual(public_key_der(public_key), public_key_der(key.public_key()))

    def test_leading_text(self):
        """Comments and other text before the PEM block are skipped."""
        key, csr = make_csr()
        data = b"# my request\nsome words\n\n" + csr
        self.assertEqual(
            public_key_der(parse_csr(data)), public_key_der(key.public_key())
        )

    def test_first_block_counts(self):
        """Only the first PEM block is read; what follows is ignored."""
        key, csr = make_csr()
        data = csr + make_csr()[1] + b"junk"
        self.assertEqual(
            public_key_der(parse_csr(data)), public_key_der(key.public_key())
        )


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
            CSRError,
            parse_csr,
            pem_encode("CERTIFICATE REQUEST", b"\x30\x03\x02\x01\x00"),
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
        """
        Every truncation and many bit flips of a real CSR are refused with CSRError.
        """
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


def _der_length(length):
    """
    The DER encoding of a length.
    """
    if length < 0x80:
        return bytes([length])
    octets = length.to_bytes((length.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(octets)]) + octets


def _der_elements(der):
    """
    The raw elements (tag, length and value) inside one DER SEQUENCE.
    """
    assert der[0] == 0x30
    if der[1] < 0x80:
        position = 2
    else:
        position = 2 + (der[1] & 0x7F)
    elements = []
    while position < len(der):
        if der[position + 1] < 0x80:
            header, length = 2, der[position + 1]
        else:
            count = der[position + 1] & 0x7F
            header = 2 + count
            length = int.from_bytes(der[position + 2 : position + 2 + count], "big")
        elements.append(der[position : position + header + length])
        position += header + length
    return elements


_ALGORITHM_IDENTIFIERS = {
    "ecdsa-with-SHA256": bytes.fromhex("300a06082a8648ce3d040302"),
    "sha256WithRSAEncryption": bytes.fromhex("300d06092a864886f70d01010b0500"),
    "ed25519": bytes.fromhex("300506032b6570"),
}


def _with_signature_algorithm(pem, algorithm):
    """
    The CSR C{pem} with its signature algorithm identifier replaced by
    C{algorithm} (a name of L{_ALGORITHM_IDENTIFIERS}); the signature bytes
    are kept.
    """
    tbs, _, signature = _der_elements(_der(pem))
    body = tbs + _ALGORITHM_IDENTIFIERS[algorithm] + signature
    return pem_encode("CERTIFICATE REQUEST", b"\x30" + _der_length(len(body)) + body)


def _signed_csr(key, hash_algorithm, **sign_options):
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(key, hash_algorithm, **sign_options)
    )
    return pem_encode(
        "CERTIFICATE REQUEST", csr.public_bytes(serialization.Encoding.DER)
    )


def _corrupt(pem):
    der = _der(pem)
    return pem_encode("CERTIFICATE REQUEST", der[:-1] + bytes([der[-1] ^ 0x01]))


class SignatureAlgorithmTests(SynchronousTestCase):
    """
    The signature check reads the algorithm and its parameters from the CSR,
    and agrees with C{is_signature_valid} on every pairing of key and
    algorithm.
    """

    def setUp(self):
        self.rsa_key = make_private_key("rsa-2048")

    def assertAgreesWithCryptography(self, pem, valid):
        """
        Assert that L{is_signature_valid} and C{is_signature_valid} both
        say C{valid} for C{pem}, and that L{parse_csr} accepts or refuses
        it accordingly.
        """
        csr = x509.load_pem_x509_csr(pem)
        self.assertEqual(csr.is_signature_valid, valid)
        self.assertEqual(is_signature_valid(csr, csr.public_key()), valid)
        if valid:
            self.assertEqual(
                public_key_der(parse_csr(pem)), public_key_der(csr.public_key())
            )
        else:
            error = self.assertRaises(CSRError, parse_csr, pem)
            self.assertEqual(str(error), "invalid signature")

    def test_rsa_pss(self):
        """An RSA-PSS CSR (MGF1 with the signature's hash) verifies with PSS."""
        pem = _signed_csr(
            self.rsa_key,
            hashes.SHA256(),
            rsa_padding=padding.PSS(
                mgf=padding.MGF1(hashes.SHA256()),
                salt_length=padding.PSS.DIGEST_LENGTH,
            ),
        )
        self.assertAgreesWithCryptography(pem, True)

    def test_rsa_pss_other_parameters(self):
        """An RSA-PSS CSR with another MGF1 hash and salt length verifies with them."""
        pem = _signed_csr(
            self.rsa_key,
            hashes.SHA256(),
            rsa_padding=padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=20),
        )
        self.assertAgreesWithCryptography(pem, True)

    def test_rsa_pss_bad_signature(self):
        """An RSA-PSS CSR whose signature does not verify is refused."""
        pem = _signed_csr(
            self.rsa_key,
            hashes.SHA256(),
            rsa_padding=padding.PSS(
                mgf=padding.MGF1(hashes.SHA256()), salt_length=32
            ),
        )
        self.assertAgreesWithCryptography(_corrupt(pem), False)

    def test_rsa_pkcs1_hashes(self):
        """RSA PKCS#1 v1.5 CSRs verify with the hash they name."""
        for hash_algorithm in (hashes.SHA384(), hashes.SHA512()):
            pem = _signed_csr(self.rsa_key, hash_algorithm)
            self.assertAgreesWithCryptography(pem, True)
            self.assertAgreesWithCryptography(_corrupt(pem), False)

    def test_ecdsa_hash_unlike_curve(self):
        """A P-384 CSR signed with SHA-256 verifies with SHA-256."""
        pem = _signed_csr(make_private_key("ecdsa-p384"), hashes.SHA256())
        self.assertAgreesWithCryptography(pem, True)

    def test_key_types_bad_signature(self):
        """ECDSA and Ed25519 CSRs whose signature does not verify are refused."""
        for key_type in ("ecdsa-p256", "ecdsa-p521", "ed25519"):
            _, pem = make_csr(key_type, corrupt_signature=True)
            self.assertAgreesWithCryptography(pem, False)

    def test_algorithm_of_another_key_type(self):
        """
        A valid signature under the algorithm identifier of another key type
        is refused, as C{is_signature_valid} refuses it.
        """
        cases = [
            ("ed25519", "ecdsa-with-SHA256"),
            ("ed25519", "sha256WithRSAEncryption"),
            ("ecdsa-p256", "ed25519"),
            ("ecdsa-p256", "sha256WithRSAEncryption"),
        ]
        for key_type, algorithm in cases:
            _, pem = make_csr(key_type)
            self.assertAgreesWithCryptography(
                _with_signature_algorithm(pem, algorithm), False
            )
        _, pem = make_csr(self.rsa_key)
        self.assertAgreesWithCryptography(
            _with_signature_algorithm(pem, "ecdsa-with-SHA256"), False
        )
        self.assertAgreesWithCryptography(
            _with_signature_algorithm(pem, "ed25519"), False
        )


class PEMShapeTests(SynchronousTestCase):
    """
    Which PEM documents take the short way (C{load_pem_x509_csr}), and that
    every other shape reads as it always did.
    """

    def test_canonical_shape(self):
        """A CSR as Go's pem.EncodeToMemory writes it is in the canonical shape."""
        _, pem = make_csr()
        self.assertTrue(is_canonical_csr_pem(pem))

    def test_other_shapes(self):
        """Any other label, text around the block or line ending is not."""
        _, pem = make_csr()
        for data in (
            make_csr(label="CERTIFICATE")[1],
            make_csr(label="NEW CERTIFICATE REQUEST")[1],
            b"# my request\n" + pem,
            pem + b"# trailer\n",
            pem.rstrip(b"\n"),
            pem.replace(b"\n", b"\r\n"),
            pem + pem,
            b"-----BEGIN CERTIFICATE REQUEST-----\n-----END CERTIFICATE REQUEST-----\n",
        ):
            self.assertFalse(is_canonical_csr_pem(data), data)

    def test_comment_line_before_block(self):
        """A # comment line before the block is skipped."""
        key, pem = make_csr()
        self.assertEqual(
            public_key_der(parse_csr(b"# a sidecar's request\n" + pem)),
            public_key_der(key.public_key()),
        )

    def test_certificate_label_rsa_pss(self):
        """A CERTIFICATE-labelled RSA-PSS CSR is read and its signature checked."""
        key = make_private_key("rsa-2048")
        der = _der(
            _signed_csr(
                key,
                hashes.SHA256(),
                rsa_padding=padding.PSS(
                    mgf=padding.MGF1(hashes.SHA256()), salt_length=32
                ),
            )
        )
        pem = pem_encode("CERTIFICATE", der)
        self.assertEqual(
            public_key_der(parse_csr(pem)), public_key_der(key.public_key())
        )
        error = self.assertRaises(
            CSRError,
            parse_csr,
            pem_encode("CERTIFICATE", der[:-1] + bytes([der[-1] ^ 0x01])),
        )
        self.assertEqual(str(error), "invalid signature")

    def test_crlf_line_endings(self):
        """A CSR with CRLF line endings is accepted."""
        key, pem = make_csr()
        self.assertEqual(
            public_key_der(parse_csr(pem.replace(b"\n", b"\r\n"))),
            public_key_der(key.public_key()),
        )

    def test_csr_after_another_block(self):
        """A CSR after a block of another kind is invalid: the first block counts."""
        _, pem = make_csr()
        other = pem_encode("PUBLIC KEY", b"\x30\x00")
        error = self.assertRaises(CSRError, parse_csr, other + pem)
        self.assertEqual(str(error), INVALID)

    def test_space_inside_base64(self):
        """Base64 with a space inside a line is invalid, as before."""
        _, pem = make_csr()
        lines = pem.split(b"\n")
        lines[1] = lines[1][:10] + b" " + lines[1][10:]
        error = self.assertRaises(CSRError, parse_csr, b"\n".join(lines))
        self.assertEqual(str(error), INVALID)

    def test_canonical_unparsable_der(self):
        """A canonical block whose DER does not parse has the parser's detail."""
        data = pem_encode("CERTIFICATE REQUEST", b"\x30\x03\x02\x01\x00")
        self.assertTrue(is_canonical_csr_pem(data))
        error = self.assertRaises(CSRError, parse_csr, data)
        try:
            x509.load_der_x509_csr(b"\x30\x03\x02\x01\x00")
        except Exception as e:
            detail = str(e)
        self.assertEqual(
            str(error), f"failed to parse certificate signing request: {detail}"
        )
