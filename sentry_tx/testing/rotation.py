"""
Rotating the issuer's files on disk as operators and the kubelet do: new
credentials written in place, or a projected volume's C{..data} link swapped
to a new version directory.
"""

import os
from datetime import datetime
from typing import Literal, Unpack

from sentry_tx.testing.certificates import (
    _DEFAULT,
    CertificateChain,
    CertificateOptions,
    _Default,
    make_certificate,
    make_private_key,
)

BUNDLE_FILE_NAMES = ("ca.crt", "issuer.crt", "issuer.key")
"""
The names of the three bundle files, in the order anchors, chain, key.
"""

PROJECTED_DATA_LINK = "..data"
"""
The symbolic link through which the kubelet publishes a projected volume's
current version.
"""


def _bundle_file_contents(chain: CertificateChain) -> tuple[bytes, bytes, bytes]:
    return (
        chain.anchors_pem,
        chain.issuer_chain_pem(),
        chain.issuer_key_pem(),
    )


def reissue_chain(
    chain: CertificateChain,
    key_type: str = "ecdsa-p256",
    not_before: datetime | Literal[_Default.DEFAULT] = _DEFAULT,
    not_after: datetime | Literal[_Default.DEFAULT] = _DEFAULT,
    **issuer_options: Unpack[CertificateOptions],
) -> CertificateChain:
    """
    A new issuer with a new key, signed by the same CA that signed
    C{chain}'s issuer: what an operator rotating the issuer (not the root)
    deploys.

    @param chain: a L{CertificateChain}.
    @param key_type: the new issuer key's type (L{KEY_TYPES}).
    @param not_before: when the new issuer starts (default: as the old).
    @param not_after: when the new issuer ends (default: as the old).
    @param issuer_options: more keyword arguments of L{make_certificate}.
    @return: a L{CertificateChain} with the same root and intermediates.
    """
    if chain.intermediates:
        signer, signer_key = chain.intermediates[0], chain.intermediate_keys[0]
    else:
        signer, signer_key = chain.root, chain.root_key
    if not_before is _DEFAULT:
        not_before = chain.issuer.not_valid_before_utc
    if not_after is _DEFAULT:
        not_after = chain.issuer.not_valid_after_utc
    issuer_key = make_private_key(key_type)
    issuer_options.setdefault("path_length", 0)
    issuer = make_certificate(
        issuer_key,
        chain.issuer.subject,
        signer=signer,
        signer_key=signer_key,
        not_before=not_before,
        not_after=not_after,
        **issuer_options,
    )
    return CertificateChain(
        root=chain.root,
        root_key=chain.root_key,
        intermediates=chain.intermediates,
        intermediate_keys=chain.intermediate_keys,
        issuer=issuer,
        issuer_key=issuer_key,
    )


def replace_bundle_files(chain: CertificateChain, directory: str) -> tuple[str, ...]:
    """
    Replace C{ca.crt}, C{issuer.crt} and C{issuer.key} in C{directory} as
    careful tools do: each is written to a temporary file in the same
    directory, then renamed over the old one.

    @return: the three paths.
    """
    paths: list[str] = []
    for name, data in zip(BUNDLE_FILE_NAMES, _bundle_file_contents(chain), strict=True):
        path = os.path.join(directory, name)
        temporary = os.path.join(directory, f".{name}.new")
        with open(temporary, "wb") as f:
            f.write(data)
        os.chmod(temporary, 0o600)
        os.rename(temporary, path)
        paths.append(path)
    return tuple(paths)


def project_volume(directory: str, chain: CertificateChain, version: str) -> None:
    """
    Lay C{directory} out as the kubelet projects a Secret: the files in a
    version directory, C{..data} pointing at it, and each visible file a
    symbolic link into C{..data/}.

    @param directory: an existing, empty directory.
    @param version: the version directory's name (C{"..2026_x"}).
    """
    chain.write(_make_version(directory, version))
    os.symlink(version, os.path.join(directory, PROJECTED_DATA_LINK))
    for name in BUNDLE_FILE_NAMES:
        os.symlink(
            os.path.join(PROJECTED_DATA_LINK, name), os.path.join(directory, name)
        )


def swap_projected_volume(
    directory: str, chain: CertificateChain, version: str
) -> None:
    """
    Publish C{chain} in a volume laid out by L{project_volume} as the kubelet
    updates one: write a new version directory, point C{..data_tmp} at it,
    rename C{..data_tmp} over C{..data}, remove the old version.

    @param version: the new version directory's name (C{"..2026_y"}).
    """
    import shutil

    data_link = os.path.join(directory, PROJECTED_DATA_LINK)
    old_version = os.readlink(data_link)
    chain.write(_make_version(directory, version))
    temporary_link = data_link + "_tmp"
    os.symlink(version, temporary_link)
    os.rename(temporary_link, data_link)
    shutil.rmtree(os.path.join(directory, old_version))


def _make_version(directory: str, version: str) -> str:
    path = os.path.join(directory, version)
    os.mkdir(path, 0o700)
    return path
