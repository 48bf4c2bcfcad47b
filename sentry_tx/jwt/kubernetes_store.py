# -*- test-case-name: tests.test_jwt_kube -*-
"""
The JWT key pair in Kubernetes (kubernetes mode): keys C{jwt.key} and
C{jwks.json} of the Secret C{dapr-trust-bundle} (the base names of
C{--jwt-key-filename} and C{--jwks-filename}), and C{jwks.json} published in
the ConfigMap C{dapr-trust-bundle} too, as Dapr does.

It runs after the X.509 store (the authority loads the bundle first), which
has created the Secret and the ConfigMap.  Racing replicas end with one key
pair as they end with one bundle: every write is conditional on the
object's C{resourceVersion}, and the loser of a 409 reads again and uses
what the winner wrote.  A Secret holding one of the two keys without the
other is refused; nothing is ever overwritten.
"""

import base64
import binascii
import os
from collections.abc import Generator, Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IReactorThreads
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from sentry_tx.ca.kubernetes_store import (
    MAX_WRITE_ATTEMPTS,
    TRUST_BUNDLE_NAME,
    KubernetesTrustStore,
    _check_secret_key,
)
from sentry_tx.config import DEFAULT_NAMESPACE, SentryConfig
from sentry_tx.errors import BundleError
from sentry_tx.jwt.material import (
    JWTMaterial,
    generate_jwt_material,
    load_jwt_material,
)
from sentry_tx.jwt.store import check_generation_algorithm
from sentry_tx.kube.errors import KubernetesAPIError, KubernetesUnavailableError
from sentry_tx.kube.paths import core_path

if TYPE_CHECKING:
    from sentry_tx.kube.client import KubernetesClient


