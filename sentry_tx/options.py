# -*- test-case-name: tests.test_kube_deploy,tests.test_tap -*-
"""
The C{twistd sentry} command line: L{Options} takes Dapr Sentry's flags
(L{sentry_tx.flags}), checks every value, reads the Configuration file in
standalone mode, and leaves one frozen L{SentryConfig} in C{sentry_config}.
A bad value ends the program at once with one line on stderr and exit
status 1.

Imported by C{twistd --help}: it must stay light (no grpc, no cryptography,
no reactor at import time).
"""

import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any, NoReturn, TextIO

from twisted.python import usage

from sentry_tx import logs
from sentry_tx.config import (
    DEFAULT_NAMESPACE,
    MODE_KUBERNETES,
    MODE_STANDALONE,
    MTLSConfig,
    SentryConfig,
    load_configuration_file,
)
from sentry_tx.errors import ConfigError
from sentry_tx.flags import (
    BOOL_FLAGS,
    DEFAULTS,
    KUBERNETES_SERVICE_HOST_VARIABLE,
    MODES,
    NAMESPACE_VARIABLE,
    PROGRAM_NAME,
    STRING_FLAGS,
    check_namespace,
    check_trust_domain,
    go_style_arguments,
    parse_bool,
    parse_port,
    parse_workers,
    split_audiences,
    version_text,
)


