# -*- test-case-name: tests.test_listen -*-
"""
Turning a failed bind into one line an operator can act on.

L{check_port_free} binds and closes a socket the way grpcio will bind, so
that a port already in use is reported as a L{ListenError} naming the flag,
before grpc core writes its own lines about it.  L{listen_error} turns a
Twisted C{CannotListenError} (healthz, metrics) into the same error.
"""

import errno
import os
import socket

from twisted.application.service import Service
from twisted.internet.error import CannotListenError

from sentry_tx.errors import ListenError


def describe_socket_error(error: BaseException) -> str:
    """
    The words for a bind failure: C{address already in use} for EADDRINUSE,
    else the system's text.
    """
    number = getattr(error, "errno", None)
    if number == errno.EADDRINUSE:
        return "address already in use"
    if number == errno.EACCES:
        return "permission denied (a port below 1024 needs privileges)"
    if number == errno.EADDRNOTAVAIL:
        return "no such local address"
    if number is not None:
        return os.strerror(number).lower()
    return str(error)


def listen_error(
    flag: str, port: int, address: str, cannot_listen: CannotListenError
) -> ListenError:
    """
    The L{ListenError} for a Twisted C{CannotListenError}.
    """
    return ListenError(
        flag, port, address, describe_socket_error(cannot_listen.socketError)
    )


def check_port_free(flag: str, address: str, port: int) -> None:
    """
    Bind (with SO_REUSEADDR, as grpc core does) and close a TCP socket on
    C{address}:C{port}; port 0 is always free, and an address that is a
    host name rather than an IP address is not checked (no DNS lookup here).

    This is a diagnosis, not a reservation: another process may still take
    the port before the real bind, which then fails as it would have.

    @param address: the bind address; empty means all interfaces.
    @raise ListenError: naming C{flag} when the bind fails.
    """
    if port == 0:
        return
    host = address.strip("[]") if address else ""
    try:
        # Numeric only: a host name would mean a DNS lookup, which may not
        # block the caller; grpcio resolves and reports such an address
        # itself.
        infos = socket.getaddrinfo(
            host or None,
            port,
            socket.AF_UNSPEC,
            socket.SOCK_STREAM,
            0,
            socket.AI_PASSIVE | socket.AI_NUMERICHOST,
        )
    except socket.gaierror:
        return
    if not host:
        # All interfaces: grpc core binds [::] (dual stack) when it can.
        infos = sorted(infos, key=lambda info: info[0] != socket.AF_INET6)[:1]
    for family, kind, protocol, _, socket_address in infos:
        probe = socket.socket(family, kind, protocol)
        try:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(socket_address)
        except OSError as error:
            raise ListenError(
                flag, port, address, describe_socket_error(error)
            ) from error
        finally:
            probe.close()


class PortCheck(Service):
    """
    At start, check that a port is free (L{check_port_free}), so that a
    port in use is one line naming its flag before any server tries it;
    added to the root before the service that binds the port (the gRPC
    server, or its serving copies, which bind with SO_REUSEPORT and would
    otherwise each fail on their own).

    @raise ListenError: from C{startService}, which the root makes fatal.
    """

    def __init__(self, flag: str, address: str, port: int) -> None:
        self.flag = flag
        self.address = address
        self.port = port

    def startService(self) -> None:
        super().startService()
        check_port_free(self.flag, self.address, self.port)
