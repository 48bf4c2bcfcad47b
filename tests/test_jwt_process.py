"""
End-to-end: C{twistd -n sentry --jwt-enabled --oidc-enabled} as a child
process on loopback ports; tokens verified with PyJWT against the JWKS the
OIDC server publishes.
"""

import json
import os
import re
import stat

import jwt as pyjwt
import treq
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from sentry_tx._proto import sentry_pb2
from sentry_tx.jwt.material import generate_jwt_material
from sentry_tx.testing.certificates import make_csr
from sentry_tx.testing.grpc_client import GrpcTestClient
from sentry_tx.testing.http2 import sign_on_new_connection
from sentry_tx.testing.jwts import verified_claims
from sentry_tx.testing.twistd import LOOPBACK_FREE_PORTS, spawn_twistd

ISSUER = "https://oidc.example.org"


class JWTProcessTests(TestCase):
    """
    JWT-SVIDs and OIDC discovery as an operator turns them on.
    """

    timeout = 90

    def setUp(self):
        self.credentials = os.path.abspath(self.mktemp())

    @inlineCallbacks
    def start(self, extra=()):
        protocol = spawn_twistd(
            self,
            [
                "--config",
                os.path.abspath(self.mktemp()),
                "--issuer-credentials",
                self.credentials,
                "--jwt-enabled",
                f"--jwt-issuer={ISSUER}",
                "--jwt-ttl=2h",
                "--oidc-enabled",
                "--oidc-server-tls-enabled=false",
                "--oidc-server-listen-address=127.0.0.1",
                "--oidc-server-listen-port=0",
                *extra,
            ]
            + LOOPBACK_FREE_PORTS,
        )
        ports = yield protocol.wait_ready()
        yield protocol.when_output(b"oidc server listening on port")
        ports["oidc"] = int(
            re.search(rb"oidc server listening on port (\d+)", protocol.output).group(1)
        )
        with open(os.path.join(self.credentials, "ca.crt"), "rb") as f:
            client = GrpcTestClient(f"127.0.0.1:{ports['grpc']}", f.read())
        self.addCleanup(client.close)
        return protocol, ports, client

    @inlineCallbacks
    def sign(self, client):
        _, csr = make_csr()
        reply = yield deferToThread(
            client.sign,
            sentry_pb2.SignCertificateRequest(
                id="myapp",
                namespace="prod",
                certificate_signing_request=csr,
                token_validator=sentry_pb2.SignCertificateRequest.INSECURE,
                jwt_audiences=["api://AzureADTokenExchange", "sts.amazonaws.com"],
            ),
        )
        return reply

    def replace_jwt_pair(self):
        """
        Replace jwt.key and jwks.json in the credentials directory with a
        new pair, each file atomically, as an operator would.

        @return: the new JWKS.
        """
        key_pem, jwks_json = generate_jwt_material()
        for name, data in (("jwt.key", key_pem), ("jwks.json", jwks_json)):
            path = os.path.join(self.credentials, name)
            with open(path + ".new", "wb") as f:
                f.write(data)
            os.chmod(path + ".new", 0o600)
            os.replace(path + ".new", path)
        return jwks_json

    @inlineCallbacks
    def get(self, url):
        response = yield treq.get(url, persistent=False)
        body = yield response.content()
        return response, body

    @inlineCallbacks
    def test_tokens_verify_against_published_jwks(self):
        """
        The key pair is generated (key mode 0600); SignCertificate answers
        with jwt and per_audience_jwts that PyJWT verifies with the JWKS the
        OIDC server publishes, whose discovery document names the issuer.
        """
        protocol, ports, client = yield self.start()
        key_path = os.path.join(self.credentials, "jwt.key")
        self.assertEqual(stat.S_IMODE(os.stat(key_path).st_mode), 0o600)
        base = f"http://127.0.0.1:{ports['oidc']}"
        response, body = yield self.get(f"{base}/.well-known/openid-configuration")
        self.assertEqual(response.code, 200)
        document = json.loads(body)
        self.assertEqual(document["issuer"], ISSUER)
        self.assertEqual(document["jwks_uri"], f"{ISSUER}/jwks.json")
        _, jwks_body = yield self.get(f"{base}/jwks.json")
        with open(os.path.join(self.credentials, "jwks.json"), "rb") as f:
            self.assertEqual(jwks_body, f.read())
        reply = yield self.sign(client)
        claims = verified_claims(
            jwks_body, reply.jwt.value, audience="sts.amazonaws.com", issuer=ISSUER
        )
        self.assertEqual(claims["sub"], "spiffe://public/ns/prod/myapp")
        self.assertEqual(
            claims["aud"], ["public", "api://AzureADTokenExchange", "sts.amazonaws.com"]
        )
        self.assertEqual(claims["exp"] - claims["iat"], 7200)
        self.assertEqual(
            sorted(reply.per_audience_jwts),
            ["api://AzureADTokenExchange", "public", "sts.amazonaws.com"],
        )
        for audience, token in reply.per_audience_jwts.items():
            verified_claims(jwks_body, token.value, audience=audience)

    @inlineCallbacks
    def reloaded_everywhere(self, protocol):
        """
        Wait until every serving process has reloaded the JWT pair: each
        watches and reloads it itself.
        """
        processes = int(
            re.search(rb"serving gRPC from (\d+) process", protocol.output).group(1)
        )
        while protocol.output.count(b"JWT signing key reloaded") < processes:
            yield deferLater(reactor, 0.1, lambda: None)

    @inlineCallbacks
    def test_key_rotation(self):
        """
        Replacing jwt.key and jwks.json in the credentials directory puts
        the new pair in service without a restart, and the OIDC server
        publishes it.
        """
        protocol, ports, client = yield self.start()
        yield protocol.when_output(b"for issuer credential changes")
        before = yield self.sign(client)
        old_kid = pyjwt.get_unverified_header(before.jwt.value)["kid"]
        jwks_json = self.replace_jwt_pair()
        yield self.reloaded_everywhere(protocol)
        after = yield self.sign(client)
        new_kid = pyjwt.get_unverified_header(after.jwt.value)["kid"]
        self.assertNotEqual(new_kid, old_kid)
        self.assertEqual(new_kid, json.loads(jwks_json)["keys"][0]["kid"])
        _, body = yield self.get(f"http://127.0.0.1:{ports['oidc']}/jwks.json")
        self.assertEqual(body, jwks_json)

    @inlineCallbacks
    def kids_by_process(self, ports):
        """
        Sign on fresh connections until two serving processes (told apart by
        their own server certificates) have answered; the JWT kid each one
        signed with.
        """
        with open(os.path.join(self.credentials, "ca.crt"), "rb") as f:
            anchors_pem = f.read()
        kids = {}
        for _ in range(32):
            _, csr = make_csr()
            certificate, reply = yield deferToThread(
                sign_on_new_connection,
                "127.0.0.1",
                ports["grpc"],
                anchors_pem,
                "cluster.local",
                sentry_pb2.SignCertificateRequest(
                    id="myapp",
                    namespace="prod",
                    certificate_signing_request=csr,
                    token_validator=sentry_pb2.SignCertificateRequest.INSECURE,
                ),
            )
            self.assertIsNotNone(reply)
            kids.setdefault(certificate, set()).add(
                pyjwt.get_unverified_header(reply.jwt.value)["kid"]
            )
            if len(kids) == 2:
                break
        self.assertEqual(len(kids), 2, "one process answered 32 connections")
        return list(kids.values())

    @inlineCallbacks
    def test_workers_mint_and_rotate(self):
        """
        With --workers 2 both serving processes (twistd's and the copy)
        mint JWTs with the generated key, and a replaced key pair is
        reloaded by each without a restart.
        """
        protocol, ports, _ = yield self.start(["--workers", "2"])
        yield protocol.when_output(b"for issuer credential changes")
        # Once every copy answers its liveness check.
        yield protocol.when_output(b"in 2 serving processes")
        with open(os.path.join(self.credentials, "jwks.json"), "rb") as f:
            old_kid = json.loads(f.read())["keys"][0]["kid"]
        kids = yield self.kids_by_process(ports)
        self.assertEqual(kids, [{old_kid}, {old_kid}])
        jwks_json = self.replace_jwt_pair()
        yield self.reloaded_everywhere(protocol)
        new_kid = json.loads(jwks_json)["keys"][0]["kid"]
        kids = yield self.kids_by_process(ports)
        self.assertEqual(kids, [{new_kid}, {new_kid}])


