"""
Tests for L{sentry_tx.options.Options}: Dapr Sentry's flags.
"""

import signal
import sys
from datetime import timedelta
from io import StringIO

from twisted.logger import LogLevel
from twisted.scripts._twistd_unix import ServerOptions
from twisted.trial.unittest import SynchronousTestCase

from sentry_tx import logs
from sentry_tx.config import MTLSConfig, SentryConfig
from sentry_tx.flags import go_style_arguments
from sentry_tx.options import Options
from sentry_tx.testing.command_lines import OptionsTestCase, options_for_test

ALL_FLAGS = (
    "config",
    "issuer-credentials",
    "issuer-ca-filename",
    "issuer-certificate-filename",
    "issuer-key-filename",
    "trust-domain",
    "token-audience",
    "mode",
    "kubeconfig",
    "port",
    "listen-address",
    "healthz-port",
    "healthz-listen-address",
    "metrics-port",
    "metrics-listen-address",
    "workers",
    "enable-metrics",
    "log-level",
    "log-as-json",
)


class DefaultsTests(OptionsTestCase):
    """
    What sentry_tx runs with when given no flags.
    """

    def test_every_default(self):
        """
        With no flags and an empty environment every setting has Dapr's
        default.
        """
        missing = self.mktemp()
        config = self.config(["--config", missing])
        self.assertEqual(config, SentryConfig(config=missing))
        self.assertEqual(config.mode, "standalone")
        self.assertEqual(
            config.issuer_credentials, "/var/run/secrets/dapr.io/credentials"
        )
        self.assertEqual(config.issuer_ca_filename, "ca.crt")
        self.assertEqual(config.issuer_certificate_filename, "issuer.crt")
        self.assertEqual(config.issuer_key_filename, "issuer.key")
        self.assertEqual(config.trust_domain, "localhost")
        self.assertEqual(config.token_audiences, ())
        self.assertEqual(config.kubeconfig, "~/.kube/config")
        self.assertEqual(config.port, 50001)
        self.assertEqual(config.listen_address, "")
        self.assertEqual(config.healthz_port, 8080)
        self.assertEqual(config.metrics_port, 9090)
        self.assertIs(config.enable_metrics, True)
        self.assertEqual(config.log_level, "info")
        self.assertIs(config.log_as_json, False)
        self.assertEqual(config.namespace, "default")
        self.assertEqual(config.mtls, MTLSConfig())

    def test_config_default_name(self):
        """
        --config defaults to daprsystem; when no such file exists the
        defaults are used and a warning says so.
        """
        options = self.parse([])
        self.assertEqual(options.sentry_config.config, "daprsystem")
        self.assertEqual(
            options.startup_warnings,
            ["configuration file 'daprsystem' not found; using the defaults"],
        )

    def test_no_warnings_for_good_file(self):
        """
        A readable Configuration file gives no startup warnings.
        """
        options = self.parse(
            [
                "--config",
                self.write("kind: Configuration\nspec:\n  mtls:\n    enabled: true\n"),
            ]
        )
        self.assertEqual(options.startup_warnings, [])


