# -*- test-case-name: tests.test_jwks,tests.test_images,tests.test_jwt_flags -*-
"""
The JWKS validator (SPEC section 6, Dapr's
C{pkg/sentry/server/validator/jwks/jwks.go}): the caller proves who it is
with a JWT signed by a key of a JSON Web Key Set.

The key set comes from one of three sources (C{options.source}):

  - an C{https://} or C{http://} URL, fetched on the reactor
    (L{sentry_tx.identity.jwks_fetch}: TLS verified against
    C{caCertificate} when given, within C{requestTimeout}, never following
    a redirect, its connection closed whatever ends it); fetched again every
    L{PERIODIC_REFRESH_SECONDS}, and
    when a token names an unknown C{kid}, at most once per
    C{minRefreshInterval} (the call waits for that fetch, within its
    deadline);
  - a path to a file, read through the credential reader and looked at
    every L{JWKS_FILE_CHECK_INTERVAL_SECONDS}: a changed file is used
    without a restart (a broken one is refused and the old set kept);
  - the JWKS JSON itself, optionally base64.

Until a key set has loaded once, C{ready} is False (healthz answers 503)
and every call is refused with "jwks validator not ready".

Refusals, in order, all PERMISSION_DENIED: no token; not ready; the common
request rules; then "token validation failed: <why>" unless the JWT verifies
with the key its C{kid} names (the algorithm fixed by that key: its C{alg},
else its type; never C{none}, never HMAC), has C{aud} containing Sentry's
SPIFFE ID, C{sub} equal to the caller's SPIFFE ID, C{exp} (required),
C{nbf} and C{iat} right within a 5 minute leeway, and a lifetime of at most
L{sentry_tx.identity.jwks_keys.MAX_TOKEN_LIFETIME_SECONDS}.  A token the
parser chokes on (JSON nested thousands deep, say) is refused the same way,
never an error of ours.  RSA keys under
L{sentry_tx.identity.jwks_keys.MIN_RSA_KEY_BITS} are left out of the key set,
with a warning.  The key set and the token check live in
L{sentry_tx.identity.jwks_keys}.
"""

import base64
import binascii
import os
from collections.abc import Callable, Iterable, MutableMapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from twisted.application.service import MultiService, Service
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorFromThreads, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IAgent
from zope.interface import implementer

from sentry_tx.ca.files import CREDENTIAL_READ_TIMEOUT_SECONDS, BoundedFileWork
from sentry_tx.ca.store import read_credential
from sentry_tx.durations import parse_go_duration
from sentry_tx.errors import BundleError, ConfigError, ValidationError
from sentry_tx.identity.caller import VALIDATOR_JWKS, CallerIdentity, SignRequest
from sentry_tx.identity.jwks_fetch import (
    FETCH_CANCELLED,
    FETCH_REFUSED,
    JWKSFetcher,
    JWKSFetchError,
    tls_policy_for,
)
from sentry_tx.identity.jwks_keys import (
    MAX_JWKS_BYTES,
    MIN_RSA_KEY_BITS,
    VALIDATION_FAILED,
    KeySet,
    UnknownKeyID,
    key_set_from_json,
    verify_token,
)
from sentry_tx.identity.rules import check_request
from sentry_tx.interfaces import IConfigurationSource, IIdentityValidator
from sentry_tx.logs import MAX_QUOTED_CHARACTERS, printable_cut

if TYPE_CHECKING:
    from sentry_tx.config import SentryConfig

DEFAULT_MIN_REFRESH_INTERVAL_SECONDS = 600.0
DEFAULT_REQUEST_TIMEOUT_SECONDS = 30.0
MIN_MIN_REFRESH_INTERVAL_SECONDS = 1.0
"""
Dapr ignores a C{minRefreshInterval} of a second or less; sentry_tx refuses
it at start instead.
"""

