# -*- test-case-name: tests.test_renewal -*-
"""
Automatic CA renewal, planned: pure functions of the bundle's certificates
and of C{now} (the shape of Dapr's PR #10290, C{pkg/sentry/server/ca/renewal.go}).

A renewal is append-only.  When the active issuer passes
C{--ca-renewal-threshold} of its life (its NotBefore + threshold x
(NotAfter - NotBefore), as Dapr's PR computes it), a new root (its key is
never written) and a new issuer are made; the root is added to the trust
anchors at once and the new pair is kept as C{issuer.next.crt} /
C{issuer.next.key} beside the active one.  The active issuer keeps signing
until the switch (L{switch_time}); then the next pair becomes the active
one.  A root leaves the anchors only after it has expired.

Everything is read back from the certificates alone (L{RenewalState}), so a
process that restarts at any point resumes where the files say it was;
L{plan} says which one step comes next.  The stores that carry the steps
out are L{sentry_tx.ca.renewal_files} (files) and
L{sentry_tx.ca.kubernetes_renewal} (the Secret); the service that runs them
on the reactor's clock is L{sentry_tx.ca.renewal_service}.

Only bundles in the shape Dapr's Sentry and sentry_tx generate are renewed
(L{shape_problem}); any other bundle is the operator's and is never written.
"""

import os
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, cast

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import NameOID

from sentry_tx.ca import x509profile
from sentry_tx.ca.bundle import (
    KEY_TYPE_ECDSA_P256,
    KEY_TYPE_ED25519,
    generate_bundle,
    is_self_signed,
    load_bundle,
)
from sentry_tx.ca.pem import certificates_pem
from sentry_tx.durations import format_go_duration
from sentry_tx.errors import BundleError, ConfigError

if TYPE_CHECKING:
    from sentry_tx.config import SentryConfig

DEFAULT_CA_TTL = timedelta(hours=8760)
"""
C{--ca-ttl}: the life of a generated or renewed root and issuer (Dapr's).
"""

DEFAULT_RENEWAL_THRESHOLD = 0.9
"""
C{--ca-renewal-threshold}: the fraction of the issuer's life after which it
is renewed (Dapr's).
"""

AUTO_SWITCH_MARGIN = timedelta(hours=1)
"""
With C{--trust-anchor-propagation-grace=auto}, the switch comes this long
before the last safe moment (the old issuer's NotAfter minus twice the
workload certificate TTL): room for a restart, a slow API server, a clock a
little ahead.
"""

GRACE_AUTO = "auto"

ACTION_OFF = "off"
ACTION_WAIT = "wait"
ACTION_RENEW = "renew"
ACTION_APPEND = "append"
ACTION_SWITCH = "switch"
ACTION_FINISH_SWITCH = "finish-switch"
ACTION_PRUNE = "prune"

WRITING_ACTIONS = (
    ACTION_RENEW,
    ACTION_APPEND,
    ACTION_SWITCH,
    ACTION_FINISH_SWITCH,
    ACTION_PRUNE,
)


def next_path(path: str) -> str:
    """
    Where the pending counterpart of an active credential lives, as Dapr's
    PR names it: C{.next} before the extension (C{issuer.crt} gives
    C{issuer.next.crt}).
    """
    root, extension = os.path.splitext(path)
    return f"{root}.next{extension}"


@dataclass(frozen=True)
class RenewalSettings:
    """
    What renewal is told: the four flags, and from the Configuration the
    workload certificate TTL and the allowed clock skew.

    @ivar grace: the propagation grace, or L{None} for C{auto}.
    """

    enabled: bool = True
    ca_ttl: timedelta = DEFAULT_CA_TTL
    threshold: float = DEFAULT_RENEWAL_THRESHOLD
    grace: timedelta | None = None
    workload_ttl: timedelta = timedelta(hours=24)
    allowed_clock_skew: timedelta = timedelta(minutes=15)
    trust_domain: str = "localhost"
    namespace: str = "default"

    @classmethod
    def from_config(cls, config: "SentryConfig") -> "RenewalSettings":
        """
        The settings of a L{sentry_tx.config.SentryConfig}.
        """
        grace = config.trust_anchor_propagation_grace_seconds
        return cls(
            enabled=config.ca_renewal_enabled,
            ca_ttl=timedelta(seconds=config.ca_ttl_seconds),
            threshold=config.ca_renewal_threshold,
            # SentryConfig types the grace as object; it holds whole
            # seconds, or None for auto.
            grace=None if grace is None else timedelta(seconds=cast(float, grace)),
            workload_ttl=config.mtls.workload_cert_ttl,
            allowed_clock_skew=config.mtls.allowed_clock_skew,
            trust_domain=config.trust_domain,
            namespace=config.namespace,
        )

    def describe_grace(self) -> str:
        """
        The grace as the operator wrote it (C{auto}, or a Go duration).
        """
        if self.grace is None:
            return GRACE_AUTO
        return format_go_duration(self.grace)


