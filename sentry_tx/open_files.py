# -*- test-case-name: tests.test_open_files -*-
"""
The process's limit on open files.

Containers commonly start processes with a soft C{RLIMIT_NOFILE} of 1,024
and a much higher hard limit.  Every connection sentry_tx holds (gRPC
callers, healthz probes, metrics scrapes) is a file descriptor, so at start
it raises the soft limit to the hard one (which needs no privilege) and
logs the limit it runs with.
"""

import resource
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class OpenFileLimit:
    """
    The soft limit before and after the raise, the hard limit, and why the
    raise failed (None when it did not).
    """

    before: int
    after: int
    hard: int
    error: str | None = None


def _show(limit: int) -> str:
    return "unlimited" if limit == resource.RLIM_INFINITY else str(limit)


def raise_open_file_limit(
    getrlimit: Callable[[int], tuple[int, int]] = resource.getrlimit,
    setrlimit: Callable[[int, tuple[int, int]], None] = resource.setrlimit,
) -> OpenFileLimit:
    """
    Raise the soft C{RLIMIT_NOFILE} to the hard limit.

    @param getrlimit: L{resource.getrlimit}, or a test's stand-in.
    @param setrlimit: L{resource.setrlimit}, or a test's stand-in.
    @return: an L{OpenFileLimit}.
    """
    soft, hard = getrlimit(resource.RLIMIT_NOFILE)
    if soft == hard:
        return OpenFileLimit(soft, soft, hard)
    try:
        setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (OSError, ValueError) as e:
        return OpenFileLimit(soft, soft, hard, str(e))
    return OpenFileLimit(soft, getrlimit(resource.RLIMIT_NOFILE)[0], hard)


def describe(limit: OpenFileLimit) -> str:
    """
    An L{OpenFileLimit} as one sentence for the log.
    """
    if limit.error is not None:
        return (
            f"open file limit stays {_show(limit.before)} (hard limit"
            f" {_show(limit.hard)}): raising it failed: {limit.error}"
        )
    if limit.before != limit.after:
        return (
            f"open file limit raised from {_show(limit.before)} to"
            f" {_show(limit.after)} (the hard limit)"
        )
    return f"open file limit is {_show(limit.after)} (the hard limit)"
