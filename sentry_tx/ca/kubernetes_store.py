# -*- test-case-name: tests.test_kube_store,tests.test_jwt_kube -*-
"""
The trust bundle kept in Kubernetes (kubernetes mode).

L{KubernetesTrustStore} keeps the bundle in the Secret C{dapr-trust-bundle}
of sentry_tx's namespace (keys C{ca.crt}, C{issuer.crt}, C{issuer.key}, or
the base names of the C{--issuer-*-filename} flags) and publishes the trust
anchors in the ConfigMap C{dapr-trust-bundle} (key C{ca.crt}), which the
sidecar injector hands to every sidecar.

Several replicas may start at once; they must end with one bundle, never
two.  Every write is conditional, and losing a race means using what the
winner wrote:

  - no Secret: generate a bundle and create the Secret (POST); on 409
    AlreadyExists another replica created it first: read it again;
  - a Secret holding none of the three keys (as a Helm chart or the sample
    manifests create it): generate a bundle and update the Secret with its
    C{metadata.resourceVersion} (PUT); on 409 Conflict another replica wrote
    first: read it again;
  - a Secret holding all three: load and verify them;
  - a Secret holding some but not all, or parts that do not verify: refuse
    to start (L{BundleError} naming the Secret key and the problem).  Unlike
    Dapr, sentry_tx never overwrites an operator's credentials.

A key whose value is empty counts as absent (it holds no credentials).
Other keys of the Secret are kept as they are.

Then the ConfigMap's C{ca.crt} is made equal to the Secret's (byte for
byte): created if the ConfigMap is missing, updated with its
C{resourceVersion} if it differs, and read again after a 409.

L{KubernetesTrustStore.load} reads and verifies the Secret only; it writes
nothing.
"""

import base64
import binascii
from collections.abc import Generator, Iterable
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IReactorThreads
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from zope.interface import implementer

from sentry_tx.ca.bundle import (
    KEY_TYPE_ECDSA_P256,
    KEY_TYPES,
    GeneratedBundle,
    TrustBundle,
    generate_bundle,
    load_bundle,
)
from sentry_tx.errors import BundleError, ConfigError
from sentry_tx.interfaces import ITrustStore
from sentry_tx.kube.errors import KubernetesAPIError, KubernetesUnavailableError
from sentry_tx.kube.paths import core_path

if TYPE_CHECKING:
    from sentry_tx.config import SentryConfig
    from sentry_tx.kube.client import KubernetesClient

TRUST_BUNDLE_NAME = "dapr-trust-bundle"
"""
The name of the Secret and of the ConfigMap, as Dapr's.
"""

ANCHORS_CONFIG_MAP_KEY = "ca.crt"
"""
The key of the trust anchors in the ConfigMap, as Dapr's.
"""

MAX_WRITE_ATTEMPTS = 5
"""
How many times a write that lost a race (409) is retried after reading
the object again, before the start fails.
"""

_SECRET_KEY_CHARACTERS = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._"
)

_LABELS = {"app": "dapr-sentry", "app.kubernetes.io/part-of": "dapr"}


def _check_secret_key(key: str) -> str:
    """
    @raise ConfigError: when C{key} cannot be a Secret data key.
    """
    if not key or key in (".", "..") or not set(key) <= _SECRET_KEY_CHARACTERS:
        raise ConfigError(
            "--issuer-*-filename",
            f"{key!r} cannot be a key of the Secret {TRUST_BUNDLE_NAME}"
            " (letters, digits, '-', '_' and '.')",
        )
    return key