THRESHOLD_FLAG = "--ca-renewal-threshold"
TTL_FLAG = "--ca-ttl"
GRACE_FLAG = "--trust-anchor-propagation-grace"


def check_settings(settings: RenewalSettings) -> None:
    """
    Refuse settings under which renewal cannot work, naming the flags.

    Checked only when renewal is enabled: the threshold is in (0, 1), the
    TTL and an explicit grace are positive; the allowed clock skew alone
    does not pass the threshold (a renewed issuer starts C{skew} early, so
    it would be due as soon as it is made and renew for ever); and the life
    left after the threshold has room for the grace (an explicit one, or
    C{auto}'s twice the workload TTL plus L{AUTO_SWITCH_MARGIN}).

    @raise ConfigError: naming the flags at fault.
    """
    if not settings.enabled:
        return
    check_values(settings)
    _check_combination(settings)


def check_values(settings: RenewalSettings) -> None:
    """
    The checks of L{check_settings} that need no Configuration: the
    threshold in (0, 1), a positive TTL and grace.

    @raise ConfigError: naming the flag at fault.
    """
    if not 0 < settings.threshold < 1:
        raise ConfigError(
            THRESHOLD_FLAG,
            f"must be in the range (0, 1), not {settings.threshold!r}",
        )
    if settings.ca_ttl <= timedelta(0):
        raise ConfigError(TTL_FLAG, "must be greater than zero")
    if settings.grace is not None and settings.grace <= timedelta(0):
        raise ConfigError(GRACE_FLAG, "must be greater than zero (or auto)")


def _check_combination(settings: RenewalSettings) -> None:
    skew = settings.allowed_clock_skew
    lifetime = settings.ca_ttl + skew
    if lifetime * settings.threshold <= skew:
        raise ConfigError(
            f"{THRESHOLD_FLAG}, {TTL_FLAG}",
            f"the allowed clock skew ({format_go_duration(skew)}) alone passes"
            f" the threshold: an issuer of {format_go_duration(settings.ca_ttl)}"
            f" starts {format_go_duration(skew)} early, so it would be due for"
            f" renewal as soon as it is made, for ever; raise {TTL_FLAG} or"
            f" {THRESHOLD_FLAG}, or lower spec.mtls.allowedClockSkew",
        )
    remaining = lifetime * (1 - settings.threshold)
    if settings.grace is None:
        needed = 2 * settings.workload_ttl + AUTO_SWITCH_MARGIN
        what = (
            f"auto needs twice the workload certificate TTL"
            f" ({format_go_duration(settings.workload_ttl)}) plus"
            f" {format_go_duration(AUTO_SWITCH_MARGIN)}"
        )
    else:
        needed = settings.grace + skew
        what = (
            f"the grace {format_go_duration(settings.grace)} plus the allowed"
            f" clock skew {format_go_duration(skew)}"
        )
    if remaining <= needed:
        raise ConfigError(
            f"{THRESHOLD_FLAG}, {GRACE_FLAG}",
            f"the threshold leaves no room for the grace: renewing at"
            f" {settings.threshold:g} of {TTL_FLAG}"
            f" {format_go_duration(settings.ca_ttl)} leaves"
            f" {format_go_duration(remaining)} of the old issuer, and {what};"
            f" lower {THRESHOLD_FLAG}, raise {TTL_FLAG} or shorten {GRACE_FLAG}",
        )


# The state, from the certificates alone


