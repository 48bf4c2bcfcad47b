"""
The C{twistd sentry} command line, and (below) the one place that wires
sentry_tx's services together.

L{Options} takes Dapr Sentry's flags, spelled as Go's C{flag} package takes
them (C{--port 50001}, C{-port=50001}, C{--enable-metrics=false}), checks
every value, reads the Configuration file in standalone mode, and leaves one
frozen L{SentryConfig} in C{sentry_config}.  A bad value ends the program at
once with one line on stderr and exit status 1.

This module is imported by C{twistd --help}: it must stay light (no grpc, no
cryptography, no reactor at import time).
"""

import os
import re
import sys
from functools import partial

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

# What sentry_tx's messages on stderr start with, as Dapr's binary name.
PROGRAM_NAME = "sentry"

MODES = (MODE_KUBERNETES, MODE_STANDALONE)

# Ports are TCP ports; 0 asks the kernel for a free one (used by tests).
MINIMUM_PORT = 0
MAXIMUM_PORT = 65535

# Trust domains as SPIFFE allows them (and as section 5 checks them).
_TRUST_DOMAIN_CHARACTERS = re.compile(r"[a-z0-9._-]+")
MAXIMUM_TRUST_DOMAIN_LENGTH = 255

# A namespace must be usable as one segment of a SPIFFE ID path.
_NAMESPACE_CHARACTERS = re.compile(r"[A-Za-z0-9._-]+")
MAXIMUM_NAMESPACE_LENGTH = 63

_PORT_TEXT = re.compile(r"[0-9]+")

# Go's strconv.ParseBool, which Go's flag package uses for boolean flags.
_GO_TRUE = frozenset(("1", "t", "T", "TRUE", "true", "True"))
_GO_FALSE = frozenset(("0", "f", "F", "FALSE", "false", "False"))

# The environment variable whose presence means "running in a pod".
KUBERNETES_SERVICE_HOST_VARIABLE = "KUBERNETES_SERVICE_HOST"
NAMESPACE_VARIABLE = "NAMESPACE"

_DEFAULTS = SentryConfig()

MAXIMUM_WORKERS = 64
"""
The most worker processes --workers may ask for.
"""

