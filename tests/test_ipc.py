"""
Tests for L{sentry_tx.server.ipc}: what a worker pool's parent and its
workers send each other.
"""

from datetime import timedelta

from cryptography.hazmat.primitives import serialization
from twisted.protocols import amp
from twisted.trial.unittest import SynchronousTestCase

from sentry_tx.config import MTLSConfig, SentryConfig, TokenValidatorConfig
from sentry_tx.metrics import SentryMetrics
from sentry_tx.server.ipc import (
    AMP_VALUE_MAX_BYTES,
    CounterDeltas,
    Counters,
    LongBytes,
    LongUnicode,
    Start,
    add_counter_deltas,
    bundle_from_pems,
    bundle_to_pems,
    config_from_json,
    config_to_json,
)
from sentry_tx.testing.certificates import make_bundle


def _round_trip_arguments(command, arguments):
    """
    Serialise C{arguments} of C{command} into an AMP box, through its wire
    form, and parse them back.
    """
    box = command.makeArguments(arguments, None)
    [parsed] = amp.parseString(amp.AmpBox(box).serialize())
    return command.parseArguments(parsed, None)


class ConfigJSONTests(SynchronousTestCase):
    """
    L{config_to_json} and L{config_from_json}.
    """

    def test_round_trip(self):
        """
        A configuration with durations down to the microsecond, audiences
        and token validator options comes back equal.
        """
        config = SentryConfig(
            mode="kubernetes",
            trust_domain="example.org",
            token_audiences=("a", "b"),
            port=0,
            listen_address="127.0.0.1",
            log_as_json=True,
            namespace="dapr-system",
            mtls=MTLSConfig(
                workload_cert_ttl=timedelta(hours=1, microseconds=7),
                allowed_clock_skew=timedelta(0),
                token_validators=(
                    TokenValidatorConfig("jwks", (("source", "https://x"),)),
                ),
            ),
        )
        self.assertEqual(config_from_json(config_to_json(config)), config)

    def test_defaults_round_trip(self):
        """
        The default configuration comes back equal.
        """
        self.assertEqual(
            config_from_json(config_to_json(SentryConfig())), SentryConfig()
        )

    def test_unknown_field_refused(self):
        """
        A document with a field L{SentryConfig} lacks is refused.
        """
        text = config_to_json(SentryConfig())[:-1] + ', "extra": 1}'
        self.assertRaises(ValueError, config_from_json, text)

    def test_wrong_type_refused(self):
        """
        A field of the wrong type is refused, naming the field.
        """
        text = config_to_json(SentryConfig()).replace(
            '"port": 50001', '"port": "50001"'
        )
        error = self.assertRaises(ValueError, config_from_json, text)
        self.assertIn("port", str(error))


class BundlePEMTests(SynchronousTestCase):
    """
    L{bundle_to_pems} and L{bundle_from_pems}.
    """

    def test_round_trip(self):
        """
        A bundle rebuilt from its PEM documents has the same anchors, chain,
        key and authority key identifier.
        """
        bundle = make_bundle(intermediates=1)
        rebuilt = bundle_from_pems(*bundle_to_pems(bundle))
        self.assertEqual(rebuilt.anchors, bundle.anchors)
        self.assertEqual(rebuilt.issuer_chain, bundle.issuer_chain)
        self.assertEqual(
            rebuilt.authority_key_identifier, bundle.authority_key_identifier
        )
        public = serialization.PublicFormat.SubjectPublicKeyInfo
        self.assertEqual(
            rebuilt.issuer_key.public_key().public_bytes(
                serialization.Encoding.DER, public
            ),
            bundle.issuer_key.public_key().public_bytes(
                serialization.Encoding.DER, public
            ),
        )

    def test_bad_key_message_hides_key(self):
        """
        A key that does not parse is refused with a message that does not
        quote it.
        """
        anchors_pem, chain_pem, key_pem = bundle_to_pems(make_bundle())
        broken = key_pem.replace(b"\n", b"\nSECRETMARKER", 1)
        error = self.assertRaises(
            ValueError, bundle_from_pems, anchors_pem, chain_pem, broken
        )
        self.assertEqual(str(error), "the issuer key does not parse")