@dataclass(frozen=True)
class RenewalState:
    """
    What the stored credentials say, verified.

    @ivar anchors: the trust anchors (C{ca.crt}), in order.
    @ivar issuer_chain: the active issuer chain (C{issuer.crt}).
    @ivar issuer_key: the active issuer's key.
    @ivar next_issuer: the pending issuer (C{issuer.next.crt}), or None.
    @ivar next_root: the root that signed it (the last certificate of
        C{issuer.next.crt}), or None.
    @ivar next_key: the pending issuer's key, or None.
    @ivar switching: a switch was interrupted: C{issuer.crt} is the new
        issuer, and its key is still C{issuer.next.key}.
    @ivar leftover: C{issuer.next.crt} is left over from a finished switch
        (it names the active issuer).
    """

    anchors: tuple[x509.Certificate, ...]
    issuer_chain: tuple[x509.Certificate, ...]
    issuer_key: PrivateKeyTypes
    next_issuer: x509.Certificate | None = None
    next_root: x509.Certificate | None = None
    next_key: PrivateKeyTypes | None = None
    switching: bool = False
    leftover: bool = False

    @property
    def issuer(self) -> x509.Certificate:
        return self.issuer_chain[0]

    @property
    def pending(self) -> bool:
        """
        Whether a renewed issuer waits for its switch.
        """
        return self.next_issuer is not None and not self.leftover


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def read_state(
    anchors_pem: bytes,
    issuer_pem: bytes,
    key_pem: bytes,
    next_crt_pem: bytes | None,
    next_key_pem: bytes | None,
    now: datetime,
    sources: tuple[str, str, str, str, str],
) -> RenewalState:
    """
    Verify the stored credentials and tell the renewal state from them.

    @param next_crt_pem: C{issuer.next.crt}, or None when absent.
    @param next_key_pem: C{issuer.next.key}, or None when absent.
    @param sources: how errors name the five parts, in this order.
    @return: a L{RenewalState}.
    @raise BundleError: when the active bundle does not verify (even with
        the one exception: an interrupted switch, whose key is still in
        C{issuer.next.key}), or the pending pair is invalid.
    """
    anchors_source, chain_source, key_source, next_crt_source, next_key_source = sources
    active = (anchors_source, chain_source, key_source)
    switching = False
    try:
        bundle = load_bundle(anchors_pem, issuer_pem, key_pem, now, sources=active)
    except BundleError as e:
        if e.source != key_source or next_key_pem is None:
            raise
        bundle = load_bundle(
            anchors_pem,
            issuer_pem,
            next_key_pem,
            now,
            sources=(anchors_source, chain_source, next_key_source),
        )
        switching = True
    next_issuer: x509.Certificate | None = None
    next_root: x509.Certificate | None = None
    next_key: PrivateKeyTypes | None = None
    leftover = False
    if next_crt_pem is not None:
        try:
            certificates = x509.load_pem_x509_certificates(next_crt_pem)
        except ValueError as e:
            raise BundleError(next_crt_source, f"does not parse: {e}") from None
        next_issuer = certificates[0]
        if _der(next_issuer) == _der(bundle.issuer):
            leftover = True
        else:
            if len(certificates) > 1 and is_self_signed(certificates[-1]):
                next_root = certificates[-1]
            else:
                next_root = _signer(next_issuer, bundle.anchors)
            if next_root is None:
                raise BundleError(
                    next_crt_source,
                    "the pending issuer is signed by no root it carries or"
                    f" that {anchors_source} holds",
                )
            if next_key_pem is None:
                raise BundleError(
                    next_key_source,
                    f"missing, while {next_crt_source} holds a pending issuer;"
                    " restore it, or remove both to renew again",
                )
            try:
                pending = load_bundle(
                    certificates_pem([next_root]),
                    next_crt_pem,
                    next_key_pem,
                    now,
                    sources=(next_crt_source, next_crt_source, next_key_source),
                )
            except BundleError as e:
                raise BundleError(
                    e.source, f"the pending issuer is refused: {e.problem}"
                ) from None
            next_key = pending.issuer_key
    return RenewalState(
        anchors=bundle.anchors,
        issuer_chain=bundle.issuer_chain,
        issuer_key=bundle.issuer_key,
        next_issuer=next_issuer,
        next_root=next_root,
        next_key=next_key,
        switching=switching,
        leftover=leftover,
    )


def _signer(
    cert: x509.Certificate, roots: Iterable[x509.Certificate]
) -> x509.Certificate | None:
    for root in roots:
        try:
            cert.verify_directly_issued_by(root)
        except Exception:
            continue
        return root
    return None


# The shape of a generated bundle


def _organization(value: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, value)])


