"""
Tests for L{sentry_tx.ca.pem}: reading the blocks of a PEM document.
"""

import base64

from twisted.trial.unittest import SynchronousTestCase

from sentry_tx.ca.pem import PEMError, iter_pem_blocks
from sentry_tx.testing.certificates import pem_encode


class PEMTests(SynchronousTestCase):
    """
    Tests for L{iter_pem_blocks}.
    """

    def test_blocks_and_lines(self):
        """Blocks come out in order with their label, DER and starting line."""
        data = b"# c\n" + pem_encode("A", b"one") + b"\n" + pem_encode("B C", b"two")
        blocks = list(iter_pem_blocks(data))
        self.assertEqual(
            [(b.label, b.der, b.line) for b in blocks],
            [("A", b"one", 2), ("B C", b"two", 6)],
        )

    def test_headers(self):
        """RFC 1421 headers are collected, not decoded as base64."""
        data = (
            b"-----BEGIN X-----\nProc-Type: 4,ENCRYPTED\nDEK-Info: AES,00\n\n"
            + base64.b64encode(b"body")
            + b"\n-----END X-----\n"
        )
        (block,) = iter_pem_blocks(data)
        self.assertEqual(
            block.headers, (("Proc-Type", "4,ENCRYPTED"), ("DEK-Info", "AES,00"))
        )
        self.assertEqual(block.der, b"body")

    def test_mismatched_end(self):
        """An END whose label differs from the BEGIN is an error."""
        data = b"-----BEGIN A-----\nAAAA\n-----END B-----\n"
        error = self.assertRaises(PEMError, list, iter_pem_blocks(data))
        self.assertIn("ends with END B", error.problem)

    def test_lenient(self):
        """Not strict, stray text is skipped."""
        data = b"hello\n" + pem_encode("A", b"one") + b"bye\n"
        self.assertEqual([b.der for b in iter_pem_blocks(data, strict=False)], [b"one"])
        self.assertRaises(PEMError, list, iter_pem_blocks(data, strict=True))

    def test_begin_inside_block(self):
        """A BEGIN before the previous block's END means that block has no END."""
        data = b"-----BEGIN A-----\nAAAA\n" + pem_encode("A", b"x")
        error = self.assertRaises(PEMError, list, iter_pem_blocks(data))
        self.assertIn("line 1", error.problem)
        self.assertIn("no END line", error.problem)
