# -*- test-case-name: tests.test_tap -*-
"""
Dapr Sentry's command-line flags: their table (names, defaults, help), their
spelling as Go's C{flag} package takes them (C{-port=50001},
C{--enable-metrics=false}), and the check of each value.

Imported by C{twistd --help}: it must stay light (no grpc, no cryptography,
no reactor at import time).
"""

import re
from collections.abc import Iterable

from sentry_tx.config import MODE_KUBERNETES, MODE_STANDALONE, SentryConfig
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

DEFAULTS = SentryConfig()

MAXIMUM_WORKERS = 64
"""
The most serving processes --workers may ask for.
"""

FlagSpec = list[str | None]
"""
One C{usage.Options} parameter: C{[name, short name, default, help]}.
"""

STRING_FLAGS: tuple[FlagSpec, ...] = (
    [
        "config",
        None,
        DEFAULTS.config,
        "standalone: path of the Dapr Configuration YAML file (a missing file"
        " means the defaults); kubernetes: name of the Configuration resource"
        " in $NAMESPACE.",
    ],
    [
        "issuer-credentials",
        None,
        DEFAULTS.issuer_credentials,
        "Directory of the trust bundle (trust anchors, issuer chain and key).",
    ],
    [
        "issuer-ca-filename",
        None,
        DEFAULTS.issuer_ca_filename,
        "Trust anchors (PEM root certificates), in --issuer-credentials unless"
        " absolute.",
    ],
    [
        "issuer-certificate-filename",
        None,
        DEFAULTS.issuer_certificate_filename,
        "Issuer certificate chain (PEM, issuer first), in --issuer-credentials"
        " unless absolute.",
    ],
    [
        "issuer-key-filename",
        None,
        DEFAULTS.issuer_key_filename,
        "Issuer private key (PEM), in --issuer-credentials unless absolute.",
    ],
    [
        "trust-domain",
        None,
        DEFAULTS.trust_domain,
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
        DEFAULTS.kubeconfig,
        "Kubeconfig file, used in kubernetes mode outside a cluster.",
    ],
    [
        "port",
        None,
        str(DEFAULTS.port),
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
        str(DEFAULTS.healthz_port),
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
        str(DEFAULTS.metrics_port),
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
        " N - 1 serving copies sharing --port (at most"
        f" {MAXIMUM_WORKERS}; default: one per core this process may use, by"
        " the cgroup CPU quota, else the CPU affinity, at most 4).",
    ],
    [
        "log-level",
        None,
        DEFAULTS.log_level,
        "Lowest level logged: debug, info, warn, error or fatal.",
    ],
    # JWT-SVIDs and the OIDC discovery server (SPEC section 11).
    [
        "jwt-key-filename",
        None,
        DEFAULTS.jwt_key_filename,
        "JWT signing key (PEM), in --issuer-credentials unless absolute.",
    ],
    [
        "jwks-filename",
        None,
        DEFAULTS.jwks_filename,
        "JWKS of the JWT signing key, in --issuer-credentials unless absolute.",
    ],
    ["jwt-issuer", None, None, "iss of issued JWTs (default: no iss claim)."],
    [
        "jwt-signing-algorithm",
        None,
        DEFAULTS.jwt_signing_algorithm,
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
        str(DEFAULTS.oidc_server_listen_port),
        "OIDC discovery server port (0 picks a free port).",
    ],
    [
        "oidc-server-listen-address",
        None,
        DEFAULTS.oidc_server_listen_address,
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

# Automatic CA renewal (Dapr PR #10290's names): each flag may also come
# from the environment (Dapr 1.18's chart passes extraEnvVars to Sentry, not
# extra arguments); a flag on the command line wins over its variable.
RENEWAL_VARIABLES = {
    "ca-ttl": "DAPR_SENTRY_CA_TTL",
    "ca-renewal-enabled": "DAPR_SENTRY_CA_RENEWAL_ENABLED",
    "ca-renewal-threshold": "DAPR_SENTRY_CA_RENEWAL_THRESHOLD",
    "trust-anchor-propagation-grace": "DAPR_SENTRY_TRUST_ANCHOR_PROPAGATION_GRACE",
}
RENEWAL_DEFAULTS = {
    "ca-ttl": "8760h",
    "ca-renewal-enabled": "true",
    "ca-renewal-threshold": "0.9",
    "trust-anchor-propagation-grace": "auto",
}
_RENEWAL_HELP = {
    "ca-ttl": "Life of a generated or renewed root and issuer (a Go duration).",
    "ca-renewal-enabled": "Renew a generated CA automatically before its"
    " issuer expires (append-only: a new root is added to the trust anchors).",
    "ca-renewal-threshold": "Fraction of the issuer's life after which it is"
    " renewed, in (0, 1).",
    "trust-anchor-propagation-grace": "How long after a renewal the old issuer"
    " keeps signing (a Go duration, never past its NotAfter); auto: its"
    " NotAfter minus twice the workload certificate TTL and 1h.",
}


def _renewal_flag(name: str) -> FlagSpec:
    return [
        name,
        None,
        None,
        f"{_RENEWAL_HELP[name]} [default: {RENEWAL_DEFAULTS[name]};"
        f" environment: {RENEWAL_VARIABLES[name]}]",
    ]


STRING_FLAGS = STRING_FLAGS + tuple(
    _renewal_flag(name)
    for name in ("ca-ttl", "ca-renewal-threshold", "trust-anchor-propagation-grace")
)

BOOL_FLAGS: tuple[FlagSpec, ...] = (
    [
        "enable-metrics",
        None,
        "true" if DEFAULTS.enable_metrics else "false",
        "Serve Prometheus metrics; a bare --enable-metrics means true,"
        " --enable-metrics=false turns them off.",
    ],
    [
        "log-as-json",
        None,
        "true" if DEFAULTS.log_as_json else "false",
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

BOOL_FLAGS = BOOL_FLAGS + (_renewal_flag("ca-renewal-enabled"),)

_STRING_FLAG_NAMES = frozenset(flag[0] for flag in STRING_FLAGS)
_BOOL_FLAG_NAMES = frozenset(flag[0] for flag in BOOL_FLAGS)

# usage.Options' own flags, which Go also takes (-h and -help print usage).
_BUILTIN_FLAGS = {"h": "help", "help": "help", "version": "version"}


def version_text() -> str:
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


def go_style_arguments(arguments: Iterable[str]) -> list[str]:
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


def parse_bool(flag: str, text: str) -> bool:
    """
    Read a boolean flag value as Go's C{strconv.ParseBool} does.

    @raise ConfigError: naming C{flag} if C{text} is not a Go boolean.
    """
    if text in _GO_TRUE:
        return True
    if text in _GO_FALSE:
        return False
    raise ConfigError(flag, f"not a boolean: {text!r} (use true or false)")


def parse_port(flag: str, text: str) -> int:
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


def parse_workers(flag: str, text: str) -> int:
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


def check_trust_domain(flag: str, text: str) -> str:
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


def check_namespace(variable: str, text: str) -> str:
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


def split_audiences(text: str) -> tuple[str, ...]:
    """
    The comma-separated audiences in C{text}, stripped, empty items dropped.
    """
    return tuple(item.strip() for item in text.split(",") if item.strip())
