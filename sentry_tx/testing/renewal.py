"""
Automatic CA renewal without files: L{MemoryRenewalStore}, a verified fake
of L{IRenewalStore} that keeps the five parts in a dict, and
L{generated_parts}, the parts of a freshly generated bundle.
"""

from datetime import datetime, timedelta

from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from sentry_tx.ca.bundle import generate_bundle
from sentry_tx.ca.renewal import (
    PART_ANCHORS,
    PART_ISSUER,
    PART_KEY,
    PART_NEXT_CERTIFICATE,
    PART_NEXT_KEY,
    WRITING_ACTIONS,
    RenewalSettings,
    RenewalState,
    StepResult,
    plan,
    read_state,
    step_writes,
)
from sentry_tx.interfaces import IRenewalStore
from sentry_tx.testing.certificates import (
    FIXED_NOW,
    TEST_NAMESPACE,
    TEST_TRUST_DOMAIN,
)

SHORT_SKEW = timedelta(seconds=1)
SHORT_CA_TTL = timedelta(seconds=90)
SHORT_RENEWAL_SETTINGS = RenewalSettings(
    ca_ttl=SHORT_CA_TTL,
    threshold=0.5,
    grace=timedelta(seconds=15),
    workload_ttl=timedelta(seconds=20),
    allowed_clock_skew=SHORT_SKEW,
    trust_domain=TEST_TRUST_DOMAIN,
    namespace=TEST_NAMESPACE,
)
"""
Renewal on a short clock, for a chain made at L{FIXED_NOW} with a 90 s
life: due at L{SHORT_RENEW_AT}, the switch at L{SHORT_SWITCH_AT}.
"""
SHORT_RENEW_AT = FIXED_NOW + timedelta(seconds=45)
SHORT_SWITCH_AT = SHORT_RENEW_AT + timedelta(seconds=16)


def generated_parts(
    trust_domain: str,
    namespace: str,
    now: datetime,
    skew: timedelta,
    lifetime: timedelta,
    key_type: str = "ecdsa-p256",
) -> dict[str, bytes]:
    """
    The stored parts of a bundle generated at C{now}, as a dict by part.
    """
    generated = generate_bundle(
        trust_domain, namespace, now, skew, key_type, lifetime=lifetime
    )
    return {
        PART_ANCHORS: generated.anchors_pem,
        PART_ISSUER: generated.issuer_chain_pem,
        PART_KEY: generated.issuer_key_pem,
    }


def state_of(parts: dict[str, bytes], now: datetime) -> RenewalState:
    """
    The L{sentry_tx.ca.renewal.RenewalState} of C{parts} at C{now} (each
    part named by its L{sentry_tx.ca.renewal.PARTS} name).
    """
    return read_state(
        parts[PART_ANCHORS],
        parts[PART_ISSUER],
        parts[PART_KEY],
        parts.get(PART_NEXT_CERTIFICATE),
        parts.get(PART_NEXT_KEY),
        now,
        (PART_ANCHORS, PART_ISSUER, PART_KEY, PART_NEXT_CERTIFICATE, PART_NEXT_KEY),
    )


@implementer(IRenewalStore)
class MemoryRenewalStore:
    """
    The five parts in a dict; every write is recorded in C{history} as
    C{(now, part, contents)}.

    @ivar fail_next: when set, the next L{step} fails with it.
    """

    description = "memory"

    def __init__(self, parts: dict[str, bytes]) -> None:
        self.parts = dict(parts)
        self.history: list[tuple[datetime, str, bytes | None]] = []
        self.fail_next: Exception | None = None

    def step(self, now: datetime, settings: RenewalSettings) -> Deferred[StepResult]:
        if self.fail_next is not None:
            error, self.fail_next = self.fail_next, None
            return fail(error)
        state = state_of(self.parts, now)
        step = plan(state, now, settings)
        if step.action not in WRITING_ACTIONS:
            return succeed(StepResult(step, state))
        writes = step_writes(state, step, now, settings)
        for part, contents in writes.writes:
            self.history.append((now, part, contents))
            if contents is None:
                self.parts.pop(part, None)
            else:
                self.parts[part] = contents
        return succeed(StepResult(step, state, True, writes.renewed))
