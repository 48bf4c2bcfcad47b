"""
Tests for L{sentry_tx.ca.renewal}: the renewal plan as a pure function of
the stored certificates and of now.
"""

from datetime import timedelta

from cryptography import x509
from twisted.trial.unittest import SynchronousTestCase

from sentry_tx.ca.bundle import load_bundle
from sentry_tx.ca.pem import certificates_pem
from sentry_tx.ca.renewal import (
    ACTION_APPEND,
    ACTION_FINISH_SWITCH,
    ACTION_OFF,
    ACTION_PRUNE,
    ACTION_RENEW,
    ACTION_SWITCH,
    ACTION_WAIT,
    AUTO_SWITCH_MARGIN,
    PART_ANCHORS,
    PART_ISSUER,
    PART_KEY,
    PART_NEXT_CERTIFICATE,
    PART_NEXT_KEY,
    RenewalSettings,
    check_settings,
    next_path,
    plan,
    renewal_due,
    switch_time,
)
from sentry_tx.errors import BundleError, ConfigError
from sentry_tx.testing.certificates import (
    FIXED_NOW,
    TEST_NAMESPACE,
    TEST_TRUST_DOMAIN,
    make_chain,
)
from sentry_tx.testing.renewal import MemoryRenewalStore, generated_parts, state_of

SKEW = timedelta(seconds=1)
TTL = timedelta(seconds=90)
GRACE = timedelta(seconds=15)

SHORT = RenewalSettings(
    enabled=True,
    ca_ttl=TTL,
    threshold=0.5,
    grace=GRACE,
    workload_ttl=timedelta(seconds=20),
    allowed_clock_skew=SKEW,
    trust_domain=TEST_TRUST_DOMAIN,
    namespace=TEST_NAMESPACE,
)


def _parts(now=FIXED_NOW, lifetime=TTL, key_type="ecdsa-p256"):
    return generated_parts(
        TEST_TRUST_DOMAIN, TEST_NAMESPACE, now, SKEW, lifetime, key_type
    )


def _ski(cert):
    return cert.extensions.get_extension_for_class(
        x509.SubjectKeyIdentifier
    ).value.digest


def _aki(cert):
    return cert.extensions.get_extension_for_class(
        x509.AuthorityKeyIdentifier
    ).value.key_identifier


class SettingsTests(SynchronousTestCase):
    """
    L{check_settings} refuses combinations under which renewal cannot work.
    """

    def test_short_times_accepted(self):
        """The issue's short times (90s, 0.5, 15s, 1s skew) pass."""
        check_settings(SHORT)

    def test_defaults_accepted(self):
        """Dapr's defaults with auto grace and a 24h workload TTL pass."""
        check_settings(RenewalSettings())

    def test_no_room_for_grace(self):
        """
        A grace longer than the life left after the threshold is refused, naming both
        flags.
        """
        error = self.assertRaises(
            ConfigError,
            check_settings,
            RenewalSettings(
                ca_ttl=TTL, threshold=0.9, grace=GRACE, allowed_clock_skew=SKEW
            ),
        )
        self.assertIn("--ca-renewal-threshold", error.field)
        self.assertIn("--trust-anchor-propagation-grace", error.field)
        self.assertIn("no room for the grace", error.problem)

    def test_no_room_for_auto(self):
        """
        auto is refused when the life left cannot hold twice the workload TTL and the
        margin.
        """
        error = self.assertRaises(
            ConfigError,
            check_settings,
            RenewalSettings(ca_ttl=timedelta(days=3), threshold=0.5),
        )
        self.assertIn("--trust-anchor-propagation-grace", error.field)

    def test_skew_alone_passes_threshold(self):
        """A skew that alone passes the threshold (renewal for ever) is refused."""
        error = self.assertRaises(
            ConfigError,
            check_settings,
            RenewalSettings(
                ca_ttl=timedelta(seconds=10),
                threshold=0.05,
                grace=timedelta(seconds=1),
                allowed_clock_skew=timedelta(seconds=5),
            ),
        )
        self.assertIn("--ca-ttl", error.field)
        self.assertIn("alone passes", error.problem)

    def test_threshold_range(self):
        """A threshold outside (0, 1) is refused, naming the flag."""
        for threshold in (0, 1, 1.5, -0.1):
            error = self.assertRaises(
                ConfigError, check_settings, RenewalSettings(threshold=threshold)
            )
            self.assertEqual(error.field, "--ca-renewal-threshold")

    def test_disabled_not_checked(self):
        """With renewal off, the other values are not held against the start."""
        check_settings(RenewalSettings(enabled=False, threshold=2))


