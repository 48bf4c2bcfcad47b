# -*- test-case-name: tests.test_stderr_capture,tests.test_root -*-
"""
Standard error, through twisted.logger.

grpc core (C++) writes its own log lines straight to file descriptor 2, in
absl's format (C{I1130 09:08:19.207600 2948 ssl_transport_security.cc:2563]
Handshake failed ...}), and so do serving copies, which inherit it.  Those
bytes bypass twisted.logger, so C{--log-as-json} output would not be all
JSON, and C{--log-level} would not apply to them.

L{StandardErrorCapture} points descriptor 2 at a pipe whose other end the
reactor reads (non-blocking, at most L{MAX_LINE_BYTES} per line: a longer
line is cut and marked), and logs each line:

  - a line in absl's format at the level its first letter says (I info,
    W warn, E error, F critical), in the namespace C{grpc};
  - a line that sentry_tx's own observer wrote (a serving copy's log line,
    JSON or text) as it is, at its level;
  - anything else at error level, in the namespace C{stderr}.

When the service stops, descriptor 2 is put back.  Writers never wait on
the reactor for long: the pipe holds 64 KiB, which the reactor drains as
soon as it runs.
"""

import errno
import json
import os
import re
from collections.abc import Callable

from twisted.application.service import Service
from twisted.internet.interfaces import IReactorFDSet, IReadDescriptor
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from zope.interface import implementer

from sentry_tx import logs

STDERR_FD = 2

# Module-level: a Logger that is a class attribute takes the class's name as
# its namespace.
_grpc_log = Logger(namespace="grpc")
_stderr_log = Logger(namespace="stderr")

MAX_LINE_BYTES = 16 * 1024
"""
The longest line logged; the rest of a longer line is dropped and the line
is marked as truncated.
"""

READ_CHUNK_BYTES = 64 * 1024

TRUNCATED_MARK = " [truncated]"

# absl's prefix: severity letter, MMDD, time, thread id, file:line]
_ABSL_LINE = re.compile(
    r"^(?P<severity>[IWEF])\d{4} \d\d:\d\d:\d\d\.\d+\s+\d+ (?P<message>\S+?:\d+\] .*)$"
)
_ABSL_LEVELS = {
    "I": LogLevel.info,
    "W": LogLevel.warn,
    "E": LogLevel.error,
    "F": LogLevel.critical,
}
# sentry_tx's text lines: "<RFC 3339 time> <level> <scope>: <message>".
_TEXT_LINE = re.compile(
    r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?Z"
    r" (?P<level>debug|info|warning|error|fatal) \S+: "
)
_DAPR_LEVELS = {
    "debug": LogLevel.debug,
    "info": LogLevel.info,
    "warning": LogLevel.warn,
    "error": LogLevel.error,
    "fatal": LogLevel.critical,
}


def classify_line(text: str) -> tuple[str, LogLevel, str]:
    """
    How to log one line read from standard error.

    @param text: the line, decoded, without its newline.
    @return: C{(kind, level, message)}: C{kind} is C{"grpc"}, C{"passthrough"}
        (already formatted by sentry_tx) or C{"stderr"}.
    """
    match = _ABSL_LINE.match(text)
    if match:
        return "grpc", _ABSL_LEVELS[match.group("severity")], match.group("message")
    if text.startswith("{"):
        try:
            record = json.loads(text)
        except ValueError:
            record = None
        if (
            isinstance(record, dict)
            and "scope" in record
            and record.get("level") in _DAPR_LEVELS
        ):
            return "passthrough", _DAPR_LEVELS[record["level"]], text
    match = _TEXT_LINE.match(text)
    if match:
        return "passthrough", _DAPR_LEVELS[match.group("level")], text
    return "stderr", LogLevel.error, text


