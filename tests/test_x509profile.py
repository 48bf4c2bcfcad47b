"""
Tests for L{sentry_tx.ca.x509profile}: the certificates sentry_tx builds.
"""

from datetime import timedelta, timezone

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import (
    ExtendedKeyUsageOID,
    ExtensionOID,
    NameOID,
    SignatureAlgorithmOID,
)
from cryptography.x509.verification import DNSName, PolicyBuilder, Store
from twisted.trial.unittest import SynchronousTestCase

from sentry_tx.ca import x509profile
from sentry_tx.ca.bundle import is_self_signed
from sentry_tx.testing.certificates import (
    FIXED_NOW,
    make_bundle,
    make_private_key,
    public_key_der,
)

TTL = timedelta(hours=24)
SKEW = timedelta(minutes=15)
SPIFFE_ID = "spiffe://example.org/ns/default/myapp"


def _leaf(bundle, public_key=None, dns_names=(), now=FIXED_NOW, ttl=TTL):
    if public_key is None:
        public_key = make_private_key().public_key()
    not_before, not_after = x509profile.leaf_validity(
        now, ttl, SKEW, bundle.chain_not_after
    )
    return x509profile.build_leaf(
        bundle, public_key, SPIFFE_ID, list(dns_names), not_before, not_after
    )