class KubernetesJWTStore:
    """
    The JWT key pair in the Secret (and its JWKS in the ConfigMap)
    C{dapr-trust-bundle}.

    @param reactor: provides C{getThreadPool} (key generation and checks are
        CPU work).
    @param client: the L{sentry_tx.kube.client.KubernetesClient}.
    @param namespace: sentry_tx's namespace.
    @param algorithm: C{--jwt-signing-algorithm}.
    @param key_id: C{--jwt-key-id}, or None.
    @param keys: the Secret keys of the private key and of the JWKS.
    """

    watch_directories = ()
    _log = Logger()

    def __init__(
        self,
        reactor: IReactorThreads,
        client: "KubernetesClient",
        namespace: str,
        algorithm: str,
        key_id: str | None,
        keys: Sequence[str] = ("jwt.key", "jwks.json"),
        name: str = TRUST_BUNDLE_NAME,
    ) -> None:
        self._reactor = reactor
        self._client = client
        self._namespace = namespace
        self._algorithm = algorithm
        self._key_id = key_id
        self._keys = tuple(_check_secret_key(key) for key in keys)
        self._name = name
        self._secret_path = core_path(namespace, "secrets", name)
        self._config_map_path = core_path(namespace, "configmaps", name)

    @classmethod
    def for_config(
        cls, reactor: IReactorThreads, client: "KubernetesClient", config: SentryConfig
    ) -> "KubernetesJWTStore":
        """
        The store for a L{SentryConfig}'s flags.
        """
        return cls(
            reactor,
            client,
            config.namespace or DEFAULT_NAMESPACE,
            config.jwt_signing_algorithm,
            config.jwt_key_id or None,
            keys=(
                os.path.basename(config.jwt_key_filename),
                os.path.basename(config.jwks_filename),
            ),
        )

    def _source(self, key: str) -> str:
        return f"Secret {self._namespace}/{self._name} key '{key}'"

    @inlineCallbacks
    def load_or_generate(
        self, now: datetime | None = None
    ) -> Generator[Deferred[Any], Any, JWTMaterial]:
        """
        Load the pair from the Secret; generate and store one when the
        Secret holds neither key; then publish the JWKS in the ConfigMap.

        @return: Deferred firing with a L{JWTMaterial}.
        """
        for _attempt in range(MAX_WRITE_ATTEMPTS):
            secret = yield self._get(self._secret_path, "Secret")
            parts = self._parts(secret)
            if parts:
                material: JWTMaterial = yield self._load(parts)
                break
            check_generation_algorithm(self._algorithm, self._source(self._keys[0]))
            key_pem, jwks_json = yield deferToThreadPool(
                self._reactor,
                self._reactor.getThreadPool(),
                generate_jwt_material,
                self._algorithm,
                self._key_id,
            )
            written = yield self._update(
                secret,
                self._secret_path,
                "Secret",
                {
                    self._keys[0]: base64.b64encode(key_pem).decode("ascii"),
                    self._keys[1]: base64.b64encode(jwks_json).decode("ascii"),
                },
            )
            if written:
                material = yield self._load(
                    dict(zip(self._keys, (key_pem, jwks_json), strict=False))
                )
                self._log.info(
                    "generated a new JWT signing key and stored it in Secret"
                    " {namespace}/{name}",
                    namespace=self._namespace,
                    name=self._name,
                )
                break
            self._log.info("another replica stored a JWT key pair first; using it")
        else:
            raise BundleError(
                self._source(self._keys[0]),
                f"the Secret kept changing while a JWT key pair was stored"
                f" ({MAX_WRITE_ATTEMPTS} attempts)",
            )
        yield self._publish_jwks(material.jwks_json)
        return material

    @inlineCallbacks
    def load(
        self, now: datetime | None = None
    ) -> Generator[Deferred[Any], Any, JWTMaterial]:
        """
        Load the pair from the Secret; never writes.
        """
        secret = yield self._get(self._secret_path, "Secret")
        parts = self._parts(secret)
        if not parts:
            raise BundleError(
                f"Secret {self._namespace}/{self._name}", "holds no JWT key pair"
            )
        material: JWTMaterial = yield self._load(parts)
        return material

    def _load(self, parts: Mapping[str, bytes]) -> Deferred[JWTMaterial]:
        return deferToThreadPool(
            self._reactor,
            self._reactor.getThreadPool(),
            load_jwt_material,
            parts[self._keys[0]],
            parts[self._keys[1]],
            self._algorithm,
            self._key_id,
            (self._source(self._keys[0]), self._source(self._keys[1])),
        )

    @inlineCallbacks
    def _get(self, path: str, kind: str) -> Generator[Deferred[Any], Any, Any]:
        description = f"{kind} {self._namespace}/{self._name}"
        try:
            document = yield self._client.get(path)
        except (KubernetesAPIError, KubernetesUnavailableError) as e:
            raise BundleError(description, f"cannot be read: {e}") from None
        return document

    def _parts(self, secret: Any) -> dict[str, bytes]:
        """
        The two keys' values, decoded; empty when the Secret holds neither.

        @raise BundleError: when it holds one without the other.
        """
        data = (secret or {}).get("data") or {}
        if not isinstance(data, dict):
            raise BundleError(
                f"Secret {self._namespace}/{self._name}", "its data is not a mapping"
            )
        parts: dict[str, bytes] = {}
        for key in self._keys:
            if data.get(key):
                try:
                    parts[key] = base64.b64decode(str(data[key]), validate=True)
                except (binascii.Error, ValueError):
                    raise BundleError(
                        self._source(key), "is not valid base64"
                    ) from None
        if len(parts) == 1:
            (present,) = parts
            (missing,) = [key for key in self._keys if key != present]
            raise BundleError(
                self._source(missing),
                f"missing, while '{present}' is present; refusing to generate a"
                " new JWT key pair, which would overwrite existing credentials"
                " (supply both keys, or remove both to have a new pair"
                " generated)",
            )
        return parts

    @inlineCallbacks
    def _update(
        self, document: Any, path: str, kind: str, data: Mapping[str, str]
    ) -> Generator[Deferred[Any], Any, bool]:
        """
        Merge C{data} into the object's data, conditionally on its
        C{resourceVersion}.

        @return: Deferred firing with True when written, False on 409.
        """
        description = f"{kind} {self._namespace}/{self._name}"
        KubernetesTrustStore._require_resource_version(document, description)
        updated = dict(document)
        updated["data"] = {**(document.get("data") or {}), **data}
        try:
            yield self._client.replace(path, updated)
        except KubernetesAPIError as e:
            if e.is_conflict:
                return False
            raise BundleError(description, f"cannot be written: {e}") from None
        except KubernetesUnavailableError as e:
            raise BundleError(description, f"cannot be written: {e}") from None
        return True

    @inlineCallbacks
    def _publish_jwks(self, jwks_json: bytes) -> Generator[Deferred[Any], Any, None]:
        """
        Make the ConfigMap's JWKS key equal to C{jwks_json}.
        """
        text = jwks_json.decode("utf-8", "replace")
        key = self._keys[1]
        for _attempt in range(MAX_WRITE_ATTEMPTS):
            config_map = yield self._get(self._config_map_path, "ConfigMap")
            data = (config_map or {}).get("data") or {}
            if data.get(key) == text:
                return
            written = yield self._update(
                config_map, self._config_map_path, "ConfigMap", {key: text}
            )
            if written:
                self._log.info(
                    "published the JWKS in ConfigMap {namespace}/{name} key {key}",
                    namespace=self._namespace,
                    name=self._name,
                    key=key,
                )
                return
        raise BundleError(
            f"ConfigMap {self._namespace}/{self._name}",
            "kept changing while the JWKS was published"
            f" ({MAX_WRITE_ATTEMPTS} attempts)",
        )