class TimesTests(SynchronousTestCase):
    """
    The renewal and switch times.
    """

    def test_due(self):
        """Renewal is due at NotBefore + threshold x lifetime."""
        issuer = state_of(_parts(), FIXED_NOW).issuer
        self.assertEqual(
            renewal_due(issuer, 0.5),
            FIXED_NOW - SKEW + (TTL + SKEW) / 2,
        )

    def test_explicit_grace(self):
        """An explicit grace counts from the pending issuer's making."""
        old = state_of(_parts(), FIXED_NOW).issuer
        made = FIXED_NOW + timedelta(seconds=46)
        new = state_of(_parts(made), made).issuer
        self.assertEqual(switch_time(old, new, SHORT), made + GRACE)

    def test_grace_capped(self):
        """An explicit grace is capped at the old issuer's NotAfter minus the skew."""
        old = state_of(_parts(), FIXED_NOW).issuer
        made = FIXED_NOW + timedelta(seconds=80)
        new = state_of(_parts(made), made).issuer
        self.assertEqual(switch_time(old, new, SHORT), FIXED_NOW + TTL - SKEW)

    def test_auto(self):
        """
        auto switches at the old NotAfter minus twice the workload TTL and the margin.
        """
        lifetime = timedelta(days=365)
        settings = RenewalSettings(allowed_clock_skew=SKEW)
        old = state_of(_parts(lifetime=lifetime), FIXED_NOW).issuer
        new = state_of(
            _parts(FIXED_NOW + timedelta(days=330), lifetime),
            FIXED_NOW + timedelta(days=330),
        ).issuer
        self.assertEqual(
            switch_time(old, new, settings),
            FIXED_NOW + lifetime - 2 * settings.workload_ttl - AUTO_SWITCH_MARGIN,
        )

    def test_next_path(self):
        """
        issuer.crt's pending counterpart is issuer.next.crt, as Dapr's PR names it.
        """
        self.assertEqual(next_path("/a/issuer.crt"), "/a/issuer.next.crt")
        self.assertEqual(next_path("/a/issuer.key"), "/a/issuer.next.key")