def key_type_of(key: PrivateKeyTypes) -> str | None:
    """
    The L{sentry_tx.ca.bundle.KEY_TYPES} entry of C{key}, or None when
    sentry_tx does not generate keys of its type.
    """
    if isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(
        key.curve, ec.SECP256R1
    ):
        return KEY_TYPE_ECDSA_P256
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return KEY_TYPE_ED25519
    return None


def shape_problem(state: RenewalState, trust_domain: str, namespace: str) -> str | None:
    """
    Why the bundle is not in the shape Dapr's Sentry and sentry_tx generate
    (a self-signed root C{O=<trust domain>}, and an issuer
    C{O=spiffe://<td>/ns/<ns>/dapr-sentry} that it signs directly, with a
    key type sentry_tx makes), or None when it is.
    """
    if len(state.issuer_chain) != 1:
        return (
            f"the issuer chain holds {len(state.issuer_chain)} certificates;"
            " a generated one holds the issuer alone"
        )
    expected_issuer = _organization(
        x509profile.spiffe_id(trust_domain, namespace, x509profile.SENTRY_APP_ID)
    )
    if state.issuer.subject != expected_issuer:
        return (
            f"the issuer's subject is {state.issuer.subject.rfc4514_string()!r},"
            f" not {expected_issuer.rfc4514_string()!r}"
        )
    root = _signer(state.issuer, state.anchors)
    expected_root = _organization(trust_domain)
    if root is None or root.subject != expected_root:
        subject = root.subject.rfc4514_string() if root is not None else "none"
        return (
            f"the root's subject is {subject!r}, not {expected_root.rfc4514_string()!r}"
        )
    if key_type_of(state.issuer_key) is None:
        return "the issuer key is of a type sentry_tx does not generate"
    return None


# Times


def renewal_due(issuer: x509.Certificate, threshold: float) -> datetime:
    """
    When C{issuer} is due for renewal: its NotBefore + C{threshold} x its
    lifetime (Dapr's PR's C{renewTime}).
    """
    start = issuer.not_valid_before_utc
    return start + (issuer.not_valid_after_utc - start) * threshold


def switch_time(
    issuer: x509.Certificate,
    next_issuer: x509.Certificate,
    settings: RenewalSettings,
) -> datetime:
    """
    When the pending issuer takes over from C{issuer}.

    With an explicit grace: the grace after the pending issuer was made
    (its NotBefore plus the allowed skew, as Dapr's PR reads it).  With
    C{auto}: the old issuer's NotAfter minus twice the workload certificate
    TTL and L{AUTO_SWITCH_MARGIN}, so that the last leaf the old issuer signs
    gets its whole TTL and still ends a TTL before its issuer.  Either way
    never later than the old issuer's NotAfter minus the skew.
    """
    skew = settings.allowed_clock_skew
    latest = issuer.not_valid_after_utc - skew
    if settings.grace is None:
        at = issuer.not_valid_after_utc - 2 * settings.workload_ttl - AUTO_SWITCH_MARGIN
    else:
        at = next_issuer.not_valid_before_utc + skew + settings.grace
    return min(at, latest)


def expired_anchors(state: RenewalState, now: datetime) -> tuple[x509.Certificate, ...]:
    """
    The anchors that have expired by C{now} (and so may be dropped).
    """
    return tuple(root for root in state.anchors if root.not_valid_after_utc < now)


@dataclass(frozen=True)
class Step:
    """
    What renewal does next.

    @ivar action: one of the C{ACTION_*} constants.
    @ivar at: for L{ACTION_WAIT}, when to look again.
    @ivar switch_at: when the pending issuer takes over, while one is
        pending.
    @ivar reason: why, in words (for L{ACTION_OFF}: why renewal is off).
    """

    action: str
    at: datetime | None = None
    switch_at: datetime | None = None
    reason: str = ""


