"""
Tests for L{sentry_tx.config}: Go durations, environment expansion and the
Dapr Configuration.
"""

import os
from datetime import timedelta

from twisted.trial.unittest import SynchronousTestCase

from sentry_tx.config import (
    DEFAULT_ALLOWED_CLOCK_SKEW,
    DEFAULT_WORKLOAD_CERT_TTL,
    KNOWN_MTLS_KEYS,
    MTLSConfig,
    expand_environment,
    load_configuration_file,
    mtls_warnings,
    parse_mtls,
)
from sentry_tx.durations import format_go_duration, parse_go_duration
from sentry_tx.errors import ConfigError

GOOD_DURATIONS = [
    ("0", timedelta(0)),
    ("-0", timedelta(0)),
    ("0s", timedelta(0)),
    ("90s", timedelta(seconds=90)),
    ("500ms", timedelta(milliseconds=500)),
    ("1h30m", timedelta(hours=1, minutes=30)),
    ("1.5h", timedelta(hours=1, minutes=30)),
    ("2h45m30.5s", timedelta(hours=2, minutes=45, seconds=30.5)),
    ("24h", timedelta(hours=24)),
    ("15m", timedelta(minutes=15)),
    (".5s", timedelta(milliseconds=500)),
    ("5.s", timedelta(seconds=5)),
    ("+5s", timedelta(seconds=5)),
    ("-2m", timedelta(minutes=-2)),
    ("1us", timedelta(microseconds=1)),
    ("1\u00b5s", timedelta(microseconds=1)),
    ("1\u03bcs", timedelta(microseconds=1)),
    ("1500ns", timedelta(microseconds=1)),
    ("1m1m", timedelta(minutes=2)),
    ("9223372036854775807ns", timedelta(microseconds=9223372036854775)),
]

BAD_DURATIONS = [
    "",
    "1",
    "h",
    ".",
    ".s",
    "-",
    "+",
    "1 h",
    " 1h",
    "1h ",
    "1d",
    "1H",
    "1..5s",
    "1.5.5s",
    "1e3s",
    "24 hours",
    "9223372036854775808ns",
    "3000000h",
]


class ParseGoDurationTests(SynchronousTestCase):
    """
    Tests for L{parse_go_duration}.
    """

    def test_good(self):
        """
        Every form Go's time.ParseDuration takes gives the same length.
        """
        for text, expected in GOOD_DURATIONS:
            self.assertEqual(
                (text, parse_go_duration(text, "f")), (text, expected)
            )

    def test_bad(self):
        """
        Text Go refuses raises ConfigError naming the field and the text,
        with examples.
        """
        for text in BAD_DURATIONS:
            error = self.assertRaises(ConfigError, parse_go_duration, text, "--x")
            self.assertEqual(error.field, "--x")
            self.assertEqual(
                error.problem,
                f"not a duration: {text!r} (use e.g. 24h, 90m, 30s)",
            )

    def test_not_a_string(self):
        """
        A value that is not a string is not a duration.
        """
        error = self.assertRaises(ConfigError, parse_go_duration, 5, "f")
        self.assertIn("not a duration", error.problem)


class ExpandEnvironmentTests(SynchronousTestCase):
    """
    Tests for L{expand_environment}, which follows Go's os.ExpandEnv.
    """

    def test_braced_and_bare(self):
        """
        ${VAR} and $VAR are both replaced from the environment.
        """
        self.assertEqual(
            expand_environment("a ${X} b $Y_2.c", {"X": "1", "Y_2": "2"}),
            ("a 1 b 2.c", []),
        )

    def test_unset_reported_once(self):
        """
        An unset variable expands to nothing and is reported once, in order.
        """
        self.assertEqual(
            expand_environment("${B}$A${B}", {}), ("", ["B", "A"])
        )

    def test_empty_is_not_unset(self):
        """
        A variable set to the empty string is not reported.
        """
        self.assertEqual(expand_environment("[${E}]", {"E": ""}), ("[]", []))

    def test_lone_dollar_kept(self):
        """
        A $ not followed by a name, or at the end, stays as it is.
        """
        self.assertEqual(expand_environment("$ 1 and $", {}), ("$ 1 and $", []))

    def test_bad_braces_dropped(self):
        """
        "${}" and an unclosed "${" are dropped, as Go drops them.
        """
        self.assertEqual(expand_environment("a${}b", {}), ("ab", []))
        self.assertEqual(expand_environment("a${b", {}), ("ab", []))

    def test_special_names(self):
        """
        $1 and $$ are one-character variable names, as in Go.
        """
        self.assertEqual(
            expand_environment("$1$$x", {"1": "one"}), ("onex", ["$"])
        )

    def test_no_dollar(self):
        """
        Text without $ comes back unchanged.
        """
        self.assertEqual(expand_environment("plain: text", {}), ("plain: text", []))


