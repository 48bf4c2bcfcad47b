"""
Tests for L{sentry_tx.logs}: level filtering, Dapr's JSON shape, text lines,
quoting a caller's input and the refusal log's rate.
"""

import json
import os
import signal
import socket
import sys
from io import StringIO

from twisted.internet.task import Clock
from twisted.logger import ILogObserver, Logger, LogLevel, LogPublisher
from twisted.python.failure import Failure
from twisted.python.logfile import LogFile
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

import sentry_tx
from sentry_tx.logs import (
    MAX_QUOTED_CHARACTERS,
    REFUSAL_LOG_INTERVAL_SECONDS,
    RefusalLog,
    dapr_scope,
    make_observer,
    open_twistd_log_file,
    quote_input,
)
from sentry_tx.testing.logs import log_messages

# 2023-11-14T22:13:20.123456Z
EVENT_TIME = 1700000000.123456
EVENT_TIME_TEXT = "2023-11-14T22:13:20.123Z"


def _event(log_format="hello {who}", level=LogLevel.info, **fields):
    """
    A log event as twisted.logger makes them.
    """
    event = {
        "log_format": log_format,
        "log_level": level,
        "log_namespace": "sentry_tx.ca.bundle",
        "log_time": EVENT_TIME,
        "who": "world",
    }
    event.update(fields)
    return event


def _failure():
    """
    A Failure with a traceback.
    """
    try:
        raise ValueError("boom")
    except ValueError:
        return Failure()


class LevelFilterTests(SynchronousTestCase):
    """
    Events below the chosen level are dropped.
    """

    def written_levels(self, level):
        """
        The levels of the events an observer at C{level} writes, out of one
        event at each level.
        """
        stream = StringIO()
        observer = make_observer(level, True, stream)
        for each in LogLevel.iterconstants():
            observer(_event(level=each))
        return [json.loads(line)["level"] for line in stream.getvalue().splitlines()]

    def test_levels(self):
        """
        Each --log-level word lets through its level and those above.
        """
        self.assertEqual(
            self.written_levels("debug"),
            ["debug", "info", "warning", "error", "fatal"],
        )
        self.assertEqual(
            self.written_levels("info"), ["info", "warning", "error", "fatal"]
        )
        self.assertEqual(self.written_levels("warn"), ["warning", "error", "fatal"])
        self.assertEqual(self.written_levels("error"), ["error", "fatal"])
        self.assertEqual(self.written_levels("fatal"), ["fatal"])

    def test_twisted_events_filtered(self):
        """
        Twisted's own events are filtered too and keep their namespace as
        scope.
        """
        stream = StringIO()
        observer = make_observer("info", True, stream)
        observer(_event(level=LogLevel.debug, log_namespace="twisted.internet"))
        observer(_event(level=LogLevel.info, log_namespace="twisted.internet"))
        (line,) = stream.getvalue().splitlines()
        self.assertEqual(json.loads(line)["scope"], "twisted.internet")

    def test_missing_level_is_info(self):
        """
        An event without a (known) log_level counts as info.
        """
        stream = StringIO()
        observer = make_observer("info", False, stream)
        event = _event()
        del event["log_level"]
        observer(event)
        observer(_event(level="loud"))
        self.assertEqual(len(stream.getvalue().splitlines()), 2)
        self.assertEqual(make_observer("warn", False, stream)(event), None)
        self.assertEqual(len(stream.getvalue().splitlines()), 2)

    def test_unknown_level_word(self):
        """
        A level word outside the five is refused.
        """
        self.assertRaises(ValueError, make_observer, "trace", False, StringIO())