class CommandTests(SynchronousTestCase):
    """
    The AMP commands' arguments through their wire form.
    """

    def test_start_arguments(self):
        """
        L{Start}'s configuration and PEM documents survive the wire, even a
        document longer than one AMP value.
        """
        anchors_pem, chain_pem, key_pem = bundle_to_pems(make_bundle())
        long_anchors = anchors_pem * (AMP_VALUE_MAX_BYTES // len(anchors_pem) + 2)
        self.assertGreater(len(long_anchors), AMP_VALUE_MAX_BYTES)
        arguments = {
            "config_json": config_to_json(SentryConfig()),
            "anchors_pem": long_anchors,
            "chain_pem": chain_pem,
            "key_pem": key_pem,
        }
        # Without JWT material the optional arguments arrive as None.
        self.assertEqual(
            _round_trip_arguments(Start, arguments),
            dict(arguments, jwt_key_pem=None, jwks_json=None),
        )

    def test_start_arguments_with_jwt(self):
        """
        L{Start} carries the JWT signing key and its JWKS when JWTs are on.
        """
        from sentry_tx.jwt.material import generate_jwt_material

        anchors_pem, chain_pem, key_pem = bundle_to_pems(make_bundle())
        jwt_key_pem, jwks_json = generate_jwt_material()
        arguments = {
            "config_json": config_to_json(SentryConfig(jwt_enabled=True)),
            "anchors_pem": anchors_pem,
            "chain_pem": chain_pem,
            "key_pem": key_pem,
            "jwt_key_pem": jwt_key_pem,
            "jwks_json": jwks_json,
        }
        self.assertEqual(_round_trip_arguments(Start, arguments), arguments)

    def test_long_unicode(self):
        """
        A L{LongUnicode} value longer than one AMP value, split inside a
        character, survives the wire.
        """
        box = {}
        value = "\u00e9" * AMP_VALUE_MAX_BYTES
        LongUnicode().toBox(b"value", box, {"value": value}, None)
        self.assertEqual(box[b"value"], b"2")
        objects = {}
        LongUnicode().fromBox(b"value", box, objects, None)
        self.assertEqual(objects, {"value": value})

    def test_empty_long_bytes(self):
        """
        An empty L{LongBytes} value survives the wire.
        """
        box = {}
        LongBytes().toBox(b"value", box, {"value": b""}, None)
        objects = {}
        LongBytes().fromBox(b"value", box, objects, None)
        self.assertEqual(objects, {"value": b""})


class CounterTests(SynchronousTestCase):
    """
    L{CounterDeltas} in a worker and L{add_counter_deltas} in the parent.
    """

    def test_deltas_summed(self):
        """
        Each L{CounterDeltas.take} reports the growth since the previous one;
        adding two workers' answers (through L{Counters}' wire form) to the
        parent's metrics gives their sum.
        """
        parent = SentryMetrics()
        workers = [SentryMetrics(), SentryMetrics()]
        deltas = [CounterDeltas(metrics) for metrics in workers]
        for metrics in workers:
            metrics.sign_request_received.inc(3)
            metrics.sign_success.inc(2)
            metrics.sign_failure.labels(reason="cert_parse").inc()
        workers[0].servercert_issue_failed.inc()
        for each in deltas:
            add_counter_deltas(parent, _round_trip_response(each.take()))
        workers[1].sign_request_received.inc()
        workers[1].sign_success.inc()
        for each in deltas:
            add_counter_deltas(parent, _round_trip_response(each.take()))
        self.assertEqual(parent.sign_request_received._value.get(), 7)
        self.assertEqual(parent.sign_success._value.get(), 5)
        self.assertEqual(
            parent.sign_failure.labels(reason="cert_parse")._value.get(), 2
        )
        self.assertEqual(parent.sign_failure.labels(reason="validator")._value.get(), 0)
        self.assertEqual(parent.servercert_issue_failed._value.get(), 1)

    def test_nothing_new(self):
        """
        With no sign since the previous take, every count is zero and no
        failure reason is listed.
        """
        deltas = CounterDeltas(SentryMetrics())
        deltas.take()
        self.assertEqual(
            deltas.take(),
            {
                "received": 0,
                "success": 0,
                "servercert_issue_failed": 0,
                "failures": [],
                "sign_durations": [],
            },
        )


def _round_trip_response(answer):
    """
    A L{Counters} answer as the parent parses it from the wire.
    """
    [parsed] = amp.parseString(Counters.makeResponse(answer, None).serialize())
    return Counters.parseResponse(parsed, None)
