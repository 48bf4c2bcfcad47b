# -*- test-case-name: tests.test_report -*-
"""
The settings in effect, said once at start.

An operator's first question after a start is "what is it actually doing?":
which certificate lifetime, which clock skew, which validators.  The flags,
the Configuration (a file, or a resource read at start in kubernetes mode)
and the mode decide it together, so the answer is logged once the
Configuration is resolved, in one line.
"""

from collections.abc import Iterable
from typing import TYPE_CHECKING

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger
from zope.interface import implementer

from sentry_tx.durations import format_go_duration
from sentry_tx.interfaces import IConfigurationSource

if TYPE_CHECKING:
    from sentry_tx.config import SentryConfig


def _validator_name(number: int) -> str:
    from sentry_tx.identity.caller import VALIDATOR_NAMES

    return VALIDATOR_NAMES.get(number, str(number))


def describe_settings(
    config: "SentryConfig", validators: Iterable[int], default_validator: int | None
) -> dict[str, str]:
    """
    The fields of the start-up line: mode, TTL, clock skew, validators and
    the default one, trust domain and namespace.

    @param config: the resolved L{SentryConfig}.
    @param validators: the enabled validators' TokenValidator numbers.
    @param default_validator: the number used for UNKNOWN, or None.
    @rtype: L{dict}
    """
    names = sorted(_validator_name(number) for number in validators)
    return {
        "mode": config.mode,
        "workload_cert_ttl": format_go_duration(config.mtls.workload_cert_ttl),
        "allowed_clock_skew": format_go_duration(config.mtls.allowed_clock_skew),
        "validators": ", ".join(names) if names else "none",
        "default_validator": (
            "none (callers must name one)"
            if default_validator is None
            else _validator_name(default_validator)
        ),
        "trust_domain": config.trust_domain,
        "namespace": config.namespace,
    }


@implementer(IConfigurationSource)
class SettingsReport:
    """
    An L{IConfigurationSource} that resolves through another one (or takes
    the configuration as it is, in standalone mode, where the file was read
    with the flags) and logs the settings in effect, once.

    @param source: the L{IConfigurationSource} to resolve through, or None.
    @param validators: the enabled validators' TokenValidator numbers.
    @param default_validator: the number used for UNKNOWN, or None.
    """

    _log = Logger()

    def __init__(
        self,
        source: IConfigurationSource | None,
        validators: Iterable[int],
        default_validator: int | None,
    ) -> None:
        self._source = source
        self._validators = tuple(validators)
        self._default_validator = default_validator
        self._reported = False

    def resolve(self, config: "SentryConfig") -> "Deferred[SentryConfig]":
        """
        Resolve C{config} through the wrapped source, then log it.
        """
        if self._source is None:
            d: Deferred[SentryConfig] = maybeDeferred(lambda: config)
        else:
            d = maybeDeferred(self._source.resolve, config)
        d.addCallback(self._report)
        return d

    def _report(self, config: "SentryConfig") -> "SentryConfig":
        if not self._reported:
            self._reported = True
            self._log.info(
                "in effect: mode {mode}; workload certificates live"
                " {workload_cert_ttl}, allowed clock skew {allowed_clock_skew};"
                " validators {validators}, default {default_validator};"
                " trust domain {trust_domain}, namespace {namespace}",
                **describe_settings(
                    config, self._validators, self._default_validator
                ),
            )
        return config
