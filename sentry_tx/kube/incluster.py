# -*- test-case-name: tests.test_kube_client,tests.test_kube_connection -*-
"""
The connection of a pod to its own cluster:
C{https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT} with the
service-account token (re-read as it rotates) and C{ca.crt} of
L{SERVICE_ACCOUNT_DIRECTORY}.
"""

import os
from collections.abc import Mapping

from twisted.internet.interfaces import IReactorTime

from sentry_tx.errors import ConfigError
from sentry_tx.kube.connection import (
    TOKEN_FILE_CHECK_INTERVAL_SECONDS,
    ClusterConnection,
    TokenFile,
    check_certificates,
    read_limited,
)

SERVICE_ACCOUNT_DIRECTORY = "/var/run/secrets/kubernetes.io/serviceaccount"
"""
Where Kubernetes mounts a pod's service-account token and cluster CA.
"""

SERVICE_ACCOUNT_TOKEN_FILENAME = "token"
SERVICE_ACCOUNT_CA_FILENAME = "ca.crt"

KUBERNETES_SERVICE_HOST_VARIABLE = "KUBERNETES_SERVICE_HOST"
KUBERNETES_SERVICE_PORT_VARIABLE = "KUBERNETES_SERVICE_PORT"


def in_cluster_connection(
    environ: Mapping[str, str],
    clock: IReactorTime,
    service_account_directory: str = SERVICE_ACCOUNT_DIRECTORY,
    token_check_interval_seconds: float = TOKEN_FILE_CHECK_INTERVAL_SECONDS,
) -> ClusterConnection:
    """
    The settings of a pod: the API server at
    C{$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT}, the token and CA
    of the mounted service account.

    @param environ: the environment.
    @param clock: an C{IReactorTime}, for the token file's re-reads.
    @param service_account_directory: where the token and C{ca.crt} are.
    @return: a L{ClusterConnection}.
    @raise ConfigError: when a variable or file is missing or wrong.
    """
    host = environ.get(KUBERNETES_SERVICE_HOST_VARIABLE, "")
    port = environ.get(KUBERNETES_SERVICE_PORT_VARIABLE, "")
    if not host or not port:
        raise ConfigError(
            f"${KUBERNETES_SERVICE_HOST_VARIABLE}",
            f"in-cluster mode needs both ${KUBERNETES_SERVICE_HOST_VARIABLE} and"
            f" ${KUBERNETES_SERVICE_PORT_VARIABLE} (or give --kubeconfig)",
        )
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(
            f"${KUBERNETES_SERVICE_PORT_VARIABLE}", f"not a port number: {port!r}"
        )
    if ":" in host:
        host = f"[{host}]"
    ca_path = os.path.join(service_account_directory, SERVICE_ACCOUNT_CA_FILENAME)
    try:
        ca_pem = read_limited(ca_path)
    except (OSError, ValueError) as e:
        raise ConfigError(
            ca_path, f"cannot be read: {getattr(e, 'strerror', None) or e}"
        ) from None
    token_path = os.path.join(service_account_directory, SERVICE_ACCOUNT_TOKEN_FILENAME)
    return ClusterConnection(
        server=f"https://{host}:{int(port)}",
        description=f"in-cluster service account ({service_account_directory})",
        trust_roots_pem=check_certificates(ca_pem, ca_path),
        token=TokenFile(
            token_path, clock, token_check_interval_seconds, field=token_path
        ),
    )
