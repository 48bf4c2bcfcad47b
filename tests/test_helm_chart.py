"""
Dapr's own Helm chart, unchanged, runs sentry_tx.

Helm itself (helm-python-sdk: Helm v4 as a library, no C{helm} binary)
renders Dapr's chart (C{tests/data/dapr-chart-1.18.3/}, Dapr's, Apache-2.0)
with C{conf/helm/values-sentry_tx.yaml}; the test reads the Sentry
Deployment's container from the rendering and starts sentry_tx with the
rendered command's arguments, through the image's C{/sentry}
(C{conf/sentry}), in kubernetes mode against the fake API server, and sees
it serve.

To the rendered arguments the test appends only what a test needs and a pod
has without flags: C{--kubeconfig} for the fake API server (a pod uses its
service account), and loopback listeners on free ports (a later flag wins,
as in Go).
"""

import json
import os
import re
import signal
import sys

import yaml
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from sentry_tx._proto import sentry_pb2
from sentry_tx.config import SentryConfig
from sentry_tx.testing.certificates import certificate_pem, make_csr, private_key_pem
from sentry_tx.testing.grpc_client import GrpcTestClient
from sentry_tx.testing.helm import render_chart
from sentry_tx.testing.jwts import verified_claims
from sentry_tx.testing.kubeconfig import (
    make_self_signed_server_certificate,
    write_kubeconfig,
)
from sentry_tx.testing.kubernetes import start_fake_kubernetes
from sentry_tx.testing.source_tree import PROJECT_ROOT, child_environment
from sentry_tx.testing.twistd import (
    LOOPBACK_FREE_PORTS,
    TwistdProtocol,
    spawn_killed_at_cleanup,
)

CHART_VERSION = "1.18.3"

CHART_DIRECTORY = os.path.join(
    PROJECT_ROOT, "tests", "data", f"dapr-chart-{CHART_VERSION}", "dapr"
)
"""
Dapr's chart, C{charts/dapr} of dapr/dapr at v1.18.3 (see the README.md
beside it).
"""

VALUES_FILE = os.path.join(PROJECT_ROOT, "conf", "helm", "values-sentry_tx.yaml")

SENTRY_TEMPLATE = "dapr/charts/dapr_sentry/templates/dapr_sentry_deployment.yaml"

RELEASE = "dapr"
CHART_NAMESPACE = "dapr-system"
TRUST_BUNDLE = "dapr-trust-bundle"
OIDC_ISSUER = "https://oidc.example.org"

SENTRY_COMMAND = os.path.join(PROJECT_ROOT, "conf", "sentry")
"""
What the image installs as C{/sentry}.
"""

IMAGE_ENTRYPOINT_ARGUMENTS = ["-n", "--pidfile=", "sentry"]
"""
What C{/sentry} gives C{twistd} before the chart's arguments.
"""


def _values_file():
    """
    The text of C{conf/helm/values-sentry_tx.yaml}.
    """
    with open(VALUES_FILE, encoding="utf-8") as f:
        return f.read()


@inlineCallbacks
def render_sentry_container(overrides=None):
    """
    Render Dapr's chart with the values file and C{overrides} (in a thread:
    the render is a child process).

    @return: Deferred firing with the Sentry Deployment's C{dapr-sentry}
        container and the Deployment's pod spec.
    """
    manifests = yield deferToThread(
        render_chart,
        CHART_DIRECTORY,
        _values_file(),
        overrides or {},
        RELEASE,
        CHART_NAMESPACE,
    )
    (deployment,) = [
        document
        for document in yaml.safe_load_all(manifests[SENTRY_TEMPLATE])
        if document and document["kind"] == "Deployment"
    ]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = [c for c in pod["containers"] if c["name"] == "dapr-sentry"]
    return container, pod


def _spawn_sentry_command(test, arguments):
    """
    Run C{conf/sentry ARGUMENTS} (the image's C{/sentry}) with this Python's
    bin directory first on the PATH (where the image has twistd), in the
    chart's namespace, killed at cleanup.
    """
    protocol = TwistdProtocol()
    environment = child_environment()
    environment["NAMESPACE"] = CHART_NAMESPACE
    environment["PATH"] = (
        os.path.dirname(sys.executable) + os.pathsep + environment.get("PATH", "")
    )
    return spawn_killed_at_cleanup(
        test, protocol, SENTRY_COMMAND, [SENTRY_COMMAND] + arguments, environment
    )