class Options(usage.Options):
    """
    Dapr Sentry's flags.

    After L{parseOptions}, C{sentry_config} is the L{SentryConfig} and
    C{startup_warnings} the warnings to log once logging has started.

    @ivar sentry_config: everything the flags, the environment and (in
        standalone mode) the Configuration file say.
    @type sentry_config: L{SentryConfig}

    @ivar startup_warnings: messages for the operator found while parsing
        (a missing Configuration file, unset environment variables in it).
    @type startup_warnings: L{list} of L{str}
    """

    synopsis = "[options]"
    longdesc = (
        "Run the Dapr certificate authority (Sentry). Flags are Dapr's and"
        " may also be written with one dash (-port 50001, -port=50001)."
    )

    optParameters = [list(flag) for flag in STRING_FLAGS + BOOL_FLAGS]

    sentry_config: SentryConfig | None = None

    def __init__(
        self,
        environ: Mapping[str, str] | None = None,
        stdout: TextIO | None = None,
        stderr: TextIO | None = None,
        default_processes: Callable[[], tuple[int, str]] | None = None,
    ) -> None:
        """
        @param environ: the environment (C{KUBERNETES_SERVICE_HOST},
            C{NAMESPACE}, and variables the Configuration file refers to);
            L{os.environ} by default.
        @type environ: L{Mapping} of L{str} to L{str}

        @param stdout: where C{--help} writes; L{sys.stdout} by default.

        @param stderr: where the one-line error goes; L{sys.stderr} by
            default.

        @param default_processes: returns C{(count, reason)}, the serving
            processes when C{--workers} is not given;
            L{sentry_tx.cores.default_serving_processes} by default.
        """
        super().__init__()
        self.environ: Mapping[str, str] = os.environ if environ is None else environ
        self.stdout = sys.stdout if stdout is None else stdout
        self.stderr = sys.stderr if stderr is None else stderr
        self.startup_warnings: list[str] = []
        self.startup_notes: list[str] = []
        if default_processes is None:
            from sentry_tx.cores import default_serving_processes

            default_processes = default_serving_processes
        self._default_processes = default_processes
        if self.environ.get(KUBERNETES_SERVICE_HOST_VARIABLE):
            self["mode"] = MODE_KUBERNETES
        else:
            self["mode"] = MODE_STANDALONE

    def opt_help(self) -> NoReturn:
        """
        Display this help and exit.
        """
        self.stdout.write(str(self))
        self.stdout.flush()
        raise SystemExit(0)

    def opt_version(self) -> NoReturn:
        """
        Display sentry_tx's version (and those of Twisted and grpcio) and
        exit.
        """
        self.stdout.write(version_text())
        self.stdout.flush()
        raise SystemExit(0)

    def parseOptions(self, options: Sequence[str] | None = None) -> None:
        """
        Parse C{options} (Go-style flags allowed).  Any bad value writes one
        line, C{sentry: <flag>: <problem>}, to C{self.stderr} and exits with
        status 1 instead of twistd's usage listing.

        @param options: the arguments; C{sys.argv[1:]} by default.
        @type options: L{list} of L{str}

        @raise SystemExit: 0 after C{--help}, 1 after a bad value.
        """
        if options is None:
            options = sys.argv[1:]
        # The serving copies are started with the same flags.
        self.arguments: list[str] = list(options)
        try:
            super().parseOptions(go_style_arguments(options))
        except ConfigError as error:
            self._exit_with_error(f"{error.field}: {error.problem}")
        except usage.UsageError as error:
            self._exit_with_error(str(error))

    def _exit_with_error(self, message: str) -> NoReturn:
        """
        Write C{message} as one line to C{self.stderr} and exit with status 1.
        """
        one_line = " ".join(message.splitlines())
        self.stderr.write(f"{PROGRAM_NAME}: {one_line}\n")
        self.stderr.flush()
        raise SystemExit(1)

    def parseArgs(self, *arguments: str) -> None:
        """
        Sentry takes no positional arguments.
        """
        if arguments:
            raise usage.UsageError(
                f"unexpected argument {arguments[0]!r} (flags look like"
                " --port 50001)"
            )

    def postOptions(self) -> None:
        """
        Check every value, read the Configuration file (standalone mode),
        build C{sentry_config} and hand the log observer to twistd.

        @raise ConfigError: naming the flag, variable or field that is wrong.
        """
        mode = self["mode"]
        if mode not in MODES:
            raise ConfigError(
                "--mode", f"unknown mode {mode!r} (use kubernetes or standalone)"
            )
        for name in (
            "config",
            "issuer-credentials",
            "issuer-ca-filename",
            "issuer-certificate-filename",
            "issuer-key-filename",
        ):
            if not self[name]:
                raise ConfigError(f"--{name}", "must not be empty")
        log_level = self["log-level"].lower()
        if log_level not in logs.LOG_LEVELS:
            raise ConfigError(
                "--log-level",
                f"unknown level {self['log-level']!r} (use debug, info, warn,"
                " error or fatal)",
            )
        namespace = self.environ.get(NAMESPACE_VARIABLE) or DEFAULT_NAMESPACE
        config = SentryConfig(
            mode=mode,
            config=self["config"],
            issuer_credentials=self["issuer-credentials"],
            issuer_ca_filename=self["issuer-ca-filename"],
            issuer_certificate_filename=self["issuer-certificate-filename"],
            issuer_key_filename=self["issuer-key-filename"],
            trust_domain=check_trust_domain("--trust-domain", self["trust-domain"]),
            token_audiences=split_audiences(self["token-audience"] or ""),
            kubeconfig=self["kubeconfig"],
            port=parse_port("--port", self["port"]),
            listen_address=self["listen-address"] or DEFAULTS.listen_address,
            healthz_port=parse_port("--healthz-port", self["healthz-port"]),
            healthz_listen_address=self["healthz-listen-address"] or "",
            metrics_listen_address=self["metrics-listen-address"] or "",
            metrics_port=parse_port("--metrics-port", self["metrics-port"]),
            enable_metrics=parse_bool("--enable-metrics", self["enable-metrics"]),
            log_level=log_level,
            log_as_json=parse_bool("--log-as-json", self["log-as-json"]),
            workers=self._serving_processes(),
            namespace=check_namespace(NAMESPACE_VARIABLE, namespace),
            mtls=self._load_mtls(mode, self["config"]),
            **self._jwt_settings(),
        )
        config = self._with_renewal_settings(config)
        self._hand_observer_to_parent(config)
        self.sentry_config = config

    def _jwt_settings(self) -> dict[str, Any]:
        """
        The JWT and OIDC flags, checked (Dapr's checks and messages, plus a
        fitting algorithm, a positive TTL and absolute URLs).

        @return: the L{SentryConfig} fields they set.
        @raise ConfigError: naming the flag that is wrong.
        """
        from sentry_tx.durations import parse_go_duration
        from sentry_tx.jwt.algorithms import JWT_SIGNING_ALGORITHMS

        jwt_enabled = parse_bool("--jwt-enabled", self["jwt-enabled"])
        oidc_enabled = parse_bool("--oidc-enabled", self["oidc-enabled"])
        tls_enabled = parse_bool(
            "--oidc-server-tls-enabled", self["oidc-server-tls-enabled"]
        )
        issuer = self["jwt-issuer"]
        if issuer is not None and not jwt_enabled:
            raise ConfigError(
                "--jwt-issuer", "cannot be set when --jwt-enabled is false"
            )
        algorithm = self["jwt-signing-algorithm"]
        if algorithm not in JWT_SIGNING_ALGORITHMS:
            raise ConfigError(
                "--jwt-signing-algorithm",
                f"unsupported signature algorithm: {algorithm!r} (use one of"
                f" {', '.join(JWT_SIGNING_ALGORITHMS)})",
            )
        ttl = parse_go_duration(self["jwt-ttl"], "--jwt-ttl")
        if ttl.total_seconds() < 1:
            raise ConfigError(
                "--jwt-ttl", f"must be at least 1s, not {self['jwt-ttl']!r}"
            )
        for name in ("jwt-key-filename", "jwks-filename"):
            if not self[name]:
                raise ConfigError(f"--{name}", "must not be empty")
        if self["jwt-key-filename"] == self["jwks-filename"]:
            raise ConfigError(
                "--jwks-filename", "must differ from --jwt-key-filename"
            )
        cert_file = self["oidc-server-tls-cert-file"]
        key_file = self["oidc-server-tls-key-file"]
        if (cert_file is None) != (key_file is None):
            raise ConfigError(
                "--oidc-server-tls-cert-file" if cert_file is None
                else "--oidc-server-tls-key-file",
                "both OIDC TLS certificate and key must be provided if one is"
                " specified",
            )
        if oidc_enabled and tls_enabled and cert_file is None:
            raise ConfigError(
                "--oidc-server-tls-cert-file",
                "oidc-server-tls-cert-file is required when OIDC HTTP server is"
                " enabled (unless oidc-server-tls-enabled is false)",
            )
        jwks_uri = self["oidc-jwks-uri"] or ""
        if jwks_uri and not re.match(r"https?://[^/?#\s]+", jwks_uri):
            raise ConfigError(
                "--oidc-jwks-uri", f"not an absolute http(s) URL: {jwks_uri!r}"
            )
        prefix = (self["oidc-path-prefix"] or "").strip("/")
        if prefix and not re.fullmatch(r"[A-Za-z0-9._~!$&'()*+,;=:@%/-]+", prefix):
            raise ConfigError(
                "--oidc-path-prefix", f"not a URL path: {self['oidc-path-prefix']!r}"
            )
        if oidc_enabled and not jwt_enabled:
            self.startup_warnings.append(
                "--oidc-enabled without --jwt-enabled: the OIDC server is"
                " disabled, as in Dapr"
            )
        allowed_hosts = split_audiences(self["oidc-allowed-hosts"] or "")
        if (
            oidc_enabled
            and jwt_enabled
            and issuer is None
            and (not allowed_hosts or "*" in allowed_hosts)
        ):
            # Any Host then becomes the document's issuer (and jwks_uri):
            # whoever reaches the server, or a cache in front of it, picks
            # what relying parties that discover keys dynamically trust.
            self.startup_warnings.append(
                "--oidc-enabled with neither --jwt-issuer nor"
                " --oidc-allowed-hosts: the OIDC server writes any request's"
                " Host into the discovery document's issuer and jwks_uri; set"
                " one of them"
            )
        return dict(
            jwt_enabled=jwt_enabled,
            jwt_key_filename=self["jwt-key-filename"],
            jwks_filename=self["jwks-filename"],
            jwt_issuer=issuer or "",
            jwt_signing_algorithm=algorithm,
            jwt_key_id=self["jwt-key-id"] or "",
            jwt_ttl_seconds=int(ttl.total_seconds()),
            oidc_enabled=oidc_enabled and jwt_enabled,
            oidc_server_listen_port=parse_port(
                "--oidc-server-listen-port", self["oidc-server-listen-port"]
            ),
            oidc_server_listen_address=self["oidc-server-listen-address"] or "",
            oidc_server_tls_enabled=tls_enabled,
            oidc_server_tls_cert_file=cert_file or "",
            oidc_server_tls_key_file=key_file or "",
            oidc_jwks_uri=jwks_uri,
            oidc_path_prefix=f"/{prefix}" if prefix else "",
            oidc_allowed_hosts=allowed_hosts,
        )

    def _with_renewal_settings(self, config: SentryConfig) -> SentryConfig:
        """
        C{config} with the automatic CA renewal flags, each from the command
        line, else its environment variable, else its default; checked as a
        whole in standalone mode (kubernetes mode knows the workload TTL and
        skew only at start, where the renewal service checks them).

        @raise ConfigError: naming the flag or variable at fault.
        """
        from dataclasses import replace

        from sentry_tx.ca.renewal import RenewalSettings, check_settings, check_values
        from sentry_tx.durations import parse_go_duration
        from sentry_tx.flags import RENEWAL_DEFAULTS, RENEWAL_VARIABLES

        def value(name: str) -> tuple[str, str]:
            if self[name] is not None:
                return self[name], f"--{name}"
            variable = RENEWAL_VARIABLES[name]
            if self.environ.get(variable):
                return self.environ[variable], variable
            return RENEWAL_DEFAULTS[name], f"--{name}"

        text, source = value("ca-ttl")
        ttl = parse_go_duration(text, source)
        if ttl.total_seconds() < 1:
            raise ConfigError(source, f"must be at least 1s, not {text!r}")
        text, source = value("ca-renewal-enabled")
        enabled = parse_bool(source, text)
        text, source = value("ca-renewal-threshold")
        try:
            threshold = float(text)
        except ValueError:
            raise ConfigError(source, f"not a number: {text!r}") from None
        text, source = value("trust-anchor-propagation-grace")
        grace = None if text == "auto" else parse_go_duration(text, source)
        config = replace(
            config,
            ca_ttl_seconds=int(ttl.total_seconds()),
            ca_renewal_enabled=enabled,
            ca_renewal_threshold=threshold,
            trust_anchor_propagation_grace_seconds=(
                None if grace is None else grace.total_seconds()
            ),
        )
        settings = RenewalSettings.from_config(config)
        if enabled:
            check_values(settings)
            if config.mode == MODE_STANDALONE:
                check_settings(settings)
        return config

    def _serving_processes(self) -> int:
        """
        How many processes serve gRPC: C{--workers}, else one per usable
        core (at most 4); the choice and its reason go to C{startup_notes}.
        """
        if self["workers"] is None:
            count, reason = self._default_processes()
        else:
            count = parse_workers("--workers", self["workers"])
            reason = "--workers"
        self.startup_notes.append(
            f"serving gRPC from {count} process{'es' if count > 1 else ''}"
            f" ({reason})"
        )
        return count

    def _load_mtls(self, mode: str, path: str) -> MTLSConfig:
        """
        The mTLS settings: in standalone mode from the Configuration file at
        C{path} (the defaults, with a warning, when there is no such file);
        in kubernetes mode the defaults, as the Configuration resource is
        fetched from the API server when the service starts.

        @raise ConfigError: if the file exists but is not a valid
            Configuration.
        """
        if mode != MODE_STANDALONE:
            return MTLSConfig()
        try:
            mtls, warnings = load_configuration_file(path, self.environ)
        except FileNotFoundError:
            self.startup_warnings.append(
                f"configuration file '{path}' not found; using the defaults"
            )
            return MTLSConfig()
        self.startup_warnings.extend(warnings)
        return mtls

    def _hand_observer_to_parent(self, config: SentryConfig) -> None:
        """
        Make the runner that parsed us (C{twistd} or C{twist}) log through
        L{logs.make_observer} with C{--log-level} and C{--log-as-json}.

        Under C{twistd}, the observer factory goes in the parent's
        C{logger} option, unless the operator gave C{--logger} or
        C{--syslog}.  twistd's C{ServerOptions.postOptions}, which runs
        after ours, passes a non-empty C{logger} to C{namedAny} (it expects
        a dotted name there), so the factory is stored just after that step
        by wrapping the parent's C{postOptions}.  twistd reads C{logger}
        later, when its runner is created.

        Under C{twist}, the parent's C{fileLogObserverFactory} and
        C{logLevel} are set instead: C{twist} opens the log file itself.

        @raise ConfigError: if twistd was told to daemonise and log to
            stdout, which twistd itself refuses.
        """
        parent = getattr(self, "parent", None)
        if parent is None or not (
            hasattr(parent, "get") and hasattr(parent, "__setitem__")
        ):
            return
        level, as_json = config.log_level, config.log_as_json
        if "fileLogObserverFactory" in parent:
            parent["fileLogObserverFactory"] = partial(
                logs.make_observer, level, as_json
            )
            parent["logLevel"] = logs.LOG_LEVELS[level]
            return
        if parent.get("logger"):
            return
        if parent.get("syslog"):
            self.startup_warnings.append(
                "logging to syslog as twistd's --syslog asks;"
                " --log-level and --log-as-json do not apply"
            )
            return
        logfile_option = parent.get("logfile")
        nodaemon = bool(parent.get("nodaemon"))
        if logfile_option == "-" and not nodaemon:
            raise ConfigError(
                "--logfile", "a daemon cannot log to stdout (add --nodaemon)"
            )

        def observer_factory() -> logs.SentryLogObserver:
            stream = logs.open_twistd_log_file(logfile_option, nodaemon)
            return logs.make_observer(level, as_json, stream)

        parent_post_options = getattr(parent, "postOptions", None)
        if parent_post_options is None:
            parent["logger"] = observer_factory
            return

        def post_options_then_set_logger() -> None:
            parent_post_options()
            parent["logger"] = observer_factory

        parent.postOptions = post_options_then_set_logger
