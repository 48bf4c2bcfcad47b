# -*- test-case-name: tests.test_logs,tests.test_http_listener,tests.test_oidc -*-
"""
Log output in Dapr's shape.

L{make_observer} builds the one observer sentry_tx logs to: it drops events
below the chosen level (Twisted's own events too) and writes each remaining
event as one line of text, or as one JSON object per line with the fields
Dapr's logger writes (C{time}, C{level}, C{msg}, C{scope}, C{type},
C{instance}, C{ver}).

L{open_twistd_log_file} picks where the lines go under C{twistd} exactly as
twistd would have (stdout, C{--logfile}, or C{twistd.log}).

What a caller sent is never written whole: L{quote_input} cuts it to
L{MAX_QUOTED_CHARACTERS} and escapes what is not printable, and
L{RefusalLog} writes at most one line per kind of refusal per interval, so
that a client cannot grow the log faster than the interval allows.
"""

import json
import socket
import string
import sys
import time
from collections.abc import Callable, Hashable
from datetime import UTC, datetime
from types import FrameType
from typing import Any, Protocol, cast

from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.logger import ILogObserver, LogEvent, Logger, LogLevel, formatEvent
from twisted.python import logfile
from twisted.python.failure import Failure
from zope.interface import implementer

import sentry_tx

# The --log-level words and the Twisted level each one lets through.
LOG_LEVELS = {
    "debug": LogLevel.debug,
    "info": LogLevel.info,
    "warn": LogLevel.warn,
    "error": LogLevel.error,
    "fatal": LogLevel.critical,
}

# The word Dapr's logger writes for each Twisted level.
_DAPR_LEVEL_NAMES = {
    LogLevel.debug: "debug",
    LogLevel.info: "info",
    LogLevel.warn: "warning",
    LogLevel.error: "error",
    LogLevel.critical: "fatal",
}

# Dapr's logger scope for sentry_tx's namespaces: the longest prefix (ending
# at a dot or the end) of the event's log_namespace wins.  Namespaces outside
# sentry_tx (Twisted's, for instance) are written as they are.
_SCOPES = (
    ("sentry_tx.ca", "dapr.sentry.ca"),
    ("sentry_tx.server", "dapr.sentry.server"),
    ("sentry_tx.identity.kubernetes", "dapr.sentry.identity.kubernetes"),
    ("sentry_tx.identity.jwks", "dapr.sentry.identity.jwks"),
    ("sentry_tx.identity", "dapr.sentry.identity"),
    ("sentry_tx.config", "dapr.sentry.config"),
    ("sentry_tx", "dapr.sentry"),
)

# The scope written for an event that carries no log_namespace.
_UNKNOWN_SCOPE = "-"

# Keys of the JSON object that an event's own fields never overwrite.
_JSON_RESERVED_KEYS = frozenset(
    ("time", "level", "msg", "scope", "type", "instance", "ver", "error")
)

_DEFAULT_TWISTD_LOG_FILE = "twistd.log"

PREFORMATTED_KEY = "sentry_preformatted_line"
"""
An event carrying this key is a line sentry_tx's observer already wrote in
another process (a serving copy's, read back from standard error): it is written
as it is.
"""

MAX_QUOTED_CHARACTERS = 256
"""
The most characters of a caller's input (a Host header, a path, a denial
message) that one field of a log line holds, marks included.
"""

REFUSAL_LOG_INTERVAL_SECONDS = 10.0
"""
How often L{RefusalLog} writes a line for one kind of refusal; the others
of that kind in between are counted, and the count is written with the
next line of the kind.
"""

# The file descriptors the observers made here write to (see writes_to_fd).
_OBSERVER_FDS: set[int] = set()


class LineStream(Protocol):
    """
    Where an observer writes its lines: a text file, C{sys.stdout}, a
    L{logfile.LogFile} (C{flush} is called when the stream has one).
    """

    def write(self, text: str, /) -> object:
        """
        Write C{text}.
        """


def writes_to_fd(fd: int) -> bool:
    """
    Whether an observer made by L{make_observer} writes to descriptor C{fd}.
    """
    return fd in _OBSERVER_FDS


