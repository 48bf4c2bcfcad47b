# -*- test-case-name: tests.test_config,tests.test_kube_configuration,tests.test_tap -*-
"""
The one frozen configuration object, and reading Dapr's Configuration.

L{SentryConfig} is built once, by L{sentry_tx.options.Options}, from the flags and
the C{spec.mtls} part of the Dapr Configuration; everything else takes it.
"""

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import yaml

from sentry_tx.ca.files import read_credential_file
from sentry_tx.durations import format_go_duration, parse_go_duration
from sentry_tx.errors import BundleError, ConfigError

DEFAULT_WORKLOAD_CERT_TTL = timedelta(hours=24)
DEFAULT_ALLOWED_CLOCK_SKEW = timedelta(minutes=15)
DEFAULT_NAMESPACE = "default"

MODE_STANDALONE = "standalone"
MODE_KUBERNETES = "kubernetes"


@dataclass(frozen=True)
class TokenValidatorConfig:
    """
    One entry of C{spec.mtls.tokenValidators}.

    @ivar name: the validator's name (C{jwks}).
    @ivar options: its options, as (key, value) pairs sorted by key.
    """

    name: str
    options: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class MTLSConfig:
    """
    The C{spec.mtls} part of a Dapr Configuration that Sentry reads.
    """

    workload_cert_ttl: timedelta = DEFAULT_WORKLOAD_CERT_TTL
    allowed_clock_skew: timedelta = DEFAULT_ALLOWED_CLOCK_SKEW
    token_validators: tuple[TokenValidatorConfig, ...] = ()


@dataclass(frozen=True)
class SentryConfig:
    """
    Everything sentry_tx is told, from flags, environment and Configuration.
    """

    mode: str = MODE_STANDALONE
    config: str = "daprsystem"
    issuer_credentials: str = "/var/run/secrets/dapr.io/credentials"
    issuer_ca_filename: str = "ca.crt"
    issuer_certificate_filename: str = "issuer.crt"
    issuer_key_filename: str = "issuer.key"
    trust_domain: str = "localhost"
    # Bare 'tuple' (of str) here and in oidc_allowed_hosts: server/ipc.py
    # decodes each field by its runtime annotation and knows 'tuple' only.
    token_audiences: tuple = ()
    kubeconfig: str = "~/.kube/config"
    port: int = 50001
    listen_address: str = ""
    healthz_port: int = 8080
    healthz_listen_address: str = ""
    metrics_port: int = 9090
    metrics_listen_address: str = ""
    enable_metrics: bool = True
    log_level: str = "info"
    log_as_json: bool = False
    workers: int = 1
    namespace: str = DEFAULT_NAMESPACE
    mtls: MTLSConfig = field(default_factory=MTLSConfig)
    # JWT-SVIDs and the OIDC server (SPEC section 11).  Plain types, so that
    # the configuration is simple to compare and print; an empty
    # string means "not set".
    jwt_enabled: bool = False
    jwt_key_filename: str = "jwt.key"
    jwks_filename: str = "jwks.json"
    jwt_issuer: str = ""
    jwt_signing_algorithm: str = "RS256"
    jwt_key_id: str = ""
    jwt_ttl_seconds: int = 24 * 3600
    oidc_enabled: bool = False
    oidc_server_listen_port: int = 9080
    oidc_server_listen_address: str = "localhost"
    oidc_server_tls_enabled: bool = True
    oidc_server_tls_cert_file: str = ""
    oidc_server_tls_key_file: str = ""
    oidc_jwks_uri: str = ""
    oidc_path_prefix: str = ""
    oidc_allowed_hosts: tuple = ()
    # Automatic CA renewal (SPEC sections 2 and 4, sentry_tx.ca.renewal).
    # Whole seconds; the grace is None for "auto".
    ca_ttl_seconds: int = 8760 * 3600
    ca_renewal_enabled: bool = True
    ca_renewal_threshold: float = 0.9
    trust_anchor_propagation_grace_seconds: object = None

    def _credential_path(self, filename: str) -> str:
        return os.path.join(self.issuer_credentials, filename)

    @property
    def ca_path(self) -> str:
        """
        Path of the trust anchors (an absolute filename is used as is).
        """
        return self._credential_path(self.issuer_ca_filename)

    @property
    def issuer_certificate_path(self) -> str:
        """
        Path of the issuer chain (an absolute filename is used as is).
        """
        return self._credential_path(self.issuer_certificate_filename)

    @property
    def issuer_key_path(self) -> str:
        """
        Path of the issuer key (an absolute filename is used as is).
        """
        return self._credential_path(self.issuer_key_filename)

    @property
    def jwt_key_path(self) -> str:
        """
        Path of the JWT signing key (an absolute filename is used as is).
        """
        return self._credential_path(self.jwt_key_filename)

    @property
    def jwks_path(self) -> str:
        """
        Path of the JWKS of the JWT signing key.
        """
        return self._credential_path(self.jwks_filename)


