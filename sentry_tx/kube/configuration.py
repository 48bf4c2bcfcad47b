# -*- test-case-name: tests.test_kube_configuration -*-
"""
Dapr's Configuration resource read through the Kubernetes API: the
C{spec.mtls} settings of kubernetes mode (L{KubernetesConfigurationSource}).
"""

from collections.abc import Callable, Generator, Iterable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.logger import Logger
from zope.interface import implementer

from sentry_tx.config import SentryConfig, mtls_warnings, parse_mtls
from sentry_tx.errors import ConfigError
from sentry_tx.interfaces import IConfigurationSource
from sentry_tx.kube.errors import KubernetesAPIError, KubernetesUnavailableError
from sentry_tx.kube.paths import configuration_path

if TYPE_CHECKING:
    from sentry_tx.kube.client import KubernetesClient


@implementer(IConfigurationSource)
class KubernetesConfigurationSource:
    """
    Reads C{spec.mtls} from the Dapr C{Configuration} named by C{--config}
    in sentry_tx's namespace.  A missing resource, an API error and a wrong
    field all stop the start with a L{ConfigError}: running on defaults the
    operator did not choose would hide the fault.

    @param client: the L{KubernetesClient}.
    @param on_resolved: callables given the completed L{SentryConfig} (the
        trust store takes the clock skew for a generated bundle from it).
    """

    _log = Logger()

    def __init__(
        self,
        client: "KubernetesClient",
        on_resolved: Iterable[Callable[[SentryConfig], object]] = (),
    ) -> None:
        self._client = client
        self._on_resolved = tuple(on_resolved)

    @inlineCallbacks
    def resolve(
        self, config: SentryConfig
    ) -> Generator[Deferred[Any], Any, SentryConfig]:
        """
        Complete C{config} with the resource's C{spec.mtls}.

        @return: Deferred firing with the new L{SentryConfig}, or failing
            with L{ConfigError}.
        """
        name, namespace = config.config, config.namespace
        source = f"Configuration {namespace}/{name}"
        try:
            document = yield self._client.get(configuration_path(namespace, name))
        except KubernetesAPIError as e:
            if e.is_not_found:
                raise ConfigError(
                    "--config",
                    f"{source} not found (create it, or name another with"
                    f" --config): HTTP {e.status} {e.reason}",
                ) from None
            raise ConfigError("--config", f"cannot read {source}: {e}") from None
        except KubernetesUnavailableError as e:
            raise ConfigError("--config", f"cannot read {source}: {e}") from None
        mtls = parse_mtls(document, source)
        for warning in mtls_warnings(document, source):
            # Not "warning": legacy observers take that key for a Python
            # warnings.warn() event.
            self._log.warn("{configuration_warning}", configuration_warning=warning)
        resolved = replace(config, mtls=mtls)
        self._log.info(
            "read {source}: workload certificates live {ttl}, clock skew {skew}",
            source=source,
            ttl=str(mtls.workload_cert_ttl),
            skew=str(mtls.allowed_clock_skew),
        )
        for callback in self._on_resolved:
            callback(resolved)
        return resolved