class LeafProfileTests(SynchronousTestCase):
    """
    Tests for L{x509profile.build_leaf}: the workload certificate profile.
    """

    def setUp(self):
        self.bundle = make_bundle("ecdsa-p256")
        self.key = make_private_key("ecdsa-p256")
        self.leaf = _leaf(
            self.bundle, self.key.public_key(), ["a.example", "b.example"]
        )

    def test_subject_empty(self):
        """The leaf's subject is the empty name."""
        self.assertEqual(self.leaf.subject, x509.Name([]))
        self.assertEqual(len(self.leaf.subject), 0)

    def test_issuer_name(self):
        """The leaf's issuer name is the issuer certificate's subject."""
        self.assertEqual(self.leaf.issuer, self.bundle.issuer.subject)

    def test_public_key_is_callers(self):
        """The leaf certifies exactly the public key it was given."""
        self.assertEqual(
            public_key_der(self.leaf.public_key()),
            public_key_der(self.key.public_key()),
        )

    def test_extension_set(self):
        """The leaf has exactly SAN, basic constraints, key usage, EKU and AKI."""
        self.assertEqual(
            {ext.oid for ext in self.leaf.extensions},
            {
                ExtensionOID.SUBJECT_ALTERNATIVE_NAME,
                ExtensionOID.BASIC_CONSTRAINTS,
                ExtensionOID.KEY_USAGE,
                ExtensionOID.EXTENDED_KEY_USAGE,
                ExtensionOID.AUTHORITY_KEY_IDENTIFIER,
            },
        )

    def test_subject_alternative_name(self):
        """The SAN is critical and holds the SPIFFE URI then the DNS names."""
        ext = self.leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        self.assertTrue(ext.critical)
        self.assertEqual(
            list(ext.value),
            [
                x509.UniformResourceIdentifier(SPIFFE_ID),
                x509.DNSName("a.example"),
                x509.DNSName("b.example"),
            ],
        )

    def test_subject_alternative_name_without_dns(self):
        """With no DNS names the SAN holds only the SPIFFE URI."""
        leaf = _leaf(self.bundle)
        ext = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        self.assertEqual(list(ext.value), [x509.UniformResourceIdentifier(SPIFFE_ID)])

    def test_basic_constraints(self):
        """Basic constraints say CA:FALSE, critically."""
        ext = self.leaf.extensions.get_extension_for_class(x509.BasicConstraints)
        self.assertTrue(ext.critical)
        self.assertFalse(ext.value.ca)
        self.assertIsNone(ext.value.path_length)

    def test_key_usage(self):
        """Key usage is digitalSignature only, critically."""
        ext = self.leaf.extensions.get_extension_for_class(x509.KeyUsage)
        self.assertTrue(ext.critical)
        usage = ext.value
        self.assertTrue(usage.digital_signature)
        for name in (
            "content_commitment",
            "key_encipherment",
            "data_encipherment",
            "key_agreement",
            "key_cert_sign",
            "crl_sign",
        ):
            self.assertFalse(getattr(usage, name), name)

    def test_extended_key_usage(self):
        """Extended key usage is serverAuth and clientAuth, not critical."""
        ext = self.leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
        self.assertFalse(ext.critical)
        self.assertEqual(
            list(ext.value),
            [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
        )

    def test_authority_key_identifier(self):
        """The AKI's key id equals the issuer's subject key identifier."""
        aki = self.leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier)
        ski = self.bundle.issuer.extensions.get_extension_for_class(
            x509.SubjectKeyIdentifier
        )
        self.assertFalse(aki.critical)
        self.assertEqual(aki.value.key_identifier, ski.value.digest)
        self.assertIsNone(aki.value.authority_cert_issuer)

    def test_serial_positive_and_distinct(self):
        """Serials are positive, distinct, and use well over 64 bits."""
        serials = [_leaf(self.bundle).serial_number for _ in range(20)]
        self.assertEqual(len(set(serials)), len(serials))
        for serial in serials:
            self.assertGreater(serial, 0)
        self.assertGreater(max(serials).bit_length(), 64)

    def test_signed_by_issuer(self):
        """The issuer certificate's key verifies the leaf's signature."""
        self.leaf.verify_directly_issued_by(self.bundle.issuer)

    def test_validity(self):
        """The leaf runs from now minus the skew to now plus the TTL."""
        self.assertEqual(self.leaf.not_valid_before_utc, FIXED_NOW - SKEW)
        self.assertEqual(self.leaf.not_valid_after_utc, FIXED_NOW + TTL)

    def test_validity_capped_at_chain(self):
        """A leaf never outlives its issuer chain."""
        now = self.bundle.chain_not_after - timedelta(hours=1)
        leaf = _leaf(self.bundle, now=now)
        self.assertEqual(leaf.not_valid_after_utc, self.bundle.chain_not_after)
        self.assertEqual(leaf.not_valid_before_utc, now - SKEW)

    def test_client_verifier_accepts(self):
        """A leaf verifies as a client certificate up to the bundle's anchors."""
        verifier = (
            PolicyBuilder()
            .store(Store(list(self.bundle.anchors)))
            .time(FIXED_NOW)
            .build_client_verifier()
        )
        verified = verifier.verify(self.leaf, list(self.bundle.issuer_chain))
        self.assertIn(x509.UniformResourceIdentifier(SPIFFE_ID), verified.subjects)

    def test_server_verifier_accepts(self):
        """A server leaf verifies for the name C{dapr-sentry}."""
        leaf = _leaf(self.bundle, dns_names=x509profile.server_dns_names("default"))
        verifier = (
            PolicyBuilder()
            .store(Store(list(self.bundle.anchors)))
            .time(FIXED_NOW)
            .build_server_verifier(DNSName("dapr-sentry"))
        )
        chain = verifier.verify(leaf, list(self.bundle.issuer_chain))
        self.assertEqual(chain[0], leaf)
        self.assertEqual(chain[-1], self.bundle.anchors[0])


class SignatureAlgorithmTests(SynchronousTestCase):
    """
    The leaf's signature algorithm follows the issuer key.
    """

    def _check(self, key_type, algorithm_oid, hash_type):
        bundle = make_bundle("ecdsa-p256", issuer_key_type=key_type)
        leaf = _leaf(bundle)
        self.assertEqual(leaf.signature_algorithm_oid, algorithm_oid)
        if hash_type is None:
            self.assertIsNone(leaf.signature_hash_algorithm)
        else:
            self.assertIsInstance(leaf.signature_hash_algorithm, hash_type)
        leaf.verify_directly_issued_by(bundle.issuer)

    def test_p256(self):
        """A P-256 issuer signs with ECDSA-SHA256."""
        self._check(
            "ecdsa-p256", SignatureAlgorithmOID.ECDSA_WITH_SHA256, hashes.SHA256
        )

    def test_p384(self):
        """A P-384 issuer signs with ECDSA-SHA384."""
        self._check(
            "ecdsa-p384", SignatureAlgorithmOID.ECDSA_WITH_SHA384, hashes.SHA384
        )

    def test_p521(self):
        """A P-521 issuer signs with ECDSA-SHA512."""
        self._check(
            "ecdsa-p521", SignatureAlgorithmOID.ECDSA_WITH_SHA512, hashes.SHA512
        )

    def test_ed25519(self):
        """An Ed25519 issuer signs with Ed25519."""
        self._check("ed25519", SignatureAlgorithmOID.ED25519, None)

    def test_rsa(self):
        """An RSA issuer signs with RSA-SHA256."""
        self._check("rsa-2048", SignatureAlgorithmOID.RSA_WITH_SHA256, hashes.SHA256)

    def test_unsupported_keys_refused(self):
        """No hash is chosen for P-192 or RSA-1024 keys: they cannot sign."""
        for key_type in ("ecdsa-p192", "rsa-1024"):
            self.assertRaises(
                ValueError, x509profile.signature_hash_for, make_private_key(key_type)
            )