class FlagTests(OptionsTestCase):
    """
    Each flag reaches the SentryConfig.
    """

    def test_every_flag(self):
        """
        Every flag given a value ends up in its SentryConfig field.
        """
        path = self.write("kind: Configuration\n")
        arguments = [
            "--config", path,
            "--issuer-credentials", "/creds",
            "--issuer-ca-filename", "/abs/roots.pem",
            "--issuer-certificate-filename", "chain.pem",
            "--issuer-key-filename", "key.pem",
            "--trust-domain", "example.org",
            "--token-audience", "a,b",
            "--mode", "standalone",
            "--kubeconfig", "/kube",
            "--port", "1",
            "--listen-address", "127.0.0.1",
            "--healthz-port", "2",
            "--healthz-listen-address", "127.0.0.2",
            "--metrics-port", "3",
            "--metrics-listen-address", "127.0.0.3",
            "--workers", "4",
            "--enable-metrics=false",
            "--log-level", "debug",
            "--log-as-json",
            "--jwt-enabled=true",
            "--jwt-key-filename", "/abs/jwt.pem",
            "--jwks-filename", "keys.json",
            "--jwt-issuer", "https://issuer.example.org",
            "--jwt-signing-algorithm", "ES256",
            "--jwt-key-id", "kid-1",
            "--jwt-ttl", "1h",
            "--oidc-enabled",
            "--oidc-server-listen-port", "5",
            "--oidc-server-listen-address", "127.0.0.5",
            "--oidc-server-tls-enabled=true",
            "--oidc-server-tls-cert-file", "/tls/tls.crt",
            "--oidc-server-tls-key-file", "/tls/tls.key",
            "--oidc-jwks-uri", "https://keys.example.org/jwks.json",
            "--oidc-path-prefix", "/dapr",
            "--oidc-allowed-hosts", "a.example.org,b.example.org",
            "--ca-ttl", "100h",
            "--ca-renewal-enabled=false",
            "--ca-renewal-threshold", "0.8",
            "--trust-anchor-propagation-grace", "5h",
        ]  # fmt: skip
        # The command line above gives every flag there is.
        given = {
            argument[2:].split("=")[0]
            for argument in arguments
            if argument.startswith("--")
        }
        self.assertEqual(given, {parameter[0] for parameter in Options.optParameters})
        config = self.config(arguments)
        self.assertEqual(
            config,
            SentryConfig(
                mode="standalone",
                config=path,
                issuer_credentials="/creds",
                issuer_ca_filename="/abs/roots.pem",
                issuer_certificate_filename="chain.pem",
                issuer_key_filename="key.pem",
                trust_domain="example.org",
                token_audiences=("a", "b"),
                kubeconfig="/kube",
                port=1,
                listen_address="127.0.0.1",
                healthz_port=2,
                healthz_listen_address="127.0.0.2",
                metrics_port=3,
                metrics_listen_address="127.0.0.3",
                workers=4,
                enable_metrics=False,
                log_level="debug",
                log_as_json=True,
                jwt_enabled=True,
                jwt_key_filename="/abs/jwt.pem",
                jwks_filename="keys.json",
                jwt_issuer="https://issuer.example.org",
                jwt_signing_algorithm="ES256",
                jwt_key_id="kid-1",
                jwt_ttl_seconds=3600,
                oidc_enabled=True,
                oidc_server_listen_port=5,
                oidc_server_listen_address="127.0.0.5",
                oidc_server_tls_enabled=True,
                oidc_server_tls_cert_file="/tls/tls.crt",
                oidc_server_tls_key_file="/tls/tls.key",
                oidc_jwks_uri="https://keys.example.org/jwks.json",
                oidc_path_prefix="/dapr",
                oidc_allowed_hosts=("a.example.org", "b.example.org"),
                ca_ttl_seconds=100 * 3600,
                ca_renewal_enabled=False,
                ca_renewal_threshold=0.8,
                trust_anchor_propagation_grace_seconds=5 * 3600,
            ),
        )
        self.assertEqual(config.ca_path, "/abs/roots.pem")
        self.assertEqual(config.jwt_key_path, "/abs/jwt.pem")
        self.assertEqual(config.issuer_key_path, "/creds/key.pem")

    def test_go_spellings(self):
        """
        -flag value, -flag=value, --flag value and --flag=value all work.
        """
        for arguments in (
            ["-port", "7"],
            ["-port=7"],
            ["--port", "7"],
            ["--port=7"],
        ):
            self.assertEqual(self.config(arguments).port, 7, arguments)

    def test_value_may_start_with_dash(self):
        """
        A string flag takes the next argument as its value even when it
        starts with a dash, as Go does.
        """
        self.assertEqual(
            self.config(["--kubeconfig", "-weird"]).kubeconfig, "-weird"
        )

    def test_value_with_equals(self):
        """
        Only the first = separates the name from the value.
        """
        self.assertEqual(
            self.config(["--token-audience=a=b"]).token_audiences, ("a=b",)
        )

    def test_last_wins(self):
        """
        A flag given twice takes its last value, as in Go.
        """
        self.assertEqual(self.config(["--port", "1", "-port=2"]).port, 2)

    def test_zero_ports(self):
        """
        Port 0 (pick a free port) is allowed for all three ports.
        """
        config = self.config(
            ["--port", "0", "--healthz-port", "0", "--metrics-port", "0"]
        )
        self.assertEqual(
            (config.port, config.healthz_port, config.metrics_port), (0, 0, 0)
        )

    def test_highest_port(self):
        """
        65535 is a port.
        """
        self.assertEqual(self.config(["--port", "65535"]).port, 65535)

    def test_token_audience_split(self):
        """
        --token-audience is split on commas; empty items and spaces around
        items are dropped.
        """
        self.assertEqual(
            self.config(["--token-audience", ",a, b,,c ,"]).token_audiences,
            ("a", "b", "c"),
        )
        self.assertEqual(self.config(["--token-audience", ""]).token_audiences, ())

    def test_log_level_case(self):
        """
        Log levels are read without regard to case, as Dapr does, and stored
        lowercase.
        """
        self.assertEqual(self.config(["--log-level", "WARN"]).log_level, "warn")

    def test_every_log_level(self):
        """
        debug, info, warn, error and fatal are log levels.
        """
        for level in ("debug", "info", "warn", "error", "fatal"):
            self.assertEqual(self.config(["--log-level", level]).log_level, level)

    def test_trust_domain_characters(self):
        """
        A trust domain of lowercase letters, digits, dots, dashes and
        underscores, up to 255 characters, is taken.
        """
        self.assertEqual(
            self.config(["--trust-domain", "a-b_c.0"]).trust_domain, "a-b_c.0"
        )
        self.assertEqual(
            self.config(["--trust-domain", "a" * 255]).trust_domain, "a" * 255
        )


