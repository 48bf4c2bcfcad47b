"""
Where sentry_tx's source tree is, and the environment of the processes tests
start (trial runs in a temporary directory, so they need it on their
PYTHONPATH).
"""

import os

PROJECT_ROOT = os.path.dirname(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
)
"""
The top of the source tree (where C{sentry_tx/} and C{twisted/plugins/}
are): processes that tests start put it on their PYTHONPATH, since trial
runs in a temporary directory.
"""


def child_environment() -> dict[str, str]:
    """
    The environment of a process a test starts: this one's, with the source
    tree first on C{PYTHONPATH} and without C{KUBERNETES_SERVICE_HOST} (a
    test run inside a pod must not make the child think it is in-cluster).

    @return: a new L{dict}.
    """
    environ = dict(os.environ)
    environ.pop("KUBERNETES_SERVICE_HOST", None)
    environ["PYTHONPATH"] = os.pathsep.join(
        [PROJECT_ROOT] + [p for p in [environ.get("PYTHONPATH")] if p]
    )
    return environ