class LeafValidityTests(SynchronousTestCase):
    """
    Tests for L{x509profile.leaf_validity}.
    """

    def test_before_chain_end(self):
        """Far from the chain's end the leaf lasts the whole TTL."""
        self.assertEqual(
            x509profile.leaf_validity(
                FIXED_NOW, TTL, SKEW, FIXED_NOW + timedelta(days=9)
            ),
            (FIXED_NOW - SKEW, FIXED_NOW + TTL),
        )

    def test_capped(self):
        """Near the chain's end NotAfter is the chain's NotAfter."""
        chain_end = FIXED_NOW + timedelta(hours=2)
        self.assertEqual(
            x509profile.leaf_validity(FIXED_NOW, TTL, SKEW, chain_end),
            (FIXED_NOW - SKEW, chain_end),
        )

    def test_whole_seconds(self):
        """Both bounds are whole seconds, equal to what the certificate stores."""
        now = FIXED_NOW + timedelta(microseconds=654321)
        bundle = make_bundle()
        not_before, not_after = x509profile.leaf_validity(
            now, TTL, SKEW, bundle.chain_not_after
        )
        self.assertEqual(not_before, FIXED_NOW - SKEW)
        self.assertEqual(not_after, FIXED_NOW + TTL)
        leaf = x509profile.build_leaf(
            bundle,
            make_private_key().public_key(),
            SPIFFE_ID,
            [],
            not_before,
            not_after,
        )
        self.assertEqual(leaf.not_valid_before_utc, not_before)
        self.assertEqual(leaf.not_valid_after_utc, not_after)

    def test_zero_skew(self):
        """With no skew allowed the leaf starts now."""
        self.assertEqual(
            x509profile.leaf_validity(
                FIXED_NOW, TTL, timedelta(0), FIXED_NOW + timedelta(days=9)
            )[0],
            FIXED_NOW,
        )


