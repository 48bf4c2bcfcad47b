"""
Tests for the OIDC discovery server (L{sentry_tx.jwt.oidc}): the documents
in memory with StubTreq, and the listener on 127.0.0.1 over HTTP and TLS.
"""

import json
import os
from io import StringIO

import treq
from treq.testing import StubTreq
from twisted.internet import defer, reactor, ssl
from twisted.internet.task import Clock
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from sentry_tx.http_listener import GuardedSite, GuardedWebService
from sentry_tx.jwt.material import generate_jwt_material, load_jwt_material
from sentry_tx.jwt.minting import JWTMinter
from sentry_tx.jwt.oidc import TLS_FILES_POLL_SECONDS, OIDCResource, OIDCService
from sentry_tx.logs import REFUSAL_LOG_INTERVAL_SECONDS, make_observer
from sentry_tx.testing.certificates import certificate_pem, private_key_pem
from sentry_tx.testing.clocks import ImmediateReactor, inline_file_work
from sentry_tx.testing.kubeconfig import make_self_signed_server_certificate
from sentry_tx.testing.logs import capture_logs, log_messages
from sentry_tx.testing.web import connect

_PAIR = []


def minter():
    """
    A minter with one generated pair (made once for the module).
    """
    if not _PAIR:
        _PAIR.append(generate_jwt_material())
    key_pem, jwks_json = _PAIR[0]
    result = JWTMinter(None, 60)
    result.install(load_jwt_material(key_pem, jwks_json, "RS256", None, ("k", "j")))
    return result


class DocumentTests(SynchronousTestCase):
    """
    L{OIDCResource} serves the two documents as Dapr does.
    """

    def client(self, issuer=None, jwks_uri=None, prefix="", hosts=(), scheme="https"):
        self.minter = minter()
        self.resource = OIDCResource(
            self.minter, issuer, jwks_uri, prefix, hosts, scheme
        )
        return StubTreq(self.resource)

    def get(self, client, url, method="GET", headers=None):
        response = self.successResultOf(
            client.request(method, url, headers=headers or {})
        )
        body = self.successResultOf(response.content())
        return response, body

    def test_discovery_derived(self):
        """
        Without --jwt-issuer and --oidc-jwks-uri, issuer and jwks_uri come
        from the scheme and the request's Host; the document has Dapr's
        fields, JSON, cacheable for an hour.
        """
        response, body = self.get(
            self.client(), "http://oidc.example.org:9080/.well-known/openid-configuration"
        )
        self.assertEqual(response.code, 200)
        self.assertEqual(
            response.headers.getRawHeaders("content-type"), ["application/json"]
        )
        self.assertEqual(
            response.headers.getRawHeaders("cache-control"), ["public, max-age=3600"]
        )
        document = json.loads(body)
        self.assertEqual(document["issuer"], "https://oidc.example.org:9080")
        self.assertEqual(document["jwks_uri"], "https://oidc.example.org:9080/jwks.json")
        self.assertEqual(document["response_types_supported"], ["id_token"])
        self.assertEqual(document["subject_types_supported"], ["public"])
        self.assertEqual(document["id_token_signing_alg_values_supported"], ["RS256"])

    def test_jwks(self):
        """
        /jwks.json is the JWKS in service, byte for byte, and follows a
        rotation at once.
        """
        client = self.client(scheme="http")
        response, body = self.get(client, "http://h/jwks.json")
        self.assertEqual(response.code, 200)
        self.assertEqual(body, _PAIR[0][1])
        key_pem, jwks_json = generate_jwt_material()
        self.minter.install(
            load_jwt_material(key_pem, jwks_json, "RS256", None, ("k", "j"))
        )
        self.assertEqual(self.get(client, "http://h/jwks.json")[1], jwks_json)

    def test_issuer_and_jwks_uri_flags(self):
        """
        --jwt-issuer and --oidc-jwks-uri are used as given; without
        --oidc-jwks-uri, jwks_uri is the JWKS path on the issuer's origin.
        """
        _, body = self.get(
            self.client(issuer="https://id.example.org/tenant", jwks_uri="https://cdn/k.json"),
            "http://h/.well-known/openid-configuration",
        )
        document = json.loads(body)
        self.assertEqual(document["issuer"], "https://id.example.org/tenant")
        self.assertEqual(document["jwks_uri"], "https://cdn/k.json")
        _, body = self.get(
            self.client(issuer="https://id.example.org/tenant", prefix="/p"),
            "http://h/p/.well-known/openid-configuration",
        )
        self.assertEqual(json.loads(body)["jwks_uri"], "https://id.example.org/p/jwks.json")

    def test_path_prefix(self):
        """
        With --oidc-path-prefix both documents are under it, and not at the
        root.
        """
        client = self.client(prefix="/dapr/oidc", scheme="http")
        response, body = self.get(client, "http://h/dapr/oidc/.well-known/openid-configuration")
        self.assertEqual(response.code, 200)
        self.assertEqual(json.loads(body)["jwks_uri"], "http://h/dapr/oidc/jwks.json")
        self.assertEqual(self.get(client, "http://h/dapr/oidc/jwks.json")[0].code, 200)
        self.assertEqual(self.get(client, "http://h/jwks.json")[0].code, 404)
        self.assertEqual(
            self.get(client, "http://h/.well-known/openid-configuration")[0].code, 404
        )

    def test_other_paths_and_methods(self):
        """
        Other paths are 404; other methods 405.
        """
        client = self.client()
        self.assertEqual(self.get(client, "http://h/")[0].code, 404)
        self.assertEqual(self.get(client, "http://h/jwks.json/x")[0].code, 404)
        self.assertEqual(self.get(client, "http://h/authorize")[0].code, 404)
        response, _ = self.get(client, "http://h/jwks.json", method="POST")
        self.assertEqual(response.code, 405)
        response, _ = self.get(
            client, "http://h/.well-known/openid-configuration", method="DELETE"
        )
        self.assertEqual(response.code, 405)

    def test_allowed_hosts(self):
        """
        With --oidc-allowed-hosts, a Host in the list (with or without a
        port) is served and any other is 403; * allows every host.
        """
        client = self.client(hosts=("oidc.example.org",))
        self.assertEqual(
            self.get(client, "http://oidc.example.org/jwks.json")[0].code, 200
        )
        self.assertEqual(
            self.get(client, "http://oidc.example.org:9080/jwks.json")[0].code, 200
        )
        response, body = self.get(client, "http://evil.example.org/jwks.json")
        self.assertEqual(response.code, 403)
        self.assertIn(b"unauthorized domain", body)
        client = self.client(hosts=("*",))
        self.assertEqual(
            self.get(client, "http://evil.example.org/jwks.json")[0].code, 200
        )

    def test_forwarded_host_never_reflected(self):
        """
        X-Forwarded-Host never reaches the document, with or without an
        allow-list, and never passes the allow-list check.
        """
        for hosts in ((), ("*",), ("oidc.example.org", "attacker.example.com")):
            client = self.client(hosts=hosts, scheme="http")
            _, body = self.get(
                client,
                "http://oidc.example.org/.well-known/openid-configuration",
                headers={"X-Forwarded-Host": ["attacker.example.com"]},
            )
            self.assertNotIn(b"attacker", body)
            self.assertEqual(json.loads(body)["issuer"], "http://oidc.example.org")
        client = self.client(hosts=("oidc.example.org",))
        response, _ = self.get(
            client,
            "http://evil.example.org/jwks.json",
            headers={"X-Forwarded-Host": ["oidc.example.org"]},
        )
        self.assertEqual(response.code, 403)

    def test_bad_host_refused(self):
        """
        A Host that is not a host name is refused rather than written into
        the document.
        """
        self.client()
        document = self.resource.discovery_document("h", "RS256")
        self.assertEqual(document["issuer"], "https://h")
        from twisted.web.test.requesthelper import DummyRequest

        request = DummyRequest([b".well-known", b"openid-configuration"])
        request.path = b"/.well-known/openid-configuration"
        request.requestHeaders.setRawHeaders(b"host", [b"evil/<script>"])
        body = self.resource.render(request)
        self.assertEqual(request.responseCode, 400)
        self.assertNotIn(b"script", body)


