"""
Tests for the common request rules and the INSECURE validator.
"""

from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from sentry_tx.errors import ValidationError
from sentry_tx.identity.caller import CallerIdentity, SignRequest
from sentry_tx.identity.insecure import InsecureValidator
from sentry_tx.identity.rules import check_request, request_problems
from sentry_tx.interfaces import IIdentityValidator


def request(**fields):
    """
    A well-formed request, with C{fields} replaced.
    """
    values = dict(
        id="myapp",
        token="",
        trust_domain="",
        namespace="default",
        csr=b"-----BEGIN CERTIFICATE REQUEST-----",
        token_validator=1,
    )
    values.update(fields)
    return SignRequest(**values)


class RequestRulesTests(SynchronousTestCase):
    """
    Tests for L{request_problems} and L{check_request}.
    """

    def test_well_formed(self):
        """
        A well-formed request breaks no rule and asks for its own identity in
        the C{public} trust domain.
        """
        self.assertEqual(request_problems(request()), [])
        self.assertEqual(
            check_request(request()),
            CallerIdentity(trust_domain="public", namespace="default", app_id="myapp"),
        )

    def test_trust_domain_kept(self):
        """
        A requested trust domain is used as is.
        """
        identity = check_request(request(trust_domain="example.org"))
        self.assertEqual(identity.spiffe_id, "spiffe://example.org/ns/default/myapp")

    def test_empty_app_id(self):
        """
        An empty app id is reported as Dapr words it.
        """
        self.assertEqual(
            request_problems(request(id="")), ["parameter app-id cannot be empty"]
        )

    def test_dots(self):
        """
        An app id with dots is reported once, for the dots only.
        """
        self.assertEqual(
            request_problems(request(id="my.app")),
            ["parameter app-id cannot contain dots"],
        )

    def test_length(self):
        """
        An app id of 64 characters passes; 65 is too long.
        """
        self.assertEqual(request_problems(request(id="a" * 64)), [])
        self.assertEqual(
            request_problems(request(id="a" * 65)),
            ["app ID must be 64 characters or less"],
        )

    def test_invalid_characters(self):
        """
        Characters outside [A-Za-z0-9_-] in an app id are refused.
        """
        for app_id in ("my/app", "my app", "caf\u00e9", "a\x00b", ".."):
            problems = request_problems(request(id=app_id))
            if app_id == "..":
                self.assertEqual(problems, ["parameter app-id cannot contain dots"])
            else:
                self.assertEqual(
                    problems, ["parameter app-id contains invalid characters"], app_id
                )

    def test_csr_required(self):
        """
        An empty CSR is reported.
        """
        self.assertEqual(request_problems(request(csr=b"")), ["CSR is required"])

    def test_namespace_required(self):
        """
        An empty namespace is reported.
        """
        self.assertEqual(
            request_problems(request(namespace="")), ["namespace is required"]
        )

    def test_namespace_invalid(self):
        """
        A namespace that is not a SPIFFE path segment of at most 63
        characters is refused.
        """
        for namespace in (".", "..", "a/b", "a b", "n" * 64, "caf\u00e9"):
            self.assertEqual(
                request_problems(request(namespace=namespace)),
                ["parameter namespace is invalid"],
                namespace,
            )
        self.assertEqual(request_problems(request(namespace="my.ns_1-x")), [])

    def test_all_problems_joined(self):
        """
        Every broken rule is reported, joined by newlines after the
        C{invalid request: } prefix.
        """
        error = self.assertRaises(
            ValidationError, check_request, request(id="", csr=b"", namespace="")
        )
        self.assertEqual(
            str(error),
            "invalid request: parameter app-id cannot be empty\n"
            "CSR is required\nnamespace is required",
        )

    def test_trust_domain_characters(self):
        """
        A trust domain with characters outside [a-z0-9._-] is refused with
        Dapr's message, without the C{invalid request:} prefix.
        """
        error = self.assertRaises(
            ValidationError, check_request, request(trust_domain="Example.org")
        )
        self.assertEqual(
            str(error),
            "trust domain characters are limited to lowercase letters, numbers, "
            "dots, dashes, and underscores",
        )

    def test_trust_domain_length(self):
        """
        A trust domain of 255 bytes passes; 256 is too long.
        """
        check_request(request(trust_domain="a" * 255))
        error = self.assertRaises(
            ValidationError, check_request, request(trust_domain="a" * 256)
        )
        self.assertEqual(str(error), "trust domain is too long")


class InsecureValidatorTests(SynchronousTestCase):
    """
    Tests for L{InsecureValidator}.
    """

    def test_interface(self):
        """
        L{InsecureValidator} provides L{IIdentityValidator} as INSECURE (1).
        """
        validator = InsecureValidator()
        verifyObject(IIdentityValidator, validator)
        self.assertEqual(validator.name, 1)
        self.assertFalse(validator.needs_reactor)

    def test_accepts(self):
        """
        A well-formed request is validated as the identity it names.
        """
        identity = self.successResultOf(InsecureValidator().validate(request()))
        self.assertEqual(identity.spiffe_id, "spiffe://public/ns/default/myapp")

    def test_refuses(self):
        """
        A request that breaks a rule fails with L{ValidationError}.
        """
        failure = self.failureResultOf(
            InsecureValidator().validate(request(id="")), ValidationError
        )
        self.assertEqual(
            failure.getErrorMessage(),
            "invalid request: parameter app-id cannot be empty",
        )