class BooleanFlagTests(OptionsTestCase):
    """
    --enable-metrics and --log-as-json take Go's boolean forms.
    """

    def test_bare(self):
        """
        A bare boolean flag, with one dash or two, means true.
        """
        for spelling in ("--log-as-json", "-log-as-json"):
            self.assertIs(self.config([spelling]).log_as_json, True)

    def test_go_parse_bool(self):
        """
        Every spelling Go's strconv.ParseBool takes is accepted.
        """
        for text in ("1", "t", "T", "TRUE", "true", "True"):
            self.assertIs(
                self.config([f"--enable-metrics={text}"]).enable_metrics, True
            )
            self.assertIs(self.config([f"-log-as-json={text}"]).log_as_json, True)
        for text in ("0", "f", "F", "FALSE", "false", "False"):
            self.assertIs(
                self.config([f"-enable-metrics={text}"]).enable_metrics, False
            )
            self.assertIs(self.config([f"--log-as-json={text}"]).log_as_json, False)

    def test_bare_does_not_consume(self):
        """
        A bare boolean flag leaves the next argument alone.
        """
        config = self.config(["--log-as-json", "--port", "5"])
        self.assertIs(config.log_as_json, True)
        self.assertEqual(config.port, 5)

    def test_separate_value_is_an_argument(self):
        """
        "--log-as-json false" is a flag followed by an argument, which is
        refused (as Go would stop parsing there).
        """
        self.assertEqual(
            self.fail_to_parse(["--log-as-json", "false"]),
            "sentry: unexpected argument 'false' (flags look like --port 50001)",
        )

    def test_not_a_bool(self):
        """
        A boolean flag with another value is refused, naming the flag.
        """
        self.assertFailsNaming(
            ["--enable-metrics=yes"], "--enable-metrics", "not a boolean: 'yes'"
        )
        self.assertFailsNaming(["-log-as-json="], "--log-as-json", "not a boolean")


class EnvironmentTests(OptionsTestCase):
    """
    The environment decides the default mode and the namespace.
    """

    def test_mode_kubernetes_in_cluster(self):
        """
        With KUBERNETES_SERVICE_HOST set, the mode defaults to kubernetes.
        """
        config = self.config([], {"KUBERNETES_SERVICE_HOST": "10.0.0.1"})
        self.assertEqual(config.mode, "kubernetes")

    def test_mode_standalone_otherwise(self):
        """
        Without KUBERNETES_SERVICE_HOST (or with it empty) the mode defaults
        to standalone.
        """
        self.assertEqual(self.config([], {}).mode, "standalone")
        self.assertEqual(
            self.config([], {"KUBERNETES_SERVICE_HOST": ""}).mode, "standalone"
        )

    def test_mode_flag_wins(self):
        """
        --mode overrides the environment's default.
        """
        config = self.config(
            ["--mode", "standalone"], {"KUBERNETES_SERVICE_HOST": "10.0.0.1"}
        )
        self.assertEqual(config.mode, "standalone")
        self.assertEqual(self.config(["--mode=kubernetes"]).mode, "kubernetes")

    def test_namespace(self):
        """
        NAMESPACE names sentry_tx's namespace; unset or empty means default.
        """
        self.assertEqual(
            self.config([], {"NAMESPACE": "dapr-system"}).namespace, "dapr-system"
        )
        self.assertEqual(self.config([], {"NAMESPACE": ""}).namespace, "default")
        self.assertEqual(self.config([], {}).namespace, "default")

    def test_bad_namespace(self):
        """
        A NAMESPACE that cannot be part of a SPIFFE ID is refused, naming it.
        """
        for bad in ("a/b", "..", "x" * 64):
            self.assertFailsNaming(
                [], "NAMESPACE", "not a valid namespace", environ={"NAMESPACE": bad}
            )


