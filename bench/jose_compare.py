"""
The JOSE library comparison quoted in README ("JOSE library: joserfc"):
RS256 signing and verification rates of PyJWT and joserfc on one RSA-2048
key, same claims, same process.

    .venv/bin/python bench/jose_compare.py [COUNT]

Needs both libraries (joserfc is a dependency, PyJWT a test extra).
"""

import sys
import time

import jwt as pyjwt
from cryptography.hazmat.primitives.asymmetric import rsa
from joserfc import jwt as joserfc_jwt
from joserfc.jwk import RSAKey


def rate(count, f):
    started = time.perf_counter()
    for _ in range(count):
        f()
    return count / (time.perf_counter() - started)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    count = int(argv[0]) if argv else 300
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jose_key = RSAKey.import_key(key)
    claims = {
        "sub": "spiffe://public/ns/default/app",
        "aud": ["public", "sts.amazonaws.com"],
        "iat": 1,
        "nbf": 1,
        "exp": 2**31,
        "jti": "00",
        "use": "sig",
    }
    header = {"alg": "RS256", "kid": "k"}
    token = pyjwt.encode(claims, key, algorithm="RS256", headers={"kid": "k"})
    public = key.public_key()
    print(f"{count} tokens each, RS256, RSA-2048")
    signed = rate(
        count,
        lambda: pyjwt.encode(claims, key, algorithm="RS256", headers={"kid": "k"}),
    )
    print(f"sign   PyJWT   {signed:6.0f}/s")
    signed = rate(
        count,
        lambda: joserfc_jwt.encode(header, claims, jose_key, algorithms=["RS256"]),
    )
    print(f"sign   joserfc {signed:6.0f}/s")
    verified = rate(
        count,
        lambda: pyjwt.decode(token, public, algorithms=["RS256"], audience="public"),
    )
    print(f"verify PyJWT   {verified:6.0f}/s")
    verified = rate(
        count, lambda: joserfc_jwt.decode(token, jose_key, algorithms=["RS256"])
    )
    print(f"verify joserfc {verified:6.0f}/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