@implementer(ITrustStore)
class KubernetesTrustStore:
    """
    A trust bundle in the Secret and ConfigMap C{dapr-trust-bundle}.

    @param reactor: provides C{getThreadPool}: generating and verifying a
        bundle are CPU work and run in the reactor's thread pool.
    @param client: the L{sentry_tx.kube.client.KubernetesClient}.
    @param namespace: sentry_tx's namespace, where both objects live.
    @param trust_domain: the trust domain of a generated bundle.
    @param allowed_clock_skew: how far before now a generated bundle starts
        (replaced by L{use_config} once the Configuration is read).
    @param keys: the Secret keys of the anchors, issuer chain and key.
    @param key_type: the key type of a generated bundle.
    @param name: the name of the Secret and the ConfigMap.
    @param watch_directories: directories where the same Secret is mounted
        (C{--issuer-credentials} in a pod): a change there is the kubelet
        projecting a new Secret, and makes the watcher reload the bundle
        from the API server.  Empty when nothing is mounted.
    @param ca_ttl: the life of a generated root and issuer (C{--ca-ttl},
        a L{timedelta}); 365 days by default.
    @raise ConfigError: when a key cannot be a Secret key.
    @raise ValueError: for an unknown C{key_type}.
    """

    _log = Logger()

    def __init__(
        self,
        reactor: IReactorThreads,
        client: "KubernetesClient",
        namespace: str,
        trust_domain: str,
        allowed_clock_skew: timedelta,
        keys: Iterable[str] = ("ca.crt", "issuer.crt", "issuer.key"),
        key_type: str = KEY_TYPE_ECDSA_P256,
        name: str = TRUST_BUNDLE_NAME,
        watch_directories: Iterable[str] = (),
        ca_ttl: timedelta | None = None,
    ) -> None:
        if key_type not in KEY_TYPES:
            raise ValueError(
                f"unknown key type {key_type!r}; expected one of {KEY_TYPES}"
            )
        self.watch_directories = tuple(watch_directories)
        self._reactor = reactor
        self._client = client
        self._namespace = namespace
        self._trust_domain = trust_domain
        self._allowed_clock_skew = allowed_clock_skew
        self._keys = tuple(_check_secret_key(key) for key in keys)
        if len(set(self._keys)) != len(self._keys):
            raise ConfigError(
                "--issuer-*-filename",
                f"the three parts need three different Secret keys, not {self._keys}",
            )
        self._key_type = key_type
        self._ca_ttl = ca_ttl
        self._name = name
        self._secret_path = core_path(namespace, "secrets", name)
        self._config_map_path = core_path(namespace, "configmaps", name)

    @property
    def secret_description(self) -> str:
        """
        C{Secret <namespace>/<name>}, as messages name it.
        """
        return f"Secret {self._namespace}/{self._name}"

    @property
    def config_map_description(self) -> str:
        """
        C{ConfigMap <namespace>/<name>}, as messages name it.
        """
        return f"ConfigMap {self._namespace}/{self._name}"

    def use_config(self, config: "SentryConfig") -> None:
        """
        Take the allowed clock skew of the resolved configuration (for a
        bundle generated afterwards).

        @param config: a L{sentry_tx.config.SentryConfig}.
        """
        self._allowed_clock_skew = config.mtls.allowed_clock_skew

    # ITrustStore

    @inlineCallbacks
    def load_or_generate(
        self, now: datetime
    ) -> Generator[Deferred[Any], Any, TrustBundle]:
        """
        Load the bundle from the Secret, generating and storing one when the
        Secret holds none; then publish its anchors in the ConfigMap.

        @param now: an aware L{datetime.datetime}.
        @return: Deferred firing with a L{TrustBundle}, or failing with
            L{BundleError} (or L{ConfigError} when the API connection
            settings are wrong).
        """
        for _attempt in range(MAX_WRITE_ATTEMPTS):
            secret: dict[str, Any] | None = yield self._read_secret()
            parts = self._parts(secret)
            if parts:
                bundle: TrustBundle = yield self._load_parts(parts, now)
                anchors_pem = parts[self._keys[0]]
                break
            generated: GeneratedBundle = yield deferToThreadPool(
                self._reactor,
                self._reactor.getThreadPool(),
                generate_bundle,
                self._trust_domain,
                self._namespace,
                now,
                self._allowed_clock_skew,
                self._key_type,
                **({} if self._ca_ttl is None else {"lifetime": self._ca_ttl}),
            )
            written: bool = yield self._store_generated(secret, generated)
            if written:
                bundle, anchors_pem = generated.bundle, generated.anchors_pem
                self._log.info(
                    "generated a new trust bundle for trust domain {trust_domain}"
                    " and stored it in {secret}; the root and issuer expire at"
                    " {not_after}",
                    trust_domain=self._trust_domain,
                    secret=self.secret_description,
                    not_after=bundle.chain_not_after.isoformat(),
                )
                break
            self._log.info(
                "another replica stored a trust bundle in {secret} first; using it",
                secret=self.secret_description,
            )
        else:
            raise BundleError(
                self.secret_description,
                f"kept changing while a new trust bundle was stored"
                f" ({MAX_WRITE_ATTEMPTS} attempts)",
            )
        yield self._publish_anchors(anchors_pem)
        return bundle

    @inlineCallbacks
    def load(self, now: datetime) -> Generator[Deferred[Any], Any, TrustBundle]:
        """
        Load and verify the bundle in the Secret; never generates, never
        writes.

        @return: Deferred firing with a L{TrustBundle}, or failing with
            L{BundleError}.
        """
        secret: dict[str, Any] | None = yield self._read_secret()
        parts = self._parts(secret)
        if not parts:
            raise BundleError(
                self.secret_description,
                "holds no trust bundle" if secret is not None else "does not exist",
            )
        bundle: TrustBundle = yield self._load_parts(parts, now)
        return bundle

    # The Secret

    def _source(self, key: str) -> str:
        return f"{self.secret_description} key '{key}'"

    @inlineCallbacks
    def _read_secret(
        self,
    ) -> Generator[Deferred[Any], Any, dict[str, Any] | None]:
        """
        The Secret, or None when it does not exist.

        @raise BundleError: when it cannot be read.
        """
        try:
            secret: dict[str, Any] = yield self._client.get(self._secret_path)
        except KubernetesAPIError as e:
            if e.is_not_found:
                return None
            raise BundleError(self.secret_description, f"cannot be read: {e}") from None
        except KubernetesUnavailableError as e:
            raise BundleError(self.secret_description, f"cannot be read: {e}") from None
        return secret

    def _parts(self, secret: dict[str, Any] | None) -> dict[str, bytes]:
        """
        The three parts in C{secret}, decoded, as a dict by key; empty when
        it holds none of them.

        @raise BundleError: when it holds some but not all, or a value is not
            base64.
        """
        if secret is None:
            return {}
        data = secret.get("data") or {}
        if not isinstance(data, dict):
            raise BundleError(self.secret_description, "its data is not a mapping")
        parts: dict[str, bytes] = {}
        for key in self._keys:
            value = data.get(key)
            if not value:
                continue
            try:
                parts[key] = base64.b64decode(str(value), validate=True)
            except (binascii.Error, ValueError):
                raise BundleError(self._source(key), "is not valid base64") from None
            if not parts[key]:
                del parts[key]
        if parts and len(parts) < len(self._keys):
            missing = [key for key in self._keys if key not in parts]
            present = [key for key in self._keys if key in parts]
            raise BundleError(
                ", ".join(self._source(key) for key in missing),
                f"missing, while {', '.join(present)}"
                f" {'is' if len(present) == 1 else 'are'} present; refusing to"
                " generate a new trust bundle, which would overwrite existing"
                " credentials (supply all three keys, or remove all of them to"
                " have a new bundle generated)",
            )
        return parts

    def _load_parts(
        self, parts: dict[str, bytes], now: datetime
    ) -> Deferred[TrustBundle]:
        """
        Verify the three parts in the thread pool.

        @return: Deferred firing with a L{TrustBundle}, or failing with
            L{BundleError} naming the Secret key at fault.
        """
        anchors_key, chain_key, key_key = self._keys
        return deferToThreadPool(
            self._reactor,
            self._reactor.getThreadPool(),
            load_bundle,
            parts[anchors_key],
            parts[chain_key],
            parts[key_key],
            now,
            sources=(
                self._source(anchors_key),
                self._source(chain_key),
                self._source(key_key),
            ),
        )

    @inlineCallbacks
    def _store_generated(
        self, secret: dict[str, Any] | None, generated: GeneratedBundle
    ) -> Generator[Deferred[Any], Any, bool]:
        """
        Store a generated bundle: create the Secret when C{secret} is None,
        else update it conditionally on its C{resourceVersion}.

        @return: Deferred firing with True when written, False when another
            writer won the race (409).
        @raise BundleError: for any other failure.
        """
        values = (
            generated.anchors_pem,
            generated.issuer_chain_pem,
            generated.issuer_key_pem,
        )
        encoded = {
            key: base64.b64encode(value).decode("ascii")
            for key, value in zip(self._keys, values, strict=True)
        }
        try:
            if secret is None:
                yield self._client.create(
                    core_path(self._namespace, "secrets"),
                    {
                        "apiVersion": "v1",
                        "kind": "Secret",
                        "metadata": {
                            "name": self._name,
                            "namespace": self._namespace,
                            "labels": dict(_LABELS),
                        },
                        "type": "Opaque",
                        "data": encoded,
                    },
                )
            else:
                updated = dict(secret)
                updated["data"] = {**(secret.get("data") or {}), **encoded}
                self._require_resource_version(secret, self.secret_description)
                yield self._client.replace(self._secret_path, updated)
        except KubernetesAPIError as e:
            if e.is_conflict:
                return False
            raise BundleError(
                self.secret_description, f"cannot store the generated trust bundle: {e}"
            ) from None
        except KubernetesUnavailableError as e:
            raise BundleError(
                self.secret_description, f"cannot store the generated trust bundle: {e}"
            ) from None
        return True

    @staticmethod
    def _require_resource_version(document: dict[str, Any], description: str) -> None:
        """
        @raise BundleError: when C{document} has no C{metadata.resourceVersion}
            (an update without one would not be conditional).
        """
        metadata = document.get("metadata") or {}
        if not metadata.get("resourceVersion"):
            raise BundleError(
                description,
                "has no metadata.resourceVersion; refusing an unconditional update",
            )

    # The ConfigMap

    @inlineCallbacks
    def _publish_anchors(
        self, anchors_pem: bytes
    ) -> Generator[Deferred[Any], Any, None]:
        """
        Make the ConfigMap's C{ca.crt} equal to C{anchors_pem}.

        @raise BundleError: naming the ConfigMap when that cannot be done.
        """
        anchors = anchors_pem.decode("utf-8", "replace")
        description = self.config_map_description
        for _attempt in range(MAX_WRITE_ATTEMPTS):
            try:
                config_map: dict[str, Any] | None = yield self._client.get(
                    self._config_map_path
                )
            except KubernetesAPIError as e:
                if not e.is_not_found:
                    raise BundleError(description, f"cannot be read: {e}") from None
                config_map = None
            except KubernetesUnavailableError as e:
                raise BundleError(description, f"cannot be read: {e}") from None
            try:
                if config_map is None:
                    yield self._client.create(
                        core_path(self._namespace, "configmaps"),
                        {
                            "apiVersion": "v1",
                            "kind": "ConfigMap",
                            "metadata": {
                                "name": self._name,
                                "namespace": self._namespace,
                                "labels": dict(_LABELS),
                            },
                            "data": {ANCHORS_CONFIG_MAP_KEY: anchors},
                        },
                    )
                    self._log.info(
                        "created {config_map} with the trust anchors",
                        config_map=description,
                    )
                    return
                data = config_map.get("data") or {}
                if not isinstance(data, dict):
                    raise BundleError(description, "its data is not a mapping")
                if data.get(ANCHORS_CONFIG_MAP_KEY) == anchors:
                    return
                self._require_resource_version(config_map, description)
                updated = dict(config_map)
                updated["data"] = {**data, ANCHORS_CONFIG_MAP_KEY: anchors}
                yield self._client.replace(self._config_map_path, updated)
                self._log.info(
                    "updated {key} in {config_map} to the trust anchors of {secret}",
                    key=ANCHORS_CONFIG_MAP_KEY,
                    config_map=description,
                    secret=self.secret_description,
                )
                return
            except KubernetesAPIError as e:
                if e.is_conflict:
                    continue
                raise BundleError(
                    description, f"cannot publish the trust anchors: {e}"
                ) from None
            except KubernetesUnavailableError as e:
                raise BundleError(
                    description, f"cannot publish the trust anchors: {e}"
                ) from None
        raise BundleError(
            description,
            f"kept changing while the trust anchors were published"
            f" ({MAX_WRITE_ATTEMPTS} attempts)",
        )
