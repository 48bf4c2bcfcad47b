"""
A real gRPC loop (L{sentry_tx.server.loop.GrpcLoop}) for tests that run
code on it: asyncio clients against servers on the reactor.
"""

from typing import TYPE_CHECKING

from twisted.internet.interfaces import IReactorFromThreads
from twisted.trial.unittest import TestCase

if TYPE_CHECKING:
    from sentry_tx.server.loop import GrpcLoop


def start_grpc_loop(
    test_case: TestCase, reactor: IReactorFromThreads | None = None
) -> "GrpcLoop":
    """
    Start a L{GrpcLoop} on its own thread for C{test_case}, stopped (its
    pending tasks cancelled, its thread joined) at cleanup.

    @return: the running loop; C{run(coroutine_function, *args)} gives a
        Deferred fired on the reactor.
    """
    from sentry_tx.server.loop import GrpcLoop

    if reactor is None:
        from twisted.internet import reactor as global_reactor

        # twisted.internet.reactor's declared type omits the thread
        # interfaces; Twisted's advice is to adapt it.
        reactor = IReactorFromThreads(global_reactor)
    grpc_loop = GrpcLoop(reactor)
    grpc_loop.start()
    test_case.addCleanup(grpc_loop.stop)
    return grpc_loop