JWKS_FILE_CHECK_INTERVAL_SECONDS = 5.0
PERIODIC_REFRESH_SECONDS = 3600.0
"""
How often a URL source is fetched again without being asked (or every
C{minRefreshInterval} if that is longer), so that a key removed from the set
stops being accepted; a token with an unknown kid asks sooner.
"""
MAX_LOGGED_KIDS_CHARACTERS = MAX_QUOTED_CHARACTERS
"""
The warning about weak keys names their C{kid}s cut to this many characters
(they come from the key server).
"""
FETCH_RETRY_INITIAL_SECONDS = 1.0
FETCH_RETRY_MAX_SECONDS = 60.0

OPTION_SOURCE = "source"
OPTION_CA_CERTIFICATE = "caCertificate"
OPTION_MIN_REFRESH_INTERVAL = "minRefreshInterval"
OPTION_REQUEST_TIMEOUT = "requestTimeout"
KNOWN_OPTIONS = (
    OPTION_SOURCE,
    OPTION_CA_CERTIFICATE,
    OPTION_MIN_REFRESH_INTERVAL,
    OPTION_REQUEST_TIMEOUT,
)

NO_TOKEN = "the request does not contain a token"
NOT_READY = "jwks validator not ready"

SOURCE_URL = "url"
SOURCE_FILE = "file"
SOURCE_INLINE = "inline"


class IJWKSReactor(IReactorTime, IReactorFromThreads):
    """
    What the JWKS validator needs of a reactor: its clock and timers (the
    refresh schedule, the fetch's timeout) and handing a file read's result
    back to its thread (L{BoundedFileWork}).
    """

FileStamp = tuple[int, int, int]
"""
A key set file's inode, size and modification time (ns): what tells that
it changed.
"""


@dataclass(frozen=True)
class JWKSOptions:
    """
    The options of a C{jwks} entry of C{spec.mtls.tokenValidators}.
    """

    source: str
    ca_certificate: str = ""
    min_refresh_interval_seconds: float = DEFAULT_MIN_REFRESH_INTERVAL_SECONDS
    request_timeout_seconds: float = DEFAULT_REQUEST_TIMEOUT_SECONDS

    @property
    def source_kind(self) -> str:
        """
        L{SOURCE_URL}, L{SOURCE_INLINE} or L{SOURCE_FILE}.
        """
        return source_kind(self.source)


def source_kind(source: str) -> str:
    """
    What C{source} is: a URL, the JWKS itself (JSON or base64 JSON), or a
    file path.
    """
    if source.startswith(("https://", "http://")):
        return SOURCE_URL
    if _inline_jwks(source) is not None:
        return SOURCE_INLINE
    return SOURCE_FILE


def _inline_key_set(source: str) -> KeySet:
    """
    The key set of an inline C{source} (L{SOURCE_INLINE}).

    @raise ValueError: when it is not a usable JWKS.
    """
    data = _inline_jwks(source)
    if data is None:
        raise ValueError("the source is not an inline JWKS")
    return key_set_from_json(data)


def _inline_jwks(source: str) -> bytes | None:
    text = source.strip()
    if text.startswith("{"):
        return text.encode("utf-8")
    try:
        decoded = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None
    return decoded if decoded.lstrip().startswith(b"{") else None


