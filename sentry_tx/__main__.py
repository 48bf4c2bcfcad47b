# -*- test-case-name: tests.test_bundle_check,tests.test_healthcheck -*-
"""
C{python -m sentry_tx COMMAND}: sentry_tx's operator commands.

  - C{check-bundle DIR}: would sentry_tx start with the trust bundle in DIR?
    (L{sentry_tx.bundle_check})
  - C{healthcheck [PID]}: is the sentry_tx running as process PID (1)
    healthy, on the healthz port its flags chose?  (L{sentry_tx.healthcheck},
    the image's HEALTHCHECK)

  - C{serve [flags]}: one serving copy, started by the twistd process
    itself with its own flags (L{sentry_tx.serve}); not for operators.

The CA itself runs under twistd: C{twistd -n sentry} (or C{/sentry} in the
image).
"""

import sys

from sentry_tx.bundle_check import CHECK_BUNDLE_COMMAND
from sentry_tx.healthcheck import HEALTHCHECK_COMMAND


def main(argv: list[str] | None = None) -> int:
    """
    Run the operator command C{argv} names.

    @return: the process's exit status.
    """
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == [CHECK_BUNDLE_COMMAND]:
        from sentry_tx.bundle_check import main as check_bundle_main

        status: int = check_bundle_main(argv[1:])
        return status
    if argv[:1] == ["serve"]:
        from sentry_tx.serve import main as serve_main

        serve_status: int = serve_main(argv[1:])
        return serve_status
    if argv[:1] == [HEALTHCHECK_COMMAND]:
        from sentry_tx.healthcheck import main as healthcheck_main

        status = healthcheck_main(argv[1:])
        return status
    sys.stderr.write(
        f"usage: python -m sentry_tx {CHECK_BUNDLE_COMMAND} DIR\n"
        f"       python -m sentry_tx {HEALTHCHECK_COMMAND} [PID]\n"
        "(the CA itself runs as: twistd -n sentry [flags])\n"
    )
    return 2


if __name__ == "__main__":
    sys.exit(main())
