"""
A Helm chart rendered by Helm itself: helm-python-sdk (the C{test} extra)
binds Helm v4's Go SDK as a C library, so no C{helm} binary is needed.

The rendering runs in a child process (C{python -m sentry_tx.testing.helm}),
bounded by a timeout: the Go runtime the library brings then never shares a
process (its threads and signal handlers) with the reactor of the test that
asks, and a render that hangs is killed instead of hanging the test.
"""

import json
import subprocess
import sys
from collections.abc import Mapping
from typing import Any

from sentry_tx.testing.source_tree import child_environment

RENDER_TIMEOUT_SECONDS = 60
"""
How long a render may take before its process is killed (one takes well
under a second here).
"""


def render_chart(
    chart: str,
    values_yaml: str,
    overrides: Mapping[str, Any],
    release: str,
    namespace: str,
) -> dict[str, str]:
    """
    Render C{chart} as C{helm template RELEASE CHART -n NAMESPACE -f
    VALUES --set ...} would (C{overrides} merged over the values file, as
    later values win in Helm). Blocks: call it in a thread.

    @param chart: the chart's directory.
    @param values_yaml: the text of a values file.
    @param overrides: a L{dict} of values set on top of it.
    @return: a L{dict} of template path (C{dapr/charts/.../x.yaml}) to
        rendered text.
    @raise subprocess.TimeoutExpired: after L{RENDER_TIMEOUT_SECONDS}.
    @raise RuntimeError: when Helm refuses the chart or the values.
    """
    request = {
        "chart": chart,
        "values_yaml": values_yaml,
        "overrides": overrides,
        "release": release,
        "namespace": namespace,
    }
    result = subprocess.run(
        [sys.executable, "-m", "sentry_tx.testing.helm"],
        input=json.dumps(request).encode(),
        capture_output=True,
        env=child_environment(),
        timeout=RENDER_TIMEOUT_SECONDS,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"helm render failed: {result.stderr.decode(errors='replace')}"
        )
    manifests: dict[str, str] = json.loads(result.stdout)
    return manifests


def merge_values(
    base: Mapping[str, Any], overrides: Mapping[str, Any]
) -> dict[str, Any]:
    """
    C{overrides} merged into a copy of C{base}, maps recursively, as Helm
    merges values files: a later value wins.
    """
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_values(merged[key], value)
        else:
            merged[key] = value
    return merged


def _main() -> None:
    """
    The child: read a request (JSON) on standard input, write the rendered
    manifests (JSON) on standard output.
    """
    import helm_python

    request = json.load(sys.stdin)
    values = merge_values(
        helm_python.values_from_yaml(request["values_yaml"]), request["overrides"]
    )
    with helm_python.Chart.load(request["chart"]) as chart:
        manifests = chart.render(
            values,
            name=request["release"],
            namespace=request["namespace"],
            is_install=True,
        )
    json.dump(manifests, sys.stdout)


if __name__ == "__main__":
    _main()