# Characters Go's os.Expand takes as a one-character "special" variable name.
_SHELL_SPECIAL_NAMES = frozenset("*#$@!?-0123456789")


def _is_shell_name_character(character: str) -> bool:
    return character == "_" or ("0" <= character <= "9") or (
        "a" <= character.lower() <= "z"
    )


def _shell_name(text: str) -> tuple[str, int]:
    """
    Read a variable reference at the start of C{text} (which follows a C{$}),
    exactly as Go's C{os.Expand} does.

    @param text: what follows the C{$}; not empty.
    @type text: L{str}

    @return: C{(name, width)}: the variable's name and how many characters
        of C{text} the reference uses.  An empty name with a positive width
        is bad syntax whose characters are dropped; an empty name with width
        zero means the C{$} was not followed by a name and stays as it is.
    @rtype: L{tuple} of (L{str}, L{int})
    """
    if text[0] == "{":
        if len(text) > 2 and text[1] in _SHELL_SPECIAL_NAMES and text[2] == "}":
            return text[1], 3
        closing = text.find("}", 1)
        if closing == -1:
            return "", 1  # "${" never closed: Go drops the "${"
        if closing == 1:
            return "", 2  # "${}": Go drops it
        return text[1:closing], closing + 1
    if text[0] in _SHELL_SPECIAL_NAMES:
        return text[0], 1
    width = 0
    while width < len(text) and _is_shell_name_character(text[width]):
        width += 1
    return text[:width], width


def expand_environment(
    text: str, environ: Mapping[str, str]
) -> tuple[str, list[str]]:
    """
    Replace C{${VAR}} and C{$VAR} in C{text} from C{environ}, as Go's
    C{os.ExpandEnv} does (which Dapr applies to its Configuration file).

    Like Go, a variable that is not set expands to the empty string, C{$$}
    and C{$1} are (special) variable references, and a C{$} followed by
    something that is not a name stays as it is.  Unlike Go, the names of the
    variables that were not set are returned so that the caller can warn.

    @param text: the text to expand.
    @type text: L{str}

    @param environ: the environment.
    @type environ: L{Mapping} of L{str} to L{str}

    @return: the expanded text, and the names referenced but not set in
        C{environ} (each once, in order of first use).
    @rtype: L{tuple} of (L{str}, L{list} of L{str})
    """
    pieces: list[str] = []
    unset: list[str] = []
    copied_up_to = 0
    index = 0
    while index < len(text):
        if text[index] == "$" and index + 1 < len(text):
            pieces.append(text[copied_up_to:index])
            name, width = _shell_name(text[index + 1 :])
            if name:
                if name in environ:
                    pieces.append(environ[name])
                elif name not in unset:
                    unset.append(name)
            elif width == 0:
                pieces.append("$")
            index += width
            copied_up_to = index + 1
        index += 1
    pieces.append(text[copied_up_to:])
    return "".join(pieces), unset


CONFIGURATION_API_VERSION = "dapr.io/v1alpha1"
CONFIGURATION_KIND = "Configuration"

