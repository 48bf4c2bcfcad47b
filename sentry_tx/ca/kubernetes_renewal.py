# -*- test-case-name: tests.test_kubernetes_renewal -*-
"""
Automatic CA renewal in the Secret C{dapr-trust-bundle} (kubernetes mode):
L{KubernetesRenewalStore}.

The Secret is one object, so each step is one write: a PUT of the whole
Secret, conditional on the C{resourceVersion} it was planned on, with the
five keys C{ca.crt}, C{issuer.crt}, C{issuer.key}, C{issuer.next.crt} and
C{issuer.next.key} as the step leaves them.  Replicas that plan the same
step at once race: one write wins, the others get 409 Conflict, read the
Secret again and plan again (finding the renewal done, they wait), so a
renewal happens once.  After each step, and whenever they differ, the
ConfigMap's C{ca.crt} is made equal to the Secret's (which the sidecar
injector gives new pods).
"""

import base64
from collections.abc import Callable, Generator
from datetime import datetime
from typing import Any, TypeVar, TypeVarTuple

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IReactorThreads
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from zope.interface import implementer

from sentry_tx.ca.kubernetes_store import MAX_WRITE_ATTEMPTS, KubernetesTrustStore
from sentry_tx.ca.renewal import (
    ACTION_OFF,
    PARTS,
    WRITING_ACTIONS,
    RenewalSettings,
    RenewalState,
    StepResult,
    StepWrites,
    next_path,
    plan,
    read_state,
    step_writes,
)
from sentry_tx.errors import BundleError
from sentry_tx.interfaces import IRenewalStore
from sentry_tx.kube.errors import KubernetesAPIError, KubernetesUnavailableError

_T = TypeVar("_T")
_Arguments = TypeVarTuple("_Arguments")


@implementer(IRenewalStore)
class KubernetesRenewalStore:
    """
    The renewal steps of a L{KubernetesTrustStore}'s Secret.

    @param reactor: provides C{getThreadPool} (generating and verifying are
        CPU work).
    @param trust_store: the L{sentry_tx.ca.kubernetes_store.KubernetesTrustStore}.
    """

    _log = Logger()

    def __init__(
        self, reactor: IReactorThreads, trust_store: KubernetesTrustStore
    ) -> None:
        self._reactor = reactor
        self._trust_store = trust_store
        keys = trust_store._keys
        self._keys = dict(
            zip(PARTS, keys + (next_path(keys[1]), next_path(keys[2])), strict=True)
        )
        self.description = trust_store.secret_description

    def _in_thread(
        self, f: Callable[[*_Arguments], _T], *args: *_Arguments
    ) -> Deferred[_T]:
        return deferToThreadPool(self._reactor, self._reactor.getThreadPool(), f, *args)

    @inlineCallbacks
    def step(
        self, now: datetime, settings: RenewalSettings
    ) -> Generator[Deferred[Any], Any, StepResult]:
        """
        Read the Secret, plan, and write the step with one conditional PUT;
        after a lost race, read and plan again.
        """
        store = self._trust_store
        for _attempt in range(MAX_WRITE_ATTEMPTS):
            secret: dict[str, Any] | None = yield store._read_secret()
            if secret is None:
                raise BundleError(self.description, "does not exist")
            data = dict(secret.get("data") or {})
            anchors, issuer, key, next_crt, next_key = (
                self._keys[part] for part in PARTS
            )
            anchors_pem = self._required(data, anchors)
            state: RenewalState = yield self._in_thread(
                read_state,
                anchors_pem,
                self._required(data, issuer),
                self._required(data, key),
                _decoded(data, next_crt),
                _decoded(data, next_key),
                now,
                (
                    store._source(anchors),
                    store._source(issuer),
                    store._source(key),
                    store._source(next_crt),
                    store._source(next_key),
                ),
            )
            step = plan(state, now, settings)
            if step.action not in WRITING_ACTIONS:
                if step.action != ACTION_OFF:
                    # A replica killed between its Secret write and the
                    # ConfigMap's: the ConfigMap follows the Secret.
                    yield store._publish_anchors(anchors_pem)
                return StepResult(step, state)
            writes: StepWrites = yield self._in_thread(
                step_writes, state, step, now, settings
            )
            for part, value in writes.writes:
                key = self._keys[part]
                if value is None:
                    data.pop(key, None)
                else:
                    data[key] = base64.b64encode(value).decode("ascii")
            store._require_resource_version(secret, self.description)
            updated = dict(secret)
            updated["data"] = data
            try:
                yield store._client.replace(store._secret_path, updated)
            except KubernetesAPIError as e:
                if e.is_conflict:
                    self._log.info(
                        "{secret} changed while a renewal step ({action}) was"
                        " written (another replica?); reading it again",
                        secret=self.description,
                        action=step.action,
                    )
                    continue
                raise BundleError(
                    self.description, f"cannot write the renewal step: {e}"
                ) from None
            except KubernetesUnavailableError as e:
                raise BundleError(
                    self.description, f"cannot write the renewal step: {e}"
                ) from None
            yield store._publish_anchors(base64.b64decode(data[self._keys[PARTS[0]]]))
            return StepResult(step, state, True, writes.renewed)
        raise BundleError(
            self.description,
            f"kept changing while a renewal step was written ({MAX_WRITE_ATTEMPTS}"
            " attempts)",
        )

    def _required(self, data: dict[str, Any], key: str) -> bytes:
        """
        The decoded value of the Secret key C{key}, which the active bundle
        needs.

        @raise BundleError: naming it, when it is absent or empty.
        """
        value = _decoded(data, key)
        if value is None:
            raise BundleError(self._trust_store._source(key), "missing")
        return value


def _decoded(data: dict[str, Any], key: str) -> bytes | None:
    """
    The base64-decoded value of C{key} in a Secret's C{data}, or None when
    it is absent or empty.
    """
    value = data.get(key)
    return base64.b64decode(value) if value else None


__all__ = ["KubernetesRenewalStore"]