class GuardedSiteTests(SynchronousTestCase):
    """
    L{OIDCResource} behind the L{GuardedSite} it is served with: Host
    checks and what refusals cost in the log.
    """

    def setUp(self):
        self.clock = Clock()
        self.site = GuardedSite(
            OIDCResource(minter(), None, None, "", ("Oidc.Example.ORG",), "https"),
            self.clock,
            label="oidc",
        )
        self.events = capture_logs(self)

    def request(self, protocol, transport, host_lines):
        transport.clear()
        protocol.dataReceived(
            b"GET /jwks.json HTTP/1.1\r\n" + b"".join(
                b"Host: " + host + b"\r\n" for host in host_lines
            ) + b"\r\n"
        )
        return int(transport.value().split(b" ", 2)[1])

    def test_two_host_headers_refused(self):
        """
        Two Host headers are 400, even when both are allowed (RFC 9112 section 3.2).
        """
        protocol, transport = connect(self.site)
        self.assertEqual(
            self.request(
                protocol, transport, [b"oidc.example.org", b"oidc.example.org"]
            ),
            400,
        )
        self.assertEqual(self.request(protocol, transport, [b"oidc.example.org"]), 200)

    def test_allowed_hosts_ignore_case_and_trailing_dot(self):
        """Host matching ignores case and a trailing dot, with or without a port."""
        protocol, transport = connect(self.site)
        for host in (
            b"OIDC.example.org",
            b"oidc.example.org.",
            b"oidc.EXAMPLE.org.:9080",
        ):
            self.assertEqual(self.request(protocol, transport, [host]), 200, host)
        for host in (
            b"oidc.example.org..",
            b"xoidc.example.org",
            b"oidc.example.org.evil",
        ):
            self.assertEqual(self.request(protocol, transport, [host]), 403, host)

    def test_refused_host_logged_as_warning(self):
        """A Host not allowed is logged once, as a warning, quoted."""
        protocol, transport = connect(self.site)
        self.assertEqual(self.request(protocol, transport, [b"evil\x1b[2J"]), 403)
        [line] = log_messages(self.events, level=LogLevel.warn)
        self.assertEqual(
            line,
            "oidc server refused 'GET' '/jwks.json' from 127.0.0.1 for Host"
            " 'evil\\x1b[2J': 403",
        )

    def test_host_flood_bounded_log(self):
        """
        2,000 refused requests with 15 KB Host headers on one connection add under 1 MB
        of log.
        """
        output = StringIO()
        observer = make_observer("debug", False, output)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        protocol, transport = connect(self.site)
        host = b"h" * (15 * 1024)
        for _ in range(1999):
            # The attack in issue 17 sent these in 1.2 s.
            self.clock.advance(0.0006)
            self.assertEqual(self.request(protocol, transport, [host]), 403)
        self.assertFalse(transport.lost)
        self.clock.advance(REFUSAL_LOG_INTERVAL_SECONDS)
        self.assertEqual(self.request(*connect(self.site), [host]), 403)
        written = len(output.getvalue().encode("utf-8"))
        self.assertLess(written, 1_000_000)
        lines = output.getvalue().splitlines()
        self.assertEqual(len(lines), 2)
        for line in lines:
            self.assertLess(len(line), 1024)
        self.assertIn("(1998 similar refusals dropped)", lines[-1])