def _document(mtls):
    """
    A Configuration document whose spec.mtls is C{mtls}.
    """
    return {
        "apiVersion": "dapr.io/v1alpha1",
        "kind": "Configuration",
        "metadata": {"name": "daprsystem"},
        "spec": {"mtls": mtls},
    }


class ParseMTLSTests(SynchronousTestCase):
    """
    Tests for L{parse_mtls}.
    """

    def assertConfigError(self, document, field, *fragments):
        """
        Parsing C{document} raises ConfigError for C{field} whose problem
        contains every fragment and names the source.
        """
        error = self.assertRaises(ConfigError, parse_mtls, document, "conf.yaml")
        self.assertEqual(error.field, field)
        for fragment in fragments + ("(in conf.yaml)",):
            self.assertIn(fragment, error.problem)
        return error

    def test_defaults(self):
        """
        A Configuration without spec.mtls gives the defaults.
        """
        self.assertEqual(parse_mtls({}, "s"), MTLSConfig())
        self.assertEqual(parse_mtls({"spec": None}, "s"), MTLSConfig())
        self.assertEqual(parse_mtls(_document(None), "s"), MTLSConfig())
        self.assertEqual(
            MTLSConfig(),
            MTLSConfig(DEFAULT_WORKLOAD_CERT_TTL, DEFAULT_ALLOWED_CLOCK_SKEW, ()),
        )
        self.assertEqual(DEFAULT_WORKLOAD_CERT_TTL, timedelta(hours=24))
        self.assertEqual(DEFAULT_ALLOWED_CLOCK_SKEW, timedelta(minutes=15))

    def test_values(self):
        """
        workloadCertTTL and allowedClockSkew are read as Go durations.
        """
        mtls = parse_mtls(
            _document({"workloadCertTTL": "1h30m", "allowedClockSkew": "0s"}), "s"
        )
        self.assertEqual(mtls.workload_cert_ttl, timedelta(minutes=90))
        self.assertEqual(mtls.allowed_clock_skew, timedelta(0))
        self.assertEqual(mtls.token_validators, ())

    def test_null_and_empty_mean_default(self):
        """
        A null or empty duration means the default, as in Dapr.
        """
        mtls = parse_mtls(
            _document({"workloadCertTTL": None, "allowedClockSkew": ""}), "s"
        )
        self.assertEqual(mtls, MTLSConfig())

    def test_ttl_zero_or_negative(self):
        """
        A workloadCertTTL of zero or below is refused, naming the field.
        """
        for text in ("0", "0s", "-1h"):
            self.assertConfigError(
                _document({"workloadCertTTL": text}),
                "spec.mtls.workloadCertTTL",
                "must be longer than zero",
                repr(text),
            )

    def test_ttl_garbage(self):
        """
        A workloadCertTTL that is not a duration is refused, naming the field.
        """
        self.assertConfigError(
            _document({"workloadCertTTL": "one day"}),
            "spec.mtls.workloadCertTTL",
            "not a duration: 'one day'",
        )

    def test_ttl_not_a_string(self):
        """
        A workloadCertTTL that YAML read as a number is refused, naming the
        field and the type.
        """
        self.assertConfigError(
            _document({"workloadCertTTL": 24}),
            "spec.mtls.workloadCertTTL",
            "must be a duration string",
            "a number",
        )

    def test_negative_skew(self):
        """
        A negative allowedClockSkew is refused, naming the field.
        """
        self.assertConfigError(
            _document({"allowedClockSkew": "-1s"}),
            "spec.mtls.allowedClockSkew",
            "must not be negative",
        )

    def test_skew_garbage(self):
        """
        An allowedClockSkew that is not a duration is refused, naming the field.
        """
        self.assertConfigError(
            _document({"allowedClockSkew": "soon"}),
            "spec.mtls.allowedClockSkew",
            "not a duration",
        )

    def test_jwks_accepted(self):
        """
        A jwks validator with a source is read, with its options.
        """
        mtls = parse_mtls(
            _document(
                {
                    "tokenValidators": [
                        {"name": "jwks", "options": {"source": "https://x/jwks"}}
                    ]
                }
            ),
            "conf.yaml",
        )
        self.assertEqual(
            [(v.name, v.options) for v in mtls.token_validators],
            [("jwks", (("source", "https://x/jwks"),))],
        )

    def test_built_in_validators_refused(self):
        """
        The built-in kubernetes and insecure validators cannot be configured
        (Dapr's message).
        """
        for name in ("kubernetes", "insecure"):
            self.assertConfigError(
                _document({"tokenValidators": [{"name": name}]}),
                "spec.mtls.tokenValidators[0].name",
                "the built-in 'kubernetes' and 'insecure' validators cannot be"
                " configured manually",
            )

    def test_jwks_twice_refused(self):
        """
        A second jwks entry is refused, naming its index.
        """
        entry = {"name": "jwks", "options": {"source": "https://x/jwks"}}
        self.assertConfigError(
            _document({"tokenValidators": [entry, entry]}),
            "spec.mtls.tokenValidators[1].name",
            "configured more than once",
        )

    def test_jwks_options_checked(self):
        """
        A jwks entry without a source, with an unknown option, a bad
        duration, a caCertificate for a non-URL source or broken inline JSON
        is refused naming the option.
        """
        for options, field, problem in [
            ({}, "source", "is required"),
            ({"source": "https://x", "timeout": "5s"}, "timeout", "unknown option"),
            (
                {"source": "https://x", "minRefreshInterval": "soon"},
                "minRefreshInterval",
                "not a duration",
            ),
            (
                {"source": "https://x", "requestTimeout": "0s"},
                "requestTimeout",
                "must be positive",
            ),
            (
                {"source": "https://x", "minRefreshInterval": "500ms"},
                "minRefreshInterval",
                "at least 1s",
            ),
            (
                {"source": "/etc/jwks.json", "caCertificate": "/ca.pem"},
                "caCertificate",
                "URL source only",
            ),
            ({"source": '{"keys": []}'}, "source", "no usable signing key"),
        ]:
            self.assertConfigError(
                _document({"tokenValidators": [{"name": "jwks", "options": options}]}),
                f"spec.mtls.tokenValidators[0].options.{field}",
                problem,
            )

    def test_unknown_validator(self):
        """
        An unknown validator name is refused, naming its index and the name.
        """
        self.assertConfigError(
            _document({"tokenValidators": [{"name": "oidc"}]}),
            "spec.mtls.tokenValidators[0].name",
            "unknown validator 'oidc'",
            "'jwks'",
        )

    def test_validator_name_missing(self):
        """
        A validator entry without a name is refused.
        """
        self.assertConfigError(
            _document({"tokenValidators": [{"options": {}}]}),
            "spec.mtls.tokenValidators[0].name",
            "must be a non-empty string",
        )

    def test_validator_options_not_strings(self):
        """
        Validator options must be strings; the field names the option.
        """
        self.assertConfigError(
            _document(
                {"tokenValidators": [{"name": "jwks", "options": {"timeout": 5}}]}
            ),
            "spec.mtls.tokenValidators[0].options.timeout",
            "must be a string",
        )

    def test_validator_options_not_mapping(self):
        """
        Validator options must be a mapping.
        """
        self.assertConfigError(
            _document({"tokenValidators": [{"name": "jwks", "options": ["a"]}]}),
            "spec.mtls.tokenValidators[0].options",
            "must be a mapping, not a list",
        )

    def test_validator_entry_not_mapping(self):
        """
        Each tokenValidators entry must be a mapping; the field names its index.
        """
        self.assertConfigError(
            _document({"tokenValidators": ["jwks"]}),
            "spec.mtls.tokenValidators[0]",
            "must be a mapping, not a string",
        )

    def test_validators_not_list(self):
        """
        tokenValidators must be a list.
        """
        self.assertConfigError(
            _document({"tokenValidators": {"name": "jwks"}}),
            "spec.mtls.tokenValidators",
            "must be a list, not a mapping",
        )

    def test_empty_validators(self):
        """
        An empty or null tokenValidators means none.
        """
        self.assertEqual(
            parse_mtls(_document({"tokenValidators": []}), "s").token_validators, ()
        )
        self.assertEqual(
            parse_mtls(_document({"tokenValidators": None}), "s").token_validators,
            (),
        )

    def test_wrong_kinds(self):
        """
        spec and spec.mtls must be mappings; the field names the path.
        """
        self.assertConfigError({"spec": "x"}, "spec", "must be a mapping")
        self.assertConfigError(
            {"spec": {"mtls": ["x"]}}, "spec.mtls", "must be a mapping, not a list"
        )

    def test_wrong_kind_or_api_version(self):
        """
        A kind or apiVersion other than Dapr's Configuration is refused.
        """
        self.assertConfigError({"kind": "Component"}, "kind", "'Configuration'")
        self.assertConfigError(
            {"apiVersion": "v1"}, "apiVersion", "'dapr.io/v1alpha1'"
        )

    def test_document_not_mapping(self):
        """
        A document that is not a mapping is refused, naming the source.
        """
        error = self.assertRaises(ConfigError, parse_mtls, ["x"], "conf.yaml")
        self.assertEqual(error.field, "conf.yaml")