class RenderedContainerTests(TestCase):
    """
    What Dapr's chart, rendered with the values file, gives the Sentry
    container.
    """

    timeout = 90

    @inlineCallbacks
    def test_image_and_command(self):
        """
        The container runs the values file's image (a name with a C{/} is
        used as is) with the command C{/sentry}, which the image installs.
        """
        container, _ = yield render_sentry_container()
        values = yaml.safe_load(_values_file())
        self.assertEqual(container["image"], values["dapr_sentry"]["image"]["name"])
        self.assertEqual(container["command"], ["/sentry"])

    @inlineCallbacks
    def test_credentials_probes_and_namespace(self):
        """
        The chart mounts the trust bundle Secret where sentry_tx looks by
        default (it passes no --issuer-credentials), probes /healthz on
        sentry_tx's default health port, and sets NAMESPACE to the
        release's namespace.
        """
        container, pod = yield render_sentry_container()
        config = SentryConfig()
        self.assertNotIn("--issuer-credentials", " ".join(container["args"]))
        (volume,) = [v for v in pod["volumes"] if v.get("secret")]
        self.assertEqual(volume["secret"]["secretName"], TRUST_BUNDLE)
        (mount,) = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
        self.assertEqual(mount["mountPath"], config.issuer_credentials)
        for probe in ("livenessProbe", "readinessProbe"):
            self.assertEqual(
                container[probe]["httpGet"],
                {"path": "/healthz", "port": config.healthz_port},
            )
        (namespace,) = [e for e in container["env"] if e["name"] == "NAMESPACE"]
        self.assertEqual(
            namespace["valueFrom"]["fieldRef"]["fieldPath"], "metadata.namespace"
        )


class DocumentedCommandTests(TestCase):
    """
    The helm commands the project documents install the chart this module
    renders.
    """

    def test_commands_add_repository_and_pin_tested_version(self):
        """
        The README, the runbook and the values file add Dapr's chart
        repository first and install its chart at the version rendered
        here, creating the namespace.
        """
        for relative in (
            "README.md",
            "docs/runbook.md",
            "conf/helm/values-sentry_tx.yaml",
        ):
            with open(os.path.join(PROJECT_ROOT, relative), encoding="utf-8") as f:
                text = f.read()
            commands = re.findall(r"helm upgrade --install dapr dapr/dapr[^`]*", text)
            self.assertTrue(commands, relative)
            for command in commands:
                self.assertEqual(
                    re.findall(r"--version (\S+)", command), [CHART_VERSION], relative
                )
                self.assertIn("--create-namespace", command, relative)
            self.assertLess(
                text.index("helm repo add dapr https://dapr.github.io/helm-charts/"),
                text.index("helm upgrade --install dapr dapr/dapr"),
                relative,
            )


class RenderedArgumentsServeTests(TestCase):
    """
    sentry_tx started through C{/sentry} with the arguments Dapr's chart
    renders serves in kubernetes mode.
    """

    # One render (well under a second here) and one start of sentry_tx;
    # RENDER_TIMEOUT_SECONDS bounds a render that hangs.
    timeout = 120

    def setUp(self):
        self.fake = start_fake_kubernetes(self)
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        self.kubeconfig = write_kubeconfig(
            os.path.join(directory, "kubeconfig"), self.fake.kubeconfig()
        )
        self.fake.add_configuration(
            CHART_NAMESPACE,
            "daprsystem",
            {
                "mtls": {
                    "enabled": True,
                    "workloadCertTTL": "24h",
                    "allowedClockSkew": "15m",
                }
            },
        )
        self.fake.add_pod("apps", "myapp-0", "myapp", {"dapr.io/app-id": "myapp"})
        self.token = self.fake.issue_token("apps", "myapp", "myapp-0")

    @inlineCallbacks
    def _serve(self, overrides=None, extra=()):
        """
        Render the chart with C{overrides}, start C{/sentry} with the
        container's arguments (then the kubeconfig, loopback ports and
        C{extra}): it is twistd running sentry_tx with exactly those
        arguments, healthz answers 200, one SignCertificate for a pod
        succeeds, the bundle is kept in the dapr-trust-bundle Secret, no
        line is logged at warning or above, and SIGTERM stops it.

        @return: Deferred firing with the rendered arguments, the reply,
            the Secret's data and the output lines.
        """
        import treq

        container, _ = yield render_sentry_container(overrides)
        self.assertEqual(container["command"], ["/sentry"])
        chart_args = container["args"]
        arguments = chart_args + ["--kubeconfig", self.kubeconfig] + LOOPBACK_FREE_PORTS
        arguments += list(extra)
        protocol = _spawn_sentry_command(self, arguments)
        ports = yield protocol.wait_ready()
        # /sentry exec'd twistd: the process is twistd itself, with the
        # image's arguments, then the chart's.
        with open(f"/proc/{protocol.transport.pid}/cmdline", "rb") as f:
            argv = [part.decode() for part in f.read().split(b"\0") if part]
        start = argv.index("-n")
        self.assertTrue(argv[start - 1].endswith("twistd"), argv)
        self.assertEqual(argv[start:], IMAGE_ENTRYPOINT_ARGUMENTS + arguments)

        response = yield treq.get(
            f"http://127.0.0.1:{ports['healthz']}/healthz", persistent=False
        )
        self.assertEqual(response.code, 200)
        yield response.content()
        secret = self.fake.secret_data(CHART_NAMESPACE, TRUST_BUNDLE)
        client = GrpcTestClient(
            f"127.0.0.1:{ports['grpc']}",
            secret["ca.crt"],
            server_name=f"dapr-sentry.{CHART_NAMESPACE}.svc",
        )
        self.addCleanup(client.close)
        reply = yield deferToThread(
            client.sign,
            sentry_pb2.SignCertificateRequest(
                id="myapp",
                namespace="apps",
                token=self.token,
                certificate_signing_request=make_csr()[1],
            ),
        )
        self.assertTrue(reply.workload_certificate.startswith(b"-----BEGIN"))

        os.kill(protocol.transport.pid, signal.SIGTERM)
        reason = yield protocol.ended
        self.assertIn(
            (reason.exitCode, reason.signal), [(0, None), (None, signal.SIGTERM)]
        )
        lines = [line for line in protocol.output.decode().splitlines() if line.strip()]
        text = "\n".join(lines)
        self.assertIn("in effect: mode kubernetes", text)
        self.assertIn(f"trust domain cluster.local, namespace {CHART_NAMESPACE}", text)
        if "--log-as-json" in chart_args:
            levels = {json.loads(line)["level"] for line in lines}
        else:
            levels = {line.split()[1] for line in lines}
        self.assertFalse(levels & {"warning", "error", "fatal"}, text)
        return chart_args, reply, secret, levels

    @inlineCallbacks
    def test_defaults(self):
        """
        With the values file alone the rendered arguments (kubernetes mode,
        metrics on 9090, trust domain cluster.local) serve, and the bundle
        is kept under Dapr's key names.
        """
        chart_args, _, secret, _ = yield self._serve()
        self.assertEqual(chart_args[:2], ["--mode", "kubernetes"])
        self.assertEqual(set(secret), {"ca.crt", "issuer.crt", "issuer.key"})

    def _oidc_tls_files(self):
        """
        An OIDC server certificate and key in a new directory, as an
        operator mounts them.

        @return: the two paths.
        """
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        certificate, key = make_self_signed_server_certificate()
        paths = []
        for name, data in (
            ("tls.crt", certificate_pem(certificate)),
            ("tls.key", private_key_pem(key)),
        ):
            path = os.path.join(directory, name)
            with open(path, "wb") as f:
                f.write(data)
            os.chmod(path, 0o600)
            paths.append(path)
        return paths

    @inlineCallbacks
    def test_jwt_and_oidc(self):
        """
        With the chart's jwt and oidc values enabled (issuer, algorithm,
        allowed hosts, TLS files) the rendered arguments serve: the key
        pair is generated into the dapr-trust-bundle Secret and the reply's
        JWT verifies with the JWKS stored there.
        """
        certificate_file, key_file = self._oidc_tls_files()
        overrides = {
            "dapr_sentry": {
                "jwt": {
                    "enabled": True,
                    "issuer": OIDC_ISSUER,
                    "signingAlgorithm": "RS256",
                },
                "oidc": {
                    "enabled": True,
                    "allowedHosts": ["oidc.example.org"],
                    "tls": {
                        "enabled": True,
                        "certFile": certificate_file,
                        "keyFile": key_file,
                    },
                },
            }
        }
        chart_args, reply, secret, _ = yield self._serve(
            overrides,
            # The OIDC server on loopback, a free port (the chart says 0.0.0.0).
            extra=[
                "--oidc-server-listen-address",
                "127.0.0.1",
                "--oidc-server-listen-port",
                "0",
            ],
        )
        for expected in (
            "--jwt-enabled=true",
            f"--jwt-issuer={OIDC_ISSUER}",
            "--oidc-enabled=true",
            f"--oidc-server-tls-cert-file={certificate_file}",
        ):
            self.assertIn(expected, chart_args)
        self.assertEqual(
            set(secret), {"ca.crt", "issuer.crt", "issuer.key", "jwt.key", "jwks.json"}
        )
        claims = verified_claims(
            secret["jwks.json"], reply.jwt.value, audience="public", issuer=OIDC_ISSUER
        )
        self.assertEqual(claims["sub"], "spiffe://public/ns/apps/myapp")

    @inlineCallbacks
    def test_other_globals(self):
        """
        With global.logAsJson, Prometheus disabled, logLevel debug and
        global.issuerFilenames the rendered arguments serve: every line is
        JSON, debug lines are written, and the bundle is kept under those
        names.
        """
        overrides = {
            "global": {
                "logAsJson": True,
                "prometheus": {"enabled": False},
                "issuerFilenames": {
                    "ca": "ca.crt",
                    "cert": "tls.crt",
                    "key": "tls.key",
                },
            },
            "dapr_sentry": {"logLevel": "debug"},
        }
        chart_args, _, secret, levels = yield self._serve(overrides)
        self.assertIn("--enable-metrics=false", chart_args)
        self.assertIn("--log-as-json", chart_args)
        self.assertIn("debug", levels)
        self.assertEqual(set(secret), {"ca.crt", "tls.crt", "tls.key"})