_STRING_FLAGS = (
    [
        "config",
        None,
        _DEFAULTS.config,
        "standalone: path of the Dapr Configuration YAML file (a missing file"
        " means the defaults); kubernetes: name of the Configuration resource"
        " in $NAMESPACE.",
    ],
    [
        "issuer-credentials",
        None,
        _DEFAULTS.issuer_credentials,
        "Directory of the trust bundle (trust anchors, issuer chain and key).",
    ],
    [
        "issuer-ca-filename",
        None,
        _DEFAULTS.issuer_ca_filename,
        "Trust anchors (PEM root certificates), in --issuer-credentials unless"
        " absolute.",
    ],
    [
        "issuer-certificate-filename",
        None,
        _DEFAULTS.issuer_certificate_filename,
        "Issuer certificate chain (PEM, issuer first), in --issuer-credentials"
        " unless absolute.",
    ],
    [
        "issuer-key-filename",
        None,
        _DEFAULTS.issuer_key_filename,
        "Issuer private key (PEM), in --issuer-credentials unless absolute.",
    ],
    [
        "trust-domain",
        None,
        _DEFAULTS.trust_domain,
        "Trust domain of the control plane and of generated CAs.",
    ],
    [
        "token-audience",
        None,
        None,
        "Comma-separated audiences for Kubernetes token review (default:"
        " none, meaning dapr.io/sentry and the Sentry SPIFFE ID).",
    ],
    [
        "mode",
        None,
        None,
        "kubernetes or standalone (default: kubernetes when"
        " $KUBERNETES_SERVICE_HOST is set, else standalone).",
    ],
    [
        "kubeconfig",
        None,
        _DEFAULTS.kubeconfig,
        "Kubeconfig file, used in kubernetes mode outside a cluster.",
    ],
    [
        "port",
        None,
        str(_DEFAULTS.port),
        "gRPC port (0 picks a free port).",
    ],
    [
        "listen-address",
        None,
        None,
        "gRPC bind address (default: all interfaces).",
    ],
    [
        "healthz-port",
        None,
        str(_DEFAULTS.healthz_port),
        "Health check port (0 picks a free port).",
    ],
    [
        "healthz-listen-address",
        None,
        None,
        "Health check bind address (default: all interfaces).",
    ],
    [
        "metrics-port",
        None,
        str(_DEFAULTS.metrics_port),
        "Prometheus metrics port (0 picks a free port).",
    ],
    [
        "metrics-listen-address",
        None,
        None,
        "Prometheus metrics bind address (default: all interfaces).",
    ],
    [
        "workers",
        None,
        None,
        "Processes serving gRPC, the twistd process included: N > 1 starts"
        " N - 1 worker processes sharing --port (at most"
        f" {MAXIMUM_WORKERS}; default: one per core this process may use, by"
        " the cgroup CPU quota, else the CPU affinity, at most 4).",
    ],
    [
        "log-level",
        None,
        _DEFAULTS.log_level,
        "Lowest level logged: debug, info, warn, error or fatal.",
    ],
    # JWT-SVIDs and the OIDC discovery server (SPEC section 11).
    [
        "jwt-key-filename",
        None,
        _DEFAULTS.jwt_key_filename,
        "JWT signing key (PEM), in --issuer-credentials unless absolute.",
    ],
    [
        "jwks-filename",
        None,
        _DEFAULTS.jwks_filename,
        "JWKS of the JWT signing key, in --issuer-credentials unless absolute.",
    ],
    ["jwt-issuer", None, None, "iss of issued JWTs (default: no iss claim)."],
    [
        "jwt-signing-algorithm",
        None,
        _DEFAULTS.jwt_signing_algorithm,
        "JWT signing algorithm; must fit the key (RS*/PS* RSA, ES256/384/512,"
        " EdDSA).",
    ],
    [
        "jwt-key-id",
        None,
        None,
        "kid of issued JWTs (default: base64 SHA-256 thumbprint of the key).",
    ],
    ["jwt-ttl", None, "24h", "Lifetime of issued JWTs (a Go duration)."],
    [
        "oidc-server-listen-port",
        None,
        str(_DEFAULTS.oidc_server_listen_port),
        "OIDC discovery server port (0 picks a free port).",
    ],
    [
        "oidc-server-listen-address",
        None,
        _DEFAULTS.oidc_server_listen_address,
        "OIDC discovery server bind address.",
    ],
    [
        "oidc-server-tls-cert-file",
        None,
        None,
        "TLS certificate (PEM chain) of the OIDC server.",
    ],
    ["oidc-server-tls-key-file", None, None, "TLS key (PEM) of the OIDC server."],
    [
        "oidc-jwks-uri",
        None,
        None,
        "jwks_uri published in the discovery document (default: derived).",
    ],
    ["oidc-path-prefix", None, None, "Path prefix of the OIDC endpoints."],
    [
        "oidc-allowed-hosts",
        None,
        None,
        "Comma-separated Host values the OIDC server answers (default: any).",
    ],
)

_BOOL_FLAGS = (
    [
        "enable-metrics",
        None,
        "true" if _DEFAULTS.enable_metrics else "false",
        "Serve Prometheus metrics; a bare --enable-metrics means true,"
        " --enable-metrics=false turns them off.",
    ],
    [
        "log-as-json",
        None,
        "true" if _DEFAULTS.log_as_json else "false",
        "Log one JSON object per line; a bare --log-as-json means true.",
    ],
    ["jwt-enabled", None, "false", "Issue JWT-SVIDs with certificates."],
    [
        "oidc-enabled",
        None,
        "false",
        "Serve OIDC discovery and the JWKS (needs --jwt-enabled).",
    ],
    [
        "oidc-server-tls-enabled",
        None,
        "true",
        "Serve OIDC over TLS (--oidc-server-tls-enabled=false: plain HTTP).",
    ],
)