GOOD_FILE = """\
apiVersion: dapr.io/v1alpha1
kind: Configuration
metadata:
  name: daprsystem
spec:
  mtls:
    enabled: true
    workloadCertTTL: "${TTL}"
    allowedClockSkew: $SKEW
    extra: "${NOT_SET}"
"""


class LoadConfigurationFileTests(SynchronousTestCase):
    """
    Tests for L{load_configuration_file}.
    """

    def write(self, content):
        """
        Write C{content} (text or bytes) to a new file and return its path.
        """
        path = self.mktemp()
        mode = "wb" if isinstance(content, bytes) else "w"
        with open(path, mode) as configuration_file:
            configuration_file.write(content)
        return path

    def test_good_file(self):
        """
        The file's values are read after environment expansion, and each
        unset variable gives a warning naming it and the file.
        """
        path = self.write(GOOD_FILE)
        mtls, warnings = load_configuration_file(path, {"TTL": "2h", "SKEW": "1m"})
        self.assertEqual(
            mtls,
            MTLSConfig(
                workload_cert_ttl=timedelta(hours=2),
                allowed_clock_skew=timedelta(minutes=1),
            ),
        )
        self.assertEqual(len(warnings), 2)
        self.assertIn("'NOT_SET'", warnings[0])
        self.assertIn(path, warnings[0])
        # "extra" is not a key of Dapr's spec.mtls: warned by name.
        self.assertIn("spec.mtls.extra: unknown key", warnings[1])

    def test_missing_file(self):
        """
        A missing file raises FileNotFoundError for the caller to handle.
        """
        self.assertRaises(
            FileNotFoundError, load_configuration_file, self.mktemp(), {}
        )

    def test_broken_yaml(self):
        """
        Unparsable YAML is refused, naming the file and the line and column.
        """
        path = self.write("spec:\n  mtls: [unclosed\n")
        error = self.assertRaises(ConfigError, load_configuration_file, path, {})
        self.assertEqual(error.field, path)
        self.assertTrue(error.problem.startswith("not valid YAML: "), error.problem)
        self.assertIn("line 3, column 1", error.problem)
        self.assertNotIn("\n", error.problem)

    def test_empty_file(self):
        """
        An empty file is refused, naming the file.
        """
        path = self.write("")
        error = self.assertRaises(ConfigError, load_configuration_file, path, {})
        self.assertEqual(error.field, path)
        self.assertIn("empty", error.problem)

    def test_not_a_mapping(self):
        """
        A YAML document that is not a mapping is refused, naming the file.
        """
        path = self.write("- a\n- b\n")
        error = self.assertRaises(ConfigError, load_configuration_file, path, {})
        self.assertEqual(error.field, path)
        self.assertIn("not a list", error.problem)

    def test_bad_field(self):
        """
        A wrong field in the file is reported with its YAML path and the file.
        """
        path = self.write("spec:\n  mtls:\n    workloadCertTTL: 0s\n")
        error = self.assertRaises(ConfigError, load_configuration_file, path, {})
        self.assertEqual(error.field, "spec.mtls.workloadCertTTL")
        self.assertIn(path, error.problem)

    def test_unset_variable_means_default(self):
        """
        A duration that expands to the empty string takes the default, with
        a warning.
        """
        path = self.write("spec:\n  mtls:\n    workloadCertTTL: '${NOPE}'\n")
        mtls, warnings = load_configuration_file(path, {})
        self.assertEqual(mtls, MTLSConfig())
        self.assertEqual(len(warnings), 1)

    def test_not_readable(self):
        """
        A path that cannot be read (a directory) is refused, naming it.
        """
        path = self.mktemp()
        os.mkdir(path)
        error = self.assertRaises(ConfigError, load_configuration_file, path, {})
        self.assertEqual(error.field, path)
        self.assertIn("is a directory, not a regular file", error.problem)

    def test_fifo_refused_at_once(self):
        """
        A FIFO at the path is refused at once, naming it, instead of
        blocking the start until something writes to it.
        """
        path = self.mktemp()
        os.mkfifo(path)
        error = self.assertRaises(ConfigError, load_configuration_file, path, {})
        self.assertEqual(error.field, path)
        self.assertIn("not a regular file", error.problem)

    def test_too_large(self):
        """
        A file larger than the cap is refused, naming it.
        """
        from sentry_tx.config import MAX_CONFIGURATION_FILE_BYTES

        path = self.write("#" * (MAX_CONFIGURATION_FILE_BYTES + 1))
        error = self.assertRaises(ConfigError, load_configuration_file, path, {})
        self.assertEqual(error.field, path)
        self.assertIn("larger than", error.problem)

    def test_not_utf8(self):
        """
        A file that is not UTF-8 is refused, naming it.
        """
        path = self.write(b"spec: \xff\n")
        error = self.assertRaises(ConfigError, load_configuration_file, path, {})
        self.assertEqual(error.field, path)
        self.assertIn("UTF-8", error.problem)