def parse_jwks_options(options: Iterable[tuple[str, str]], field: str) -> JWKSOptions:
    """
    Check the options of a C{jwks} validator entry.

    @param options: C{(key, value)} pairs, as L{TokenValidatorConfig} holds.
    @param field: the entry's YAML path, for errors.
    @return: L{JWKSOptions}.
    @raise ConfigError: naming the option that is missing or wrong.
    """
    values = dict(options)
    for key in values:
        if key not in KNOWN_OPTIONS:
            raise ConfigError(
                f"{field}.options.{key}",
                f"unknown option (known: {', '.join(KNOWN_OPTIONS)})",
            )
    source = values.get(OPTION_SOURCE, "").strip()
    if not source:
        raise ConfigError(f"{field}.options.{OPTION_SOURCE}", "is required")
    kind = source_kind(source)
    if kind == SOURCE_INLINE:
        try:
            _inline_key_set(source)
        except ValueError as e:
            raise ConfigError(f"{field}.options.{OPTION_SOURCE}", str(e)) from None
    ca_certificate = values.get(OPTION_CA_CERTIFICATE, "")
    if ca_certificate and kind != SOURCE_URL:
        raise ConfigError(
            f"{field}.options.{OPTION_CA_CERTIFICATE}",
            "applies to a URL source only",
        )
    durations: dict[str, float] = {}
    for key, default in (
        (OPTION_MIN_REFRESH_INTERVAL, DEFAULT_MIN_REFRESH_INTERVAL_SECONDS),
        (OPTION_REQUEST_TIMEOUT, DEFAULT_REQUEST_TIMEOUT_SECONDS),
    ):
        text = values.get(key, "")
        if not text:
            durations[key] = default
            continue
        seconds = parse_go_duration(text, f"{field}.options.{key}").total_seconds()
        if seconds <= 0:
            raise ConfigError(
                f"{field}.options.{key}", f"must be positive, not {text!r}"
            )
        durations[key] = seconds
    if durations[OPTION_MIN_REFRESH_INTERVAL] < MIN_MIN_REFRESH_INTERVAL_SECONDS:
        raise ConfigError(
            f"{field}.options.{OPTION_MIN_REFRESH_INTERVAL}",
            f"must be at least {MIN_MIN_REFRESH_INTERVAL_SECONDS:g}s",
        )
    return JWKSOptions(
        source=source,
        ca_certificate=ca_certificate,
        min_refresh_interval_seconds=durations[OPTION_MIN_REFRESH_INTERVAL],
        request_timeout_seconds=durations[OPTION_REQUEST_TIMEOUT],
    )


