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

from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from zope.interface import implementer

from sentry_tx.ca.kubernetes_store import MAX_WRITE_ATTEMPTS
from sentry_tx.ca.renewal import (
    ACTION_OFF,
    PARTS,
    WRITING_ACTIONS,
    StepResult,
    next_path,
    plan,
    read_state,
    step_writes,
)
from sentry_tx.errors import BundleError
from sentry_tx.interfaces import IRenewalStore
from sentry_tx.kube.errors import KubernetesAPIError, KubernetesUnavailableError


@implementer(IRenewalStore)
class KubernetesRenewalStore:
    """
    The renewal steps of a L{KubernetesTrustStore}'s Secret.

    @param reactor: provides C{getThreadPool} (generating and verifying are
        CPU work).
    @param trust_store: the L{sentry_tx.ca.kubernetes_store.KubernetesTrustStore}.
    """

    _log = Logger()

    def __init__(self, reactor, trust_store):
        self._reactor = reactor
        self._trust_store = trust_store
        keys = trust_store._keys
        self._keys = dict(
            zip(PARTS, keys + (next_path(keys[1]), next_path(keys[2])))
        )
        self.description = trust_store.secret_description

    def _in_thread(self, f, *args):
        return deferToThreadPool(self._reactor, self._reactor.getThreadPool(), f, *args)

    @inlineCallbacks
    def step(self, now, settings):
        """
        Read the Secret, plan, and write the step with one conditional PUT;
        after a lost race, read and plan again.
        """
        store = self._trust_store
        for attempt in range(MAX_WRITE_ATTEMPTS):
            secret = yield store._read_secret()
            if secret is None:
                raise BundleError(self.description, "does not exist")
            data = dict(secret.get("data") or {})
            contents = [
                base64.b64decode(data[self._keys[part]]) if data.get(self._keys[part]) else None
                for part in PARTS
            ]
            state = yield self._in_thread(
                read_state,
                *contents,
                now,
                tuple(store._source(self._keys[part]) for part in PARTS),
            )
            step = plan(state, now, settings)
            if step.action not in WRITING_ACTIONS:
                if step.action != ACTION_OFF:
                    # A replica killed between its Secret write and the
                    # ConfigMap's: the ConfigMap follows the Secret.
                    yield store._publish_anchors(contents[0])
                return StepResult(step, state)
            writes = yield self._in_thread(step_writes, state, step, now, settings)
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
            yield store._publish_anchors(
                base64.b64decode(data[self._keys[PARTS[0]]])
            )
            return StepResult(step, state, True, writes.renewed)
        raise BundleError(
            self.description,
            f"kept changing while a renewal step was written ({MAX_WRITE_ATTEMPTS}"
            " attempts)",
        )


__all__ = ["KubernetesRenewalStore"]
