# -*- test-case-name: tests.test_kube_deploy,tests.test_deploy_policies -*-
"""
Where the deployment files are (C{conf/}: the Kubernetes manifests, the
Dockerfile) and what the image runs, read as the deployment tests read them.

Moved here from C{tests.test_kube_deploy} so that the deployment and
process tests share them without importing one another.
"""

from __future__ import annotations

import os
from typing import Any

from sentry_tx.testing.source_tree import PROJECT_ROOT

CONF = os.path.join(PROJECT_ROOT, "conf")
MANIFESTS = os.path.join(CONF, "kubernetes")
DOCKERFILE = os.path.join(CONF, "Dockerfile")

ENTRYPOINT = ["twistd", "-n", "--pidfile=", "sentry"]
"""
The command the image runs, and the one tests/test_process.py and
tests/test_kube_process.py run (C{twistd} then these arguments).
"""


def load_manifests() -> dict[tuple[str, str], dict[str, Any]]:
    """
    Every document of every YAML file in C{conf/kubernetes}, by C{(kind,
    name)}.
    """
    import yaml

    documents = {}
    for filename in sorted(os.listdir(MANIFESTS)):
        if not filename.endswith(".yaml") or filename == "kustomization.yaml":
            continue
        with open(os.path.join(MANIFESTS, filename), encoding="utf-8") as f:
            for document in yaml.safe_load_all(f):
                if document is not None:
                    key = (document["kind"], document["metadata"]["name"])
                    documents[key] = document
    return documents
