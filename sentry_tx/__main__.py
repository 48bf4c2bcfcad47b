"""
C{python -m sentry_tx COMMAND}: sentry_tx's operator commands.

  - C{check-bundle DIR}: would sentry_tx start with the trust bundle in DIR?
    (L{sentry_tx.bundle_check})

The CA itself runs under twistd: C{twistd -n sentry} (or C{/sentry} in the
image).
"""

import sys

from sentry_tx.bundle_check import CHECK_BUNDLE_COMMAND


def main(argv=None):
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == [CHECK_BUNDLE_COMMAND]:
        from sentry_tx.bundle_check import main as check_bundle_main

        return check_bundle_main(argv[1:])
    sys.stderr.write(
        f"usage: python -m sentry_tx {CHECK_BUNDLE_COMMAND} DIR\n"
        "(the CA itself runs as: twistd -n sentry [flags])\n"
    )
    return 2


if __name__ == "__main__":
    sys.exit(main())