class NamesTests(SynchronousTestCase):
    """
    Tests for the SPIFFE id and the DNS names of leaves.
    """

    def test_spiffe_id(self):
        """The SPIFFE id is C{spiffe://<td>/ns/<ns>/<id>}."""
        self.assertEqual(
            x509profile.spiffe_id("example.org", "prod", "orders"),
            "spiffe://example.org/ns/prod/orders",
        )

    def test_injector(self):
        """dapr-injector in the own namespace gets the injector service name."""
        self.assertEqual(
            x509profile.control_plane_dns_names(
                "dapr-injector", "dapr-system", "dapr-system", "cluster.local"
            ),
            ["dapr-sidecar-injector.dapr-system.svc"],
        )

    def test_operator(self):
        """dapr-operator in the own namespace gets the webhook service name."""
        self.assertEqual(
            x509profile.control_plane_dns_names(
                "dapr-operator", "dapr-system", "dapr-system", "cluster.local"
            ),
            ["dapr-webhook.dapr-system.svc"],
        )

    def test_scheduler(self):
        """dapr-scheduler gets the three scheduler server names in the trust domain."""
        self.assertEqual(
            x509profile.control_plane_dns_names(
                "dapr-scheduler", "dapr-system", "dapr-system", "example.org"
            ),
            [
                "dapr-scheduler-server-0.dapr-scheduler-server.dapr-system.svc.example.org",
                "dapr-scheduler-server-1.dapr-scheduler-server.dapr-system.svc.example.org",
                "dapr-scheduler-server-2.dapr-scheduler-server.dapr-system.svc.example.org",
            ],
        )

    def test_other_namespace(self):
        """Control-plane ids in another namespace get no DNS names."""
        for app_id in ("dapr-injector", "dapr-operator", "dapr-scheduler"):
            self.assertEqual(
                x509profile.control_plane_dns_names(
                    app_id, "default", "dapr-system", "example.org"
                ),
                [],
            )

    def test_ordinary_app(self):
        """An ordinary app in the own namespace gets no DNS names."""
        self.assertEqual(
            x509profile.control_plane_dns_names(
                "dapr-placement", "dapr-system", "dapr-system", "example.org"
            ),
            [],
        )

    def test_control_plane_names_in_leaf(self):
        """Control-plane DNS names end up in the leaf's SAN after the URI."""
        bundle = make_bundle()
        names = x509profile.control_plane_dns_names(
            "dapr-operator", "dapr-system", "dapr-system", "example.org"
        )
        leaf = _leaf(bundle, dns_names=names)
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertEqual(san.get_values_for_type(x509.DNSName), names)

    def test_server_dns_names(self):
        """sentry_tx's own server names are Dapr's four."""
        self.assertEqual(
            x509profile.server_dns_names("dapr-system"),
            [
                "dapr-sentry",
                "dapr-sentry.dapr-system.svc",
                "dapr-sentry.dapr-system.svc.cluster.local",
                "cluster.local",
            ],
        )


class CAProfileTests(SynchronousTestCase):
    """
    Tests for L{x509profile.build_root} and L{x509profile.build_issuer}.
    """

    def setUp(self):
        self.root_key = make_private_key("ecdsa-p256")
        self.issuer_key = make_private_key("ecdsa-p256")
        self.root = x509profile.build_root(
            self.root_key, "example.org", FIXED_NOW, SKEW
        )
        self.issuer = x509profile.build_issuer(
            self.issuer_key.public_key(),
            self.root,
            self.root_key,
            "example.org",
            "dapr-system",
            FIXED_NOW,
            SKEW,
        )

    def _check_ca(self, cert, path_length):
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
        self.assertTrue(constraints.critical)
        self.assertTrue(constraints.value.ca)
        self.assertEqual(constraints.value.path_length, path_length)
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
        self.assertTrue(usage.critical)
        self.assertTrue(usage.value.key_cert_sign)
        self.assertTrue(usage.value.crl_sign)
        self.assertTrue(usage.value.digital_signature)
        self.assertFalse(usage.value.key_encipherment)
        ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
        self.assertEqual(
            ski.value, x509.SubjectKeyIdentifier.from_public_key(cert.public_key())
        )
        self.assertEqual(cert.not_valid_before_utc, FIXED_NOW - SKEW)
        self.assertEqual(cert.not_valid_after_utc, FIXED_NOW + x509profile.CA_LIFETIME)
        self.assertGreater(cert.serial_number, 0)

    def test_root(self):
        """The root is a self-signed CA named O=<trust domain>, valid 365 days."""
        self.assertEqual(
            self.root.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value,
            "example.org",
        )
        self.assertEqual(len(self.root.subject), 1)
        self.assertTrue(is_self_signed(self.root))
        self._check_ca(self.root, None)

    def test_issuer(self):
        """The issuer is a CA named after sentry_tx's SPIFFE id, signed by the root."""
        self.assertEqual(
            self.issuer.subject,
            x509.Name(
                [
                    x509.NameAttribute(
                        NameOID.ORGANIZATION_NAME,
                        "spiffe://example.org/ns/dapr-system/dapr-sentry",
                    )
                ]
            ),
        )
        self.issuer.verify_directly_issued_by(self.root)
        self._check_ca(self.issuer, 0)
        self.assertEqual(
            public_key_der(self.issuer.public_key()),
            public_key_der(self.issuer_key.public_key()),
        )

    def test_issuer_aki(self):
        """The issuer's AKI names the root's subject key identifier."""
        aki = self.issuer.extensions.get_extension_for_class(
            x509.AuthorityKeyIdentifier
        )
        ski = self.root.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
        self.assertEqual(aki.value.key_identifier, ski.value.digest)

    def test_serials_distinct(self):
        """Root and issuer serials are distinct 128-bit-or-more random numbers."""
        self.assertNotEqual(self.root.serial_number, self.issuer.serial_number)
        other = x509profile.build_root(self.root_key, "example.org", FIXED_NOW, SKEW)
        self.assertNotEqual(self.root.serial_number, other.serial_number)
        self.assertGreater(
            max(self.root.serial_number, other.serial_number).bit_length(), 128
        )

    def test_ed25519(self):
        """Ed25519 keys make Ed25519-signed CAs."""
        key = make_private_key("ed25519")
        root = x509profile.build_root(key, "example.org", FIXED_NOW, SKEW)
        self.assertEqual(root.signature_algorithm_oid, SignatureAlgorithmOID.ED25519)
        self.assertTrue(is_self_signed(root))


