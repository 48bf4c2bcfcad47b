# -*- test-case-name: tests.test_fuzz -*-
"""
The hypothesis profiles of sentry_tx's property-based tests.

Importing this module registers two profiles and loads the one named by the
environment variable C{HYPOTHESIS_PROFILE} (default C{ci}):

  - C{ci}: quick and deterministic (the same examples on every run), for
    every test run and CI;
  - C{long}: many more random examples, for a fuzzing session::

        HYPOTHESIS_PROFILE=long .venv/bin/python -m twisted.trial tests.test_fuzz

    (C{tox -e fuzz} runs the same.)

Neither profile writes an example database: a failure prints the
falsifying example and the C{@reproduce_failure} blob to paste instead.
"""

import functools
import os
from collections.abc import Callable
from typing import Any, TypeVar

from hypothesis import HealthCheck, settings

PROFILE_ENVIRONMENT_VARIABLE = "HYPOTHESIS_PROFILE"
DEFAULT_PROFILE = "ci"

CI_MAX_EXAMPLES = 60
LONG_MAX_EXAMPLES = 5000

_SLOW_IS_FINE = [HealthCheck.too_slow, HealthCheck.data_too_large]

settings.register_profile(
    "ci",
    max_examples=CI_MAX_EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    report_multiple_bugs=False,
    suppress_health_check=_SLOW_IS_FINE,
)
settings.register_profile(
    "long",
    max_examples=LONG_MAX_EXAMPLES,
    deadline=None,
    database=None,
    print_blob=True,
    report_multiple_bugs=False,
    suppress_health_check=_SLOW_IS_FINE,
)
settings.load_profile(os.environ.get(PROFILE_ENVIRONMENT_VARIABLE, DEFAULT_PROFILE))

_Result = TypeVar("_Result")


def scaled_examples(fraction: float) -> int:
    """
    A share of the loaded profile's C{max_examples}, at least 5: for tests
    whose examples are expensive (a real gRPC call each).

    @param fraction: a L{float} in (0, 1].
    """
    return max(5, int(settings().max_examples * fraction))


def show_notes(test: Callable[..., _Result]) -> Callable[..., _Result]:
    """
    Decorate a C{@given} test so that a failure's message ends with the
    exception's notes: hypothesis attaches the falsifying example (and what
    the test passed to C{note}) as notes, which trial does not print.
    """

    @functools.wraps(test)
    def wrapper(*args: Any, **kwargs: Any) -> _Result:
        try:
            return test(*args, **kwargs)
        except Exception as e:
            notes = getattr(e, "__notes__", None)
            if notes and len(e.args) <= 1:
                message = str(e.args[0]) if e.args else ""
                e.args = ("\n".join([message, *notes]),)
            raise

    return wrapper
