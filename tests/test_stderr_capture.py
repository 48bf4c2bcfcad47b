"""
Tests for L{sentry_tx.stderr_capture}: grpc core's lines on standard error
go through twisted.logger, so that C{--log-as-json} output is all JSON.
"""

import io
import json
import os
import signal
import socket

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from sentry_tx import logs
from sentry_tx.stderr_capture import (
    TRUNCATED_MARK,
    StandardErrorCapture,
    _PipeReader,
    classify_line,
)
from sentry_tx.testing.twistd import LOOPBACK_FREE_PORTS, spawn_twistd

GRPC_LINE = (
    "I1130 09:08:19.207600    2948 ssl_transport_security.cc:2563] Handshake"
    " failed with error SSL_ERROR_SSL: error:10000096:SSL routines"
)


class ClassifyLineTests(SynchronousTestCase):
    """
    L{classify_line} tells grpc core's lines, sentry_tx's own and the rest
    apart.
    """

    def test_absl_levels(self):
        """
        absl's severity letter gives the level; the message keeps file:line.
        """
        for letter, level in (
            ("I", LogLevel.info),
            ("W", LogLevel.warn),
            ("E", LogLevel.error),
            ("F", LogLevel.critical),
        ):
            kind, got, message = classify_line(letter + GRPC_LINE[1:])
            self.assertEqual((kind, got), ("grpc", level))
            self.assertTrue(
                message.startswith("ssl_transport_security.cc:2563] Handshake")
            )

    def test_sentry_lines_pass_through(self):
        """
        A line sentry_tx's observer wrote (JSON or text, a worker's) passes
        through as it is, at its own level.
        """
        json_line = json.dumps(
            {"time": "t", "level": "warning", "scope": "dapr.sentry", "msg": "m"}
        )
        self.assertEqual(
            classify_line(json_line), ("passthrough", LogLevel.warn, json_line)
        )
        text_line = "2026-11-30T09:08:19.207Z error dapr.sentry.server: boom"
        self.assertEqual(
            classify_line(text_line), ("passthrough", LogLevel.error, text_line)
        )

    def test_other(self):
        """
        Anything else is an error line of its own.
        """
        self.assertEqual(
            classify_line("Segmentation fault"),
            ("stderr", LogLevel.error, "Segmentation fault"),
        )
        self.assertEqual(classify_line('{"not": "ours"}')[0], "stderr")


class PipeReaderTests(SynchronousTestCase):
    """
    L{_PipeReader} splits what it reads into bounded lines.
    """

    def setUp(self):
        self.lines = []
        self.reader = _PipeReader(-1, self.lines.append, max_line_bytes=10)

    def test_lines_across_reads(self):
        """
        A line split over two reads comes out whole; blank lines are
        dropped.
        """
        self.reader.feed(b"one\ntw")
        self.reader.feed(b"o\n\nthree")
        self.assertEqual(self.lines, ["one", "two"])
        self.reader.flush()
        self.assertEqual(self.lines, ["one", "two", "three"])

    def test_long_line_cut(self):
        """
        A line longer than the bound is cut to it and marked, whether it
        arrives whole or in pieces; the rest of it is dropped, and the next
        line is intact.
        """
        self.reader.feed(b"0123456789ABCDEF\nnext\n")
        self.reader.feed(b"abcdefghij")
        self.reader.feed(b"klmnop")
        self.reader.feed(b"qrs\nafter\n")
        self.assertEqual(
            self.lines,
            [
                "0123456789" + TRUNCATED_MARK,
                "next",
                "abcdefghij" + TRUNCATED_MARK,
                "after",
            ],
        )

    def test_invalid_utf8(self):
        """
        Bytes that are not UTF-8 are replaced, never raised.
        """
        self.reader.feed(b"\xff\xfe\n")
        self.assertEqual(self.lines, ["\ufffd\ufffd"])


class PreformattedTests(SynchronousTestCase):
    """
    sentry_tx's observer writes a passed-through line as it is.
    """

    def test_written_verbatim(self):
        """
        An event with the preformatted key is written as that line, in JSON
        mode too, and still filtered by level.
        """
        stream = io.StringIO()
        observer = logs.make_observer("info", True, stream)
        line = '{"level": "info", "scope": "dapr.sentry", "msg": "from a worker"}'
        observer({"log_level": LogLevel.info, "log_format": "{line}", "line": line,
                  logs.PREFORMATTED_KEY: line})
        observer({"log_level": LogLevel.debug, "log_format": "{line}", "line": "x",
                  logs.PREFORMATTED_KEY: "x"})
        self.assertEqual(stream.getvalue(), line + "\n")