_STRING_FLAG_NAMES = frozenset(flag[0] for flag in _STRING_FLAGS)
_BOOL_FLAG_NAMES = frozenset(flag[0] for flag in _BOOL_FLAGS)

# usage.Options' own flags, which Go also takes (-h and -help print usage).
_BUILTIN_FLAGS = {"h": "help", "help": "help", "version": "version"}


def version_text():
    """
    What C{twistd sentry --version} prints: sentry_tx's version, then those
    of Twisted and grpcio, read from the installed metadata (so that
    C{--version} imports no grpc).
    """
    from importlib import metadata

    import sentry_tx

    lines = [f"sentry_tx {sentry_tx.__version__}"]
    for distribution in ("Twisted", "grpcio"):
        try:
            lines.append(f"{distribution} {metadata.version(distribution)}")
        except metadata.PackageNotFoundError:
            lines.append(f"{distribution} (not installed)")
    return "\n".join(lines) + "\n"


def go_style_arguments(arguments):
    """
    Rewrite a command line written for Go's C{flag} package into the form
    L{usage.Options} takes.

    Every flag may start with one dash or two and take its value as
    C{-flag value} or C{-flag=value}; a boolean flag takes a value only after
    C{=} (a bare one means true and never consumes the next argument).  As
    in Go, flags end at C{--} or at the first argument that is not a flag.
    Each flag comes out as C{--name=value}.

    @param arguments: the command line, without the program and subcommand.
    @type arguments: L{list} of L{str}

    @return: the rewritten command line.
    @rtype: L{list} of L{str}

    @raise ConfigError: for a flag that does not exist, or one that needs a
        value and has none.
    """
    rewritten = []
    remaining = list(arguments)
    while remaining:
        argument = remaining.pop(0)
        if argument == "--" or not argument.startswith("-") or argument == "-":
            rewritten.append(argument)
            rewritten.extend(remaining)
            break
        name, equals, value = argument.lstrip("-").partition("=")
        if argument.startswith("---") or not name:
            raise ConfigError(argument, "bad flag syntax")
        if name in _STRING_FLAG_NAMES:
            if not equals:
                if not remaining:
                    raise ConfigError(f"--{name}", "needs a value")
                value = remaining.pop(0)
            rewritten.append(f"--{name}={value}")
        elif name in _BOOL_FLAG_NAMES:
            rewritten.append(f"--{name}={value if equals else 'true'}")
        elif name in _BUILTIN_FLAGS:
            rewritten.append(f"--{_BUILTIN_FLAGS[name]}{equals}{value}")
        else:
            raise ConfigError(f"--{name}", "no such flag (see --help)")
    return rewritten


def _parse_bool(flag, text):
    """
    Read a boolean flag value as Go's C{strconv.ParseBool} does.

    @raise ConfigError: naming C{flag} if C{text} is not a Go boolean.
    """
    if text in _GO_TRUE:
        return True
    if text in _GO_FALSE:
        return False
    raise ConfigError(flag, f"not a boolean: {text!r} (use true or false)")


def _parse_port(flag, text):
    """
    Read a TCP port number (0 to 65535; 0 picks a free port).

    @raise ConfigError: naming C{flag} if C{text} is not a port number.
    """
    if _PORT_TEXT.fullmatch(text):
        port = int(text)
        if MINIMUM_PORT <= port <= MAXIMUM_PORT:
            return port
    raise ConfigError(
        flag,
        f"not a port number: {text!r} (use {MINIMUM_PORT}-{MAXIMUM_PORT};"
        f" 0 picks a free port)",
    )


