# -*- test-case-name: tests.test_jwt,tests.test_jwt_kube,tests.test_oidc -*-
"""
Minting JWT-SVIDs into SignCertificate responses (SPEC section 11).

The servicer makes one call, L{JWTMinter.fill}, after the certificate is
signed.  Audiences are the workload's trust domain then the request's
C{jwt_audiences}: C{jwt} is one token for all of them and
C{per_audience_jwts} one token per audience, keyed by it.  Claims: C{sub}
(the SPIFFE ID), C{aud}, C{iat} now, C{nbf} now minus the allowed clock
skew, C{exp} now plus C{--jwt-ttl}, a random C{jti}, C{use} C{sig}, and
C{iss} only when C{--jwt-issuer} is set.
"""

import secrets
from collections.abc import Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from joserfc import jwt
from twisted.logger import Logger

from sentry_tx.identity.caller import CallerIdentity
from sentry_tx.identity.rules import jwt_audiences_problem
from sentry_tx.jwt.material import JWTMaterial

if TYPE_CHECKING:
    from sentry_tx._proto.sentry_pb2 import SignCertificateResponse

JTI_BYTES = 16

_log = Logger()


class JWTMintingError(Exception):
    """
    No JWT could be made (INTERNAL "failed to generate JWT").
    """


class JWTAudienceError(Exception):
    """
    The request's C{jwt_audiences} cannot be served (the caller's mistake:
    INVALID_ARGUMENT with this message).
    """


def audiences_for(trust_domain: str, requested: Sequence[str]) -> list[str]:
    """
    The audiences of a request's tokens: C{trust_domain} first, then the
    requested ones, each once, in order (deduplicated in linear time).

    @raise JWTAudienceError: when C{requested} breaks a limit of
        L{sentry_tx.identity.rules.request_shape_problem} (the servicer
        refuses such a request before it gets here).
    """
    problem = jwt_audiences_problem(requested)
    if problem is not None:
        raise JWTAudienceError(problem)
    return list(dict.fromkeys((trust_domain, *requested)))


class JWTMinter:
    """
    Signs JWT-SVIDs with the material in service.

    @ivar material: the L{sentry_tx.jwt.material.JWTMaterial} in service, or
        None before it is loaded; replaced whole on the reactor thread
        (L{install}), read once per call.
    @ivar issuer: C{--jwt-issuer}, or None.
    @ivar ttl_seconds: C{--jwt-ttl} in seconds.
    """

    def __init__(self, issuer: str | None, ttl_seconds: float) -> None:
        self.material: JWTMaterial | None = None
        self.issuer = issuer
        self.ttl_seconds = ttl_seconds

    @property
    def ready(self) -> bool:
        """
        Whether material is loaded (a readiness source for healthz).
        """
        return self.material is not None

    def install(self, material: JWTMaterial) -> None:
        """
        Put C{material} in service for every call that starts afterwards.
        """
        previous, self.material = self.material, material
        if previous is None:
            _log.info(
                "JWT issuing enabled: {algorithm}, kid {key_id}",
                algorithm=material.algorithm,
                key_id=material.key_id,
            )
        elif not self.serves(previous):
            _log.info(
                "JWT signing key reloaded: {algorithm}, kid {key_id}",
                algorithm=material.algorithm,
                key_id=material.key_id,
            )

    def serves(self, material: JWTMaterial) -> bool:
        """
        Whether C{material} is the pair in service (the same key and JWKS).
        """
        current = self.material
        return current is not None and (current.key_pem, current.jwks_json) == (
            material.key_pem,
            material.jwks_json,
        )

    def mint(
        self,
        material: JWTMaterial,
        subject: str,
        audiences: Sequence[str],
        now_seconds: float,
        clock_skew_seconds: float,
    ) -> str:
        """
        One signed token.

        @param material: the L{JWTMaterial} to sign with.
        @param subject: the SPIFFE ID.
        @param audiences: a list of audiences (C{aud}).
        @param now_seconds: the current time, POSIX seconds.
        @param clock_skew_seconds: how far before now C{nbf} is.
        @rtype: L{str}
        """
        now = int(now_seconds)
        claims: dict[str, Any] = {
            "sub": subject,
            "aud": list(audiences),
            "iat": now,
            "nbf": now - int(clock_skew_seconds),
            "exp": now + int(self.ttl_seconds),
            "jti": secrets.token_hex(JTI_BYTES),
            "use": "sig",
        }
        if self.issuer is not None:
            claims["iss"] = self.issuer
        header = {"alg": material.algorithm, "kid": material.key_id, "typ": "JWT"}
        return jwt.encode(
            header, claims, material.signing_key, algorithms=[material.algorithm]
        )

    def fill(
        self,
        response: "SignCertificateResponse",
        identity: CallerIdentity,
        requested_audiences: Sequence[str],
        now_seconds: float,
        clock_skew: timedelta,
    ) -> None:
        """
        Fill C{response.jwt} and C{response.per_audience_jwts} for
        C{identity}: the servicer's one call after signing.

        @param response: a C{SignCertificateResponse}.
        @param identity: the validated L{CallerIdentity}.
        @param requested_audiences: the request's C{jwt_audiences}.
        @param now_seconds: the current time, POSIX seconds.
        @param clock_skew: the allowed clock skew, a L{timedelta}.
        @raise JWTAudienceError: for audiences that cannot be served.
        @raise JWTMintingError: when no token can be signed.
        """
        audiences = audiences_for(identity.trust_domain, requested_audiences)
        material = self.material
        if material is None:
            raise JWTMintingError("JWT signing key is not available")
        skew_seconds = clock_skew.total_seconds()
        subject = identity.spiffe_id
        try:
            response.jwt.value = self.mint(
                material, subject, audiences, now_seconds, skew_seconds
            )
            for audience in audiences:
                response.per_audience_jwts[audience].value = self.mint(
                    material, subject, [audience], now_seconds, skew_seconds
                )
        except Exception as e:
            raise JWTMintingError(f"error signing JWT token: {type(e).__name__}") from e