@implementer(IReadDescriptor)
class _PipeReader:
    """
    The reactor's side of the pipe: reads, splits lines, hands them on.
    """

    def __init__(
        self, fd: int, on_line: Callable[[str], object], max_line_bytes: int
    ) -> None:
        self._fd = fd
        self._on_line = on_line
        self._max_line_bytes = max_line_bytes
        self._pending = b""
        self._discarding = False

    def fileno(self) -> int:
        return self._fd

    def logPrefix(self) -> str:
        return "stderr-capture"

    # The reactor takes the exception itself (CONNECTION_DONE), as Twisted's
    # own descriptors return it; IReadDescriptor's annotation says Failure.
    def doRead(self) -> Exception | None:  # type: ignore[override]
        try:
            data = os.read(self._fd, READ_CHUNK_BYTES)
        except BlockingIOError:
            return None
        except OSError as e:
            if e.errno == errno.EINTR:
                return None
            raise
        if not data:
            from twisted.internet import main

            return main.CONNECTION_DONE
        self.feed(data)
        return None

    def feed(self, data: bytes) -> None:
        """
        Split C{data} (with what was pending) into lines, each cut to the
        bound.
        """
        buffer = self._pending + data
        *lines, rest = buffer.split(b"\n")
        for line in lines:
            if self._discarding:
                self._discarding = False
                continue
            self._emit(line)
        if len(rest) > self._max_line_bytes:
            if not self._discarding:
                self._emit(rest[: self._max_line_bytes], truncated=True)
            self._discarding = True
            rest = b""
        self._pending = rest

    def flush(self) -> None:
        if self._pending and not self._discarding:
            self._emit(self._pending)
        self._pending = b""

    def _emit(self, line: bytes, truncated: bool = False) -> None:
        if len(line) > self._max_line_bytes:
            line, truncated = line[: self._max_line_bytes], True
        text = line.decode("utf-8", "replace").rstrip("\r")
        if text or truncated:
            self._on_line(text + (TRUNCATED_MARK if truncated else ""))

    def connectionLost(self, reason: Failure) -> None:
        self.flush()


class StandardErrorCapture(Service):
    """
    Route file descriptor C{fd} (standard error) through twisted.logger
    while running.

    @param reactor: the reactor that reads the pipe.
    @param fd: the descriptor to capture (2; tests pass another).
    @param max_line_bytes: see L{MAX_LINE_BYTES}.
    """

    name = "stderr-capture"
    # The root stops it after every other service, so that what they write
    # while stopping (serving copies, grpc core) is still captured.
    stop_after_others = True
    _log = Logger()

    def __init__(
        self,
        reactor: IReactorFDSet,
        fd: int = STDERR_FD,
        max_line_bytes: int = MAX_LINE_BYTES,
    ) -> None:
        self._reactor = reactor
        self._fd = fd
        self._max_line_bytes = max_line_bytes
        self._saved_fd: int | None = None
        self._reader: _PipeReader | None = None
        self.capturing = False

    def startService(self) -> None:
        super().startService()
        if logs.writes_to_fd(self._fd):
            # The log itself goes to this descriptor: capturing it would
            # read back our own lines forever.
            self._log.info(
                "the log is written to file descriptor {fd}; lines there from"
                " grpc core are left as they are",
                fd=self._fd,
            )
            return
        read_fd, write_fd = os.pipe()
        os.set_blocking(read_fd, False)
        os.set_inheritable(read_fd, False)
        self._saved_fd = os.dup(self._fd)
        os.set_inheritable(self._saved_fd, False)
        os.dup2(write_fd, self._fd)
        os.close(write_fd)
        self._reader = _PipeReader(read_fd, self._line, self._max_line_bytes)
        self._reactor.addReader(self._reader)
        self.capturing = True

    def stopService(self) -> None:
        super().stopService()
        if not self.capturing:
            return
        assert self._reader is not None and self._saved_fd is not None
        self.capturing = False
        reader, self._reader = self._reader, None
        # Put the descriptor back first, so that no write lands in a pipe
        # nobody reads; then drain what is left.
        os.dup2(self._saved_fd, self._fd)
        os.close(self._saved_fd)
        self._saved_fd = None
        self._reactor.removeReader(reader)
        while True:
            try:
                data = os.read(reader.fileno(), READ_CHUNK_BYTES)
            except OSError:
                break
            if not data:
                break
            reader.feed(data)
        reader.flush()
        os.close(reader.fileno())

    def _line(self, text: str) -> None:
        kind, level, message = classify_line(text)
        if kind == "grpc":
            _grpc_log.emit(level, "{grpc_core}", grpc_core=message)
        elif kind == "passthrough":
            _stderr_log.emit(
                level, "{line}", **{"line": message, logs.PREFORMATTED_KEY: message}
            )
        else:
            _stderr_log.emit(level, "{stderr}", stderr=message)