class PreparedProfileTests(SynchronousTestCase):
    """
    Tests for L{x509profile.leaf_profile}: what is prepared once per bundle,
    and that leaves built from it are the profile's.
    """

    def test_prepared_once_per_bundle(self):
        """The same bundle gets the same profile; another bundle its own."""
        first, second = make_bundle(), make_bundle()
        profile = x509profile.leaf_profile(first)
        self.assertIs(x509profile.leaf_profile(first), profile)
        self.assertIs(profile.bundle, first)
        other = x509profile.leaf_profile(second)
        self.assertIs(other.bundle, second)
        self.assertEqual(other.issuer_name, second.issuer.subject)
        self.assertEqual(other.chain_not_after, second.chain_not_after)

    def test_profile_immutable(self):
        """A prepared profile cannot be changed."""
        profile = x509profile.leaf_profile(make_bundle())
        self.assertRaises(
            AttributeError, setattr, profile, "issuer_name", x509.Name([])
        )

    def test_leaves_follow_bundle_swaps(self):
        """Leaves signed alternately with two bundles each name their own issuer."""
        bundles = [make_bundle(), make_bundle("ed25519")]
        for bundle in bundles + bundles:
            leaf = _leaf(bundle)
            self.assertEqual(leaf.issuer, bundle.issuer.subject)
            self.assertEqual(
                leaf.extensions.get_extension_for_class(
                    x509.AuthorityKeyIdentifier
                ).value,
                bundle.authority_key_identifier,
            )
            leaf.verify_directly_issued_by(bundle.issuer)

    def test_extension_order(self):
        """Extensions come in order: SAN, basic constraints, key usage, EKU, AKI."""
        leaf = _leaf(make_bundle())
        self.assertEqual(
            [(ext.oid, ext.critical) for ext in leaf.extensions],
            [
                (ExtensionOID.SUBJECT_ALTERNATIVE_NAME, True),
                (ExtensionOID.BASIC_CONSTRAINTS, True),
                (ExtensionOID.KEY_USAGE, True),
                (ExtensionOID.EXTENDED_KEY_USAGE, False),
                (ExtensionOID.AUTHORITY_KEY_IDENTIFIER, False),
            ],
        )

    def test_validity_in_another_time_zone(self):
        """
        Bounds given in a time zone other than UTC are stored as the same instants.
        """
        zone = timezone(timedelta(hours=2))
        not_before = (FIXED_NOW - SKEW).astimezone(zone)
        not_after = (FIXED_NOW + TTL).astimezone(zone)
        leaf = x509profile.build_leaf(
            make_bundle(),
            make_private_key().public_key(),
            SPIFFE_ID,
            [],
            not_before,
            not_after,
        )
        self.assertEqual(leaf.not_valid_before_utc, FIXED_NOW - SKEW)
        self.assertEqual(leaf.not_valid_after_utc, FIXED_NOW + TTL)

    def test_not_after_before_not_before(self):
        """A NotAfter before the NotBefore is refused, not signed."""
        self.assertRaises(
            ValueError,
            x509profile.build_leaf,
            make_bundle(),
            make_private_key().public_key(),
            SPIFFE_ID,
            [],
            FIXED_NOW,
            FIXED_NOW - timedelta(seconds=1),
        )