class BadValueTests(OptionsTestCase):
    """
    Each bad value stops the program with one line naming the flag.
    """

    def test_unknown_mode(self):
        """
        A mode other than kubernetes or standalone is refused.
        """
        self.assertFailsNaming(["--mode", "cloud"], "--mode", "unknown mode 'cloud'")

    def test_bad_ports(self):
        """
        A port that is not an integer from 0 to 65535 is refused, naming the
        port's flag.
        """
        for flag in ("--port", "--healthz-port", "--metrics-port"):
            for value in ("-1", "65536", "abc", "", "1.5", " 80", "+80"):
                self.assertFailsNaming(
                    [f"{flag}={value}"], flag, f"not a port number: {value!r}"
                )

    def test_unknown_log_level(self):
        """
        A log level outside debug, info, warn, error, fatal is refused.
        """
        self.assertFailsNaming(
            ["--log-level", "trace"], "--log-level", "unknown level 'trace'"
        )

    def test_bad_trust_domains(self):
        """
        An empty trust domain, one with characters outside [a-z0-9._-], or
        one longer than 255 characters is refused.
        """
        self.assertFailsNaming(["--trust-domain="], "--trust-domain", "empty")
        for bad in ("Example.org", "a b", "spiffe://x", "caf\u00e9"):
            self.assertFailsNaming(
                ["--trust-domain", bad], "--trust-domain", "characters are limited"
            )
        self.assertFailsNaming(
            ["--trust-domain", "a" * 256], "--trust-domain", "too long"
        )

    def test_empty_paths(self):
        """
        The configuration and credential file flags may not be empty.
        """
        for flag in (
            "--config",
            "--issuer-credentials",
            "--issuer-ca-filename",
            "--issuer-certificate-filename",
            "--issuer-key-filename",
        ):
            self.assertFailsNaming([f"{flag}="], flag, "must not be empty")

    def test_unknown_flag(self):
        """
        A flag that does not exist is refused, naming it.
        """
        self.assertFailsNaming(["--prot", "5"], "--prot", "no such flag")
        self.assertFailsNaming(["-issuer_credentials=x"], "--issuer_credentials")

    def test_missing_value(self):
        """
        A string flag at the end without a value is refused, naming it.
        """
        self.assertFailsNaming(["--port"], "--port", "needs a value")

    def test_bad_syntax(self):
        """
        Three dashes, or a bare "-=", is bad flag syntax.
        """
        self.assertFailsNaming(["---port=1"], "---port=1", "bad flag syntax")
        self.assertFailsNaming(["-=1"], "-=1", "bad flag syntax")

    def test_positional_argument(self):
        """
        Sentry takes no positional arguments.
        """
        line = self.fail_to_parse(["extra"])
        self.assertEqual(
            line,
            "sentry: unexpected argument 'extra' (flags look like --port 50001)",
        )

    def test_flags_stop_at_double_dash(self):
        """
        Flags end at "--": what follows is an argument, and refused.
        """
        self.assertEqual(
            self.fail_to_parse(["--", "--port", "5"]),
            "sentry: unexpected argument '--port' (flags look like --port 50001)",
        )


class HelpTests(OptionsTestCase):
    """
    --help lists the flags.
    """

    def test_help_lists_every_flag(self):
        """
        --help (and Go's -help and -h) print a usage text naming every flag
        and exit 0.
        """
        for spelling in ("--help", "-help", "-h"):
            options = options_for_test()
            exit = self.assertRaises(SystemExit, options.parseOptions, [spelling])
            self.assertEqual(exit.code, 0)
            usage = options.stdout.getvalue()
            flags = {parameter[0] for parameter in Options.optParameters}
            self.assertLessEqual(set(ALL_FLAGS), flags)
            for flag in flags:
                self.assertIn(f"--{flag}=", usage)
            self.assertEqual(options.stderr.getvalue(), "")

    def test_help_states_defaults(self):
        """
        The usage text states the defaults, the environment-dependent one in
        words, and that port 0 picks a free port.
        """
        options = options_for_test()
        self.assertRaises(SystemExit, options.parseOptions, ["--help"])
        usage = " ".join(options.stdout.getvalue().split())
        for default in (
            "[default: daprsystem]",
            "[default: /var/run/secrets/dapr.io/credentials]",
            "[default: 50001]",
            "[default: 8080]",
            "[default: 9090]",
            "[default: true]",
            "[default: false]",
            "[default: info]",
            "[default: localhost]",
            "KUBERNETES_SERVICE_HOST is set",
            "0 picks a free port",
            "all interfaces",
        ):
            self.assertIn(default, usage)