def plan(state: RenewalState, now: datetime, settings: RenewalSettings) -> Step:
    """
    The one step renewal takes next, from the state and C{now} alone.

    In order: off (disabled, or not a generated bundle); finish an
    interrupted switch; append the pending root if the anchors lack it;
    switch once its time has come; drop expired anchors; renew once due;
    else wait for the earliest of these times.
    """
    if not settings.enabled:
        return Step(ACTION_OFF, reason="--ca-renewal-enabled is false")
    problem = shape_problem(state, settings.trust_domain, settings.namespace)
    if problem is not None:
        return Step(
            ACTION_OFF,
            reason=(
                f"the bundle is not one sentry_tx generates ({problem}); it is"
                " the operator's and is never written"
            ),
        )
    if state.switching or state.leftover:
        return Step(ACTION_FINISH_SWITCH, reason="a switch was interrupted")
    expiring = [
        root.not_valid_after_utc
        for root in state.anchors
        if root.not_valid_after_utc >= now
    ]
    if state.pending:
        next_issuer, next_root = _pending_pair(state)
        at = switch_time(state.issuer, next_issuer, settings)
        anchored = {_der(root) for root in state.anchors}
        if _der(next_root) not in anchored:
            return Step(
                ACTION_APPEND, switch_at=at, reason="the new root is not trusted yet"
            )
        if now >= at:
            return Step(ACTION_SWITCH, switch_at=at, reason="the switch time has come")
        if expired_anchors(state, now):
            return Step(ACTION_PRUNE, switch_at=at, reason="an anchor has expired")
        wake = min([at] + [t for t in expiring if t > now])
        return Step(ACTION_WAIT, at=wake, switch_at=at, reason="a renewal is pending")
    if expired_anchors(state, now):
        return Step(ACTION_PRUNE, reason="an anchor has expired")
    due = renewal_due(state.issuer, settings.threshold)
    if now >= due:
        return Step(ACTION_RENEW, reason="the issuer passed the renewal threshold")
    wake = min([due] + [t for t in expiring if t > now])
    return Step(ACTION_WAIT, at=wake, reason="not due yet")


def _pending_pair(state: RenewalState) -> tuple[x509.Certificate, x509.Certificate]:
    """
    The pending issuer and its root, of a C{state} that has them.

    @raise ValueError: when C{state} holds no pending issuer and root
        (L{read_state} never makes such a pending state).
    """
    if state.next_issuer is None or state.next_root is None:
        raise ValueError("no pending issuer and root")
    return state.next_issuer, state.next_root


# What each step writes


@dataclass(frozen=True)
class RenewedPair:
    """
    A new root and issuer, and the PEM documents a renewal writes.

    @ivar next_crt_pem: C{issuer.next.crt}: the new issuer, then its root.
    @ivar next_key_pem: C{issuer.next.key} (PKCS#8).
    @ivar anchors_pem: C{ca.crt}: the unexpired anchors, then the new root.
    """

    root: x509.Certificate
    issuer: x509.Certificate
    next_crt_pem: bytes
    next_key_pem: bytes
    anchors_pem: bytes


def renew(state: RenewalState, now: datetime, settings: RenewalSettings) -> RenewedPair:
    """
    Make a new root (a fresh key of the active issuer's type, used once and
    dropped) and a new issuer for C{--ca-ttl}.

    @return: a L{RenewedPair}.
    """
    key_type = key_type_of(state.issuer_key)
    if key_type is None:
        # plan() renews only a bundle whose key type sentry_tx makes.
        raise ValueError("the issuer key is of a type sentry_tx does not generate")
    generated = generate_bundle(
        settings.trust_domain,
        settings.namespace,
        now,
        settings.allowed_clock_skew,
        key_type,
        lifetime=settings.ca_ttl,
    )
    (root,) = generated.bundle.anchors
    issuer = generated.bundle.issuer
    return RenewedPair(
        root=root,
        issuer=issuer,
        next_crt_pem=certificates_pem([issuer, root]),
        next_key_pem=generated.issuer_key_pem,
        anchors_pem=anchors_after(state, now, (root,)),
    )


def anchors_after(
    state: RenewalState, now: datetime, added: Iterable[x509.Certificate] = ()
) -> bytes:
    """
    C{ca.crt} after a step: the anchors that have not expired, in order,
    then C{added} (each once).
    """
    kept = [root for root in state.anchors if root.not_valid_after_utc >= now]
    present = {_der(root) for root in kept}
    kept.extend(root for root in added if _der(root) not in present)
    return certificates_pem(kept)


def active_after_switch(state: RenewalState) -> tuple[bytes, bytes]:
    """
    C{issuer.crt} and C{issuer.key} after the switch: the pending issuer
    alone (its root is in the anchors), and its key.

    @return: C{(chain_pem, key_pem)}.
    """
    key: PrivateKeyTypes | None
    if state.switching:
        issuer, key = state.issuer, state.issuer_key
    else:
        issuer, _ = _pending_pair(state)
        key = state.next_key
    if key is None:
        raise ValueError("no pending issuer key")
    return certificates_pem([issuer]), key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


