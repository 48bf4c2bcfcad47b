# -*- test-case-name: tests.test_healthcheck -*-
"""
C{python -m sentry_tx healthcheck}: the image's HEALTHCHECK.

It asks C{/healthz} on the port the running sentry_tx was told to use: it
reads the command line of the container's first process (twistd, started by
C{/sentry} or the ENTRYPOINT), finds C{--healthz-port} and
C{--healthz-listen-address} among the flags after C{sentry}, and fetches
C{http://<address>/healthz} with a short timeout.  Exit status 0 when the
answer is 200, 1 otherwise (as Docker's HEALTHCHECK wants).

This runs in its own short-lived process, outside the reactor: a blocking
fetch with a timeout is what it is for.
"""

import sys
import urllib.error
import urllib.request
from typing import TextIO

from sentry_tx.config import SentryConfig

HEALTHCHECK_COMMAND = "healthcheck"

HEALTHCHECK_TIMEOUT_SECONDS = 2.0
"""
How long the probe waits for C{/healthz}; below the Dockerfile's
C{--timeout}.
"""

_PLUGIN_NAME = "sentry"
_ALL_INTERFACES = ("", "0.0.0.0", "::", "[::]")


def healthz_url(argv: list[str]) -> str:
    """
    The C{/healthz} URL of a sentry_tx started with C{argv}.

    @param argv: the whole command line (C{twistd -n --pidfile= sentry
        --healthz-port 8081 ...}).
    @return: the URL: the flags' port (default 8080) on their address, or
        on 127.0.0.1 when it listens on all interfaces.
    """
    from sentry_tx.errors import ConfigError
    from sentry_tx.flags import go_style_arguments

    port = str(SentryConfig().healthz_port)
    address = ""
    if _PLUGIN_NAME in argv:
        arguments = argv[argv.index(_PLUGIN_NAME) + 1 :]
        try:
            rewritten = go_style_arguments(arguments)
        except ConfigError:
            rewritten = []
        for argument in rewritten:
            name, _, value = argument.partition("=")
            if name == "--healthz-port":
                port = value
            elif name == "--healthz-listen-address":
                address = value
    if address in _ALL_INTERFACES:
        address = "127.0.0.1"
    elif ":" in address and not address.startswith("["):
        address = f"[{address}]"
    return f"http://{address}:{port}/healthz"


def probe(url: str, timeout: float = HEALTHCHECK_TIMEOUT_SECONDS) -> bool:
    """
    Whether C{url} answers 200 within C{timeout} seconds.
    """
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            status: int = response.status
            return status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def read_command_line(pid: int = 1) -> list[str]:
    """
    The command line of process C{pid}, from C{/proc}.
    """
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return [
            part.decode("utf-8", "replace") for part in f.read().split(b"\0") if part
        ]


def main(argv: list[str], pid: int = 1, out: TextIO | None = None) -> int:
    """
    The C{healthcheck} command: C{[PID]} (default 1, the container's first
    process).

    @return: 0 when healthy, 1 when not.
    """
    out = sys.stdout if out is None else out
    if argv:
        pid = int(argv[0])
    try:
        url = healthz_url(read_command_line(pid))
    except OSError as error:
        out.write(
            f"unhealthy: cannot read the command line of process {pid}: {error}\n"
        )
        return 1
    if probe(url):
        return 0
    out.write(f"unhealthy: {url} did not answer 200\n")
    return 1