class GoStyleArgumentsTests(SynchronousTestCase):
    """
    Tests for L{go_style_arguments}.
    """

    def test_rewrite(self):
        """
        Every flag comes out as --name=value; a bare boolean as =true;
        arguments from the first non-flag on are kept as they are.
        """
        self.assertEqual(
            go_style_arguments(
                ["-port", "1", "--log-as-json", "-mode=x", "rest", "-port", "2"]
            ),
            ["--port=1", "--log-as-json=true", "--mode=x", "rest", "-port", "2"],
        )

    def test_help_spellings(self):
        """
        -h, -help and --help all become --help; --version stays.
        """
        self.assertEqual(
            go_style_arguments(["-h"]), ["--help"]
        )
        self.assertEqual(go_style_arguments(["-help"]), ["--help"])
        self.assertEqual(go_style_arguments(["-version"]), ["--version"])


class ConfigurationFileTests(OptionsTestCase):
    """
    In standalone mode the file named by --config is read.
    """

    def test_missing_file(self):
        """
        A --config naming no file gives the defaults and a warning.
        """
        path = self.mktemp()
        options = self.parse(["--config", path])
        self.assertEqual(options.sentry_config.mtls, MTLSConfig())
        self.assertEqual(
            options.startup_warnings,
            [f"configuration file '{path}' not found; using the defaults"],
        )

    def test_good_file(self):
        """
        The file's TTL and skew are used, after environment expansion; an
        unset variable gives a warning.
        """
        path = self.write(
            "apiVersion: dapr.io/v1alpha1\n"
            "kind: Configuration\n"
            "spec:\n"
            "  mtls:\n"
            "    workloadCertTTL: ${TTL}\n"
            "    allowedClockSkew: 1m\n"
            "    unused: $UNSET\n"
        )
        options = self.parse(["--config", path], {"TTL": "1h30m"})
        self.assertEqual(
            options.sentry_config.mtls,
            MTLSConfig(
                workload_cert_ttl=timedelta(minutes=90),
                allowed_clock_skew=timedelta(minutes=1),
            ),
        )
        self.assertEqual(len(options.startup_warnings), 2)
        self.assertIn("'UNSET'", options.startup_warnings[0])
        # "unused" is not a key of Dapr's spec.mtls: warned by name.
        self.assertIn("spec.mtls.unused: unknown key", options.startup_warnings[1])

    def test_broken_yaml(self):
        """
        A file that is not YAML stops the program with one line naming it.
        """
        path = self.write("spec: [\n")
        self.assertFailsNaming(["--config", path], path, "not valid YAML", "line 2")

    def test_bad_ttls(self):
        """
        A TTL of zero, below zero, or not a duration stops the program with
        one line naming the field.
        """
        for ttl in ("0", "-1h", "0s", "soon"):
            path = self.write(f"spec:\n  mtls:\n    workloadCertTTL: '{ttl}'\n")
            self.assertFailsNaming(
                ["--config", path], "spec.mtls.workloadCertTTL", path
            )

    def test_negative_skew(self):
        """
        A skew below zero stops the program with one line naming the field.
        """
        path = self.write("spec:\n  mtls:\n    allowedClockSkew: -5m\n")
        self.assertFailsNaming(
            ["--config", path], "spec.mtls.allowedClockSkew", "negative"
        )

    def test_unknown_validator(self):
        """
        An unknown token validator stops the program, naming the entry.
        """
        path = self.write(
            "spec:\n  mtls:\n    tokenValidators:\n      - name: magic\n"
        )
        self.assertFailsNaming(
            ["--config", path], "spec.mtls.tokenValidators[0].name", "'magic'"
        )

    def test_jwks_without_source_refused(self):
        """
        A configured jwks validator without a source stops the program,
        naming the option.
        """
        path = self.write(
            "spec:\n"
            "  mtls:\n"
            "    tokenValidators:\n"
            "      - name: jwks\n"
            "        options:\n"
            "          minRefreshInterval: 1m\n"
        )
        self.assertFailsNaming(
            ["--config", path],
            "spec.mtls.tokenValidators[0].options.source",
            "is required",
        )

    def test_wrong_kinds(self):
        """
        Fields of the wrong YAML type, or a resource of another kind, stop
        the program naming the field.
        """
        for content, field in (
            ("spec: 3\n", "spec"),
            ("spec:\n  mtls: []\n", "spec.mtls"),
            ("spec:\n  mtls:\n    workloadCertTTL: 24\n", "spec.mtls.workloadCertTTL"),
            (
                "spec:\n  mtls:\n    tokenValidators: jwks\n",
                "spec.mtls.tokenValidators",
            ),
            ("kind: Component\n", "kind"),
            ("- a\n", None),
        ):
            path = self.write(content)
            self.assertFailsNaming(["--config", path], field or path)

    def test_kubernetes_mode_does_not_read(self):
        """
        In kubernetes mode --config names a resource: no file is read, no
        warning is given, and the mTLS settings stay at their defaults.
        """
        path = self.write("spec: [\n")
        options = self.parse(["--mode", "kubernetes", "--config", path])
        self.assertEqual(options.sentry_config.mtls, MTLSConfig())
        self.assertEqual(options.startup_warnings, [])

    def test_flag_errors_first(self):
        """
        A bad flag is reported before the Configuration file is read.
        """
        path = self.write("spec: [\n")
        self.assertFailsNaming(["--config", path, "--port", "x"], "--port")


