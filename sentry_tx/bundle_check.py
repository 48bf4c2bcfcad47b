# -*- test-case-name: tests.test_bundle_check -*-
"""
C{python -m sentry_tx check-bundle DIR}: would sentry_tx start with the trust
bundle in DIR?

It runs exactly the start-up checks (L{FileTrustStore.load_or_generate_sync}
over the same three paths, at the current time), never generates or writes
anything, and prints what it found: the trust anchors and the issuer chain
with their expiry dates and key types, which anchor the chain reaches,
whether the key matches the issuer, and a renewal's pending next issuer
with its switch time.  Exit status 0 when the bundle would
load; 1, with the message sentry_tx would log, when it would not.

Operators run it on the files they are about to put in the
C{dapr-trust-bundle} Secret (or a credentials directory) before they do.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, NoReturn

from sentry_tx.config import SentryConfig

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
    from cryptography.x509 import Certificate
    from twisted.internet.interfaces import IDelayedCall

    from sentry_tx.ca.bundle import TrustBundle
    from sentry_tx.ca.renewal import RenewalSettings
    from sentry_tx.ca.store import FileTrustStore
    from sentry_tx.logs import LineStream

BundlePaths = tuple[str, str, str]
"""
The trust anchors, issuer chain and issuer key paths, in that order.
"""

CHECK_BUNDLE_COMMAND = "check-bundle"

_DEFAULTS = SentryConfig()


class _SynchronousOnly:
    """
    The reactor the check hands its file stores: the check reads the files
    synchronously (their C{*_sync} methods) and runs no reactor, so none of
    this is ever called; if it were, it says so rather than wait forever.
    """

    def _refuse(self) -> NoReturn:
        raise RuntimeError("the bundle check reads synchronously; it runs no reactor")

    def seconds(self) -> float:
        self._refuse()

    def callLater(
        self, delay: float, callable: Callable[..., object], *args: object
    ) -> IDelayedCall:
        self._refuse()

    def callFromThread(self, callable: Callable[..., object], *args: object) -> None:
        self._refuse()


_SYNCHRONOUS_ONLY = _SynchronousOnly()


def _key_description(public_key: PublicKeyTypes) -> str:
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return f"ECDSA {public_key.curve.name}"
    if isinstance(public_key, rsa.RSAPublicKey):
        return f"RSA {public_key.key_size}-bit"
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return "Ed25519"
    return type(public_key).__name__


def _expiry(certificate: Certificate, now: datetime) -> str:
    """
    C{"expires <date> (in N days)"}, or C{"EXPIRED <date>"}.
    """
    from sentry_tx.expiry import EXPIRY_WARNING_DAYS

    not_after = certificate.not_valid_after_utc
    days = (not_after - now).total_seconds() / 86400
    text = not_after.isoformat()
    if days < 0:
        return f"EXPIRED {text}"
    warning = (
        f"; WITHIN {EXPIRY_WARNING_DAYS} DAYS" if days < EXPIRY_WARNING_DAYS else ""
    )
    return f"expires {text} (in {int(days)} days{warning})"


def describe_bundle(
    bundle: TrustBundle, paths: BundlePaths, now: datetime
) -> list[str]:
    """
    The report on a bundle that loads, as lines of text.

    @param bundle: the L{TrustBundle} loaded.
    @param paths: the anchors, issuer chain and key paths.
    @param now: an aware L{datetime}.
    """
    from sentry_tx.ca.bundle import _is_signed_by

    ca_path, chain_path, key_path = paths
    lines = [f"trust anchors ({ca_path}): {len(bundle.anchors)}"]
    for anchor in bundle.anchors:
        lines.append(
            f"  {anchor.subject.rfc4514_string()}: {_expiry(anchor, now)};"
            f" key {_key_description(anchor.public_key())}"
        )
    lines.append(f"issuer chain ({chain_path}): {len(bundle.issuer_chain)}")
    for certificate in bundle.issuer_chain:
        lines.append(
            f"  {certificate.subject.rfc4514_string()}, issued by"
            f" {certificate.issuer.rfc4514_string()}: {_expiry(certificate, now)};"
            f" key {_key_description(certificate.public_key())}"
        )
    top = bundle.issuer_chain[-1]
    reached = [
        anchor.subject.rfc4514_string()
        for anchor in bundle.anchors
        if anchor.subject == top.issuer and _is_signed_by(top, anchor)
    ]
    lines.append(
        "the issuer chain verifies up to the anchor "
        + (", ".join(reached) if reached else "(none)")
    )
    lines.append(
        f"issuer key ({key_path}): {_key_description(bundle.issuer_key.public_key())},"
        " matches the issuer certificate"
    )
    lines.append(
        "workload certificates will not outlive"
        f" {bundle.chain_not_after.isoformat()}"
    )
    return lines


def check_bundle(
    paths: BundlePaths,
    now: datetime,
    out: LineStream,
    err: LineStream,
    settings: RenewalSettings | None = None,
) -> int:
    """
    Run the start-up checks on the three C{paths} and report to C{out}
    (the findings) and C{err} (the refusal).

    @return: the exit status: 0 if the bundle would load, 1 if not.
    """
    from sentry_tx.ca.store import FileTrustStore
    from sentry_tx.errors import BundleError

    if not any(os.path.lexists(path) for path in paths):
        err.write(
            f"none of {', '.join(paths)} exists: sentry_tx would generate a"
            " new trust bundle there; there is nothing to check\n"
        )
        return 1
    store = FileTrustStore(
        _SYNCHRONOUS_ONLY,
        *paths,
        trust_domain=_DEFAULTS.trust_domain,
        namespace=_DEFAULTS.namespace,
        allowed_clock_skew=_DEFAULTS.mtls.allowed_clock_skew,
    )
    try:
        # Some file exists, so this never generates: it is the start's own
        # code path, refusals included.
        bundle = store.load_or_generate_sync(now)
    except BundleError as error:
        # The words sentry_tx logs when it refuses to start.
        err.write(f"refusing to start: {error}\n")
        return 1
    for line in describe_bundle(bundle, paths, now):
        out.write(line + "\n")
    for line in describe_renewal(store, now, settings):
        out.write(line + "\n")
    out.write("OK: sentry_tx would load this bundle\n")
    return 0


def describe_renewal(
    store: FileTrustStore, now: datetime, settings: RenewalSettings | None = None
) -> list[str]:
    """
    The report on automatic CA renewal: a pending next issuer and its switch
    time, or an interrupted switch (which sentry_tx finishes at start).

    @param store: the L{FileTrustStore} of the bundle.
    @param settings: the L{RenewalSettings} the switch time is computed
        with (the grace, the workload TTL and the skew); the defaults when
        None.
    """
    from sentry_tx.ca.renewal import RenewalSettings, switch_time
    from sentry_tx.ca.renewal_files import FileRenewalStore
    from sentry_tx.durations import format_go_duration
    from sentry_tx.errors import BundleError

    try:
        state = FileRenewalStore(_SYNCHRONOUS_ONLY, store).read_sync(now)
    except BundleError as error:
        return [f"renewal: the pending issuer cannot be used: {error}"]
    next_crt, next_key = store.next_paths
    if state.switching or state.leftover:
        return [
            f"renewal: a switch to the renewed issuer was interrupted; sentry_tx"
            f" finishes it at start (removing {next_crt} and {next_key})"
        ]
    next_issuer = state.next_issuer
    if next_issuer is None or not state.pending:
        return ["renewal: no renewed issuer pending"]
    if settings is None:
        settings = RenewalSettings()
    anchored = state.next_root in state.anchors
    return [
        f"renewal: pending next issuer ({next_crt}):"
        f" {next_issuer.subject.rfc4514_string()},"
        f" {_expiry(next_issuer, now)}; its root is"
        f" {'in' if anchored else 'NOT YET in (sentry_tx appends it at start)'}"
        f" the trust anchors",
        f"renewal: the issuer switches to it at"
        f" {switch_time(state.issuer, next_issuer, settings).isoformat()}"
        f" (grace {settings.describe_grace()}, workload certificate TTL"
        f" {format_go_duration(settings.workload_ttl)}, clock skew"
        f" {format_go_duration(settings.allowed_clock_skew)});"
        " restart workloads before then so their sidecars trust the new root",
    ]


def main(
    argv: Sequence[str],
    out: LineStream | None = None,
    err: LineStream | None = None,
    now: datetime | None = None,
) -> int:
    """
    The C{check-bundle} command line.

    @param argv: the arguments after C{check-bundle}.
    @return: the exit status.
    """
    from twisted.logger import globalLogPublisher

    from sentry_tx import logs

    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    parser = argparse.ArgumentParser(
        prog=f"python -m sentry_tx {CHECK_BUNDLE_COMMAND}",
        description="Run sentry_tx's start-up checks on a trust bundle directory.",
    )
    parser.add_argument("directory", help="the directory (as --issuer-credentials)")
    for flag, default in (
        ("--issuer-ca-filename", _DEFAULTS.issuer_ca_filename),
        ("--issuer-certificate-filename", _DEFAULTS.issuer_certificate_filename),
        ("--issuer-key-filename", _DEFAULTS.issuer_key_filename),
    ):
        parser.add_argument(flag, default=default, help=f"default: {default}")
    parser.add_argument(
        "--trust-anchor-propagation-grace",
        default="auto",
        help="as sentry_tx runs, for the switch time of a pending renewal"
        " (default: auto)",
    )
    parser.add_argument(
        "--config",
        default=None,
        help="the Configuration file sentry_tx runs with (its workload"
        " certificate TTL and clock skew set the switch time)",
    )
    arguments = parser.parse_args(argv)
    from sentry_tx.errors import ConfigError

    try:
        settings = _renewal_settings(arguments)
    except ConfigError as error:
        err.write(f"{error.field}: {error.problem}\n")
        return 2
    except OSError as error:
        err.write(f"--config: {error}\n")
        return 2
    config = SentryConfig(
        issuer_credentials=arguments.directory,
        issuer_ca_filename=arguments.issuer_ca_filename,
        issuer_certificate_filename=arguments.issuer_certificate_filename,
        issuer_key_filename=arguments.issuer_key_filename,
    )
    if now is None:
        now = datetime.now(UTC)
    # The start's warnings (a key file readable by others) are shown too,
    # while the check runs.
    observer = logs.make_observer("warn", False, err)
    globalLogPublisher.addObserver(observer)
    try:
        return check_bundle(
            (config.ca_path, config.issuer_certificate_path, config.issuer_key_path),
            now,
            out,
            err,
            settings,
        )
    finally:
        globalLogPublisher.removeObserver(observer)


def _renewal_settings(arguments: argparse.Namespace) -> RenewalSettings:
    """
    The L{RenewalSettings} check-bundle computes a switch time with.
    """
    from sentry_tx.ca.renewal import RenewalSettings
    from sentry_tx.config import MTLSConfig, load_configuration_file
    from sentry_tx.durations import parse_go_duration

    grace = None
    if arguments.trust_anchor_propagation_grace != "auto":
        grace = parse_go_duration(
            arguments.trust_anchor_propagation_grace,
            "--trust-anchor-propagation-grace",
        )
    mtls = MTLSConfig()
    if arguments.config is not None:
        mtls, _ = load_configuration_file(arguments.config, os.environ)
    return RenewalSettings(
        grace=grace,
        workload_ttl=mtls.workload_cert_ttl,
        allowed_clock_skew=mtls.allowed_clock_skew,
    )