class JSONTests(SynchronousTestCase):
    """
    --log-as-json writes one object per line in Dapr's shape.
    """

    def record(self, event, level="debug"):
        """
        The one JSON object written for C{event}.
        """
        stream = StringIO()
        make_observer(level, True, stream)(event)
        text = stream.getvalue()
        self.assertTrue(text.endswith("\n"))
        self.assertEqual(text.count("\n"), 1, text)
        return json.loads(text)

    def test_provides_interface(self):
        """
        The observer provides ILogObserver.
        """
        self.assertTrue(verifyObject(ILogObserver, make_observer("info", True, None)))

    def test_fields(self):
        """
        An event gives time, level, msg, scope, type, instance and ver.
        """
        self.assertEqual(
            self.record(_event()),
            {
                "time": EVENT_TIME_TEXT,
                "level": "info",
                "msg": "hello world",
                "scope": "dapr.sentry.ca",
                "type": "log",
                "instance": socket.gethostname(),
                "ver": sentry_tx.__version__,
                "who": "world",
            },
        )

    def test_level_words(self):
        """
        Levels are written with Dapr's words (warning, fatal).
        """
        words = {
            LogLevel.debug: "debug",
            LogLevel.info: "info",
            LogLevel.warn: "warning",
            LogLevel.error: "error",
            LogLevel.critical: "fatal",
        }
        for level, word in words.items():
            self.assertEqual(self.record(_event(level=level))["level"], word)

    def test_scopes(self):
        """
        sentry_tx namespaces map to Dapr's scopes; others stay as they are.
        """
        for namespace, scope in (
            ("sentry_tx.ca.bundle", "dapr.sentry.ca"),
            ("sentry_tx.ca", "dapr.sentry.ca"),
            ("sentry_tx.server.servicer.CAServicer", "dapr.sentry.server"),
            ("sentry_tx.identity.kubernetes", "dapr.sentry.identity.kubernetes"),
            ("sentry_tx.identity.insecure", "dapr.sentry.identity"),
            ("sentry_tx.tap", "dapr.sentry"),
            ("sentry_tx.healthz.HealthzResource", "dapr.sentry"),
            ("sentry_tx", "dapr.sentry"),
            ("sentry_txt.other", "sentry_txt.other"),
            ("twisted.application.app.AppLogger", "twisted.application.app.AppLogger"),
            ("log_legacy", "log_legacy"),
        ):
            self.assertEqual(
                self.record(_event(log_namespace=namespace))["scope"], scope
            )
            self.assertEqual(dapr_scope(namespace), scope)
        self.assertEqual(dapr_scope(None), "-")

    def test_failure(self):
        """
        An event with a failure has the exception in msg and the traceback
        in error.
        """
        record = self.record(
            _event("signing failed", level=LogLevel.error, log_failure=_failure())
        )
        self.assertEqual(record["msg"], "signing failed: ValueError: boom")
        self.assertIn("Traceback", record["error"])
        self.assertIn("ValueError: boom", record["error"])

    def test_failure_from_logger(self):
        """
        Logger.failure events, published as Twisted publishes them, are
        written with the exception.
        """
        stream = StringIO()
        publisher = LogPublisher(make_observer("info", True, stream))
        log = Logger(namespace="sentry_tx.server.grpc", observer=publisher)
        try:
            raise ZeroDivisionError("division by zero")
        except ZeroDivisionError:
            log.failure("call {method} failed", method="SignCertificate")
        record = json.loads(stream.getvalue())
        self.assertEqual(record["level"], "fatal")
        self.assertEqual(
            record["msg"],
            "call SignCertificate failed: ZeroDivisionError: division by zero",
        )
        self.assertEqual(record["scope"], "dapr.sentry.server")
        self.assertEqual(record["method"], "SignCertificate")

    def test_unserialisable_field(self):
        """
        A format field that JSON cannot hold is written as its str().
        """

        class Thing:
            def __str__(self):
                return "a thing"

        record = self.record(_event("got {thing}", thing=Thing()))
        self.assertEqual(record["thing"], "a thing")
        self.assertEqual(record["msg"], "got a thing")

    def test_only_format_fields(self):
        """
        Only fields the format names are copied, and never over Dapr's keys.
        """
        record = self.record(
            _event("{msg} {scope} {peer.real}", msg="m", scope="s", peer=1,
                   secret="x")
        )  # fmt: skip
        self.assertNotIn("secret", record)
        self.assertEqual(record["scope"], "dapr.sentry.ca")
        self.assertEqual(record["peer"], 1)
        self.assertEqual(record["msg"], "m s 1")

    def test_no_time(self):
        """
        An event without log_time is stamped with the observer's clock.
        """
        stream = StringIO()
        make_observer("info", True, stream, now=lambda: 0.5)(
            {"log_format": "x", "log_level": LogLevel.info}
        )
        record = json.loads(stream.getvalue())
        self.assertEqual(record["time"], "1970-01-01T00:00:00.500Z")
        self.assertEqual(record["scope"], "-")

    def test_broken_format(self):
        """
        A format string that cannot be formatted still gives a line.
        """
        record = self.record(_event("{missing} and {"))
        self.assertIn("Unable to format event", record["msg"])


class NeverRaisesTests(SynchronousTestCase):
    """
    The observer never raises into the log publisher.
    """

    def test_broken_stream(self):
        """
        A stream whose write fails loses that line quietly: the observer
        returns normally, and the next line is written once the stream
        works again.
        """

        class Flaky:
            def __init__(self):
                self.attempts = []
                self.written = []
                self.full = True

            def write(self, text):
                self.attempts.append(text)
                if self.full:
                    raise OSError("disk full")
                self.written.append(text)

        for as_json in (True, False):
            stream = Flaky()
            observer = make_observer("info", as_json, stream, now=lambda: 0.0)
            self.assertIsNone(observer(_event(who="lost")))
            self.assertEqual(len(stream.attempts), 1)
            self.assertIn("hello lost", stream.attempts[0])
            stream.full = False
            self.assertIsNone(observer(_event(who="kept")))
            self.assertEqual(len(stream.written), 1)
            self.assertIn("hello kept", stream.written[0])
            self.assertNotIn("lost", stream.written[0])

    def test_broken_event(self):
        """
        An event whose parts misbehave is written as an error line.
        """

        class Exploding:
            def __str__(self):
                raise RuntimeError("no")

            __repr__ = __str__

        stream = StringIO()
        make_observer("info", True, stream, now=lambda: 0.0)(
            _event(log_failure=Exploding(), log_time="soon", who=Exploding())
        )
        record = json.loads(stream.getvalue())
        self.assertEqual(record["time"], "1970-01-01T00:00:00.000Z")
        self.assertIn("unprintable failure", record["msg"])

        stream = StringIO()
        make_observer("info", False, stream, now=lambda: 0.0)(
            _event(log_failure=Exploding(), log_time="soon")
        )
        self.assertEqual(
            stream.getvalue(),
            "1970-01-01T00:00:00.000Z info dapr.sentry.ca: hello world\n"
            "unprintable failure\n",
        )

    def test_unhashable_level(self):
        """
        An event with an unhashable log_level still gives one line.
        """
        stream = StringIO()
        make_observer("info", True, stream)(_event(level=[]))
        self.assertEqual(len(stream.getvalue().splitlines()), 1, stream.getvalue())
        self.assertIn("unable to format", stream.getvalue())


class TextTests(SynchronousTestCase):
    """
    Without --log-as-json each event is one line of text.
    """

    def test_line(self):
        """
        A line is "<time> <level> <scope>: <message>".
        """
        stream = StringIO()
        make_observer("info", False, stream)(_event(level=LogLevel.warn))
        self.assertEqual(
            stream.getvalue(),
            f"{EVENT_TIME_TEXT} warning dapr.sentry.ca: hello world\n",
        )

    def test_failure(self):
        """
        An event with a failure is followed by its traceback.
        """
        stream = StringIO()
        make_observer("info", False, stream)(
            _event("failed", level=LogLevel.error, log_failure=_failure())
        )
        first, *rest = stream.getvalue().splitlines()
        self.assertEqual(first, f"{EVENT_TIME_TEXT} error dapr.sentry.ca: failed")
        self.assertIn("Traceback", rest[0])
        self.assertEqual(rest[-1], "builtins.ValueError: boom")


class OpenTwistdLogFileTests(SynchronousTestCase):
    """
    Tests for L{open_twistd_log_file}, which follows twistd's choice.
    """

    def setUp(self):
        handler = signal.getsignal(signal.SIGUSR1)
        self.addCleanup(signal.signal, signal.SIGUSR1, handler)

    def test_stdout(self):
        """
        "-", or no log file when not daemonising, means stdout.
        """
        self.assertIs(open_twistd_log_file("-", True), sys.stdout)
        self.assertIs(open_twistd_log_file(None, True), sys.stdout)
        self.assertIs(open_twistd_log_file("", True), sys.stdout)

    def test_path(self):
        """
        A path is opened as a rotating LogFile, and a SIGUSR1 handler (to
        rotate it) is installed.
        """
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)
        path = os.path.abspath(self.mktemp())
        log_file = open_twistd_log_file(path, True)
        self.addCleanup(log_file.close)
        self.assertIsInstance(log_file, LogFile)
        self.assertEqual(log_file.path, path)
        self.assertNotEqual(signal.getsignal(signal.SIGUSR1), signal.SIG_DFL)

    def test_existing_sigusr1_kept(self):
        """
        A SIGUSR1 handler already in place is not replaced.
        """

        def handler(number, frame):
            pass

        signal.signal(signal.SIGUSR1, handler)
        log_file = open_twistd_log_file(os.path.abspath(self.mktemp()), False)
        self.addCleanup(log_file.close)
        self.assertIs(signal.getsignal(signal.SIGUSR1), handler)

    def test_daemon_default(self):
        """
        A daemon without --logfile writes to twistd.log in the current
        directory.
        """
        log_file = open_twistd_log_file(None, False)
        self.addCleanup(log_file.close)
        self.assertEqual(log_file.path, os.path.abspath("twistd.log"))