class _SentryServerOptions(ServerOptions):
    """
    twistd's own option parser, with sentry as its only subcommand (so that
    no plugin discovery is needed) and an empty environment.
    """

    subCommands = [
        ("sentry", None, lambda: Options(environ={}, stderr=StringIO()), "Sentry")
    ]


class TwistdLoggingTests(SynchronousTestCase):
    """
    Options hands twistd a log observer factory honouring --log-level and
    --log-as-json.
    """

    def parse(self, arguments):
        """
        Parse a twistd command line and return twistd's options.
        """
        server_options = _SentryServerOptions()
        server_options.parseOptions(arguments)
        return server_options

    def test_nodaemon_logs_to_stdout(self):
        """
        Under "twistd -n" the logger twistd will use is ours, writing to
        stdout, at the chosen level, as JSON when asked.
        """
        server_options = self.parse(
            ["-n", "sentry", "--log-as-json", "--log-level", "warn", "--config", "x"]
        )
        observer = server_options["logger"]()
        self.assertIsInstance(observer, logs.SentryLogObserver)
        self.assertIs(observer.stream, sys.stdout)

    def test_logfile(self):
        """
        With twistd's --logfile the observer writes JSON lines to that file.
        """
        path = self.mktemp()
        handler = signal.getsignal(signal.SIGUSR1)
        self.addCleanup(signal.signal, signal.SIGUSR1, handler)
        server_options = self.parse(
            ["--logfile", path, "sentry", "--log-as-json", "--config", "x"]
        )
        observer = server_options["logger"]()
        self.addCleanup(observer.stream.close)
        observer(
            {
                "log_format": "hello",
                "log_level": LogLevel.info,
                "log_namespace": "sentry_tx.tap",
                "log_time": 0.0,
            }
        )
        observer({"log_format": "hidden", "log_level": LogLevel.debug})
        with open(path) as log_file:
            lines = log_file.read().splitlines()
        self.assertEqual(len(lines), 1)
        self.assertIn('"msg": "hello"', lines[0])

    def test_operator_logger_kept(self):
        """
        A --logger given to twistd is left as the operator chose it.
        """
        server_options = self.parse(
            ["--logger", "twisted.logger.textFileLogObserver", "sentry"]
        )
        from twisted.logger import textFileLogObserver

        self.assertIs(server_options["logger"], textFileLogObserver)

    def test_syslog_kept(self):
        """
        twistd's --syslog is honoured, with a warning that the sentry log
        flags do not apply.
        """
        server_options = self.parse(["--syslog", "sentry", "--config", "x"])
        self.assertIsNone(server_options["logger"])
        self.assertIn(
            "logging to syslog as twistd's --syslog asks;"
            " --log-level and --log-as-json do not apply",
            server_options.subOptions.startup_warnings,
        )

    def test_daemon_to_stdout_refused(self):
        """
        A daemon told to log to stdout is refused with one line, as twistd
        itself refuses it.
        """
        stderr = StringIO()

        class Parser(ServerOptions):
            subCommands = [
                ("sentry", None, lambda: Options(environ={}, stderr=stderr), "")
            ]

        exit = self.assertRaises(
            SystemExit, Parser().parseOptions, ["--logfile=-", "sentry"]
        )
        self.assertEqual(exit.code, 1)
        self.assertEqual(
            stderr.getvalue(),
            "sentry: --logfile: a daemon cannot log to stdout (add --nodaemon)\n",
        )

    def test_no_parent(self):
        """
        Without a parent (tests, tools) nothing is handed anywhere: the
        options parse and stay without a parent.
        """
        options = options_for_test()
        options.parseOptions(["--config", "x"])
        self.assertIsInstance(options.sentry_config, SentryConfig)
        self.assertIsNone(options.parent)

    def test_plain_mapping_parent(self):
        """
        A parent without postOptions gets the factory directly.
        """
        options = options_for_test()
        options.parent = {}
        options.parseOptions(["--config", "x", "--log-level", "error"])
        self.assertTrue(callable(options.parent["logger"]))

    def test_twist_parent(self):
        """
        Under "twist" the parent's file observer factory and level are set.
        """
        options = options_for_test()
        options.parent = {
            "fileLogObserverFactory": None,
            "logLevel": LogLevel.info,
        }
        options.parseOptions(["--config", "x", "--log-level", "debug"])
        stream = StringIO()
        observer = options.parent["fileLogObserverFactory"](stream)
        self.assertIsInstance(observer, logs.SentryLogObserver)
        self.assertIs(observer.stream, stream)
        self.assertEqual(options.parent["logLevel"], LogLevel.debug)
        self.assertNotIn("logger", options.parent)


