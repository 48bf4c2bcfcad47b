"""
Clients that misbehave on purpose, for the transport-limit and TLS tests: a
TLS connection that speaks HTTP/2 frame by frame (grpcio's own client never
pings too often nor opens streams past the limit), one SignCertificate call
by hand on a connection of its own, and sockets that connect and never
speak.  They block: run them in a thread, never on the reactor.
"""

import socket
import ssl
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sentry_tx._proto.sentry_pb2 import (
        SignCertificateRequest,
        SignCertificateResponse,
    )


HTTP2_CLIENT_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
HTTP2_DATA = 0x0
HTTP2_HEADERS = 0x1
HTTP2_RST_STREAM = 0x3
HTTP2_SETTINGS = 0x4
HTTP2_PING = 0x6
HTTP2_GOAWAY = 0x7
HTTP2_FLAG_ACK = 0x1
HTTP2_FLAG_END_STREAM = 0x1
HTTP2_FLAG_END_HEADERS = 0x4
HTTP2_SETTINGS_MAX_CONCURRENT_STREAMS = 0x3
HTTP2_NO_ERROR = 0x0
HTTP2_REFUSED_STREAM = 0x7
HTTP2_CANCEL = 0x8
HTTP2_ENHANCE_YOUR_CALM = 0xB


@dataclass(frozen=True)
class HTTP2Frame:
    """
    One HTTP/2 frame as read off the wire (RFC 9113 section 4.1).
    """

    type: int
    flags: int
    stream_id: int
    payload: bytes

    def settings(self) -> dict[int, int]:
        """
        A SETTINGS frame's parameters, as a dict from identifier to value.
        """
        payload = self.payload
        return {
            int.from_bytes(payload[i : i + 2], "big"): int.from_bytes(
                payload[i + 2 : i + 6], "big"
            )
            for i in range(0, len(payload) - 5, 6)
        }

    @property
    def error_code(self) -> int:
        """
        The error code of a RST_STREAM or GOAWAY frame.
        """
        start = 4 if self.type == HTTP2_GOAWAY else 0
        return int.from_bytes(self.payload[start : start + 4], "big")

    @property
    def debug_data(self) -> bytes:
        """
        The opaque debug data of a GOAWAY frame (gRPC puts its reason there).
        """
        return self.payload[8:]


def http2_frame(
    frame_type: int, flags: int = 0, stream_id: int = 0, payload: bytes = b""
) -> bytes:
    """
    The bytes of one HTTP/2 frame.
    """
    return (
        len(payload).to_bytes(3, "big")
        + bytes([frame_type, flags])
        + stream_id.to_bytes(4, "big")
        + payload
    )


def _hpack_integer(value: int, prefix_bits: int) -> bytes:
    # RFC 7541 section 5.1, with a zero first byte besides the prefix.
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([value])
    out = bytearray([limit])
    value -= limit
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _hpack_literal(name: bytes, value: bytes) -> bytes:
    # "Literal header field without indexing, new name", no Huffman coding.
    return (
        b"\x00"
        + _hpack_integer(len(name), 7)
        + name
        + _hpack_integer(len(value), 7)
        + value
    )


def grpc_request_headers(
    stream_id: int, path: bytes, authority: str = "dapr-sentry"
) -> bytes:
    """
    A HEADERS frame opening a gRPC call on C{stream_id} that never sends its
    message: the stream stays open.

    @param path: the method, C{bytes} (C{b"/dapr.proto.sentry.v1.CA/..."}).
    """
    block = b"".join(
        _hpack_literal(name, value)
        for name, value in (
            (b":method", b"POST"),
            (b":scheme", b"https"),
            (b":path", path),
            (b":authority", authority.encode("ascii")),
            (b"content-type", b"application/grpc"),
            (b"te", b"trailers"),
        )
    )
    return http2_frame(HTTP2_HEADERS, HTTP2_FLAG_END_HEADERS, stream_id, block)


