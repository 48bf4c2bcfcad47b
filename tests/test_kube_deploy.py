"""
Tests for the container image and the Kubernetes manifests in C{conf/}: they
parse, pass only flags sentry_tx has, and agree with each other on ports,
names and privileges.  (No Docker engine or cluster is needed.)
"""

import io
import json
import os
import re

import yaml
from twisted.trial.unittest import SynchronousTestCase

from sentry_tx.ca.kubernetes_store import TRUST_BUNDLE_NAME
from sentry_tx.config import MODE_KUBERNETES, SentryConfig, parse_mtls
from sentry_tx.kube.incluster import SERVICE_ACCOUNT_DIRECTORY
from sentry_tx.options import Options
from sentry_tx.testing.manifests import (
    CONF,
    DOCKERFILE,
    ENTRYPOINT,
    MANIFESTS,
    load_manifests,
)
from sentry_tx.testing.source_tree import PROJECT_ROOT


def _canonical(name):
    """
    A distribution name as PEP 503 compares them.
    """
    return re.sub(r"[-_.]+", "-", name).lower()


def _runtime_closure(distribution):
    """
    The canonical names of the installed distributions that C{distribution}
    needs at run time (its extras excluded), followed recursively with the
    extras each requirement asks for.
    """
    from importlib import metadata

    from packaging.requirements import Requirement

    seen = set()
    pending = [(distribution, frozenset())]
    while pending:
        name, extras = pending.pop()
        for text in metadata.requires(name) or []:
            requirement = Requirement(text)
            marker = requirement.marker
            if marker is not None and not any(
                marker.evaluate({"extra": extra}) for extra in extras | {""}
            ):
                continue
            key = _canonical(requirement.name)
            wanted = frozenset(requirement.extras)
            if (key, wanted) not in seen:
                seen.add((key, wanted))
                pending.append((requirement.name, wanted))
    return {key for key, _ in seen}


def dockerfile_instructions():
    """
    The Dockerfile's instructions as C{(INSTRUCTION, arguments)}, with
    continuation lines joined and comments dropped.
    """
    with open(DOCKERFILE, encoding="utf-8") as f:
        text = f.read()
    text = re.sub(r"\\\n", " ", text)
    instructions = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, arguments = line.partition(" ")
        instructions.append((instruction.upper(), arguments.strip()))
    return instructions


