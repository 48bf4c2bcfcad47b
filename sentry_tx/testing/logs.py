"""
Reading what sentry_tx logs, in tests: collect the log events of a test
(L{capture_logs}) and read them back as text (L{log_messages}).
"""

from collections.abc import Iterable
from typing import cast

from twisted.logger import (
    ILogObserver,
    LogEvent,
    LogLevel,
    formatEvent,
    globalLogPublisher,
)
from twisted.trial.unittest import TestCase


def capture_logs(test: TestCase) -> list[LogEvent]:
    """
    Collect every log event until the end of C{test}.

    @param test: the running test case (its cleanup stops the collecting).
    @return: the list the events are appended to.
    """
    events: list[LogEvent] = []
    # A bound method is an observer (ILogObserver is a callable interface).
    observer = cast(ILogObserver, events.append)
    globalLogPublisher.addObserver(observer)
    test.addCleanup(globalLogPublisher.removeObserver, observer)
    return events


def log_messages(
    events: Iterable[LogEvent],
    level: LogLevel | None = None,
    namespace: str | None = None,
    with_failures: bool = False,
) -> list[str]:
    """
    The formatted text of C{events}.

    @param level: only events at this L{LogLevel}, when given.
    @param namespace: only events of this C{log_namespace}, when given.
    @param with_failures: append the traceback of the failure an event
        carries to its text.
    @return: a L{list} of L{str}, in the events' order.
    """
    texts: list[str] = []
    for event in events:
        if level is not None and event.get("log_level") != level:
            continue
        if namespace is not None and event.get("log_namespace") != namespace:
            continue
        text = formatEvent(event)
        failure = event.get("log_failure")
        if with_failures and failure is not None:
            text += "\n" + failure.getTraceback()
        texts.append(text)
    return texts