class WorkersFlagTests(SynchronousTestCase):
    """
    Tests for C{--workers}.
    """

    def parse(self, *arguments, default_processes=lambda: (3, "a fake reason")):
        options = Options(
            environ={},
            stdout=StringIO(),
            stderr=StringIO(),
            default_processes=default_processes,
        )
        options.parseOptions(
            ["--issuer-credentials", "/nonexistent", "--config", "/nonexistent.yaml"]
            + list(arguments)
        )
        return options

    def test_default(self):
        """
        Without --workers, the count is the default one (one per usable
        core) and the note to log at start says how many and why.
        """
        options = self.parse()
        self.assertEqual(options.sentry_config.workers, 3)
        self.assertEqual(
            options.startup_notes, ["serving gRPC from 3 processes (a fake reason)"]
        )

    def test_real_default(self):
        """
        The default count comes from the cores this process may use, at
        most 4.
        """
        from sentry_tx.cores import default_serving_processes

        options = Options(environ={}, stdout=StringIO(), stderr=StringIO())
        options.parseOptions(["--config", "/nonexistent.yaml"])
        self.assertEqual(
            options.sentry_config.workers, default_serving_processes()[0]
        )
        self.assertLessEqual(options.sentry_config.workers, 4)

    def test_count(self):
        """
        C{--workers 2} asks for two serving processes, and says so.
        """
        options = self.parse("--workers", "2")
        self.assertEqual(options.sentry_config.workers, 2)
        self.assertEqual(
            options.startup_notes, ["serving gRPC from 2 processes (--workers)"]
        )

    def test_bad(self):
        """
        Zero, a negative or non-numeric count, or more than the maximum,
        exits 1 with one line naming the flag.
        """
        for value in ("0", "-1", "two", "65", "\u0662"):
            options = Options(environ={}, stdout=StringIO(), stderr=StringIO())
            error = self.assertRaises(
                SystemExit,
                options.parseOptions,
                ["--config", "/nonexistent.yaml", "--workers", value],
            )
            self.assertEqual(error.code, 1)
            line = options.stderr.getvalue()
            self.assertEqual(line.count("\n"), 1, value)
            self.assertIn("--workers", line)