class JWKSProcessTests(TestCase):
    """
    The JWKS validator with a file source, served by serving copies.
    """

    timeout = 90

    @inlineCallbacks
    def test_workers_validate_jwks_tokens(self):
        """
        With --workers 2 and a jwks validator reading a file, a token signed
        by a key of the file is accepted and yields a certificate for its
        SPIFFE ID; a request without a token is PERMISSION_DENIED and one
        naming no validator INVALID_ARGUMENT (standalone has no default
        validator then).
        """
        import grpc
        from cryptography import x509

        from sentry_tx.testing.jwk import jwk_member, rsa_key

        directory = os.path.abspath(self.mktemp())
        os.mkdir(directory)
        jwks_path = os.path.join(directory, "jwks.json")
        with open(jwks_path, "w") as f:
            json.dump({"keys": [jwk_member(rsa_key(), kid="k1")]}, f)
        config_path = os.path.join(directory, "config.yaml")
        with open(config_path, "w") as f:
            f.write(
                "apiVersion: dapr.io/v1alpha1\nkind: Configuration\n"
                "spec:\n  mtls:\n    tokenValidators:\n      - name: jwks\n"
                f"        options:\n          source: {jwks_path}\n"
            )
        credentials = os.path.join(directory, "credentials")
        protocol = spawn_twistd(
            self,
            ["--config", config_path, "--issuer-credentials", credentials,
             "--workers", "2"] + LOOPBACK_FREE_PORTS,
        )
        ports = yield protocol.wait_ready()
        response = yield treq.get(
            f"http://127.0.0.1:{ports['healthz']}/healthz", persistent=False
        )
        self.assertEqual(response.code, 200)
        yield response.content()
        with open(os.path.join(credentials, "ca.crt"), "rb") as f:
            client = GrpcTestClient(f"127.0.0.1:{ports['grpc']}", f.read())
        self.addCleanup(client.close)
        import time

        value = pyjwt.encode(
            {
                "sub": "spiffe://public/ns/default/myapp",
                "aud": "spiffe://localhost/ns/default/dapr-sentry",
                "iat": int(time.time()),
                "exp": int(time.time()) + 600,
            },
            rsa_key(),
            algorithm="RS256",
            headers={"kid": "k1"},
        )

        def request(**fields):
            _, csr = make_csr()
            values = dict(
                id="myapp",
                namespace="default",
                certificate_signing_request=csr,
                token_validator=sentry_pb2.SignCertificateRequest.JWKS,
                token=value,
            )
            values.update(fields)
            return sentry_pb2.SignCertificateRequest(**values)

        for _ in range(4):  # calls spread over both workers
            reply = yield deferToThread(client.sign, request())
            leaf = x509.load_pem_x509_certificates(reply.workload_certificate)[0]
            san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
            self.assertEqual(
                san.value.get_values_for_type(x509.UniformResourceIdentifier),
                ["spiffe://public/ns/default/myapp"],
            )
        error = yield self.assertFailure(
            deferToThread(client.sign, request(token="")), grpc.RpcError
        )
        self.assertEqual(error.code(), grpc.StatusCode.PERMISSION_DENIED)
        self.assertEqual(error.details(), "the request does not contain a token")
        error = yield self.assertFailure(
            deferToThread(client.sign, request(token_validator=0)), grpc.RpcError
        )
        self.assertEqual(error.code(), grpc.StatusCode.INVALID_ARGUMENT)