class RawHTTP2Client:
    """
    A TLS connection (verified against C{anchors_pem}, ALPN h2) on which the
    test writes HTTP/2 frames by hand.  It sends the client preface and an
    empty SETTINGS frame at once; everything else is up to the test.

    @param timeout: seconds any one read or write may block; a read that
        times out raises L{TimeoutError}.
    """

    def __init__(
        self,
        host: str,
        port: int,
        anchors_pem: bytes,
        server_name: str,
        timeout: float = 10.0,
    ) -> None:
        context = ssl.create_default_context(cadata=anchors_pem.decode("ascii"))
        context.set_alpn_protocols(["h2"])
        raw = socket.create_connection((host, port), timeout=timeout)
        try:
            self._socket = context.wrap_socket(raw, server_hostname=server_name)
        except BaseException:
            raw.close()
            raise
        self._buffer = b""
        self.send(HTTP2_CLIENT_PREFACE, http2_frame(HTTP2_SETTINGS))

    def send(self, *chunks: bytes) -> None:
        """
        Write C{chunks} (frames from L{http2_frame}, or any bytes).
        """
        self._socket.sendall(b"".join(chunks))

    def read_frame(self) -> HTTP2Frame | None:
        """
        The next frame, or None when the server closed the connection.
        """
        while True:
            if len(self._buffer) >= 9:
                length = int.from_bytes(self._buffer[:3], "big")
                if len(self._buffer) >= 9 + length:
                    header, self._buffer = self._buffer[:9], self._buffer[9:]
                    payload, self._buffer = (
                        self._buffer[:length],
                        self._buffer[length:],
                    )
                    return HTTP2Frame(
                        type=header[3],
                        flags=header[4],
                        stream_id=int.from_bytes(header[5:9], "big") & 0x7FFFFFFF,
                        payload=payload,
                    )
            try:
                data = self._socket.recv(65536)
            except (ssl.SSLEOFError, ConnectionResetError):
                return None
            if not data:
                return None
            self._buffer += data

    def read_until(
        self, frame_type: int, stream_id: int | None = None
    ) -> HTTP2Frame | None:
        """
        Read until a frame of C{frame_type} (on C{stream_id}, if given).

        @return: that frame, or None when the connection closed first.
        """
        while True:
            frame = self.read_frame()
            if frame is None:
                return None
            if frame.type == frame_type and stream_id in (None, frame.stream_id):
                return frame

    def close(self) -> None:
        """
        Close the connection.
        """
        self._socket.close()


def sign_on_new_connection(
    host: str,
    port: int,
    anchors_pem: bytes,
    server_name: str,
    request: "SignCertificateRequest",
    path: bytes | None = None,
) -> tuple[bytes | None, "SignCertificateResponse | None"]:
    """
    Make one SignCertificate call on a connection of its own, by hand, and
    say which serving process answered: with several processes sharing the
    port, each connection is accepted by one of them, and each serves with
    a server certificate of its own.

    @param request: a C{SignCertificateRequest}.
    @return: C{(server certificate DER, SignCertificateResponse or None)};
        None when the call ended without a message (a refusal).
    """
    from sentry_tx._proto import sentry_pb2

    message = request.SerializeToString()
    client = RawHTTP2Client(host, port, anchors_pem, server_name)
    try:
        client.read_until(HTTP2_SETTINGS)
        client.send(
            http2_frame(HTTP2_SETTINGS, HTTP2_FLAG_ACK),
            grpc_request_headers(
                1, path or b"/dapr.proto.sentry.v1.CA/SignCertificate"
            ),
            http2_frame(
                HTTP2_DATA,
                HTTP2_FLAG_END_STREAM,
                1,
                b"\x00" + len(message).to_bytes(4, "big") + message,
            ),
        )
        certificate = client._socket.getpeercert(binary_form=True)
        body = b""
        while True:
            frame = client.read_frame()
            if frame is None:
                break
            if frame.stream_id != 1:
                continue
            if frame.type == HTTP2_DATA:
                body += frame.payload
            if (
                frame.type in (HTTP2_HEADERS, HTTP2_DATA)
                and frame.flags & HTTP2_FLAG_END_STREAM
            ):
                break
            if frame.type == HTTP2_RST_STREAM:
                break
    finally:
        client.close()
    if len(body) < 5:
        return certificate, None
    return certificate, sentry_pb2.SignCertificateResponse.FromString(body[5:])


def open_silent_connections(
    host: str, port: int, count: int, timeout: float = 10.0
) -> list[socket.socket]:
    """
    Open C{count} TCP connections to C{host}:C{port} that never send a byte.

    @return: the connected sockets; the caller closes them.
    """
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sockets.append(socket.create_connection((host, port), timeout=timeout))
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets
