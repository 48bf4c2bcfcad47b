# -*- test-case-name: tests.test_config -*-
"""
Go's C{time.Duration} text, read and written as Go does (C{24h0m0s},
C{1.5s}): the durations of Dapr's flags and Configuration.
"""

import re
from datetime import timedelta
from fractions import Fraction

from sentry_tx.errors import ConfigError

_NANOSECONDS_PER_UNIT = {
    "ns": 1,
    "us": 1_000,
    "\u00b5s": 1_000,  # MICRO SIGN, as Go accepts it
    "\u03bcs": 1_000,  # GREEK SMALL LETTER MU, as Go accepts it
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60 * 1_000_000_000,
    "h": 3600 * 1_000_000_000,
}

# Go's time.Duration is an int64 count of nanoseconds.
_MAX_DURATION_NANOSECONDS = 2**63 - 1
_MIN_DURATION_NANOSECONDS = -(2**63)

# One "<number><unit>" component: digits with an optional fraction (at least
# one digit on one side of the dot), then a unit made of non-digit, non-dot
# characters (checked against the table afterwards, as Go does).
_DURATION_COMPONENT = re.compile(r"(\d*)(?:\.(\d*))?([^\d.]*)")


def parse_go_duration(text: object, field: str) -> timedelta:
    """
    Parse a duration in the syntax of Go's C{time.ParseDuration}.

    A duration is an optional sign followed by one or more components, each a
    decimal number with an optional fraction and a unit (C{ns}, C{us}, C{µs},
    C{ms}, C{s}, C{m}, C{h}): C{"1h30m"}, C{"90s"}, C{"1.5h"}, C{"-2m"}.  The
    bare string C{"0"} is zero.  No spaces are allowed.  As in Go, the total
    must fit in a signed 64-bit count of nanoseconds (about 292 years).

    L{timedelta} has microsecond resolution: nanoseconds below a whole
    microsecond are truncated toward zero.

    @param text: the duration text.
    @type text: L{str}

    @param field: the flag or field the text came from, for the error.
    @type field: L{str}

    @return: the duration.
    @rtype: L{timedelta}

    @raise ConfigError: if C{text} is not a Go duration.
    """
    nanoseconds = _go_duration_nanoseconds(text) if isinstance(text, str) else None
    if nanoseconds is None:
        raise ConfigError(
            field, f"not a duration: {text!r} (use e.g. 24h, 90m, 30s)"
        )
    whole_microseconds = abs(nanoseconds) // 1_000
    return timedelta(
        microseconds=-whole_microseconds if nanoseconds < 0 else whole_microseconds
    )


def _go_duration_nanoseconds(text: str) -> int | None:
    """
    The number of nanoseconds C{text} means in Go's duration syntax.

    @param text: the duration text.
    @type text: L{str}

    @return: the signed count of nanoseconds, or L{None} if C{text} is not a
        valid Go duration.
    @rtype: L{int} or L{None}
    """
    rest = text
    negative = False
    if rest[:1] in ("-", "+"):
        negative = rest[0] == "-"
        rest = rest[1:]
    if rest == "0":
        return 0
    if not rest:
        return None
    total = Fraction(0)
    position = 0
    while position < len(rest):
        match = _DURATION_COMPONENT.match(rest, position)
        assert match is not None  # every part of the pattern may be empty
        whole, fraction, unit = match.groups()
        if not whole and not fraction:
            # Neither side of the dot has a digit: "", ".", ".s", "h".
            return None
        if unit not in _NANOSECONDS_PER_UNIT:
            return None
        number = Fraction(int(whole or "0"))
        if fraction:
            number += Fraction(int(fraction), 10 ** len(fraction))
        total += number * _NANOSECONDS_PER_UNIT[unit]
        position = match.end()
    nanoseconds = int(total)  # truncates toward zero, like Go
    if negative:
        nanoseconds = -nanoseconds
    if not _MIN_DURATION_NANOSECONDS <= nanoseconds <= _MAX_DURATION_NANOSECONDS:
        return None
    return nanoseconds


def format_go_duration(duration: timedelta) -> str:
    """
    A L{timedelta} written as Go's C{time.Duration.String} writes it
    (C{24h0m0s}, C{15m0s}, C{1.5s}, C{0s}), whole microseconds and above.
    """
    microseconds = (
        duration.days * 86_400_000_000
        + duration.seconds * 1_000_000
        + duration.microseconds
    )
    sign = "-" if microseconds < 0 else ""
    microseconds = abs(microseconds)
    if microseconds == 0:
        return "0s"
    if microseconds < 1_000_000:
        if microseconds % 1000 == 0:
            return f"{sign}{microseconds // 1000}ms"
        return f"{sign}{microseconds}\u00b5s"
    hours, rest = divmod(microseconds, 3_600_000_000)
    minutes, rest = divmod(rest, 60_000_000)
    seconds, fraction = divmod(rest, 1_000_000)
    text = f"{seconds}"
    if fraction:
        text += "." + f"{fraction:06d}".rstrip("0")
    text += "s"
    if hours:
        return f"{sign}{hours}h{minutes}m{text}"
    if minutes:
        return f"{sign}{minutes}m{text}"
    return f"{sign}{text}"