@implementer(IIdentityValidator)
class JWKSValidator(Service):
    """
    The JWKS validator, and the service that keeps its key set.

    @param reactor: the reactor (clock, thread pool, connections).
    @param options: L{JWKSOptions}.
    @param sentry_audience: Sentry's SPIFFE ID, the C{aud} tokens must hold.
    @param http_agent: an L{IAgent} every fetch uses (tests with an
        in-memory server), or None: then each fetch makes its own
        connections (L{JWKSFetcher}), trusting C{caCertificate}, read in a
        thread before the first fetch, when given.
    @param read_file: the credential reader (a file source, and a
        C{caCertificate} path).
    @param file_work: the L{BoundedFileWork} that runs file reads (a daemon
        thread with a time bound per read by default).
    """

    name = VALIDATOR_JWKS
    _log = Logger()

    def __init__(
        self,
        reactor: IJWKSReactor,
        options: JWKSOptions,
        sentry_audience: str,
        http_agent: IAgent | None = None,
        read_file: Callable[[str], bytes] = read_credential,
        file_work: BoundedFileWork | None = None,
    ) -> None:
        self._reactor = reactor
        self._file_work = (
            file_work if file_work is not None else BoundedFileWork(reactor)
        )
        self.options = options
        self._sentry_audience = sentry_audience
        self._http_agent = http_agent
        self._fetcher: JWKSFetcher | None = None
        self._read_file = read_file
        self._kind = options.source_kind
        self.needs_reactor = self._kind == SOURCE_URL
        self.key_set: KeySet | None = None
        self.loads = 0
        self._last_fetch: float | None = None
        self._fetching: defer.Deferred[Any] | None = None
        self._waiters: list[defer.Deferred[bool]] = []
        self._call: IDelayedCall | None = None
        self._retry_seconds = FETCH_RETRY_INITIAL_SECONDS
        self._file_stamp: FileStamp | None = None

    @property
    def ready(self) -> bool:
        """
        Whether a key set has loaded (healthz is 503 until then).
        """
        return self.key_set is not None

    # IService

    def startService(self) -> None:
        super().startService()
        if self._kind == SOURCE_INLINE:
            self._install(_inline_key_set(self.options.source))
        elif self._kind == SOURCE_FILE:
            self._check_file()
        else:
            self._fetch_and_reschedule()

    def stopService(self) -> None:
        super().stopService()
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        if self._fetching is not None:
            self._fetching.cancel()

    # IIdentityValidator

    def validate(
        self, request: SignRequest, deadline: float | None = None
    ) -> "defer.Deferred[CallerIdentity]":
        """
        Check the caller's token (see the module's docstring).

        With a file or inline source, it runs in the calling thread and the
        returned Deferred has fired.  With a URL source it runs on the
        reactor thread, and may wait (until C{deadline}, a reactor time, and
        at most C{requestTimeout}) for a refetch of the key set when the
        token names an unknown C{kid}.
        """
        try:
            subject = self._check(request)
            key_set = self._loaded_key_set()
            verify_token(
                request.token,
                key_set,
                self._sentry_audience,
                subject.spiffe_id,
                self._reactor.seconds(),
            )
            return defer.succeed(subject)
        except ValidationError:
            return defer.fail()
        except UnknownKeyID as unknown:
            if not self.needs_reactor or not self._may_refresh():
                return defer.fail(self._unknown(unknown.kid))
            return self._refresh_then_verify(request, subject, unknown.kid, deadline)

    def _check(self, request: SignRequest) -> CallerIdentity:
        if not request.token:
            raise ValidationError(NO_TOKEN)
        if self.key_set is None:
            raise ValidationError(NOT_READY)
        return check_request(request)

    def _loaded_key_set(self) -> KeySet:
        """
        The key set in use (once loaded, one always is).

        @raise ValidationError: L{NOT_READY} before one has loaded.
        """
        if self.key_set is None:
            raise ValidationError(NOT_READY)
        return self.key_set

    @staticmethod
    def _unknown(kid: str) -> ValidationError:
        return ValidationError(
            f"{VALIDATION_FAILED}: no key with kid {kid!r} in the key set"
        )

    def _may_refresh(self) -> bool:
        return (
            self._fetching is not None
            or self._last_fetch is None
            or self._reactor.seconds() - self._last_fetch
            >= self.options.min_refresh_interval_seconds
        )

    def _refresh_then_verify(
        self,
        request: SignRequest,
        subject: CallerIdentity,
        kid: str,
        deadline: float | None,
    ) -> "defer.Deferred[CallerIdentity]":
        d = self._fetch()
        wait = self.options.request_timeout_seconds
        if deadline is not None:
            wait = max(0.0, min(wait, deadline - self._reactor.seconds()))
        waited: defer.Deferred[None] = defer.Deferred()

        def wake(_: object = None) -> None:
            if not waited.called:
                waited.callback(None)

        d.addBoth(wake)
        timer = self._reactor.callLater(wait, wake)

        def verify(_: object) -> CallerIdentity:
            if timer.active():
                timer.cancel()
            try:
                verify_token(
                    request.token,
                    self._loaded_key_set(),
                    self._sentry_audience,
                    subject.spiffe_id,
                    self._reactor.seconds(),
                )
            except UnknownKeyID:
                raise self._unknown(kid) from None
            return subject

        return waited.addCallback(verify)

    # Loading

    def _install(self, key_set: KeySet) -> None:
        previous = self.key_set
        first = previous is None
        changed = previous is None or key_set.raw != previous.raw
        self.key_set = key_set
        self.loads += 1
        if not changed:
            return
        self._log.info(
            "jwks validator: {what} key set with {count} keys",
            what="loaded the" if first else "loaded a new",
            count=len(key_set.keys),
        )
        if key_set.weak_kids:
            self._log.warn(
                "jwks validator: left out {count} RSA keys under {bits} bits"
                " (kid {kids}); the rest of the key set is in use",
                count=len(key_set.weak_kids),
                bits=MIN_RSA_KEY_BITS,
                kids=printable_cut(
                    ", ".join(repr(kid) for kid in key_set.weak_kids),
                    MAX_LOGGED_KIDS_CHARACTERS,
                ),
            )

    def _install_fetched(self, body: bytes) -> bool:
        """
        Install the key set a fetch brought.

        @return: True.
        @raise JWKSFetchError: "refused: <why>" when it is not a usable JWKS.
        """
        try:
            key_set = key_set_from_json(body)
        except ValueError as e:
            raise JWKSFetchError(str(e), FETCH_REFUSED) from None
        self._install(key_set)
        return True

    def _fetcher_for(self, ca_pem: bytes | None) -> JWKSFetcher:
        """
        The L{JWKSFetcher} of the source, trusting the certificates in
        C{ca_pem} (the system's roots when None).
        """
        return JWKSFetcher(
            self._reactor,
            self.options.source,
            self.options.request_timeout_seconds,
            MAX_JWKS_BYTES,
            tls_policy=tls_policy_for(ca_pem),
            agent=self._http_agent,
        )

    def _ca_pem(self) -> bytes | None:
        """
        In a thread: C{caCertificate}'s PEM (read through the credential
        reader when it is a path), or None.
        """
        ca = self.options.ca_certificate
        if not ca:
            return None
        if "-----BEGIN" in ca:
            return ca.encode("utf-8")
        return self._read_file(ca)

    def refresh(self) -> "defer.Deferred[bool]":
        """
        Fetch a URL source's key set now (sharing a fetch under way).

        @return: a Deferred firing with True when a key set was installed.
        """
        return self._fetch()

    def _fetch_and_reschedule(self) -> None:
        self._call = None
        if not self.running:
            return
        d = self._fetch()

        def done(ok: bool) -> None:
            if not self.running:
                return
            periodic = max(
                PERIODIC_REFRESH_SECONDS, self.options.min_refresh_interval_seconds
            )
            if ok:
                self._retry_seconds = FETCH_RETRY_INITIAL_SECONDS
                delay = periodic
            elif self.key_set is None:
                delay = self._retry_seconds
                self._retry_seconds = min(
                    self._retry_seconds * 2, FETCH_RETRY_MAX_SECONDS
                )
            else:
                delay = self.options.min_refresh_interval_seconds
            self._call = self._reactor.callLater(delay, self._fetch_and_reschedule)

        d.addCallback(done)

    def _fetch(self) -> "defer.Deferred[bool]":
        """
        Fetch the key set once (concurrent callers share one fetch).

        @return: a Deferred that fires with True when a key set was
            installed, False otherwise; it never fails.
        """
        waiter: defer.Deferred[bool] = defer.Deferred()
        self._waiters.append(waiter)
        if self._fetching is not None:
            return waiter
        self._last_fetch = self._reactor.seconds()
        # One Deferred, given a new name at each step as its result changes.
        fetcher_ready: defer.Deferred[JWKSFetcher]
        if self._fetcher is None:
            ca_read = self._file_work.run(
                "the jwks caCertificate", CREDENTIAL_READ_TIMEOUT_SECONDS, self._ca_pem
            )
            fetcher_ready = ca_read.addCallback(self._fetcher_for)

            def keep(fetcher: JWKSFetcher) -> JWKSFetcher:
                self._fetcher = fetcher
                return fetcher

            fetcher_ready.addCallback(keep)
        else:
            fetcher_ready = defer.succeed(self._fetcher)
        fetched = fetcher_ready.addCallback(lambda fetcher: fetcher.fetch())
        d = fetched.addCallback(self._install_fetched)

        def failed(failure: Failure) -> bool:
            if not self.running and (
                failure.check(defer.CancelledError)
                or (
                    isinstance(failure.value, JWKSFetchError)
                    and failure.value.why == FETCH_CANCELLED
                )
            ):
                # stopService cancelled it, perhaps while the caCertificate
                # was still being read: nothing to say.
                return False
            if failure.check(JWKSFetchError):
                what = str(failure.value)
            else:
                name = type(failure.value).__name__
                what = f"failed: {failure.getErrorMessage() or name}"
            self._log.error(
                "JWKS fetch from {url} {what}; {kept}",
                url=self.options.source,
                what=what,
                kept="keeping the previous key set" if self.key_set else "not ready",
            )
            return False

        settled = d.addErrback(failed)

        done: list[bool] = []

        def finished(result: bool | Failure) -> None:
            done.append(True)
            self._fetching = None
            waiters, self._waiters = self._waiters, []
            for each in waiters:
                each.callback(result)

        settled.addBoth(finished)
        if not done:
            self._fetching = settled
        return waiter

    def _check_file(self) -> None:
        self._call = None
        if not self.running:
            return
        d = self._file_work.run(
            self.options.source, CREDENTIAL_READ_TIMEOUT_SECONDS, self._read_if_changed
        )

        def loaded(result: tuple[FileStamp, KeySet] | None) -> None:
            if result is not None:
                stamp, key_set = result
                self._file_stamp = stamp
                self._install(key_set)

        def failed(failure: Failure) -> None:
            self._log.error(
                "jwks validator: cannot load the key set from {path}; {kept}: {error}",
                path=self.options.source,
                kept="keeping the previous one" if self.key_set else "not ready",
                error=failure.getErrorMessage(),
            )

        d.addCallbacks(loaded, failed)

        def again(_: object) -> None:
            if self.running:
                self._call = self._reactor.callLater(
                    JWKS_FILE_CHECK_INTERVAL_SECONDS, self._check_file
                )

        d.addBoth(again)

    def _read_if_changed(self) -> tuple[FileStamp, KeySet] | None:
        """
        In a thread: the file's stamp and key set when it changed since the
        last load, else None.

        @raise BundleError: when it cannot be read.
        @raise ValueError: when it is not a usable JWKS.
        """
        path = self.options.source
        try:
            info = os.stat(path)
        except OSError as e:
            raise BundleError(path, f"cannot be read: {e.strerror}") from None
        stamp = (info.st_ino, info.st_size, info.st_mtime_ns)
        if stamp == self._file_stamp:
            return None
        return stamp, key_set_from_json(self._read_file(path))