class ManifestTests(SynchronousTestCase):
    """
    The manifests in C{conf/kubernetes}.
    """

    def setUp(self):
        self.documents = load_manifests()
        self.deployment = self.documents[("Deployment", "dapr-sentry")]
        self.pod = self.deployment["spec"]["template"]["spec"]
        self.container = self.pod["containers"][0]

    def _options(self):
        stderr = io.StringIO()
        options = Options(
            environ={"NAMESPACE": "dapr-system", "KUBERNETES_SERVICE_HOST": "10.0.0.1"},
            stderr=stderr,
        )
        try:
            options.parseOptions(self.container["args"])
        except SystemExit:
            self.fail(f"the Deployment's args do not parse: {stderr.getvalue()}")
        return options.sentry_config

    def _container_port(self, name):
        for port in self.container["ports"]:
            if port["name"] == name:
                return port["containerPort"]
        self.fail(f"no container port named {name}")

    def test_kustomization_lists_every_file(self):
        """
        The kustomization lists every manifest file.
        """
        with open(os.path.join(MANIFESTS, "kustomization.yaml")) as f:
            kustomization = yaml.safe_load(f)
        files = sorted(
            name
            for name in os.listdir(MANIFESTS)
            if name.endswith(".yaml") and name != "kustomization.yaml"
        )
        self.assertEqual(sorted(kustomization["resources"]), files)

    def test_every_document_is_named(self):
        """
        Every document has apiVersion, kind and a name; namespaced ones are
        in dapr-system.
        """
        cluster_scoped = {"ClusterRole", "ClusterRoleBinding"}
        for (kind, name), document in self.documents.items():
            self.assertTrue(document.get("apiVersion"), (kind, name))
            if kind not in cluster_scoped:
                self.assertEqual(
                    document["metadata"].get("namespace"), "dapr-system", (kind, name)
                )

    def test_flags_exist(self):
        """
        Every flag the Deployment passes is a flag of sentry_tx.
        """
        flags = {parameter[0] for parameter in Options.optParameters}
        passed = [
            argument.lstrip("-").split("=")[0]
            for argument in self.container["args"]
            if argument.startswith("-")
        ]
        self.assertTrue(passed)
        for flag in passed:
            self.assertIn(flag, flags)

    def test_args_parse(self):
        """
        The Deployment's args parse into kubernetes mode with the container
        ports.
        """
        config = self._options()
        self.assertEqual(config.mode, MODE_KUBERNETES)
        self.assertEqual(config.namespace, "dapr-system")
        self.assertEqual(config.port, self._container_port("grpc"))
        self.assertEqual(config.healthz_port, self._container_port("healthz"))
        self.assertEqual(config.metrics_port, self._container_port("metrics"))

    def test_replicas_and_anti_affinity(self):
        """
        Three replicas, spread over nodes by pod anti-affinity.
        """
        self.assertEqual(self.deployment["spec"]["replicas"], 3)
        terms = self.pod["affinity"]["podAntiAffinity"][
            "preferredDuringSchedulingIgnoredDuringExecution"
        ]
        term = terms[0]["podAffinityTerm"]
        self.assertEqual(term["topologyKey"], "kubernetes.io/hostname")
        self.assertEqual(
            term["labelSelector"]["matchLabels"],
            self.deployment["spec"]["selector"]["matchLabels"],
        )

    def test_probes(self):
        """
        Readiness and liveness probe /healthz on the healthz port.
        """
        for probe in ("readinessProbe", "livenessProbe"):
            check = self.container[probe]["httpGet"]
            self.assertEqual(check["path"], "/healthz")
            self.assertEqual(check["port"], "healthz")

    def test_namespace_from_downward_api(self):
        """
        NAMESPACE comes from the pod's namespace.
        """
        env = {item["name"]: item for item in self.container["env"]}
        self.assertEqual(
            env["NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"], "metadata.namespace"
        )

    def test_projected_token(self):
        """
        A projected, expiring service-account token and the cluster CA are
        mounted where sentry_tx reads them.
        """
        mounts = {mount["name"]: mount for mount in self.container["volumeMounts"]}
        volumes = {volume["name"]: volume for volume in self.pod["volumes"]}
        mount = mounts["kube-api-access"]
        self.assertEqual(mount["mountPath"], SERVICE_ACCOUNT_DIRECTORY)
        sources = volumes["kube-api-access"]["projected"]["sources"]
        token = [
            s["serviceAccountToken"] for s in sources if "serviceAccountToken" in s
        ]
        self.assertEqual(token[0]["path"], "token")
        self.assertIn("expirationSeconds", token[0])
        ca = [s["configMap"] for s in sources if "configMap" in s]
        self.assertEqual(ca[0]["items"][0]["path"], "ca.crt")
        self.assertFalse(self.pod["automountServiceAccountToken"])

    def test_non_root(self):
        """
        The pod runs as the image's non-root user, without privileges.
        """
        self.assertTrue(self.pod["securityContext"]["runAsNonRoot"])
        self.assertEqual(self.pod["securityContext"]["runAsUser"], 65532)
        self.assertFalse(self.container["securityContext"]["allowPrivilegeEscalation"])
        self.assertEqual(
            self.container["securityContext"]["capabilities"]["drop"], ["ALL"]
        )

    def test_service(self):
        """
        The Service maps 443 to the gRPC port (named grpc, as Dapr's) and
        exposes metrics, selecting the Deployment's pods.
        """
        service = self.documents[("Service", "dapr-sentry")]
        ports = {port["name"]: port for port in service["spec"]["ports"]}
        self.assertEqual(ports["grpc"]["port"], 443)
        self.assertEqual(ports["grpc"]["targetPort"], self._container_port("grpc"))
        self.assertEqual(
            ports["metrics"]["targetPort"], self._container_port("metrics")
        )
        labels = self.deployment["spec"]["template"]["metadata"]["labels"]
        # An empty selector would select nothing in particular.
        self.assertTrue(service["spec"]["selector"])
        for key, value in service["spec"]["selector"].items():
            self.assertEqual(labels[key], value)

    def test_service_account(self):
        """
        The pod runs as the ServiceAccount the bindings grant to.
        """
        account = self.pod["serviceAccountName"]
        self.assertIn(("ServiceAccount", account), self.documents)
        for kind in ("ClusterRoleBinding", "RoleBinding"):
            binding = self.documents[(kind, "dapr-sentry")]
            self.assertEqual(
                binding["subjects"],
                [
                    {
                        "kind": "ServiceAccount",
                        "name": account,
                        "namespace": "dapr-system",
                    }
                ],
            )
            self.assertEqual(binding["roleRef"]["kind"], kind.replace("Binding", ""))
            self.assertIn(
                (binding["roleRef"]["kind"], binding["roleRef"]["name"]), self.documents
            )

    def test_cluster_role_least_privilege(self):
        """
        Cluster-wide: create TokenReviews; get, list and watch Pods and
        Configurations (the validator's watch); nothing else, as Dapr's chart.
        """
        rules = self.documents[("ClusterRole", "dapr-sentry")]["rules"]
        granted = {
            (group, resource, verb)
            for rule in rules
            for group in rule["apiGroups"]
            for resource in rule["resources"]
            for verb in rule["verbs"]
        }
        self.assertEqual(
            granted,
            {
                ("authentication.k8s.io", "tokenreviews", "create"),
                ("", "pods", "get"),
                ("", "pods", "list"),
                ("", "pods", "watch"),
                ("dapr.io", "configurations", "get"),
                ("dapr.io", "configurations", "list"),
                ("dapr.io", "configurations", "watch"),
            },
        )

    def test_role_least_privilege(self):
        """
        In its namespace: get and update of the dapr-trust-bundle Secret and
        ConfigMap only, restricted by resourceNames.
        """
        rules = self.documents[("Role", "dapr-sentry")]["rules"]
        for rule in rules:
            self.assertEqual(rule["resourceNames"], [TRUST_BUNDLE_NAME])
            self.assertEqual(sorted(rule["verbs"]), ["get", "update"])
        self.assertEqual(
            sorted(resource for rule in rules for resource in rule["resources"]),
            ["configmaps", "secrets"],
        )

    def test_no_wildcards(self):
        """
        No rule grants "*".
        """
        for kind in ("ClusterRole", "Role"):
            rules = self.documents[(kind, "dapr-sentry")]["rules"]
            self.assertTrue(rules, kind)
            for rule in rules:
                for field in ("apiGroups", "resources", "verbs"):
                    self.assertNotIn("*", rule[field])

    def test_trust_bundle_objects_empty(self):
        """
        The Secret and ConfigMap are shipped without data (sentry_tx fills
        them; re-applying keeps what it wrote).
        """
        for kind in ("Secret", "ConfigMap"):
            document = self.documents[(kind, TRUST_BUNDLE_NAME)]
            self.assertNotIn("data", document)

    def test_configuration(self):
        """
        The sample Configuration is the one --config names, and valid.
        """
        config = self._options()
        configuration = self.documents[("Configuration", config.config)]
        mtls = parse_mtls(configuration, "configuration.yaml")
        self.assertEqual(mtls.workload_cert_ttl.total_seconds(), 24 * 3600)