class VersionTests(SynchronousTestCase):
    """
    C{twistd sentry --version} says which sentry_tx this is.
    """

    def test_version(self):
        """
        C{--version} (or Go's C{-version}) prints sentry_tx's version first,
        then Twisted's and grpcio's, and exits 0.
        """
        import sentry_tx

        for flag in ("--version", "-version"):
            options = options_for_test()
            error = self.assertRaises(SystemExit, options.parseOptions, [flag])
            self.assertEqual(error.code, 0)
            lines = options.stdout.getvalue().splitlines()
            self.assertEqual(lines[0], f"sentry_tx {sentry_tx.__version__}")
            self.assertTrue(lines[1].startswith("Twisted "))
            self.assertTrue(lines[2].startswith("grpcio "))

    def test_under_twistd(self):
        """
        Through twistd's own parser, the subcommand's --version is ours.
        """
        import sentry_tx

        stdout = StringIO()

        class Parser(ServerOptions):
            subCommands = [
                ("sentry", None, lambda: Options(environ={}, stdout=stdout), "Sentry")
            ]

        self.assertRaises(SystemExit, Parser().parseOptions, ["sentry", "--version"])
        self.assertTrue(
            stdout.getvalue().startswith(f"sentry_tx {sentry_tx.__version__}\n")
        )


class RenewalFlagTests(OptionsTestCase):
    """
    The automatic CA renewal flags (Dapr PR #10290's names), each also from
    an environment variable.
    """

    def test_defaults(self):
        """Without flags or variables: 8760h, on, 0.9, auto."""
        config = self.config([])
        self.assertEqual(config.ca_ttl_seconds, 8760 * 3600)
        self.assertTrue(config.ca_renewal_enabled)
        self.assertEqual(config.ca_renewal_threshold, 0.9)
        self.assertIsNone(config.trust_anchor_propagation_grace_seconds)

    def test_flags(self):
        """The flags set the four values."""
        config = self.config(
            [
                "--ca-ttl", "90s", "--ca-renewal-threshold", "0.5",
                "--trust-anchor-propagation-grace", "15s",
                "--ca-renewal-enabled=false",
            ]
        )
        self.assertEqual(config.ca_ttl_seconds, 90)
        self.assertEqual(config.ca_renewal_threshold, 0.5)
        self.assertEqual(config.trust_anchor_propagation_grace_seconds, 15)
        self.assertFalse(config.ca_renewal_enabled)

    def test_environment(self):
        """Each variable sets its value; a flag wins over its variable."""
        environ = {
            "DAPR_SENTRY_CA_RENEWAL_ENABLED": "false",
            "DAPR_SENTRY_CA_TTL": "100h",
            "DAPR_SENTRY_CA_RENEWAL_THRESHOLD": "0.8",
            "DAPR_SENTRY_TRUST_ANCHOR_PROPAGATION_GRACE": "2h",
        }
        config = self.config([], environ)
        self.assertFalse(config.ca_renewal_enabled)
        self.assertEqual(config.ca_ttl_seconds, 100 * 3600)
        self.assertEqual(config.ca_renewal_threshold, 0.8)
        self.assertEqual(config.trust_anchor_propagation_grace_seconds, 7200)
        config = self.config(["--ca-renewal-enabled"], environ)
        self.assertTrue(config.ca_renewal_enabled)

    def test_bad_variable_named(self):
        """A bad value from a variable is refused naming the variable."""
        self.assertFailsNaming(
            [], "DAPR_SENTRY_CA_RENEWAL_THRESHOLD", "not a number",
            environ={"DAPR_SENTRY_CA_RENEWAL_THRESHOLD": "most"},
        )

    def test_no_room_refused(self):
        """
        A threshold that leaves no room for the grace stops the start, naming both
        flags.
        """
        self.assertFailsNaming(
            ["--ca-ttl", "100h", "--ca-renewal-threshold", "0.99",
             "--trust-anchor-propagation-grace", "2h"],
            "--ca-renewal-threshold, --trust-anchor-propagation-grace",
            "no room for the grace",
        )

    def test_help_lists_variables(self):
        """--help names each renewal flag's default and variable."""
        options = options_for_test()
        self.assertRaises(SystemExit, options.parseOptions, ["--help"])
        usage = "".join(options.stdout.getvalue().split())
        for text in (
            "[default: 8760h; environment: DAPR_SENTRY_CA_TTL]",
            "[default: true; environment: DAPR_SENTRY_CA_RENEWAL_ENABLED]",
            "[default: 0.9; environment: DAPR_SENTRY_CA_RENEWAL_THRESHOLD]",
            "[default: auto; environment: DAPR_SENTRY_TRUST_ANCHOR_PROPAGATION_GRACE]",
        ):
            self.assertIn("".join(text.split()), usage)