def _parse_workers(flag, text):
    """
    Read a worker process count (1 to L{MAXIMUM_WORKERS}).

    @raise ConfigError: naming C{flag} if C{text} is not such a count.
    """
    if text.isdigit() and text.isascii():
        workers = int(text)
        if 1 <= workers <= MAXIMUM_WORKERS:
            return workers
    raise ConfigError(
        flag, f"not a worker count: {text!r} (use 1-{MAXIMUM_WORKERS})"
    )


def _check_trust_domain(flag, text):
    """
    @raise ConfigError: naming C{flag} if C{text} is not a valid trust domain.
    """
    if not text:
        raise ConfigError(flag, "must not be empty")
    if not _TRUST_DOMAIN_CHARACTERS.fullmatch(text):
        raise ConfigError(
            flag,
            f"{text!r}: trust domain characters are limited to lowercase"
            " letters, numbers, dots, dashes, and underscores",
        )
    if len(text.encode("utf-8")) > MAXIMUM_TRUST_DOMAIN_LENGTH:
        raise ConfigError(
            flag,
            f"trust domain is too long ({len(text)} characters; at most"
            f" {MAXIMUM_TRUST_DOMAIN_LENGTH})",
        )
    return text


def _check_namespace(variable, text):
    """
    @raise ConfigError: naming C{variable} if C{text} cannot be a SPIFFE ID
        path segment.
    """
    if (
        not _NAMESPACE_CHARACTERS.fullmatch(text)
        or text in (".", "..")
        or len(text) > MAXIMUM_NAMESPACE_LENGTH
    ):
        raise ConfigError(
            variable,
            f"not a valid namespace: {text!r} (letters, digits, '.', '_' and"
            f" '-', at most {MAXIMUM_NAMESPACE_LENGTH} characters)",
        )
    return text


