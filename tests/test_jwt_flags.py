"""
Tests for the JWT and OIDC flags of L{sentry_tx.options.Options} (SPEC sections
2 and 11) and for their wiring in L{sentry_tx.tap.build_service}.
"""

from twisted.application.service import IServiceCollection

from sentry_tx.config import SentryConfig
from sentry_tx.jwt.oidc import OIDCService
from sentry_tx.tap import build_service
from sentry_tx.testing.clocks import ImmediateReactor
from sentry_tx.testing.command_lines import OptionsTestCase

JWT_FLAGS = (
    "jwt-enabled",
    "jwt-key-filename",
    "jwks-filename",
    "jwt-issuer",
    "jwt-signing-algorithm",
    "jwt-key-id",
    "jwt-ttl",
    "oidc-enabled",
    "oidc-server-listen-port",
    "oidc-server-listen-address",
    "oidc-server-tls-enabled",
    "oidc-server-tls-cert-file",
    "oidc-server-tls-key-file",
    "oidc-jwks-uri",
    "oidc-path-prefix",
    "oidc-allowed-hosts",
)


class JWTFlagTests(OptionsTestCase):
    """
    Every JWT and OIDC flag is accepted and checked.
    """

    def test_defaults(self):
        """
        Without the flags, JWTs and OIDC are off with Dapr's defaults.
        """
        config = self.config([])
        self.assertEqual(
            (
                config.jwt_enabled,
                config.jwt_key_filename,
                config.jwks_filename,
                config.jwt_signing_algorithm,
                config.jwt_ttl_seconds,
                config.oidc_enabled,
                config.oidc_server_listen_port,
                config.oidc_server_listen_address,
                config.oidc_server_tls_enabled,
            ),
            (
                False,
                "jwt.key",
                "jwks.json",
                "RS256",
                86400,
                False,
                9080,
                "localhost",
                True,
            ),
        )

    def test_help_lists_flags(self):
        """
        --help lists every JWT and OIDC flag.
        """
        options = self.parse([])
        text = str(options)
        for flag in JWT_FLAGS:
            self.assertIn(f"--{flag}", text)

    def test_all_flags(self):
        """
        Every flag, Go style, lands in the config; relative file names are
        in --issuer-credentials; the prefix is normalised.
        """
        config = self.config(
            [
                "-issuer-credentials=/creds",
                "--jwt-enabled",
                "--jwt-key-filename",
                "k.pem",
                "--jwks-filename=/abs/keys.json",
                "--jwt-issuer=https://issuer.example.org",
                "--jwt-signing-algorithm=PS384",
                "--jwt-key-id=kid1",
                "--jwt-ttl=90m",
                "--oidc-enabled=true",
                "--oidc-server-listen-port=9443",
                "--oidc-server-listen-address=0.0.0.0",
                "--oidc-server-tls-enabled=false",
                "--oidc-jwks-uri=https://cdn.example.org/jwks.json",
                "--oidc-path-prefix=/dapr/",
                "--oidc-allowed-hosts=a.example.org, b.example.org",
            ]
        )
        self.assertEqual(config.jwt_key_path, "/creds/k.pem")
        self.assertEqual(config.jwks_path, "/abs/keys.json")
        self.assertEqual(config.jwt_issuer, "https://issuer.example.org")
        self.assertEqual(config.jwt_signing_algorithm, "PS384")
        self.assertEqual(config.jwt_key_id, "kid1")
        self.assertEqual(config.jwt_ttl_seconds, 5400)
        self.assertTrue(config.oidc_enabled)
        self.assertEqual(config.oidc_server_listen_port, 9443)
        self.assertEqual(config.oidc_server_listen_address, "0.0.0.0")
        self.assertFalse(config.oidc_server_tls_enabled)
        self.assertEqual(config.oidc_jwks_uri, "https://cdn.example.org/jwks.json")
        self.assertEqual(config.oidc_path_prefix, "/dapr")
        self.assertEqual(config.oidc_allowed_hosts, ("a.example.org", "b.example.org"))

    def test_issuer_needs_jwt(self):
        """
        --jwt-issuer without --jwt-enabled is an error (Dapr's check).
        """
        self.assertFailsNaming(
            ["--jwt-issuer=https://x"], "--jwt-issuer",
            "cannot be set when --jwt-enabled is false",
        )

    def test_bad_values(self):
        """
        A bad algorithm, TTL, port, boolean, URL, prefix or file name stops
        the program naming the flag.
        """
        for arguments, flag, fragment in [
            (
                ["--jwt-signing-algorithm=HS256"],
                "--jwt-signing-algorithm",
                "unsupported",
            ),
            (
                ["--jwt-signing-algorithm=none"],
                "--jwt-signing-algorithm",
                "unsupported",
            ),
            (["--jwt-ttl=soon"], "--jwt-ttl", "not a duration"),
            (["--jwt-ttl=0s"], "--jwt-ttl", "at least 1s"),
            (["--jwt-ttl=-1h"], "--jwt-ttl", "at least 1s"),
            (["--jwt-enabled=maybe"], "--jwt-enabled", "not a boolean"),
            (
                ["--oidc-server-listen-port=70000"],
                "--oidc-server-listen-port",
                "not a port",
            ),
            (["--oidc-jwks-uri=/jwks.json"], "--oidc-jwks-uri", "absolute"),
            (["--oidc-path-prefix=/a b"], "--oidc-path-prefix", "not a URL path"),
            (["--jwt-key-filename="], "--jwt-key-filename", "must not be empty"),
            (["--jwks-filename=jwt.key"], "--jwks-filename", "must differ"),
        ]:
            self.assertFailsNaming(arguments, flag, fragment)

    def test_oidc_tls_files(self):
        """
        OIDC over TLS (the default) needs both files, with Dapr's messages;
        one without the other is refused even when OIDC is off.
        """
        self.assertFailsNaming(
            ["--jwt-enabled", "--oidc-enabled"],
            "--oidc-server-tls-cert-file",
            "oidc-server-tls-cert-file is required when OIDC HTTP server is enabled",
        )
        self.assertFailsNaming(
            ["--oidc-server-tls-cert-file=/c"], "--oidc-server-tls-key-file",
            "both OIDC TLS certificate and key must be provided",
        )
        config = self.config(
            ["--jwt-enabled", "--oidc-enabled", "--oidc-server-tls-cert-file=/c",
             "--oidc-server-tls-key-file=/k"]
        )
        self.assertEqual(
            (config.oidc_server_tls_cert_file, config.oidc_server_tls_key_file),
            ("/c", "/k"),
        )

    def test_oidc_without_jwt(self):
        """
        --oidc-enabled without --jwt-enabled runs no OIDC server, with a
        warning, as Dapr does.
        """
        options = self.parse(["--oidc-enabled", "--oidc-server-tls-enabled=false"])
        self.assertFalse(options.sentry_config.oidc_enabled)
        self.assertIn("OIDC server is disabled", " ".join(options.startup_warnings))

    def test_host_reflected_warning(self):
        """
        OIDC with neither --jwt-issuer nor --oidc-allowed-hosts (or only
        *) warns at start that any Host is reflected; either flag silences it.
        """
        base = ["--jwt-enabled", "--oidc-enabled", "--oidc-server-tls-enabled=false"]
        for extra in ([], ["--oidc-allowed-hosts=*"]):
            warnings = " ".join(self.parse(base + extra).startup_warnings)
            self.assertIn("neither --jwt-issuer nor --oidc-allowed-hosts", warnings)
        for extra in (
            ["--jwt-issuer=https://id.example.org"],
            ["--oidc-allowed-hosts=oidc.example.org"],
        ):
            warnings = " ".join(self.parse(base + extra).startup_warnings)
            self.assertNotIn("--oidc-allowed-hosts", warnings)
        warnings = " ".join(self.parse(["--jwt-enabled"]).startup_warnings)
        self.assertNotIn("--oidc-allowed-hosts", warnings)

    def test_workers_accepted(self):
        """
        --jwt-enabled works with several serving processes: the parent sends
        the JWT material to the workers with the bundle.
        """
        config = self.parse(["--jwt-enabled", "--workers", "3"]).sentry_config
        self.assertEqual((config.jwt_enabled, config.workers), (True, 3))