class MTLSWarningsTests(SynchronousTestCase):
    """
    L{mtls_warnings}: what an operator should hear about a Configuration
    that parsed.
    """

    def test_misspelt_key(self):
        """
        A misspelt key is warned about by name, with the key it resembles,
        and its value is not used.
        """
        document = {"spec": {"mtls": {"workloadCertTTl": "1h"}}}
        self.assertEqual(
            mtls_warnings(document, "f.yaml"),
            [
                "spec.mtls.workloadCertTTl: unknown key, ignored (did you mean"
                " 'workloadCertTTL'?) (in f.yaml)"
            ],
        )
        self.assertEqual(
            parse_mtls(document, "f.yaml").workload_cert_ttl, timedelta(hours=24)
        )

    def test_known_keys(self):
        """
        Every key of Dapr's MTLSSpec is known, including those only sidecars
        read.
        """
        document = {"spec": {"mtls": {key: None for key in KNOWN_MTLS_KEYS}}}
        self.assertEqual(mtls_warnings(document, "f"), [])

    def test_unknown_key_without_hint(self):
        """
        A key like none of Dapr's is warned about without a hint.
        """
        self.assertEqual(
            mtls_warnings({"spec": {"mtls": {"colour": "blue"}}}, "f"),
            ["spec.mtls.colour: unknown key, ignored (in f)"],
        )

    def test_missing_mtls(self):
        """
        A Configuration without spec.mtls (or without spec) is warned about,
        with the defaults in use.
        """
        for document in ({"spec": {}}, {}, {"spec": {"mtls": None}}):
            [warning] = mtls_warnings(document, "f")
            self.assertEqual(
                warning,
                "f has no spec.mtls; using the defaults (workloadCertTTL"
                " 24h0m0s, allowedClockSkew 15m0s)",
            )

    def test_file_warnings(self):
        """
        L{load_configuration_file} returns the unknown-key warnings.
        """
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("spec:\n  mtls:\n    workloadCertTTl: 1h\n")
        _, warnings = load_configuration_file(path, {})
        self.assertEqual(len(warnings), 1)
        self.assertIn("workloadCertTTl", warnings[0])

    def test_shipped_sample_has_no_warning(self):
        """
        conf/daprsystem.yaml, which the README's first command uses, loads
        with no warning at all.
        """
        import os

        from sentry_tx.testing.source_tree import PROJECT_ROOT

        _, warnings = load_configuration_file(
            os.path.join(PROJECT_ROOT, "conf", "daprsystem.yaml"), {}
        )
        self.assertEqual(warnings, [])


class FormatGoDurationTests(SynchronousTestCase):
    """
    L{format_go_duration} writes durations as Go's Duration.String does.
    """

    def test_examples(self):
        """
        Hours, minutes, seconds, fractions and sub-second values read as Go
        writes them, and parse back to the same duration.
        """
        for duration, text in (
            (timedelta(hours=24), "24h0m0s"),
            (timedelta(minutes=15), "15m0s"),
            (timedelta(seconds=90), "1m30s"),
            (timedelta(seconds=1.5), "1.5s"),
            (timedelta(milliseconds=500), "500ms"),
            (timedelta(0), "0s"),
            (timedelta(minutes=-2), "-2m0s"),
        ):
            self.assertEqual(format_go_duration(duration), text)
            self.assertEqual(parse_go_duration(text, "f"), duration)