class QuoteInputTests(SynchronousTestCase):
    """
    L{quote_input} makes a caller's input safe and short enough to log.
    """

    def test_short_input_quoted_whole(self):
        """Input within the limit is written whole, quoted."""
        self.assertEqual(quote_input("oidc.example.org"), "'oidc.example.org'")
        self.assertEqual(quote_input(b"/healthz"), "'/healthz'")

    def test_long_input_cut(self):
        """Input past the limit is cut to the limit and says how long it was."""
        quoted = quote_input("h" * 15_000)
        self.assertEqual(len(quoted), MAX_QUOTED_CHARACTERS)
        self.assertTrue(quoted.startswith("'hhh"))
        self.assertTrue(quoted.endswith("... (15000 characters)"))

    def test_escapes_cut_too(self):
        """Input whose escapes make it longer than the limit is cut as well."""
        quoted = quote_input("\x00" * MAX_QUOTED_CHARACTERS)
        self.assertLessEqual(len(quoted), MAX_QUOTED_CHARACTERS)
        self.assertIn("(256 characters)", quoted)

    def test_no_line_breaks(self):
        """Control and bidi characters are escaped: they cannot forge a line."""
        quoted = quote_input("a\nb\r\x00\u202e")
        for character in "\n\r\x00\u202e":
            self.assertNotIn(character, quoted)

    def test_smaller_limit(self):
        """The limit is a parameter."""
        self.assertLessEqual(len(quote_input("x" * 100, limit=40)), 40)


class RefusalLogTests(SynchronousTestCase):
    """
    L{RefusalLog} writes one line per kind per interval, on the clock it is
    given, and counts what it drops.
    """

    def setUp(self):
        self.clock = Clock()
        self.events = []
        self.refusals = RefusalLog(
            Logger(observer=self.events.append), self.clock, interval_seconds=10.0
        )

    def refuse(self, kind, path="/x"):
        return self.refusals.refused(kind, LogLevel.info, "refused {path}", path=path)

    def test_one_line_per_interval_with_dropped_count(self):
        """
        Refusals within the interval are counted, then reported with the next line.
        """
        self.assertTrue(self.refuse(404))
        for _ in range(5):
            self.clock.advance(1.0)
            self.assertFalse(self.refuse(404))
        self.assertEqual(self.refusals.dropped(404), 5)
        self.clock.advance(4.0)
        self.assertFalse(self.refuse(404))
        self.clock.advance(1.0)
        self.assertTrue(self.refuse(404, path="/y"))
        self.assertEqual(self.refusals.dropped(404), 0)
        self.assertEqual(
            log_messages(self.events),
            ["refused /x", "refused /y (6 similar refusals dropped)"],
        )

    def test_kinds_apart(self):
        """Each kind has its own interval: a flood of one hides no other."""
        self.assertTrue(self.refuse(403))
        self.assertFalse(self.refuse(403))
        self.assertTrue(self.refuse(404))
        self.assertFalse(self.refuse(404))
        self.assertEqual(len(self.events), 2)

    def test_level_and_fields(self):
        """The line has the level and fields given, and the dropped count as a field."""
        self.refusals.refused(403, LogLevel.warn, "refused {path}", path="/p")
        self.assertEqual(self.events[0]["log_level"], LogLevel.warn)
        self.assertEqual(self.events[0]["path"], "/p")
        self.assertEqual(self.events[0]["dropped_refusals"], 0)

    def test_default_interval(self):
        """The default interval is REFUSAL_LOG_INTERVAL_SECONDS."""
        refusals = RefusalLog(Logger(observer=self.events.append), self.clock)
        refusals.refused(1, LogLevel.info, "a")
        self.clock.advance(REFUSAL_LOG_INTERVAL_SECONDS - 0.001)
        self.assertFalse(refusals.refused(1, LogLevel.info, "a"))
        self.clock.advance(0.001)
        self.assertTrue(refusals.refused(1, LogLevel.info, "a"))
