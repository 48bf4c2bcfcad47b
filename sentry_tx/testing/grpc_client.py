"""
Calling the gRPC servicer from tests: a synchronous gRPC client of a real
listening port (L{GrpcTestClient}), a servicer context that records aborts,
and a way to run the servicer's coroutines without an event loop.
"""

import asyncio
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar, TypeVarTuple

from cryptography import x509
from twisted.internet.defer import Deferred, fail, succeed

if TYPE_CHECKING:
    import grpc

    from sentry_tx._proto.sentry_pb2 import (
        SignCertificateRequest,
        SignCertificateResponse,
    )

_T = TypeVar("_T")
_Arguments = TypeVarTuple("_Arguments")


class AbortingContext:
    """
    The part of C{grpc.aio.ServicerContext} the servicer uses: C{abort}
    records the status and trailing metadata and raises
    L{AbortingContext.Aborted}, as grpcio's raises; C{read} answers with
    C{message} (C{grpc.aio.EOF} when None); C{time_remaining} with
    C{remaining}; C{peer} with C{peer}.
    """

    class Aborted(Exception):
        """
        Raised by L{AbortingContext.abort}.
        """

    def __init__(
        self,
        message: object = None,
        remaining: float | None = None,
        peer: str = "ipv4:127.0.0.1:40000",
    ) -> None:
        self.message = message
        self.remaining = remaining
        self._peer = peer
        self.trailing_metadata: object = None

    def peer(self) -> str:
        return self._peer

    async def abort(
        self, code: "grpc.StatusCode", details: str, trailing_metadata: object = None
    ) -> NoReturn:
        self.code, self.details = code, details
        self.trailing_metadata = trailing_metadata
        raise self.Aborted()

    async def read(self) -> object:
        import grpc

        return grpc.aio.EOF if self.message is None else self.message

    def time_remaining(self) -> float | None:
        return self.remaining


def run_now(coroutine: Coroutine[Any, Any, _T]) -> _T:
    """
    Run C{coroutine} to its end at once, with no event loop: for pipeline
    code that must not wait (the INSECURE path).

    @return: its result (its exception is raised).
    @raise AssertionError: if it waited for something.
    """
    try:
        coroutine.send(None)
    except StopIteration as stop:
        value: _T = stop.value
        return value
    coroutine.close()
    raise AssertionError("the coroutine waited instead of finishing at once")


class SynchronousGrpcLoop:
    """
    A stand-in for L{sentry_tx.server.loop.GrpcLoop} whose asyncio loop runs
    in the calling thread, only while L{run} runs: a coroutine handed to it
    runs to its end at once and the returned Deferred has fired.  For
    lifecycle tests with a fake reactor (a server started on it binds and
    stops, but serves no call between runs).
    """

    def __init__(self, reactor: object = None) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None

    @property
    def running(self) -> bool:
        return self.loop is not None

    def start(self) -> None:
        self.loop = asyncio.new_event_loop()

    def run(
        self,
        coroutine_function: Callable[[*_Arguments], Coroutine[Any, Any, _T]],
        *args: *_Arguments,
    ) -> Deferred[_T]:
        if self.loop is None:
            raise RuntimeError("the loop is not started")
        try:
            result = self.loop.run_until_complete(coroutine_function(*args))
        except Exception:
            return fail()
        return succeed(result)

    def stop(self) -> Deferred[None]:
        if self.loop is not None:
            self.loop.close()
            self.loop = None
        return succeed(None)


class GrpcTestClient:
    """
    A real grpcio client of C{dapr.proto.sentry.v1.CA} over TLS that trusts
    only C{anchors_pem}.  Its calls block: run them in a thread
    (C{deferToThread}), never on the reactor, whose thread the server needs.
    """

    def __init__(
        self,
        target: str,
        anchors_pem: bytes,
        server_name: str = "dapr-sentry.default.svc",
    ) -> None:
        import grpc

        from sentry_tx._proto import sentry_pb2_grpc

        self.target = target
        self._anchors_pem = anchors_pem
        self._server_name = server_name
        self._channel = grpc.secure_channel(
            target,
            grpc.ssl_channel_credentials(root_certificates=anchors_pem),
            options=[("grpc.ssl_target_name_override", server_name)],
        )
        self._stub = sentry_pb2_grpc.CAStub(self._channel)

    def sign(
        self, request: "SignCertificateRequest", timeout: float = 10.0
    ) -> "SignCertificateResponse":
        """
        Call SignCertificate; raises C{grpc.RpcError} on a refusal.
        """
        response: SignCertificateResponse = self._stub.SignCertificate(
            request, timeout=timeout
        )
        return response

    def server_chain(self, timeout: float = 10.0) -> list[x509.Certificate] | None:
        """
        The certificate chain the server presents, as cryptography
        certificates (leaf first), read by a TLS 1.2+ handshake; None when
        it presents none.
        """
        import select
        import socket
        import time

        from OpenSSL import SSL

        host, port = self.target.rsplit(":", 1)
        context = SSL.Context(SSL.TLS_CLIENT_METHOD)
        context.set_min_proto_version(SSL.TLS1_2_VERSION)
        context.set_alpn_protos([b"h2"])
        with socket.create_connection((host, int(port)), timeout=timeout) as sock:
            connection = SSL.Connection(context, sock)
            connection.set_tlsext_host_name(self._server_name.encode("ascii"))
            connection.set_connect_state()
            deadline = time.monotonic() + timeout
            while True:
                try:
                    connection.do_handshake()
                    break
                except SSL.WantReadError:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TimeoutError("TLS handshake timed out") from None
                    select.select([sock], [], [], left)
            chain = connection.get_peer_cert_chain(as_cryptography=True)
        return chain

    def close(self) -> None:
        """
        Close the channel.
        """
        self._channel.close()
