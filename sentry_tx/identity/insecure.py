# -*- test-case-name: tests.test_identity -*-
"""
The INSECURE validator: it proves nothing about the caller beyond the common
request rules.  Use it only where every caller is trusted (standalone mode).
"""

from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from sentry_tx.errors import ValidationError
from sentry_tx.identity.caller import VALIDATOR_INSECURE, CallerIdentity, SignRequest
from sentry_tx.identity.rules import check_request
from sentry_tx.interfaces import IIdentityValidator


@implementer(IIdentityValidator)
class InsecureValidator:
    """
    Accepts any well-formed request as the identity it names.
    """

    name = VALIDATOR_INSECURE
    needs_reactor = False

    def validate(
        self, request: SignRequest, deadline: float | None = None
    ) -> Deferred[CallerIdentity]:
        """
        Apply the common rules only (at once: C{deadline} cannot be missed).
        """
        try:
            return succeed(check_request(request))
        except ValidationError:
            return fail()
