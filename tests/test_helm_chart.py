"""
Dapr's own Helm chart, unchanged, runs sentry_tx: the argument lists its
Sentry template renders start sentry_tx in kubernetes mode (against the fake
API server) and it serves.

There is no helm binary here, so the lists below are rendered by hand from

    charts/dapr/charts/dapr_sentry/templates/dapr_sentry_deployment.yaml
    (dapr/dapr, the 1.18 line: v1.18.0-rc.1-215-gd8450742ce, commit
    d8450742ce3260d93a2346f4398a1e60d019a45b)

whose container part is, with debug.enabled false:

    command:
    - "/sentry"
    args:
    - "--mode"
    - "{{ .Values.mode }}"                       # dapr_sentry values: kubernetes
    - "--log-level"
    - {{ .Values.logLevel }}                     # info
    {{- if eq .Values.global.logAsJson true }}
    - "--log-as-json"
    {{- end }}
    {{- if eq .Values.global.prometheus.enabled true }}   # true
    - "--enable-metrics"
    - "--metrics-port"
    - "{{ .Values.global.prometheus.port }}"     # 9090
    {{- else }}
    - "--enable-metrics=false"
    {{- end }}
    - "--trust-domain"
    - {{ .Values.global.mtls.controlPlaneTrustDomain }}   # cluster.local
    {{- with .Values.global.issuerFilenames }}   # {} by default
    - "--issuer-ca-filename"
    - "{{ .ca }}"
    - "--issuer-certificate-filename"
    - "{{ .cert }}"
    - "--issuer-key-filename"
    - "{{ .key }}"
    {{- end }}
    {{- if .Values.jwt.enabled }} ... --jwt-* ... {{- end }}
    {{- if .Values.oidc.enabled }} ... --oidc-* ... {{- end }}
    {{- with .Values.extraArgs }} ... {{- end }}

with the Secret dapr-trust-bundle mounted at
/var/run/secrets/dapr.io/credentials and no --issuer-credentials flag.  The
--jwt-* and --oidc-* branches belong to sentry_tx's JWT/OIDC work and are
not rendered here.

To each list the test appends only what a test needs and a pod has without
flags: --kubeconfig for the fake API server (a pod uses its service
account), and loopback listeners on free ports (a later flag wins, as in
Go).
"""

import json
import os
import signal
import sys

from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from sentry_tx._proto import sentry_pb2
from sentry_tx.config import SentryConfig
from sentry_tx.testing.certificates import make_csr
from sentry_tx.testing.grpc_client import GrpcTestClient
from sentry_tx.testing.kubeconfig import write_kubeconfig
from sentry_tx.testing.kubernetes import start_fake_kubernetes
from sentry_tx.testing.source_tree import PROJECT_ROOT, child_environment
from tests.test_kube_deploy import ENTRYPOINT
from tests.test_process import (
    LOOPBACK_FREE_PORTS,
    _TwistdProtocol,
    spawn_killed_at_cleanup,
    spawn_twistd,
)

CHART_NAMESPACE = "dapr-system"
CHART_TRUST_DOMAIN = "cluster.local"
TRUST_BUNDLE = "dapr-trust-bundle"

CHART_DEFAULT_ARGS = [
    "--mode", "kubernetes",
    "--log-level", "info",
    "--enable-metrics",
    "--metrics-port", "9090",
    "--trust-domain", "cluster.local",
]
"""
The chart's defaults (global.logAsJson false, global.prometheus enabled on
9090, no global.issuerFilenames).
"""