# The token validators a Configuration may name, and those this version can
# run.  A known but unsupported validator stops the program: running without
# a validator the operator asked for would accept callers it should refuse.
KNOWN_TOKEN_VALIDATORS = ("jwks",)
SUPPORTED_TOKEN_VALIDATORS = ("jwks",)
BUILT_IN_TOKEN_VALIDATORS = ("kubernetes", "insecure")
BUILT_IN_VALIDATOR_PROBLEM = (
    "the built-in 'kubernetes' and 'insecure' validators cannot be configured"
    " manually"
)

_WORKLOAD_CERT_TTL_FIELD = "spec.mtls.workloadCertTTL"
_ALLOWED_CLOCK_SKEW_FIELD = "spec.mtls.allowedClockSkew"
_TOKEN_VALIDATORS_FIELD = "spec.mtls.tokenValidators"


def _type_name(value: object) -> str:
    """
    Describe the YAML type of C{value} for an error message.
    """
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return f"a {type(value).__name__}"


def _mapping_or_empty(
    document: Mapping[Any, Any], key: str, field: str, source: str
) -> Mapping[Any, Any]:
    """
    The mapping under C{key} in C{document}; a missing or null one is empty.

    @raise ConfigError: naming C{field} if the value is not a mapping.
    """
    value = document.get(key)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(
            field, f"must be a mapping, not {_type_name(value)} (in {source})"
        )
    return value


def _duration_field(
    mtls: Mapping[Any, Any], key: str, field: str, default: timedelta, source: str
) -> timedelta:
    """
    Read the Go duration under C{key} in C{mtls}, or C{default} when it is
    missing, null or empty (as Dapr treats an empty string).

    @raise ConfigError: naming C{field} if the value is not a duration string.
    """
    value = mtls.get(key)
    if value is None or value == "":
        return default
    if not isinstance(value, str):
        raise ConfigError(
            field,
            f"must be a duration string such as '24h', not {_type_name(value)}"
            f" ({value!r}) (in {source})",
        )
    try:
        return parse_go_duration(value, field)
    except ConfigError as error:
        raise ConfigError(field, f"{error.problem} (in {source})") from None


def _parse_token_validator(
    entry: object, index: int, source: str
) -> TokenValidatorConfig:
    """
    Read one entry of C{spec.mtls.tokenValidators}.

    @raise ConfigError: naming the entry's field if it is malformed, names an
        unknown validator, or one this version cannot run.
    """
    field = f"{_TOKEN_VALIDATORS_FIELD}[{index}]"
    if not isinstance(entry, Mapping):
        raise ConfigError(
            field, f"must be a mapping, not {_type_name(entry)} (in {source})"
        )
    name = entry.get("name")
    if not isinstance(name, str) or not name:
        raise ConfigError(
            f"{field}.name",
            f"must be a non-empty string, not {_type_name(name)} (in {source})",
        )
    options = _mapping_or_empty(entry, "options", f"{field}.options", source)
    for key, value in options.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise ConfigError(
                f"{field}.options.{key}",
                f"must be a string, not {_type_name(value)} (in {source})",
            )
    if name.lower() in BUILT_IN_TOKEN_VALIDATORS:
        raise ConfigError(
            f"{field}.name", f"{BUILT_IN_VALIDATOR_PROBLEM} (in {source})"
        )
    if name not in KNOWN_TOKEN_VALIDATORS:
        known = ", ".join(repr(each) for each in KNOWN_TOKEN_VALIDATORS)
        raise ConfigError(
            f"{field}.name",
            f"unknown validator {name!r} (known: {known}) (in {source})",
        )
    if name not in SUPPORTED_TOKEN_VALIDATORS:
        raise ConfigError(
            f"{field}.name",
            f"the {name} validator is not supported by this version of"
            f" sentry_tx (in {source})",
        )
    if name == "jwks":
        from sentry_tx.identity.jwks import parse_jwks_options

        try:
            parse_jwks_options(options.items(), field)
        except ConfigError as error:
            raise ConfigError(error.field, f"{error.problem} (in {source})") from None
    return TokenValidatorConfig(name=name, options=tuple(sorted(options.items())))


