# -*- test-case-name: tests.test_pem,tests.test_bundle,tests.test_csr -*-
"""
Reading PEM documents: the blocks of a document, strictly (only C{#}
comments and blank lines around the blocks, as a trust bundle's parts are
read) or leniently (stray text skipped, as Go's C{pem.Decode} does for a
CSR); and writing certificates back as PEM.

Messages name the line at fault and never quote the contents, which may be
key material.
"""

import base64
import binascii
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from sentry_tx.errors import BundleError

_PEM_BEGIN = b"-----BEGIN "
_PEM_END = b"-----END "
_PEM_DASHES = b"-----"


class PEMError(ValueError):
    """
    A PEM document is malformed.

    @ivar problem: what is wrong, in words, starting with the line number.
    """

    def __init__(self, problem: str) -> None:
        super().__init__(problem)
        self.problem = problem


@dataclass(frozen=True)
class PEMBlock:
    """
    One C{-----BEGIN <label>-----} ... C{-----END <label>-----} block.

    @ivar label: the label (C{"CERTIFICATE"}, C{"EC PRIVATE KEY"}, ...).
    @ivar headers: RFC 1421 headers (C{Proc-Type}, C{DEK-Info}) as a tuple
        of C{(name, value)} pairs of C{str}; empty for modern PEM.
    @ivar der: the decoded contents.
    @ivar line: the 1-based line number of the BEGIN line.
    """

    label: str
    headers: tuple[tuple[str, str], ...]
    der: bytes = field(repr=False)
    line: int


_PEM_LABEL = re.compile(rb"[\x21-\x2c\x2e-\x7e]+(?:[- ][\x21-\x2c\x2e-\x7e]+)*")
"""
An RFC 7468 label (C{CERTIFICATE}, C{EC PRIVATE KEY}).  Only such a label
makes a line a BEGIN or END line: a whole PEM squeezed onto one line
(newlines lost on the way) must not be taken for a BEGIN line, or messages
about it would quote the key.
"""

MAX_PEM_LABEL_BYTES = 64


def _pem_label(line: bytes, marker: bytes) -> str | None:
    """
    The label of a BEGIN or END line, or L{None} if C{line} is not one.
    """
    # The marker ends with a space, so it cannot overlap the closing dashes.
    if line.startswith(marker) and line.endswith(_PEM_DASHES):
        label = line[len(marker) : -len(_PEM_DASHES)]
        if len(label) <= MAX_PEM_LABEL_BYTES and _PEM_LABEL.fullmatch(label):
            return label.decode("ascii")
    return None


def iter_pem_blocks(data: bytes, strict: bool = True) -> Iterator[PEMBlock]:
    """
    Yield the PEM blocks of C{data}, in order.

    @param data: the document, C{bytes}.
    @param strict: when true, the only lines allowed outside blocks are
        blank lines and C{#} comments; any other text is a L{PEMError}.
        When false, such text is skipped (as Go's C{pem.Decode} does).
    @return: an iterator of L{PEMBlock}.
    @raise PEMError: for text outside a block (when strict), a block without
        its END line, an END line whose label differs, or contents that are
        not base64.  The error may come after some blocks were yielded.
    """
    lines = data.split(b"\n")
    index = 0
    while index < len(lines):
        line = lines[index].strip()
        index += 1
        label = _pem_label(line, _PEM_BEGIN)
        if label is None:
            if strict and line and not line.startswith(b"#"):
                raise PEMError(
                    f"line {index}: unexpected text outside a PEM block "
                    f"(only '#' comments and blank lines are allowed)"
                )
            continue
        begin_line = index
        headers: list[tuple[str, str]] = []
        body: list[bytes] = []
        while True:
            next_line = lines[index].strip() if index < len(lines) else None
            if next_line is None or next_line.startswith(_PEM_BEGIN):
                raise PEMError(
                    f"line {begin_line}: the {label} block has no END line"
                )
            line = next_line
            index += 1
            end_label = _pem_label(line, _PEM_END)
            if end_label is not None:
                if end_label != label:
                    raise PEMError(
                        f"line {index}: the {label} block that starts on line "
                        f"{begin_line} ends with END {end_label}"
                    )
                break
            if b":" in line and not body:
                name, _, value = line.partition(b":")
                headers.append(
                    (
                        name.strip().decode("ascii", "replace"),
                        value.strip().decode("ascii", "replace"),
                    )
                )
            elif line:
                body.append(line)
        try:
            der = base64.b64decode(b"".join(body), validate=True)
        except (binascii.Error, ValueError):
            raise PEMError(
                f"line {begin_line}: the {label} block is not valid base64"
            ) from None
        yield PEMBlock(label=label, headers=tuple(headers), der=der, line=begin_line)


def strict_pem_blocks(data: bytes, source: str) -> list[PEMBlock]:
    """
    All the PEM blocks of a bundle part, strictly.

    @raise BundleError: naming C{source} when the document is malformed.
    """
    try:
        return list(iter_pem_blocks(data, strict=True))
    except PEMError as e:
        raise BundleError(source, e.problem) from None


def certificates_pem(certificates: Iterable[x509.Certificate]) -> bytes:
    """
    The PEM of C{certificates}, concatenated.

    @param certificates: an iterable of L{x509.Certificate}.
    @return: C{bytes}.
    """
    return b"".join(
        cert.public_bytes(serialization.Encoding.PEM) for cert in certificates
    )


__all__ = [
    "MAX_PEM_LABEL_BYTES",
    "PEMBlock",
    "PEMError",
    "certificates_pem",
    "iter_pem_blocks",
    "strict_pem_blocks",
]