def jwks_validator_for(
    config: "SentryConfig", reactor: IJWKSReactor
) -> JWKSValidator | None:
    """
    The JWKS validator C{config}'s Configuration asks for
    (C{spec.mtls.tokenValidators} naming C{jwks}), or None.

    @raise ConfigError: when its options are wrong.
    """
    for index, entry in enumerate(config.mtls.token_validators):
        if entry.name == "jwks":
            options = parse_jwks_options(
                entry.options, f"spec.mtls.tokenValidators[{index}]"
            )
            sentry_id = (
                f"spiffe://{config.trust_domain}/ns/{config.namespace}/dapr-sentry"
            )
            return JWKSValidator(reactor, options, sentry_id)
    return None


@implementer(IConfigurationSource)
class JWKSFromConfiguration(MultiService):
    """
    Kubernetes mode reads the Configuration when the authority starts,
    after the validators were built: when it names a C{jwks} token
    validator, this adds one then, beside KUBERNETES (which stays the
    default, as in Dapr), and runs it as its child service.  healthz waits
    for its key set through L{ready}.

    @param inner: the L{IConfigurationSource} that reads the Configuration.
    @param reactor: the reactor the validator runs on.
    @param validators: the validators by enum number, shared with the
        authority, which builds its servicer once the Configuration is
        resolved.
    @param validator_for: builds the validator from a resolved config
        (L{jwks_validator_for}); tests pass one of their own.
    """

    def __init__(
        self,
        inner: IConfigurationSource,
        reactor: IJWKSReactor,
        validators: MutableMapping[int, Any],
        validator_for: Callable[
            ["SentryConfig", IJWKSReactor], JWKSValidator | None
        ] = jwks_validator_for,
    ) -> None:
        super().__init__()
        self._inner = inner
        self._reactor = reactor
        self._validators = validators
        self._validator_for = validator_for
        self.validator: JWKSValidator | None = None

    @property
    def ready(self) -> bool:
        """
        True without a JWKS validator, else once its key set has loaded.
        """
        return self.validator is None or self.validator.ready

    def resolve(self, config: "SentryConfig") -> "defer.Deferred[SentryConfig]":
        d = self._inner.resolve(config)

        def add(resolved: "SentryConfig") -> "SentryConfig":
            if self.validator is None:
                validator = self._validator_for(resolved, self._reactor)
                if validator is not None:
                    self.validator = validator
                    self._validators[VALIDATOR_JWKS] = validator
                    validator.setServiceParent(self)
            return resolved

        return d.addCallback(add)