def dapr_scope(namespace: str | None) -> str:
    """
    Dapr's logger scope for a Twisted log namespace.

    @param namespace: an event's C{log_namespace}, or L{None}.
    @type namespace: L{str} or L{None}

    @return: C{dapr.sentry...} for sentry_tx's namespaces, the namespace
        itself for others.
    @rtype: L{str}
    """
    if not namespace:
        return _UNKNOWN_SCOPE
    for prefix, scope in _SCOPES:
        if namespace == prefix or namespace.startswith(prefix + "."):
            return scope
    return namespace


def _rfc3339(timestamp: float) -> str:
    """
    Format a POSIX timestamp as RFC 3339 in UTC with milliseconds.

    @param timestamp: seconds since the epoch.
    @type timestamp: L{float}

    @rtype: L{str}
    """
    moment = datetime.fromtimestamp(timestamp, tz=UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _format_fields(event: LogEvent) -> list[str]:
    """
    The names of the event fields its C{log_format} refers to (C{{id}},
    C{{peer.host}} -> C{id}, C{peer}).

    Only these fields are copied into the JSON object: they are already part
    of the message, so the JSON output shows nothing the text does not.
    """
    log_format = event.get("log_format")
    if not isinstance(log_format, str):
        return []
    names: list[str] = []
    try:
        for _, field_name, _, _ in string.Formatter().parse(log_format):
            if field_name:
                name = field_name.split(".", 1)[0].split("[", 1)[0]
                if name and name not in names:
                    names.append(name)
    except ValueError:
        # A malformed format string; formatEvent says so in the message.
        return []
    return names


def _json_value(value: object) -> object:
    """
    C{value} if it serialises to JSON, else its C{str()} (or C{repr()}).
    """
    try:
        json.dumps(value)
        return value
    except Exception:
        pass
    try:
        return str(value)
    except Exception:
        return object.__repr__(value)


@implementer(ILogObserver)
class SentryLogObserver:
    """
    Write events at or above a level to a text stream, one line each, as
    text or as Dapr's JSON.

    @ivar _minimum_level: the lowest level written.
    @ivar _as_json: whether lines are JSON objects.
    @ivar stream: the file-like object lines are written to (its owner
        closes it).
    @ivar _instance: the host name written as C{instance}.
    @ivar _now: returns the current POSIX time, for events without a
        C{log_time}.
    """

    def __init__(
        self,
        minimum_level: LogLevel,
        as_json: bool,
        stream: LineStream,
        instance: str,
        now: Callable[[], float],
    ) -> None:
        """
        @param minimum_level: the lowest level written.
        @type minimum_level: L{LogLevel}

        @param as_json: write JSON objects rather than text.
        @type as_json: L{bool}

        @param stream: where lines are written; it needs C{write} (and
            C{flush}, which is used when present).

        @param instance: the host name written as C{instance}.
        @type instance: L{str}

        @param now: returns the current POSIX time.
        @type now: zero-argument callable returning L{float}
        """
        self._minimum_level = minimum_level
        self._as_json = as_json
        self.stream = stream
        self._instance = instance
        self._now = now

    def __call__(self, event: LogEvent) -> None:
        """
        Write C{event} if its level is high enough.  Never raises: a broken
        event is written as best it can be, and a stream that fails loses
        the line.

        @param event: a Twisted log event.
        @type event: L{dict}
        """
        try:
            level = event.get("log_level", LogLevel.info)
            if level not in _DAPR_LEVEL_NAMES:
                level = LogLevel.info
            if level < self._minimum_level:
                return
            preformatted = event.get(PREFORMATTED_KEY)
            if isinstance(preformatted, str):
                line = preformatted
            elif self._as_json:
                line = self._json_line(event, level)
            else:
                line = self._text_line(event, level)
        except Exception:
            line = self._emergency_line(event)
        try:
            self.stream.write(line + "\n")
            flush = getattr(self.stream, "flush", None)
            if flush is not None:
                flush()
        except Exception:
            pass

    def _time(self, event: LogEvent) -> str:
        timestamp = event.get("log_time")
        if not isinstance(timestamp, (int, float)):
            timestamp = self._now()
        return _rfc3339(timestamp)

    def _failure_summary(self, failure: Failure) -> str:
        """
        C{"<ExceptionType>: <message>"} for a L{Failure}.
        """
        try:
            return f"{type(failure.value).__name__}: {failure.getErrorMessage()}"
        except Exception:
            return "unprintable failure"

    def _failure_traceback(self, failure: Failure) -> str:
        try:
            return failure.getTraceback().rstrip("\n")
        except Exception:
            return self._failure_summary(failure)

    def _text_line(self, event: LogEvent, level: LogLevel) -> str:
        """
        C{"<time> <level> <scope>: <message>"}, followed by the traceback of
        an event that carries a failure.
        """
        message = formatEvent(event)
        line = (
            f"{self._time(event)} {_DAPR_LEVEL_NAMES[level]}"
            f" {dapr_scope(event.get('log_namespace'))}: {message}"
        )
        failure = event.get("log_failure")
        if failure is not None:
            line += "\n" + self._failure_traceback(failure)
        return line

    def _json_line(self, event: LogEvent, level: LogLevel) -> str:
        """
        One JSON object in Dapr's shape; an event with a failure gets the
        exception in C{msg} and its traceback in C{error}.
        """
        message = formatEvent(event)
        record: dict[str, Any] = {
            "time": self._time(event),
            "level": _DAPR_LEVEL_NAMES[level],
            "type": "log",
            "scope": dapr_scope(event.get("log_namespace")),
            "instance": self._instance,
            "ver": sentry_tx.__version__,
        }
        failure = event.get("log_failure")
        if failure is not None:
            summary = self._failure_summary(failure)
            message = f"{message}: {summary}" if message else summary
            record["error"] = self._failure_traceback(failure)
        record["msg"] = message
        for name in _format_fields(event):
            if name not in _JSON_RESERVED_KEYS and name in event:
                record[name] = _json_value(event[name])
        return json.dumps(record, default=str, ensure_ascii=False)

    def _emergency_line(self, event: object) -> str:
        """
        Something went wrong formatting C{event}: write what can be written.
        """
        namespace = event.get("log_namespace") if isinstance(event, dict) else None
        text = f"unable to format a log event from {namespace!r}"
        if self._as_json:
            return json.dumps(
                {
                    "time": _rfc3339(self._now()),
                    "level": "error",
                    "type": "log",
                    "scope": "dapr.sentry",
                    "instance": self._instance,
                    "ver": sentry_tx.__version__,
                    "msg": text,
                }
            )
        return f"{_rfc3339(self._now())} error dapr.sentry: {text}"


def _host_name() -> str:
    try:
        return socket.gethostname()
    except OSError:
        return ""


def make_observer(
    level: str,
    as_json: bool,
    stream: LineStream,
    now: Callable[[], float] | None = None,
) -> SentryLogObserver:
    """
    Build the observer sentry_tx logs to.

    @param level: the lowest level written, as C{--log-level} spells it:
        C{debug}, C{info}, C{warn}, C{error} or C{fatal} (Twisted's
        C{critical}).
    @type level: L{str}

    @param as_json: write one JSON object per line rather than text.
    @type as_json: L{bool}

    @param stream: where lines are written (C{write}, optionally C{flush}).

    @param now: returns the current POSIX time, for events without a
        C{log_time}; L{time.time} by default.
    @type now: zero-argument callable returning L{float}

    @return: the observer.
    @rtype: L{ILogObserver} provider

    @raise ValueError: if C{level} is not one of the five words.
    """
    if level not in LOG_LEVELS:
        raise ValueError(f"unknown log level {level!r}")
    if now is None:
        now = time.time
    try:
        fileno = getattr(stream, "fileno", None)
        if fileno is not None:
            _OBSERVER_FDS.add(fileno())
    except Exception:
        pass
    return SentryLogObserver(LOG_LEVELS[level], as_json, stream, _host_name(), now)


def open_twistd_log_file(logfile_option: str | None, nodaemon: bool) -> LineStream:
    """
    Where twistd would have written its log, given its C{--logfile} and
    C{--nodaemon} (mirrors C{UnixAppLogger._getLogObserver}, syslog aside).

    C{-}, or no log file when not daemonising, is stdout; a path is opened
    as a L{logfile.LogFile} (rotated on SIGUSR1 as twistd does, unless that
    signal is already handled); a daemon without C{--logfile} writes to
    C{twistd.log}.

    @param logfile_option: twistd's C{--logfile} value, or L{None}.
    @type logfile_option: L{str} or L{None}

    @param nodaemon: twistd's C{--nodaemon}.
    @type nodaemon: L{bool}

    @return: a writable stream.
    """
    if logfile_option == "-" or (nodaemon and not logfile_option):
        return sys.stdout
    log_file: logfile.LogFile = logfile.LogFile.fromFullPath(
        logfile_option or _DEFAULT_TWISTD_LOG_FILE
    )
    _rotate_on_sigusr1(log_file)
    return log_file


def _rotate_on_sigusr1(log_file: logfile.LogFile) -> None:
    """
    Rotate C{log_file} on SIGUSR1, as twistd does for its own log file,
    unless the signal already has a handler.
    """
    import signal

    if signal.getsignal(signal.SIGUSR1):
        return

    def rotate(signal_number: int, frame: FrameType | None) -> None:
        from twisted.internet import reactor

        cast(IReactorFromThreads, reactor).callFromThread(log_file.rotate)

    signal.signal(signal.SIGUSR1, rotate)


def quote_input(value: object, limit: int = MAX_QUOTED_CHARACTERS) -> str:
    """
    A caller's input as a log line may hold it: quoted with C{repr} (so a
    newline, a NUL or a bidi override is written as an escape, and cannot
    forge a line), and cut to C{limit} characters, ending with how long it
    was when it is cut.

    @param value: what the caller sent.
    @type value: L{str} or L{bytes} (read as Latin-1), or anything with a
        C{str()}.

    @param limit: the most characters returned.
    @type limit: L{int}

    @rtype: L{str} of at most C{limit} characters.
    """
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    elif not isinstance(value, str):
        value = str(value)
    # repr() writes at most 10 characters for one; never quote more than
    # the limit can show.
    quoted = repr(value[:limit])
    if len(quoted) <= limit and len(value) <= limit:
        return quoted
    mark = f"... ({len(value)} characters)"
    return quoted[: max(limit - len(mark), 0)] + mark[:limit]


def printable_cut(text: str, limit: int) -> str:
    """
    C{text} with characters that are not printable escaped (C{\\xNN}) and
    cut to at most C{limit} characters, for a log line that shows it
    unquoted (a URL, a list of names); L{quote_input} quotes it instead.
    """
    escaped = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)
    if len(escaped) <= limit:
        return escaped
    return escaped[: limit - 3] + "..."