class PlanTests(SynchronousTestCase):
    """
    L{plan} takes one step at a time, from the parts and now alone.
    """

    def test_wait_until_due(self):
        """Before the threshold, renewal waits until it."""
        step = plan(state_of(_parts(), FIXED_NOW), FIXED_NOW, SHORT)
        self.assertEqual(step.action, ACTION_WAIT)
        self.assertEqual(step.at, FIXED_NOW - SKEW + (TTL + SKEW) / 2)

    def test_renew_when_due(self):
        """Past the threshold, the step is a renewal."""
        now = FIXED_NOW + timedelta(seconds=45)
        self.assertEqual(plan(state_of(_parts(), now), now, SHORT).action, ACTION_RENEW)

    def test_disabled(self):
        """Renewal off: the step is off, saying why."""
        settings = RenewalSettings(enabled=False)
        step = plan(state_of(_parts(), FIXED_NOW), FIXED_NOW, settings)
        self.assertEqual(step.action, ACTION_OFF)
        self.assertIn("--ca-renewal-enabled", step.reason)

    def test_operator_bundle_off(self):
        """
        A bundle not in the generated shape is never renewed, even past its threshold.
        """
        ca = make_chain(intermediates=1)
        parts = {
            PART_ANCHORS: ca.anchors_pem,
            PART_ISSUER: ca.issuer_chain_pem(),
            PART_KEY: ca.issuer_key_pem(),
        }
        late = ca.issuer.not_valid_after_utc - timedelta(seconds=1)
        step = plan(state_of(parts, late), late, SHORT)
        self.assertEqual(step.action, ACTION_OFF)
        self.assertIn("operator's", step.reason)

    def test_other_trust_domain_off(self):
        """A generated bundle of another trust domain is not in the shape."""
        settings = RenewalSettings(trust_domain="other.org", namespace=TEST_NAMESPACE)
        step = plan(state_of(_parts(), FIXED_NOW), FIXED_NOW, settings)
        self.assertEqual(step.action, ACTION_OFF)

    def test_renewed_pair(self):
        """
        A renewal writes the next pair before the append; the new root shares the
        subject and key type, with SKI and AKI.
        """
        now = FIXED_NOW + timedelta(seconds=45)
        for key_type in ("ecdsa-p256", "ed25519"):
            store = MemoryRenewalStore(_parts(key_type=key_type))
            result = self.successResultOf(store.step(now, SHORT))
            self.assertEqual(result.step.action, ACTION_RENEW)
            self.assertEqual(
                [part for _, part, _ in store.history],
                [PART_NEXT_KEY, PART_NEXT_CERTIFICATE, PART_ANCHORS],
            )
            state = state_of(store.parts, now)
            old_root, new_root = state.anchors
            self.assertEqual(new_root.subject, old_root.subject)
            self.assertEqual(
                new_root.public_key().__class__.__mro__[1],
                old_root.public_key().__class__.__mro__[1],
            )
            self.assertNotEqual(_ski(new_root), _ski(old_root))
            self.assertEqual(_aki(state.next_issuer), _ski(new_root))
            self.assertEqual(state.next_root, new_root)
            self.assertEqual(
                state.next_issuer.not_valid_after_utc
                - state.next_issuer.not_valid_before_utc,
                TTL + SKEW,
            )

    def test_append_after_crash(self):
        """
        A pending pair whose root is not in the anchors (a crash before the append) is
        appended.
        """
        now = FIXED_NOW + timedelta(seconds=45)
        store = MemoryRenewalStore(_parts())
        self.successResultOf(store.step(now, SHORT))
        parts = dict(store.parts)
        parts[PART_ANCHORS] = _parts_anchor(store)
        step = plan(state_of(parts, now), now, SHORT)
        self.assertEqual(step.action, ACTION_APPEND)

    def test_switch_then_finish(self):
        """
        At the switch time the next pair becomes active; an interrupted switch is
        finished.
        """
        now = FIXED_NOW + timedelta(seconds=45)
        store = MemoryRenewalStore(_parts())
        self.successResultOf(store.step(now, SHORT))
        pending = state_of(store.parts, now)
        at = switch_time(pending.issuer, pending.next_issuer, SHORT)
        self.assertEqual(
            plan(pending, at - timedelta(seconds=1), SHORT).action, ACTION_WAIT
        )
        step = plan(pending, at, SHORT)
        self.assertEqual(step.action, ACTION_SWITCH)
        # Interrupted after issuer.crt was written: the key is still next.
        parts = dict(store.parts)
        parts[PART_ISSUER] = certificates_pem([pending.next_issuer])
        state = state_of(parts, at)
        self.assertTrue(state.switching)
        self.assertEqual(plan(state, at, SHORT).action, ACTION_FINISH_SWITCH)
        # Interrupted after issuer.key too: issuer.next.crt is left over.
        parts[PART_KEY] = parts.pop(PART_NEXT_KEY)
        state = state_of(parts, at)
        self.assertTrue(state.leftover)
        self.assertEqual(plan(state, at, SHORT).action, ACTION_FINISH_SWITCH)

    def test_mismatched_key_refused(self):
        """A key that matches issuer.crt nowhere is refused, naming issuer.key."""
        parts = _parts()
        parts[PART_KEY] = _parts()[PART_KEY]
        error = self.assertRaises(BundleError, state_of, parts, FIXED_NOW)
        self.assertEqual(error.source, PART_KEY)

    def test_two_renewals(self):
        """
        Driven through two renewals, the active issuer always chains to an anchor, and
        no anchor leaves before it expires.
        """
        store = MemoryRenewalStore(_parts())
        now = FIXED_NOW
        seen = {}
        roots = set()
        switches = 0
        while now < FIXED_NOW + timedelta(seconds=200):
            result = self.successResultOf(store.step(now, SHORT))
            switches += result.step.action == ACTION_SWITCH
            parts = store.parts
            load_bundle(parts[PART_ANCHORS], parts[PART_ISSUER], parts[PART_KEY], now)
            anchors = state_of(parts, now).anchors
            present = {root.serial_number for root in anchors}
            for serial, not_after in seen.items():
                if serial not in present:
                    self.assertLess(not_after, now)
            for root in anchors:
                seen[root.serial_number] = root.not_valid_after_utc
                roots.add(root.serial_number)
            now += timedelta(seconds=1)
        self.assertGreaterEqual(switches, 2)
        self.assertGreaterEqual(len(roots), 3)
        self.assertIn(
            ACTION_PRUNE,
            [action for action in _actions(store)],
        )


def _actions(store):
    # What each write of the history belongs to, roughly: a lone ca.crt
    # write that removes a root is a prune.
    previous = None
    for _, part, contents in store.history:
        if (
            part == PART_ANCHORS
            and previous is not None
            and len(contents) < len(previous)
        ):
            yield ACTION_PRUNE
        if part == PART_ANCHORS:
            previous = contents


def _parts_anchor(store):
    # ca.crt as it was before the renewal's append.
    contents = next(
        written
        for _, part, written in reversed(store.history)
        if part == PART_ANCHORS
    )
    certificates = x509.load_pem_x509_certificates(contents)
    return certificates_pem(certificates[:-1])
