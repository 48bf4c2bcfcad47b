"""
Tests for L{sentry_tx.testing}: each verified fake provides the interface it
stands for, so that a test passing against a fake says something about the
real thing.  (The INotify fake is also held to Twisted's L{INotify} by the
contract tests in C{tests/test_watcher.py}.)
"""

import inspect

from twisted.internet.inotify import INotify
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from sentry_tx.errors import BundleError
from sentry_tx.interfaces import (
    ICertificateAuthority,
    IIdentityValidator,
    ITrustStore,
)
from sentry_tx.testing.authority import (
    FakeCertificateAuthority,
    FakeTrustStore,
    FakeValidator,
    ObservedAuthority,
    RefusingCertificateAuthority,
)
from sentry_tx.testing.inotify import FakeINotify, FakeINotifyFactory


class FakesTests(SynchronousTestCase):
    """
    The fakes provide the interfaces they stand for.
    """

    def test_renewal_store(self):
        """
        L{MemoryRenewalStore} passes C{verifyObject} for L{IRenewalStore}.
        """
        from sentry_tx.interfaces import IRenewalStore
        from sentry_tx.testing.renewal import MemoryRenewalStore

        verifyObject(IRenewalStore, MemoryRenewalStore({}))

    def test_validator(self):
        """
        L{FakeValidator} passes C{verifyObject} for L{IIdentityValidator}.
        """
        verifyObject(IIdentityValidator, FakeValidator())

    def test_certificate_authority(self):
        """
        L{FakeCertificateAuthority} passes C{verifyObject} for
        L{ICertificateAuthority}.
        """
        verifyObject(ICertificateAuthority, FakeCertificateAuthority())

    def test_trust_store(self):
        """
        L{FakeTrustStore} passes C{verifyObject} for L{ITrustStore}.
        """
        verifyObject(ITrustStore, FakeTrustStore())

    def test_observed_authority(self):
        """
        L{ObservedAuthority} passes C{verifyObject} for
        L{ICertificateAuthority}, and reports a finished restart to
        C{when_restarted}.
        """
        inner = FakeCertificateAuthority()
        observed = ObservedAuthority(inner)
        verifyObject(ICertificateAuthority, observed)
        waiting = observed.when_restarted()
        self.successResultOf(observed.restart(None))
        succeeded, _ = self.successResultOf(waiting)
        self.assertTrue(succeeded)
        self.assertEqual(len(observed.outcomes), 1)

    def test_refusing_authority(self):
        """
        L{RefusingCertificateAuthority} passes C{verifyObject} for
        L{ICertificateAuthority}, and its restart fails with its error.
        """
        error = BundleError("ca.crt", "refused")
        authority = RefusingCertificateAuthority(error)
        verifyObject(ICertificateAuthority, authority)
        failure = self.failureResultOf(authority.restart(None), BundleError)
        self.assertIs(failure.value, error)


class FakeINotifyTests(SynchronousTestCase):
    """
    L{FakeINotify} is called as Twisted's L{INotify} is.
    """

    def test_signatures(self):
        """
        Each method of Twisted's L{INotify} that the fake defines takes the
        same parameters as the real one.
        """
        shared = [
            name
            for name, member in vars(FakeINotify).items()
            if inspect.isfunction(member)
            and not name.startswith("_")
            and hasattr(INotify, name)
        ]
        self.assertIn("watch", shared)
        self.assertIn("ignore", shared)
        for name in shared:
            self.assertEqual(
                list(inspect.signature(getattr(FakeINotify, name)).parameters),
                list(inspect.signature(getattr(INotify, name)).parameters),
                name,
            )

    def test_factory_makes_fakes(self):
        """
        L{FakeINotifyFactory} stands for the L{INotify} class: calling it
        makes a L{FakeINotify}, which is then its C{current} one.
        """
        factory = FakeINotifyFactory()
        made = factory()
        self.assertIsInstance(made, FakeINotify)
        self.assertIs(factory.current, made)