class RefusalLog:
    """
    Log refusals of requests with at most one line per kind each
    C{interval_seconds}: a refusal of a kind logged less than that long ago
    is only counted, and the next line of that kind says how many were
    dropped ("N similar refusals dropped").

    Kinds are chosen by sentry_tx's code (an HTTP status, say), never by a
    caller, so the table of kinds stays small.

    @param logger: the L{Logger} the lines go to.
    @param clock: an L{IReactorTime}; its C{seconds()} times the intervals.
    @param interval_seconds: see L{REFUSAL_LOG_INTERVAL_SECONDS}.
    """

    def __init__(
        self,
        logger: Logger,
        clock: IReactorTime,
        interval_seconds: float = REFUSAL_LOG_INTERVAL_SECONDS,
    ) -> None:
        self._logger = logger
        self._clock = clock
        self._interval_seconds = interval_seconds
        self._next_line_at: dict[Hashable, float] = {}
        self._dropped: dict[Hashable, int] = {}

    def dropped(self, kind: Hashable) -> int:
        """
        How many refusals of C{kind} were dropped since its last line.
        """
        return self._dropped.get(kind, 0)

    def refused(
        self, kind: Hashable, level: LogLevel, log_format: str, **fields: object
    ) -> bool:
        """
        Log one refusal of C{kind}, unless a line of that kind was written
        less than the interval ago (then it is counted).

        @param kind: a hashable that sentry_tx's code chooses.
        @param level: the L{LogLevel} of the line.
        @param log_format: the line's format; its fields are C{fields},
            each of which quotes a caller's input only through
            L{quote_input}.
        @return: whether a line was written.
        @rtype: L{bool}
        """
        now = self._clock.seconds()
        if now < self._next_line_at.get(kind, now):
            self._dropped[kind] = self._dropped.get(kind, 0) + 1
            return False
        self._next_line_at[kind] = now + self._interval_seconds
        dropped = self._dropped.pop(kind, 0)
        if dropped:
            log_format += " ({dropped_refusals} similar refusals dropped)"
        self._logger.emit(level, log_format, dropped_refusals=dropped, **fields)
        return True
