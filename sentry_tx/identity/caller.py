# -*- test-case-name: tests.test_identity,tests.test_servicer -*-
"""
Who is calling, as every validator sees it: the numbers of the
C{TokenValidator} enum, the request a validator checks (L{SignRequest}) and
the identity it proves (L{CallerIdentity}).
"""

from dataclasses import dataclass
from typing import Any

# The TokenValidator enum of dapr.proto.sentry.v1.SignCertificateRequest.
VALIDATOR_UNKNOWN = 0
VALIDATOR_INSECURE = 1
VALIDATOR_KUBERNETES = 2
VALIDATOR_JWKS = 3

VALIDATOR_NAMES = {
    VALIDATOR_UNKNOWN: "UNKNOWN",
    VALIDATOR_INSECURE: "INSECURE",
    VALIDATOR_KUBERNETES: "KUBERNETES",
    VALIDATOR_JWKS: "JWKS",
}


@dataclass(frozen=True)
class SignRequest:
    """
    A SignCertificate request, independent of the protobuf classes.
    """

    id: str
    token: str
    trust_domain: str
    namespace: str
    csr: bytes
    token_validator: int
    jwt_audiences: tuple[str, ...] = ()

    @classmethod
    def from_proto(cls, message: Any) -> "SignRequest":
        """
        Build from a C{SignCertificateRequest} message.
        """
        return cls(
            id=message.id,
            token=message.token,
            trust_domain=message.trust_domain,
            namespace=message.namespace,
            csr=message.certificate_signing_request,
            token_validator=message.token_validator,
            jwt_audiences=tuple(message.jwt_audiences),
        )


@dataclass(frozen=True)
class CallerIdentity:
    """
    What a validator proved: the parts of the SPIFFE ID to sign, and (the
    KUBERNETES validator only, from the pod it read) the pod's container
    images as the JSON bytes to stamp into the certificate
    (L{sentry_tx.identity.images}); C{b""} stamps none.
    """

    trust_domain: str
    namespace: str
    app_id: str
    container_images: bytes = b""

    @property
    def spiffe_id(self) -> str:
        """
        C{spiffe://<trust domain>/ns/<namespace>/<app id>}.
        """
        return f"spiffe://{self.trust_domain}/ns/{self.namespace}/{self.app_id}"