def _split_audiences(text):
    """
    The comma-separated audiences in C{text}, stripped, empty items dropped.
    """
    return tuple(item.strip() for item in text.split(",") if item.strip())


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

    optParameters = [list(flag) for flag in _STRING_FLAGS + _BOOL_FLAGS]

    sentry_config = None

    def __init__(
        self, environ=None, stdout=None, stderr=None, default_processes=None
    ):
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
            L{sentry_tx.server.cores.default_serving_processes} by default.
        """
        super().__init__()
        self.environ = os.environ if environ is None else environ
        self.stdout = sys.stdout if stdout is None else stdout
        self.stderr = sys.stderr if stderr is None else stderr
        self.startup_warnings = []
        self.startup_notes = []
        if default_processes is None:
            from sentry_tx.server.cores import default_serving_processes

            default_processes = default_serving_processes
        self._default_processes = default_processes
        if self.environ.get(KUBERNETES_SERVICE_HOST_VARIABLE):
            self["mode"] = MODE_KUBERNETES
        else:
            self["mode"] = MODE_STANDALONE

    def opt_help(self):
        """
        Display this help and exit.
        """
        self.stdout.write(str(self))
        self.stdout.flush()
        raise SystemExit(0)

    def opt_version(self):
        """
        Display sentry_tx's version (and those of Twisted and grpcio) and
        exit.
        """
        self.stdout.write(version_text())
        self.stdout.flush()
        raise SystemExit(0)

    def parseOptions(self, options=None):
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
        try:
            super().parseOptions(go_style_arguments(options))
        except ConfigError as error:
            self._exit_with_error(f"{error.field}: {error.problem}")
        except usage.UsageError as error:
            self._exit_with_error(str(error))

    def _exit_with_error(self, message):
        """
        Write C{message} as one line to C{self.stderr} and exit with status 1.
        """
        one_line = " ".join(message.splitlines())
        self.stderr.write(f"{PROGRAM_NAME}: {one_line}\n")
        self.stderr.flush()
        raise SystemExit(1)

    def parseArgs(self, *arguments):
        """
        Sentry takes no positional arguments.
        """
        if arguments:
            raise usage.UsageError(
                f"unexpected argument {arguments[0]!r} (flags look like"
                " --port 50001)"
            )

    def postOptions(self):
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
            trust_domain=_check_trust_domain("--trust-domain", self["trust-domain"]),
            token_audiences=_split_audiences(self["token-audience"] or ""),
            kubeconfig=self["kubeconfig"],
            port=_parse_port("--port", self["port"]),
            listen_address=self["listen-address"] or _DEFAULTS.listen_address,
            healthz_port=_parse_port("--healthz-port", self["healthz-port"]),
            healthz_listen_address=self["healthz-listen-address"] or "",
            metrics_listen_address=self["metrics-listen-address"] or "",
            metrics_port=_parse_port("--metrics-port", self["metrics-port"]),
            enable_metrics=_parse_bool("--enable-metrics", self["enable-metrics"]),
            log_level=log_level,
            log_as_json=_parse_bool("--log-as-json", self["log-as-json"]),
            workers=self._serving_processes(),
            namespace=_check_namespace(NAMESPACE_VARIABLE, namespace),
            mtls=self._load_mtls(mode, self["config"]),
            **self._jwt_settings(),
        )
        self._hand_observer_to_parent(config)
        self.sentry_config = config

    def _jwt_settings(self):
        """
        The JWT and OIDC flags, checked (Dapr's checks and messages, plus a
        fitting algorithm, a positive TTL and absolute URLs).

        @return: the L{SentryConfig} fields they set.
        @raise ConfigError: naming the flag that is wrong.
        """
        from sentry_tx.durations import parse_go_duration
        from sentry_tx.jwt import JWT_SIGNING_ALGORITHMS

        jwt_enabled = _parse_bool("--jwt-enabled", self["jwt-enabled"])
        oidc_enabled = _parse_bool("--oidc-enabled", self["oidc-enabled"])
        tls_enabled = _parse_bool(
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
        return dict(
            jwt_enabled=jwt_enabled,
            jwt_key_filename=self["jwt-key-filename"],
            jwks_filename=self["jwks-filename"],
            jwt_issuer=issuer or "",
            jwt_signing_algorithm=algorithm,
            jwt_key_id=self["jwt-key-id"] or "",
            jwt_ttl_seconds=int(ttl.total_seconds()),
            oidc_enabled=oidc_enabled and jwt_enabled,
            oidc_server_listen_port=_parse_port(
                "--oidc-server-listen-port", self["oidc-server-listen-port"]
            ),
            oidc_server_listen_address=self["oidc-server-listen-address"] or "",
            oidc_server_tls_enabled=tls_enabled,
            oidc_server_tls_cert_file=cert_file or "",
            oidc_server_tls_key_file=key_file or "",
            oidc_jwks_uri=jwks_uri,
            oidc_path_prefix=f"/{prefix}" if prefix else "",
            oidc_allowed_hosts=_split_audiences(self["oidc-allowed-hosts"] or ""),
        )

    def _serving_processes(self):
        """
        How many processes serve gRPC: C{--workers}, else one per usable
        core (at most 4); the choice and its reason go to C{startup_notes}.
        """
        if self["workers"] is None:
            count, reason = self._default_processes()
        else:
            count = _parse_workers("--workers", self["workers"])
            reason = "--workers"
        self.startup_notes.append(
            f"serving gRPC from {count} process{'es' if count > 1 else ''}"
            f" ({reason})"
        )
        return count

    def _load_mtls(self, mode, path):
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

    def _hand_observer_to_parent(self, config):
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

        def observer_factory():
            stream = logs.open_twistd_log_file(logfile_option, nodaemon)
            return logs.make_observer(level, as_json, stream)

        parent_post_options = getattr(parent, "postOptions", None)
        if parent_post_options is None:
            parent["logger"] = observer_factory
            return

        def post_options_then_set_logger():
            parent_post_options()
            parent["logger"] = observer_factory

        parent.postOptions = post_options_then_set_logger


def build_service(config, reactor, startup_warnings=(), startup_notes=()):
    """
    Wire sentry_tx: the one place that chooses implementations and composes
    services.  Builds objects only; sockets, threads and fds are opened by
    the services' C{startService}.

    @param config: the L{SentryConfig}.
    @param reactor: the reactor (also the clock) every service uses.
    @param startup_warnings: messages to log once logging runs.
    @param startup_notes: information to log once logging runs.
    @return: the root L{SentryService}.
    """
    from twisted.application.service import IService

    from sentry_tx.ca.store import FileTrustStore
    from sentry_tx.expiry import ExpiryChecker
    from sentry_tx.healthz import healthz_root
    from sentry_tx.http_listener import http_listener
    from sentry_tx.listen import PortCheck
    from sentry_tx.metrics import SentryMetrics, metrics_root
    from sentry_tx.report import SettingsReport
    from sentry_tx.server.service import CertificateAuthorityService
    from sentry_tx.server.workers import WorkerPoolAuthority
    from sentry_tx.service import SentryService
    from sentry_tx.stderr_capture import StandardErrorCapture
    from sentry_tx.watcher import IssuerWatcher

    root = SentryService(reactor, startup_warnings, startup_notes=startup_notes)
    # First child: grpc core's own lines on fd 2 go through the log from
    # the start, and it stops last, after worker processes.
    StandardErrorCapture(reactor).setServiceParent(root)
    metrics = SentryMetrics()
    configuration_source = None
    readiness = ()
    if config.mode == MODE_KUBERNETES:
        from sentry_tx.modes import build_kubernetes_parts

        # With worker processes, each worker watches for its own validator.
        kubernetes = build_kubernetes_parts(
            config, reactor, os.environ, watch=config.workers == 1
        )
        # Added before the authority, so that it stops after it: the API
        # client's connections close once nothing uses them.
        kubernetes.service.setServiceParent(root)
        trust_store = kubernetes.trust_store
        validators = kubernetes.validators
        default_validator = kubernetes.default_validator
        from sentry_tx.identity.jwks import JWKSRefusingConfigurationSource

        configuration_source = JWKSRefusingConfigurationSource(
            kubernetes.configuration_source
        )
        readiness = kubernetes.readiness
    else:
        trust_store = FileTrustStore(
            reactor,
            config.ca_path,
            config.issuer_certificate_path,
            config.issuer_key_path,
            config.trust_domain,
            config.namespace,
            config.mtls.allowed_clock_skew,
        )
        from sentry_tx.modes import build_validators

        chosen = build_validators(config, reactor, os.environ)
        validators = chosen.validators
        default_validator = chosen.default_validator
    # Validators that keep state (the JWKS key set) run as services, before
    # the authority, and healthz waits for them to be ready.
    readiness_sources = []
    for validator in validators.values():
        if IService.providedBy(validator):
            validator.setServiceParent(root)
            readiness_sources.append(validator)
    jwt_minter = None
    if config.jwt_enabled:
        from sentry_tx.jwt.minting import JWTMinter
        from sentry_tx.jwt.store import FileJWTStore, JWTTrustStore

        jwt_minter = JWTMinter(config.jwt_issuer or None, config.jwt_ttl_seconds)
        if config.mode == MODE_KUBERNETES:
            from sentry_tx.jwt.kubernetes_store import KubernetesJWTStore

            jwt_store = KubernetesJWTStore.for_config(
                reactor, kubernetes.client, config
            )
        else:
            jwt_store = FileJWTStore(
                reactor,
                config.jwt_key_path,
                config.jwks_path,
                config.jwt_signing_algorithm,
                config.jwt_key_id or None,
            )
        trust_store = JWTTrustStore(trust_store, jwt_store, jwt_minter)
    # Resolves the Configuration (kubernetes mode) and logs, once, the TTL,
    # skew and validators in effect.
    configuration_source = SettingsReport(
        configuration_source, validators, default_validator
    )
    # A gRPC port in use: one line naming --port, before anything binds it.
    PortCheck("--port", config.listen_address, config.port).setServiceParent(root)
    if config.workers > 1:
        # gRPC in this process and N - 1 worker processes sharing the port;
        # each worker builds its own validators (sentry_tx.server.worker),
        # this process keeps the bundle, the watch, health and metrics.
        def local_authority(local_config, local_store):
            return CertificateAuthorityService(
                local_config,
                reactor,
                local_store,
                validators,
                default_validator,
                metrics,
                reuse_port=True,
                jwt_minter=jwt_minter,
            )

        authority = WorkerPoolAuthority(
            config,
            reactor,
            trust_store,
            metrics,
            config.workers - 1,
            on_start_failure=root.fatal,
            configuration_source=configuration_source,
            local_factory=local_authority,
            jwt_minter=jwt_minter,
        )
    else:
        authority = CertificateAuthorityService(
            config,
            reactor,
            trust_store,
            validators,
            default_validator,
            metrics,
            on_start_failure=root.fatal,
            configuration_source=configuration_source,
            jwt_minter=jwt_minter,
        )
    authority.setServiceParent(root)
    oidc = None
    if config.oidc_enabled and jwt_minter is not None:
        # Dapr's healthz waits for the OIDC listener too.
        oidc = build_oidc_service(config, reactor, jwt_minter, root.fatal)
        readiness_sources.append(oidc)
    # After the authority: they start once it is starting and stop before it.
    if trust_store.watch_directories:
        IssuerWatcher(
            authority, trust_store.watch_directories, reactor, metrics
        ).setServiceParent(root)
    ExpiryChecker(authority, reactor, metrics).setServiceParent(root)
    # Every HTTP listener comes from http_listener: request deadline and
    # connection cap (sentry_tx.http_listener).
    http_listener(
        "healthz",
        config.healthz_port,
        healthz_root(authority, *readiness, *readiness_sources),
        reactor,
        interface=config.healthz_listen_address,
    ).setServiceParent(root)
    if config.enable_metrics:
        http_listener(
            "metrics",
            config.metrics_port,
            metrics_root(metrics),
            reactor,
            interface=config.metrics_listen_address,
        ).setServiceParent(root)
    if oidc is not None:
        oidc.setServiceParent(root)
    return root


def build_oidc_service(config, reactor, jwt_minter, on_start_failure):
    """
    The OIDC discovery server, served as healthz and metrics are (the
    request deadline and connection cap of L{sentry_tx.http_listener}),
    inside TLS when it is on.
    """
    from sentry_tx.http_listener import GuardedSite, GuardedWebService
    from sentry_tx.jwt.oidc import OIDCResource, OIDCService

    tls = config.oidc_server_tls_enabled
    site = GuardedSite(
        OIDCResource(
            jwt_minter,
            config.jwt_issuer or None,
            config.oidc_jwks_uri or None,
            config.oidc_path_prefix,
            config.oidc_allowed_hosts,
            "https" if tls else "http",
        ),
        reactor,
    )
    return OIDCService(
        reactor,
        lambda factory: GuardedWebService(
            "oidc",
            config.oidc_server_listen_port,
            factory,
            interface=config.oidc_server_listen_address,
            flag="--oidc-server-listen-port",
        ),
        site,
        tls_files=(
            (config.oidc_server_tls_cert_file, config.oidc_server_tls_key_file)
            if tls
            else None
        ),
        on_start_failure=on_start_failure,
    )


def makeService(options):
    """
    The twistd entry point: build sentry_tx's service tree from parsed
    L{Options}.
    """
    from twisted.internet import reactor

    return build_service(
        options.sentry_config,
        reactor,
        options.startup_warnings,
        getattr(options, "startup_notes", ()),
    )