class CaptureTests(TestCase):
    """
    L{StandardErrorCapture} on a descriptor of the test's own (a pipe
    standing for fd 2), with the real reactor.
    """

    timeout = 10

    def setUp(self):
        self.original_read, self.fd = os.pipe()
        self.addCleanup(os.close, self.original_read)
        self.addCleanup(os.close, self.fd)
        self.events = []
        self.waiting = []

        def observe(event):
            if event.get("log_namespace") in ("grpc", "stderr"):
                self.events.append(event)
                waiting, self.waiting = self.waiting, []
                for d in waiting:
                    d.callback(event)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)

    def next_event(self):
        d = Deferred()
        self.waiting.append(d)
        return d

    @inlineCallbacks
    def test_grpc_line_logged_then_descriptor_restored(self):
        """
        While running, a grpc core line written to the descriptor becomes a
        log event in the C{grpc} namespace at its level; after
        C{stopService} the descriptor writes where it did before.
        """
        capture = StandardErrorCapture(reactor, fd=self.fd)
        capture.startService()
        self.addCleanup(lambda: capture.running and capture.stopService())
        self.assertTrue(capture.capturing)
        os.write(self.fd, ("E" + GRPC_LINE[1:] + "\n").encode())
        event = yield self.next_event()
        self.assertEqual(event["log_level"], LogLevel.error)
        self.assertIn("Handshake failed", event["grpc_core"])
        capture.stopService()
        os.write(self.fd, b"after\n")
        self.assertEqual(os.read(self.original_read, 100), b"after\n")

    @inlineCallbacks
    def test_pending_lines_drained_at_stop(self):
        """
        What is still in the pipe when the capture stops is logged, not
        lost, including a last line without a newline.
        """
        capture = StandardErrorCapture(reactor, fd=self.fd)
        capture.startService()
        os.write(self.fd, b"first\nsecond")
        capture.stopService()
        self.assertEqual([e["stderr"] for e in self.events], ["first", "second"])
        yield None

    def test_not_when_the_log_writes_there(self):
        """
        When sentry_tx's own log writes to the descriptor, it is not
        captured (its lines would come back forever).
        """

        class Stream(io.StringIO):
            def fileno(inner):
                return self.fd

        logs.make_observer("info", True, Stream())
        self.addCleanup(logs._OBSERVER_FDS.discard, self.fd)
        capture = StandardErrorCapture(reactor, fd=self.fd)
        capture.startService()
        self.addCleanup(capture.stopService)
        self.assertFalse(capture.capturing)


class TwistdJSONTests(TestCase):
    """
    C{twistd sentry --log-as-json}, with grpc core writing a line.
    """

    timeout = 60

    @inlineCallbacks
    def test_all_json(self):
        """
        A TLS handshake that fails makes grpc core log a line; with
        --log-as-json it arrives as a JSON object in scope C{grpc}, nothing
        reaches the real standard error, and every line is JSON.
        """
        protocol = spawn_twistd(
            self,
            ["--config", os.path.abspath(self.mktemp()),
             "--issuer-credentials", os.path.abspath(self.mktemp()),
             "--log-as-json"] + LOOPBACK_FREE_PORTS,
        )
        stderr = []
        protocol.errReceived = stderr.append
        ports = yield protocol.wait_ready()
        logged = protocol.when_output(b"Handshake failed")
        with socket.create_connection(("127.0.0.1", ports["grpc"]), timeout=5) as raw:
            # A TLS record header announcing an absurd handshake message.
            raw.sendall(b"\x16\x03\x01\x00\x05hello")
            try:
                raw.recv(100)
            except OSError:
                pass
        yield logged
        os.kill(protocol.transport.pid, signal.SIGTERM)
        yield protocol.ended
        self.assertEqual(stderr, [])
        records = [
            json.loads(line) for line in protocol.output.decode().splitlines() if line
        ]
        [handshake] = [r for r in records if "Handshake failed" in r["msg"]]
        self.assertEqual(handshake["scope"], "grpc")
        self.assertEqual(handshake["level"], "info")