class ListenerTests(TestCase):
    """
    L{OIDCService} on 127.0.0.1, through the same L{GuardedWebService} as healthz.
    """

    timeout = 30

    def service(self, tls_files=None, clock=None):
        clock = clock or ImmediateReactor()
        site = GuardedSite(
            OIDCResource(
                minter(), None, None, "", (), "https" if tls_files else "http"
            ),
            reactor,
        )
        service = OIDCService(
            clock,
            lambda factory: GuardedWebService(
                "oidc", 0, factory, reactor, interface="127.0.0.1"
            ),
            site,
            tls_files=tls_files,
            file_work=inline_file_work(clock),
        )
        return service

    @defer.inlineCallbacks
    def test_plain_http(self):
        """
        With TLS off it serves plain HTTP from the start and stops like the
        other listeners.
        """
        service = self.service()
        service.startService()
        self.addCleanup(service.stopService)
        self.assertTrue(service.ready)
        port = service.web_service.port
        from twisted.web.client import Agent

        client = treq.client.HTTPClient(Agent(reactor))
        response = yield client.get(f"http://127.0.0.1:{port}/jwks.json")
        body = yield response.content()
        self.assertEqual(body, _PAIR[0][1])
        yield service.stopService()
        self.assertFalse(service.ready)

    @defer.inlineCallbacks
    def test_tls_waits_for_files(self):
        """
        Over TLS it waits for the certificate and key files to appear,
        then serves HTTPS with them.
        """
        directory = self.mktemp()
        os.mkdir(directory)
        certificate_path = os.path.join(directory, "tls.crt")
        key_path = os.path.join(directory, "tls.key")
        clock = ImmediateReactor()
        service = self.service((certificate_path, key_path), clock)
        service.startService()
        self.addCleanup(service.stopService)
        self.assertFalse(service.ready)
        clock.advance(TLS_FILES_POLL_SECONDS)
        self.assertFalse(service.ready)
        certificate, key = make_self_signed_server_certificate()
        with open(certificate_path, "wb") as f:
            f.write(certificate_pem(certificate))
        with open(key_path, "wb") as f:
            f.write(private_key_pem(key))
        clock.advance(TLS_FILES_POLL_SECONDS)
        self.assertTrue(service.ready)
        trust = ssl.trustRootFromCertificates(
            [ssl.Certificate.loadPEM(certificate_pem(certificate))]
        )
        from twisted.web.client import Agent, BrowserLikePolicyForHTTPS

        client = treq.client.HTTPClient(
            Agent(reactor, contextFactory=BrowserLikePolicyForHTTPS(trust))
        )
        response = yield client.get(
            f"https://127.0.0.1:{service.web_service.port}/.well-known/openid-configuration"
        )
        document = json.loads((yield response.content()))
        self.assertTrue(document["issuer"].startswith("https://127.0.0.1:"))
        yield service.stopService()

    def test_tls_bad_files_fatal(self):
        """
        TLS files that do not load are a start failure, not a silent wait.
        """
        directory = self.mktemp()
        os.mkdir(directory)
        paths = (os.path.join(directory, "c"), os.path.join(directory, "k"))
        for path in paths:
            with open(path, "wb") as f:
                f.write(b"not pem")
        failures = []
        clock = ImmediateReactor()
        service = OIDCService(
            clock,
            lambda factory: GuardedWebService(
                "oidc", 0, factory, reactor, interface="127.0.0.1"
            ),
            GuardedSite(OIDCResource(minter(), None, None, "", (), "https"), reactor),
            tls_files=paths,
            on_start_failure=failures.append,
            file_work=inline_file_work(clock),
        )
        service.startService()
        self.addCleanup(service.stopService)
        self.assertEqual(len(failures), 1)
        self.assertIn("no PEM certificate", failures[0].getErrorMessage())
        self.assertFalse(service.ready)
