"""
One serving process of sentry_tx's CA in one of two hostings, for
bench/run.py to compare (issue 9 asked for the alternative to be measured):

- ``thread``: what sentry_tx runs, the default reactor in the main thread and
  grpc.aio on its own loop in a thread the CA owns
  (sentry_tx.server.loop.GrpcLoop);
- ``same-loop``: Twisted's asyncio reactor, with grpc.aio on the reactor's
  own asyncio loop (what ``twistd -r asyncio`` would need).

    python bench/hosting.py DESIGN WORKDIR

It serves the INSECURE validator on a free 127.0.0.1 port with a generated
bundle, writes ``WORKDIR/ca.crt`` and then ``WORKDIR/port``, and runs until
SIGTERM.  Only this benchmark uses the ``same-loop`` hosting: sentry_tx keeps
one hosting mode.
"""

import asyncio
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


class ReactorLoop:
    """
    The reactor's own asyncio loop in the place of a GrpcLoop: coroutines
    run on the reactor's thread, nothing is started or joined.
    """

    def __init__(self, reactor):
        self.loop = reactor._asyncioEventloop

    running = True

    def start(self):
        pass

    def run(self, coroutine_function, *args):
        from twisted.internet.defer import Deferred

        return Deferred.fromFuture(
            asyncio.ensure_future(coroutine_function(*args), loop=self.loop)
        )

    def stop(self):
        from twisted.internet.defer import succeed

        return succeed(None)


def main(design, workdir):
    if design == "same-loop":
        from twisted.internet import asyncioreactor

        asyncioreactor.install(asyncio.new_event_loop())
    elif design != "thread":
        raise SystemExit(f"unknown design {design!r} (thread or same-loop)")
    import datetime
    import signal

    from twisted.internet import reactor

    from sentry_tx.ca.bundle import generate_bundle
    from sentry_tx.config import SentryConfig
    from sentry_tx.identity.caller import VALIDATOR_INSECURE
    from sentry_tx.identity.insecure import InsecureValidator
    from sentry_tx.metrics import SentryMetrics
    from sentry_tx.server.loop import GrpcLoop
    from sentry_tx.server.service import CertificateAuthorityService
    from sentry_tx.testing.authority import FakeTrustStore

    generated = generate_bundle(
        "localhost",
        "default",
        datetime.datetime.now(datetime.UTC),
        datetime.timedelta(minutes=15),
    )
    config = SentryConfig(listen_address="127.0.0.1", port=0)
    ca = CertificateAuthorityService(
        config,
        reactor,
        FakeTrustStore(generated.bundle),
        {VALIDATOR_INSECURE: InsecureValidator()},
        VALIDATOR_INSECURE,
        SentryMetrics(),
        grpc_loop_factory=ReactorLoop if design == "same-loop" else GrpcLoop,
    )

    def started(_):
        with open(os.path.join(workdir, "ca.crt"), "wb") as f:
            f.write(generated.anchors_pem)
        with open(os.path.join(workdir, "port.new"), "w") as f:
            f.write(str(ca.port))
        os.replace(os.path.join(workdir, "port.new"), os.path.join(workdir, "port"))

    def failed(failure):
        failure.printTraceback()
        reactor.stop()

    reactor.callWhenRunning(
        lambda: ca.start(config).addCallbacks(started, failed)
    )
    signal.signal(
        signal.SIGTERM,
        lambda *_: reactor.callFromThread(
            lambda: ca.stop().addBoth(lambda _: reactor.stop())
        ),
    )
    reactor.run(installSignalHandlers=False)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