PART_ANCHORS = "anchors"
PART_ISSUER = "issuer"
PART_KEY = "key"
PART_NEXT_CERTIFICATE = "next_crt"
PART_NEXT_KEY = "next_key"
PARTS = (PART_ANCHORS, PART_ISSUER, PART_KEY, PART_NEXT_CERTIFICATE, PART_NEXT_KEY)
"""
The five stored parts: C{ca.crt}, C{issuer.crt}, C{issuer.key},
C{issuer.next.crt}, C{issuer.next.key} (files, or Secret keys).
"""


@dataclass(frozen=True)
class StepWrites:
    """
    What one step writes.

    @ivar writes: C{(part, contents)} pairs in the order a store that
        cannot write them at once (files) must write them, so that a crash
        between any two leaves a state L{read_state} reads and L{plan}
        completes; C{None} contents remove the part.
    @ivar renewed: the L{RenewedPair} of a renewal, else None.
    """

    writes: tuple[tuple[str, bytes | None], ...]
    renewed: "RenewedPair | None" = None


def step_writes(
    state: RenewalState, step: Step, now: datetime, settings: RenewalSettings
) -> StepWrites:
    """
    The writes of C{step} (one of L{WRITING_ACTIONS}) on C{state}.

      - renew: C{issuer.next.key}, then C{issuer.next.crt} (issuer and
        root), then C{ca.crt} with the root appended: until the append, the
        pending pair is known and L{plan} appends its root;
      - append: C{ca.crt};
      - switch: C{issuer.crt}, then C{issuer.key}, then both next parts
        removed: between the first two, C{issuer.next.key} holds the key of
        C{issuer.crt} (L{RenewalState.switching}), after them
        C{issuer.next.crt} names the active issuer (L{RenewalState.leftover});
        both are finished by L{ACTION_FINISH_SWITCH};
      - finish-switch: C{issuer.key} (when still stale), then the next
        parts removed;
      - prune: C{ca.crt} without its expired anchors.
    """
    if step.action == ACTION_RENEW:
        pair = renew(state, now, settings)
        return StepWrites(
            (
                (PART_NEXT_KEY, pair.next_key_pem),
                (PART_NEXT_CERTIFICATE, pair.next_crt_pem),
                (PART_ANCHORS, pair.anchors_pem),
            ),
            renewed=pair,
        )
    if step.action == ACTION_APPEND:
        return StepWrites(
            ((PART_ANCHORS, anchors_after(state, now, _pending_pair(state)[1:])),)
        )
    if step.action == ACTION_PRUNE:
        return StepWrites(((PART_ANCHORS, anchors_after(state, now)),))
    removals: tuple[tuple[str, bytes | None], ...] = (
        (PART_NEXT_KEY, None),
        (PART_NEXT_CERTIFICATE, None),
    )
    if step.action == ACTION_SWITCH:
        chain_pem, key_pem = active_after_switch(state)
        return StepWrites(((PART_ISSUER, chain_pem), (PART_KEY, key_pem)) + removals)
    if step.action == ACTION_FINISH_SWITCH:
        if state.switching:
            _, key_pem = active_after_switch(state)
            return StepWrites(((PART_KEY, key_pem),) + removals)
        return StepWrites(removals)
    raise ValueError(f"step {step.action!r} writes nothing")


@dataclass(frozen=True)
class StepResult:
    """
    What a store did for one L{plan}.

    @ivar step: the L{Step} planned.
    @ivar state: the L{RenewalState} it was planned on.
    @ivar written: whether the store wrote (False when it waited, was off,
        or lost a race to another replica, which wrote instead).
    @ivar renewed: the L{RenewedPair} a renewal wrote, else None.
    """

    step: Step
    state: RenewalState
    written: bool = False
    renewed: RenewedPair | None = None


__all__ = [
    "AUTO_SWITCH_MARGIN",
    "DEFAULT_CA_TTL",
    "DEFAULT_RENEWAL_THRESHOLD",
    "RenewalSettings",
    "RenewalState",
    "Step",
    "check_settings",
    "next_path",
    "plan",
    "read_state",
    "renew",
    "renewal_due",
    "shape_problem",
    "switch_time",
]