def parse_mtls(document: object, source: str) -> MTLSConfig:
    """
    Read the C{spec.mtls} settings Sentry uses from a Dapr Configuration.

    Missing parts take their defaults (C{workloadCertTTL} 24h,
    C{allowedClockSkew} 15m, no token validators); anything present must be
    right.  C{apiVersion} and C{kind}, when present, must be Dapr's.

    @param document: the parsed Configuration resource.
    @type document: L{Mapping}

    @param source: where the document came from (a path, or a resource
        name), added to error messages.
    @type source: L{str}

    @return: the mTLS settings.
    @rtype: L{MTLSConfig}

    @raise ConfigError: naming the YAML path of the first wrong field.
    """
    if not isinstance(document, Mapping):
        raise ConfigError(
            source,
            f"a Configuration must be a mapping, not {_type_name(document)}",
        )
    for key, expected in (
        ("apiVersion", CONFIGURATION_API_VERSION),
        ("kind", CONFIGURATION_KIND),
    ):
        if key in document and document[key] != expected:
            raise ConfigError(
                key, f"must be {expected!r}, not {document[key]!r} (in {source})"
            )
    spec = _mapping_or_empty(document, "spec", "spec", source)
    mtls = _mapping_or_empty(spec, "mtls", "spec.mtls", source)

    workload_cert_ttl = _duration_field(
        mtls,
        "workloadCertTTL",
        _WORKLOAD_CERT_TTL_FIELD,
        DEFAULT_WORKLOAD_CERT_TTL,
        source,
    )
    if workload_cert_ttl <= timedelta(0):
        raise ConfigError(
            _WORKLOAD_CERT_TTL_FIELD,
            f"must be longer than zero, not {mtls['workloadCertTTL']!r}"
            f" (in {source})",
        )
    allowed_clock_skew = _duration_field(
        mtls,
        "allowedClockSkew",
        _ALLOWED_CLOCK_SKEW_FIELD,
        DEFAULT_ALLOWED_CLOCK_SKEW,
        source,
    )
    if allowed_clock_skew < timedelta(0):
        raise ConfigError(
            _ALLOWED_CLOCK_SKEW_FIELD,
            f"must not be negative, not {mtls['allowedClockSkew']!r}"
            f" (in {source})",
        )

    entries = mtls.get("tokenValidators")
    if entries is None:
        entries = []
    if not isinstance(entries, list):
        raise ConfigError(
            _TOKEN_VALIDATORS_FIELD,
            f"must be a list, not {_type_name(entries)} (in {source})",
        )
    token_validators = tuple(
        _parse_token_validator(entry, index, source)
        for index, entry in enumerate(entries)
    )
    names = [validator.name for validator in token_validators]
    for index, name in enumerate(names):
        if name in names[:index]:
            raise ConfigError(
                f"{_TOKEN_VALIDATORS_FIELD}[{index}].name",
                f"the {name} validator is configured more than once (in {source})",
            )
    return MTLSConfig(
        workload_cert_ttl=workload_cert_ttl,
        allowed_clock_skew=allowed_clock_skew,
        token_validators=token_validators,
    )


# The keys of Dapr's MTLSSpec (pkg/config/configuration.go).  Sentry reads
# three of them; the others belong to sidecars and are accepted silently.
KNOWN_MTLS_KEYS = (
    "enabled",
    "workloadCertTTL",
    "allowedClockSkew",
    "sentryAddress",
    "controlPlaneTrustDomain",
    "tokenValidators",
)