class WiringTests(OptionsTestCase):
    """
    L{build_service} adds the OIDC server only when asked.
    """

    def children(self, config):
        root = build_service(config, ImmediateReactor())
        self.assertTrue(IServiceCollection.providedBy(root))
        return list(root)

    def test_oidc_child(self):
        """
        With --jwt-enabled and --oidc-enabled the root has an OIDC child;
        without, none.
        """
        with_oidc = SentryConfig(
            jwt_enabled=True, oidc_enabled=True, oidc_server_tls_enabled=False
        )
        self.assertEqual(
            [type(s) for s in self.children(with_oidc) if isinstance(s, OIDCService)],
            [OIDCService],
        )
        self.assertFalse(
            [
                s
                for s in self.children(SentryConfig(jwt_enabled=True))
                if isinstance(s, OIDCService)
            ]
        )

    def test_oidc_refusals_logged_as_oidc(self):
        """
        The OIDC listener's refusals are logged under its own name, and
        healthz's and metrics' under theirs.
        """
        config = SentryConfig(
            jwt_enabled=True, oidc_enabled=True, oidc_server_tls_enabled=False
        )
        children = self.children(config)
        (oidc,) = [s for s in children if isinstance(s, OIDCService)]
        self.assertEqual(oidc.web_service.args[1].label, "oidc")
        labels = {getattr(s, "label", None): s for s in children}
        for label in ("healthz", "metrics"):
            self.assertEqual(labels[label].args[1].label, label)

    def test_healthz_waits_for_oidc(self):
        """
        healthz counts the OIDC listener among its readiness sources, as
        Dapr's healthz target does.
        """
        config = SentryConfig(
            jwt_enabled=True,
            oidc_enabled=True,
            oidc_server_tls_cert_file="/nonexistent/c",
            oidc_server_tls_key_file="/nonexistent/k",
        )
        children = self.children(config)
        (oidc,) = [s for s in children if isinstance(s, OIDCService)]
        healthz = [s for s in children if getattr(s, "label", None) == "healthz"][0]
        resource = healthz.args[1].resource.children[b"healthz"]
        self.assertIn(oidc, resource._sources)

    def test_jwks_validator_service_and_healthz(self):
        """
        A configured jwks validator is a child service started before the
        authority, and a readiness source of healthz.
        """
        from sentry_tx.config import MTLSConfig, TokenValidatorConfig
        from sentry_tx.identity.jwks import JWKSValidator

        config = SentryConfig(
            mtls=MTLSConfig(
                token_validators=(
                    TokenValidatorConfig("jwks", (("source", "https://x/jwks"),)),
                )
            )
        )
        children = self.children(config)
        (validator,) = [s for s in children if isinstance(s, JWKSValidator)]
        names = [getattr(s, "name", None) for s in children]
        self.assertLess(children.index(validator), names.index("ca"))
        healthz = [s for s in children if getattr(s, "label", None) == "healthz"][0]
        resource = healthz.args[1].resource.children[b"healthz"]
        self.assertIn(validator, resource._sources)