class DockerfileTests(SynchronousTestCase):
    """
    C{conf/Dockerfile}.
    """

    def setUp(self):
        self.instructions = dockerfile_instructions()

    def _arguments(self, instruction):
        return [
            arguments for name, arguments in self.instructions if name == instruction
        ]

    def test_base_image(self):
        """
        The base is a build argument whose default is python:3.11-slim
        (bookworm), to be pinned by digest as the comment above it says.
        """
        self.assertEqual(self._arguments("FROM"), ["${BASE_IMAGE}"])
        (argument,) = self._arguments("ARG")
        self.assertEqual(argument, "BASE_IMAGE=python:3.11-slim-bookworm")
        with open(DOCKERFILE, encoding="utf-8") as f:
            text = f.read()
        self.assertIn("--build-arg BASE_IMAGE=python:3.11-slim-bookworm@sha256:", text)
        self.assertIn("To bump:", text)

    def test_entrypoint(self):
        """
        The entrypoint is twistd in the foreground without a pid file, the
        command the process tests run.
        """
        (entrypoint,) = self._arguments("ENTRYPOINT")
        self.assertEqual(json.loads(entrypoint), ENTRYPOINT)

    def test_exposed_ports(self):
        """
        The exposed ports are sentry_tx's default ports.
        """
        defaults = SentryConfig()
        (exposed,) = self._arguments("EXPOSE")
        self.assertEqual(
            sorted(int(port) for port in exposed.split()),
            sorted([defaults.port, defaults.healthz_port, defaults.metrics_port]),
        )

    def test_non_root_user(self):
        """
        The image runs as a non-root user, the one the Deployment expects.
        """
        (user,) = self._arguments("USER")
        self.assertEqual(user, "65532:65532")

    def test_installs_project_and_plugin_cache(self):
        """
        The project is installed with pip (not editable) and the plugin
        cache is written while still root.
        """
        runs = " ".join(self._arguments("RUN"))
        self.assertIn("pip install -c conf/constraints.txt .", runs)
        self.assertNotIn("pip install -e", runs)
        self.assertIn("list(getPlugins(IPlugin))", runs)
        names = [name for name, _ in self.instructions]
        self.assertLess(
            max(i for i, name in enumerate(names) if name == "RUN"), names.index("USER")
        )

    def test_healthcheck(self):
        """
        The health check is sentry_tx's own probe, which follows
        --healthz-port (no curl in slim images, no port written here).
        """
        (healthcheck,) = self._arguments("HEALTHCHECK")
        command = json.loads(healthcheck.split("CMD", 1)[1])
        self.assertEqual(command, ["python", "-m", "sentry_tx", "healthcheck"])
        self.assertNotIn("8080", healthcheck)

    def test_sentry_executable(self):
        """
        /sentry, the command Dapr's chart runs, is installed executable and
        runs the ENTRYPOINT's command with the chart's arguments.
        """
        runs = " ".join(self._arguments("RUN"))
        self.assertIn("install -m 0755 conf/sentry /sentry", runs)
        path = os.path.join(CONF, "sentry")
        self.assertTrue(os.access(path, os.X_OK))
        with open(path, encoding="utf-8") as f:
            lines = [line for line in f if line.strip() and not line.startswith("#")]
        self.assertEqual(lines, [f'exec {" ".join(ENTRYPOINT)} "$@"\n'])

    def test_default_credentials_directory_owned(self):
        """
        The default --issuer-credentials exists in the image, owned by the
        unprivileged user (standalone mode generates a bundle there).
        """
        runs = " ".join(self._arguments("RUN"))
        self.assertIn(
            f"install -d -o sentry -g sentry -m 0700 "
            f"{SentryConfig().issuer_credentials}",
            runs,
        )

    def test_constraints_pin_every_dependency(self):
        """
        conf/constraints.txt pins (==) every distribution that installing
        sentry_tx brings in: setup.py's requirements and theirs, followed
        through the installed distributions' metadata (extras as asked).
        """
        with open(os.path.join(CONF, "constraints.txt"), encoding="utf-8") as f:
            pins = {
                _canonical(line.split("==")[0]): line.split("==")[1]
                for line in f.read().splitlines()
                if line and not line.startswith("#")
            }
        required = _runtime_closure("sentry_tx")
        self.assertIn("joserfc", required)
        self.assertEqual(sorted(required - set(pins)), [])

    def test_copied_paths_exist(self):
        """
        Every path the image copies from the build context exists.
        """
        copies = self._arguments("COPY")
        self.assertTrue(copies, "the Dockerfile copies nothing")
        for arguments in copies:
            sources = arguments.split()[:-1]
            self.assertTrue(sources, arguments)
            for source in sources:
                self.assertTrue(
                    os.path.exists(os.path.join(PROJECT_ROOT, source)), source
                )