def mtls_warnings(document: object, source: str) -> list[str]:
    """
    What an operator should hear about a Configuration that parsed: a
    missing C{spec.mtls} (every setting is a default), and each key under
    it that Dapr does not know (a misspelt C{workloadCertTTl} would
    otherwise leave the TTL at its default without a word), with the known
    key it most resembles.

    @param document: the Configuration, already accepted by L{parse_mtls}.
    @param source: where it came from (a path, or a resource name).
    @return: the warnings, in the order of the keys.
    @rtype: L{list} of L{str}
    """
    import difflib

    spec = document.get("spec") if isinstance(document, Mapping) else None
    mtls = spec.get("mtls") if isinstance(spec, Mapping) else None
    if not isinstance(mtls, Mapping):
        return [
            f"{source} has no spec.mtls; using the defaults (workloadCertTTL"
            f" {format_go_duration(DEFAULT_WORKLOAD_CERT_TTL)}, allowedClockSkew"
            f" {format_go_duration(DEFAULT_ALLOWED_CLOCK_SKEW)})"
        ]
    warnings: list[str] = []
    for key in mtls:
        if key in KNOWN_MTLS_KEYS:
            continue
        close = difflib.get_close_matches(
            str(key), KNOWN_MTLS_KEYS, n=1, cutoff=0.6
        ) or [
            known for known in KNOWN_MTLS_KEYS if known.lower() == str(key).lower()
        ]
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        warnings.append(
            f"spec.mtls.{key}: unknown key, ignored{hint} (in {source})"
        )
    return warnings


def _yaml_error_detail(error: yaml.YAMLError) -> str:
    """
    A one-line description of a PyYAML error, with a 1-based line and column
    when PyYAML knows them.
    """
    problem = getattr(error, "problem", None) or str(error)
    context = getattr(error, "context", None)
    if context:
        problem = f"{context}, {problem}"
    mark = getattr(error, "problem_mark", None) or getattr(
        error, "context_mark", None
    )
    detail = " ".join(str(problem).split())
    if mark is not None:
        detail += f" at line {mark.line + 1}, column {mark.column + 1}"
    return detail


MAX_CONFIGURATION_FILE_BYTES = 1024 * 1024
"""
The largest Configuration file read.
"""


def load_configuration_file(
    path: str, environ: Mapping[str, str]
) -> tuple[MTLSConfig, list[str]]:
    """
    Read a Dapr Configuration file: expand the environment in it (as Dapr
    does), parse it as YAML and read its C{spec.mtls}.

    @param path: the file's path.
    @type path: L{str}

    @param environ: the environment used for C{${VAR}}.
    @type environ: L{Mapping} of L{str} to L{str}

    @return: the mTLS settings, and warnings for the operator (one for each
        environment variable the file uses that is not set).
    @rtype: L{tuple} of (L{MTLSConfig}, L{list} of L{str})

    @raise FileNotFoundError: if there is no file at C{path}; the caller
        decides what that means.
    @raise ConfigError: if the file cannot be read, is not a regular file
        (a FIFO would block the start), is larger than
        L{MAX_CONFIGURATION_FILE_BYTES}, is not a YAML mapping, or a field in
        it is wrong.
    """
    # The credential reader: a non-blocking open, regular files only, a
    # size cap.  Options are parsed before the reactor runs, so it runs
    # here, in the main thread.
    try:
        raw = read_credential_file(path, MAX_CONFIGURATION_FILE_BYTES)
    except BundleError as error:
        if not os.path.lexists(path):
            raise FileNotFoundError(path) from None
        raise ConfigError(path, error.problem) from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise ConfigError(
            path, f"not valid UTF-8 (byte {error.start})"
        ) from None
    expanded, unset_names = expand_environment(text, environ)
    warnings = [
        f"configuration file '{path}': environment variable '{name}' is not"
        f" set; it expands to an empty string"
        for name in unset_names
    ]
    try:
        document = yaml.safe_load(expanded)
    except yaml.YAMLError as error:
        raise ConfigError(
            path, f"not valid YAML: {_yaml_error_detail(error)}"
        ) from None
    if document is None:
        raise ConfigError(path, "the file is empty; expected a Configuration")
    if not isinstance(document, Mapping):
        raise ConfigError(
            path,
            f"expected a Configuration mapping, not {_type_name(document)}",
        )
    mtls = parse_mtls(document, path)
    return mtls, warnings + mtls_warnings(document, path)
