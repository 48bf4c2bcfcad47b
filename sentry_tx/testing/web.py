"""
Driving a twisted.web site in memory: L{connect} gives a channel of the
site on a L{ClosingTransport}, so that a test feeds it request bytes and
reads the response without a socket.
"""

from typing import TYPE_CHECKING

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionAborted
from twisted.internet.interfaces import IProtocol
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.server import Site

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorSSL, IReactorTCP, IReactorTime

    class IServingReactor(IReactorTCP, IReactorSSL, IReactorTime):
        """
        What the fake servers (L{sentry_tx.testing.jwks_server},
        L{sentry_tx.testing.kubernetes}) need of a reactor: listening on TCP
        and TLS, and a clock.  A make-believe interface, for type checking
        only, as Twisted's own C{_IReactorCommon}: the real reactor provides
        all three.
        """


PEER = IPv4Address("TCP", "127.0.0.1", 40000)


class ClosingTransport(StringTransport):
    """
    A StringTransport that delivers connectionLost when aborted, as a TCP
    transport does.

    @ivar lost: whether the connection has been lost.
    """

    def __init__(self) -> None:
        super().__init__(peerAddress=PEER)
        self.protocol: IProtocol | None = None
        self.lost = False

    def abortConnection(self) -> None:
        super().abortConnection()
        if not self.lost and self.protocol is not None:
            self.lost = True
            self.protocol.connectionLost(Failure(ConnectionAborted()))


def connect(site: Site) -> tuple[HTTPChannel, ClosingTransport]:
    """
    A new connection to C{site}.

    @return: C{(protocol, transport)}: the site's channel, connected to a
        L{ClosingTransport}.
    """
    protocol = site.buildProtocol(PEER)
    transport = ClosingTransport()
    transport.protocol = protocol
    protocol.makeConnection(transport)
    return protocol, transport