CHART_ARGS = {
    "defaults": CHART_DEFAULT_ARGS,
    "logAsJson": [
        "--mode", "kubernetes",
        "--log-level", "info",
        "--log-as-json",
        "--enable-metrics",
        "--metrics-port", "9090",
        "--trust-domain", "cluster.local",
    ],
    "prometheus disabled, logLevel debug": [
        "--mode", "kubernetes",
        "--log-level", "debug",
        "--enable-metrics=false",
        "--trust-domain", "cluster.local",
    ],
    "issuerFilenames": [
        "--mode", "kubernetes",
        "--log-level", "info",
        "--enable-metrics",
        "--metrics-port", "9090",
        "--trust-domain", "cluster.local",
        "--issuer-ca-filename", "ca.crt",
        "--issuer-certificate-filename", "tls.crt",
        "--issuer-key-filename", "tls.key",
    ],
    # jwt.enabled, jwt.issuer, jwt.signingAlgorithm; oidc.enabled,
    # oidc.allowedHosts and oidc.tls (certFile, keyFile, enabled): the
    # files are where the operator mounts them (OIDC_TLS_DIRECTORY stands
    # for that directory here).
    "jwt and oidc": [
        "--mode", "kubernetes",
        "--log-level", "info",
        "--enable-metrics",
        "--metrics-port", "9090",
        "--trust-domain", "cluster.local",
        "--jwt-enabled=true",
        "--jwt-issuer=https://oidc.example.org",
        "--jwt-signing-algorithm=RS256",
        "--oidc-enabled=true",
        "--oidc-server-listen-address=0.0.0.0",
        "--oidc-allowed-hosts=oidc.example.org",
        "--oidc-server-tls-cert-file=OIDC_TLS_DIRECTORY/tls.crt",
        "--oidc-server-tls-key-file=OIDC_TLS_DIRECTORY/tls.key",
        "--oidc-server-tls-enabled=true",
    ],
}
"""
The argument lists the template renders for the values named by each key.
"""

CHART_COMMAND = "/sentry"

SENTRY_COMMAND = os.path.join(PROJECT_ROOT, "conf", "sentry")
"""
What the image installs as L{CHART_COMMAND}.
"""


def _spawn_sentry_command(test, arguments):
    """
    Run C{conf/sentry ARGUMENTS} (the image's C{/sentry}) with this
    Python's bin directory first on the PATH, killed at cleanup.
    """
    protocol = _TwistdProtocol()
    environment = child_environment()
    environment["NAMESPACE"] = CHART_NAMESPACE
    environment["PATH"] = os.path.dirname(sys.executable) + os.pathsep + environment.get("PATH", "")
    return spawn_killed_at_cleanup(
        test, protocol, SENTRY_COMMAND, [SENTRY_COMMAND] + arguments, environment
    )


class ChartArgumentsTests(TestCase):
    """
    sentry_tx started with each argument list Dapr's chart renders.
    """

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
            {"mtls": {"enabled": True, "workloadCertTTL": "24h", "allowedClockSkew": "15m"}},
        )
        self.fake.add_pod("apps", "myapp-0", "myapp", {"dapr.io/app-id": "myapp"})
        self.token = self.fake.issue_token("apps", "myapp", "myapp-0")

    def test_chart_defaults_need_no_credentials_flag(self):
        """
        The chart passes no --issuer-credentials: sentry_tx's default is the
        directory where the chart mounts the dapr-trust-bundle Secret.
        """
        self.assertNotIn("--issuer-credentials", " ".join(sum(CHART_ARGS.values(), [])))
        self.assertEqual(
            SentryConfig().issuer_credentials, "/var/run/secrets/dapr.io/credentials"
        )

    @inlineCallbacks
    def _serve(self, values, via_sentry_command=False):
        """
        Start sentry_tx with the list rendered for C{values} (plus the
        test's kubeconfig and loopback ports): it starts in kubernetes mode,
        logs nothing at warning or above, becomes healthy, signs a
        certificate for a pod, keeps the bundle under the chart's key names,
        and stops on SIGTERM.

        @return: Deferred firing with the output lines.
        """
        import treq

        chart_args = [
            argument.replace("OIDC_TLS_DIRECTORY", self._oidc_tls_directory())
            for argument in CHART_ARGS[values]
        ]
        arguments = chart_args + ["--kubeconfig", self.kubeconfig] + LOOPBACK_FREE_PORTS
        if "--oidc-enabled=true" in chart_args:
            # The test's own: the OIDC server on loopback, a free port.
            arguments += [
                "--oidc-server-listen-address", "127.0.0.1",
                "--oidc-server-listen-port", "0",
            ]  # fmt: skip
        if via_sentry_command:
            protocol = _spawn_sentry_command(self, arguments)
        else:
            protocol = spawn_twistd(self, arguments, env={"NAMESPACE": CHART_NAMESPACE})
        ports = yield protocol.wait_ready()
        if via_sentry_command:
            # /sentry exec'd twistd: the process is twistd itself, with the
            # image's ENTRYPOINT arguments, then the chart's.
            with open(f"/proc/{protocol.transport.pid}/cmdline", "rb") as f:
                argv = [part.decode() for part in f.read().split(b"\0") if part]
            start = argv.index("-n")
            self.assertTrue(argv[start - 1].endswith("twistd"))
            self.assertEqual(argv[start - 1 :][1 : len(ENTRYPOINT)], ENTRYPOINT[1:])
            self.assertEqual(argv[start - 1 + len(ENTRYPOINT) :], arguments)
        response = yield treq.get(
            f"http://127.0.0.1:{ports['healthz']}/healthz", persistent=False
        )
        self.assertEqual(response.code, 200)
        yield response.content()
        secret = self.fake.secret_data(CHART_NAMESPACE, TRUST_BUNDLE)
        keys = (
            ("ca.crt", "tls.crt", "tls.key")
            if "--issuer-key-filename" in chart_args
            else ("ca.crt", "issuer.crt", "issuer.key")
        )
        if "--jwt-enabled=true" in chart_args:
            keys += ("jwt.key", "jwks.json")
        self.assertEqual(set(secret), set(keys))
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
        if "--jwt-enabled=true" in chart_args:
            import jwt as pyjwt

            key_set = pyjwt.PyJWKSet.from_json(secret["jwks.json"].decode())
            kid = pyjwt.get_unverified_header(reply.jwt.value)["kid"]
            claims = pyjwt.decode(
                reply.jwt.value,
                key_set[kid].key,
                algorithms=["RS256"],
                audience="public",
                issuer="https://oidc.example.org",
            )
            self.assertEqual(claims["sub"], "spiffe://public/ns/apps/myapp")
        os.kill(protocol.transport.pid, signal.SIGTERM)
        reason = yield protocol.ended
        self.assertIn((reason.exitCode, reason.signal), [(0, None), (None, signal.SIGTERM)])
        lines = [line for line in protocol.output.decode().splitlines() if line.strip()]
        text = "\n".join(lines)
        self.assertIn("in effect: mode kubernetes", text)
        self.assertIn("trust domain cluster.local, namespace dapr-system", text)
        if "--log-as-json" in chart_args:
            levels = {json.loads(line)["level"] for line in lines}
        else:
            levels = {line.split()[1] for line in lines}
        self.assertFalse(levels & {"warning", "error", "fatal"}, text)
        return levels

    def test_defaults(self):
        """
        The list for the chart's default values serves, run as the chart
        runs it: through C{/sentry} (C{conf/sentry}, with twistd found on
        the PATH as in the image).
        """
        return self._serve("defaults", via_sentry_command=True)

    @inlineCallbacks
    def test_log_as_json(self):
        """
        With global.logAsJson the list serves and every line is one JSON
        object.
        """
        levels = yield self._serve("logAsJson")
        self.assertIn("info", levels)

    @inlineCallbacks
    def test_metrics_disabled_debug(self):
        """
        With Prometheus disabled and logLevel debug the list serves, and
        debug lines are written.
        """
        levels = yield self._serve("prometheus disabled, logLevel debug")
        self.assertIn("debug", levels)

    def _oidc_tls_directory(self):
        """
        A directory with the OIDC server's certificate and key, made once
        per test.
        """
        if getattr(self, "_oidc_tls", None) is None:
            from sentry_tx.testing.certificates import certificate_pem, private_key_pem
            from sentry_tx.testing.kubeconfig import make_self_signed_server_certificate

            self._oidc_tls = os.path.abspath(self.mktemp())
            os.makedirs(self._oidc_tls)
            certificate, key = make_self_signed_server_certificate()
            for name, data in (
                ("tls.crt", certificate_pem(certificate)),
                ("tls.key", private_key_pem(key)),
            ):
                path = os.path.join(self._oidc_tls, name)
                with open(path, "wb") as f:
                    f.write(data)
                os.chmod(path, 0o600)
        return self._oidc_tls

    def test_jwt_and_oidc(self):
        """
        With jwt and oidc enabled (TLS files given, allowed hosts set) the
        list serves: healthz waits for the OIDC listener, the key pair is
        generated into the dapr-trust-bundle Secret, and the reply's JWT
        verifies with the JWKS stored there.
        """
        return self._serve("jwt and oidc")

    def test_issuer_filenames(self):
        """
        With global.issuerFilenames the bundle is kept under those names in
        the dapr-trust-bundle Secret.
        """
        return self._serve("issuerFilenames")
