"""
Certificate factories (and, later, verified fakes) the tests share.

The factories build what the production profile in
L{sentry_tx.ca.x509profile} never would: chains with intermediates, CAs
without keyCertSign, certificates that expired, keys of every type and in
every PEM format, CSRs with bad signatures.  Nothing here is used outside
tests.
"""

import base64
import os
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from zope.interface import implementer

from sentry_tx.ca.bundle import certificates_pem, load_bundle
from sentry_tx.config import SentryConfig
from sentry_tx.identity import CallerIdentity
from sentry_tx.interfaces import (
    ICertificateAuthority,
    IIdentityValidator,
    ITrustStore,
)

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
"""
The top of the source tree (where C{sentry_tx/} and C{twisted/plugins/}
are): processes that tests start put it on their PYTHONPATH, since trial
runs in a temporary directory.
"""

FIXED_NOW = datetime(2026, 3, 1, 12, 0, 0, tzinfo=timezone.utc)
"""
The "now" tests inject, unless they need another.
"""

TEST_TRUST_DOMAIN = "example.org"
TEST_NAMESPACE = "dapr-system"

CA_TEST_LIFETIME = timedelta(days=365)
"""
How long factory CAs live by default, centred-ish on L{FIXED_NOW}.
"""

_KEY_FACTORIES = {
    "ecdsa-p192": lambda: ec.generate_private_key(ec.SECP192R1()),
    "ecdsa-p256": lambda: ec.generate_private_key(ec.SECP256R1()),
    "ecdsa-p384": lambda: ec.generate_private_key(ec.SECP384R1()),
    "ecdsa-p521": lambda: ec.generate_private_key(ec.SECP521R1()),
    "ed25519": ed25519.Ed25519PrivateKey.generate,
    "rsa-1024": lambda: rsa.generate_private_key(65537, 1024),
    "rsa-2048": lambda: rsa.generate_private_key(65537, 2048),
}

KEY_TYPES = tuple(_KEY_FACTORIES)
"""
The key types L{make_private_key} knows, including ones sentry_tx refuses
(C{ecdsa-p192}, C{rsa-1024}).
"""

_DEFAULT = object()


def make_private_key(key_type="ecdsa-p256"):
    """
    A new private key.

    @param key_type: one of L{KEY_TYPES}.
    """
    return _KEY_FACTORIES[key_type]()


def default_hash(key):
    """
    The hash a test certificate or CSR signed by C{key} uses (the production
    choice, but also for curves and sizes production refuses).
    """
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return None
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size > 384:
        return hashes.SHA512()
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size > 256:
        return hashes.SHA384()
    return hashes.SHA256()


def private_key_pem(key, key_format="pkcs8", password=None):
    """
    The PEM of a private key.

    @param key_format: C{"pkcs8"} (C{PRIVATE KEY}), C{"sec1"} (C{EC PRIVATE
        KEY}, EC keys only) or C{"pkcs1"} (C{RSA PRIVATE KEY}, RSA keys only).
    @param password: C{bytes} to encrypt it with (C{ENCRYPTED PRIVATE KEY}
        for PKCS#8, a C{Proc-Type} header for the others), or L{None}.
    """
    private_format = {
        "pkcs8": serialization.PrivateFormat.PKCS8,
        "sec1": serialization.PrivateFormat.TraditionalOpenSSL,
        "pkcs1": serialization.PrivateFormat.TraditionalOpenSSL,
    }[key_format]
    encryption = (
        serialization.NoEncryption()
        if password is None
        else serialization.BestAvailableEncryption(password)
    )
    return key.private_bytes(serialization.Encoding.PEM, private_format, encryption)


def certificate_pem(*certificates):
    """
    The PEM of C{certificates}, concatenated.
    """
    return certificates_pem(certificates)


def organization_name(organization):
    """
    An X.509 name of just C{O=<organization>}.
    """
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization)])


def make_certificate(
    key,
    subject,
    *,
    signer=None,
    signer_key=None,
    not_before=FIXED_NOW - timedelta(days=30),
    not_after=FIXED_NOW + CA_TEST_LIFETIME,
    ca=True,
    path_length=None,
    key_cert_sign=True,
    key_usage=True,
    basic_constraints=True,
    subject_key_identifier=True,
    extensions=(),
):
    """
    Build a test certificate, a CA by default.

    @param key: the subject's private key.
    @param subject: an L{x509.Name}, or a C{str} used as C{O=<subject>}.
    @param signer: the issuing certificate, or L{None} for self-signed.
    @param signer_key: the issuing private key (C{key} when self-signed).
    @param ca: the basic constraints' CA flag.
    @param path_length: the basic constraints' path length.
    @param key_cert_sign: whether the key usage includes keyCertSign.
    @param key_usage: whether to add a key usage extension at all.
    @param basic_constraints: whether to add basic constraints at all.
    @param subject_key_identifier: whether to add SKI (and AKI when signed
        by another certificate).
    @param extensions: more C{(extension value, critical)} pairs.
    @return: an L{x509.Certificate}.
    """
    if isinstance(subject, str):
        subject = organization_name(subject)
    if signer is None:
        signer_name, signer_key = subject, key
    else:
        signer_name = signer.subject
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(signer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
    )
    if basic_constraints:
        builder = builder.add_extension(
            x509.BasicConstraints(ca=ca, path_length=path_length if ca else None),
            critical=True,
        )
    if key_usage:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=key_cert_sign,
                crl_sign=key_cert_sign,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    if subject_key_identifier:
        builder = builder.add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
        )
        if signer is not None:
            builder = builder.add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(
                    signer.public_key()
                ),
                critical=False,
            )
    for value, critical in extensions:
        builder = builder.add_extension(value, critical=critical)
    return builder.sign(signer_key, default_hash(signer_key))


@dataclass(frozen=True)
class CertificateChain:
    """
    A root, optional intermediates and an issuer, with their keys.

    @ivar root: the self-signed root.
    @ivar intermediates: CA certificates between issuer and root, the one
        nearest the issuer first.
    @ivar issuer: the certificate that signs leaves.
    """

    root: x509.Certificate
    root_key: object = field(repr=False)
    intermediates: tuple
    intermediate_keys: tuple = field(repr=False)
    issuer: x509.Certificate
    issuer_key: object = field(repr=False)

    @property
    def anchors_pem(self):
        """
        The root's PEM, as C{ca.crt}.
        """
        return certificate_pem(self.root)

    def issuer_chain_pem(self, include_root=False):
        """
        The issuer chain's PEM, as C{issuer.crt}: issuer, intermediates and,
        if asked, the root at the end.
        """
        certificates = [self.issuer, *self.intermediates]
        if include_root:
            certificates.append(self.root)
        return certificate_pem(*certificates)

    def issuer_key_pem(self, key_format="pkcs8", password=None):
        """
        The issuer key's PEM, as C{issuer.key}; see L{private_key_pem}.
        """
        return private_key_pem(self.issuer_key, key_format, password)

    def load(self, now=FIXED_NOW):
        """
        Load this chain with L{load_bundle}.

        @return: a L{sentry_tx.ca.bundle.TrustBundle}.
        """
        return load_bundle(
            self.anchors_pem, self.issuer_chain_pem(), self.issuer_key_pem(), now
        )

    def write(self, directory, include_root=False):
        """
        Write C{ca.crt}, C{issuer.crt} and C{issuer.key} into C{directory}
        (which must exist).

        @return: the three paths.
        """
        contents = (
            ("ca.crt", self.anchors_pem),
            ("issuer.crt", self.issuer_chain_pem(include_root)),
            ("issuer.key", self.issuer_key_pem()),
        )
        paths = []
        for name, data in contents:
            path = os.path.join(directory, name)
            with open(path, "wb") as f:
                f.write(data)
            paths.append(path)
        os.chmod(paths[2], 0o600)
        return tuple(paths)


def make_chain(
    key_type="ecdsa-p256",
    *,
    issuer_key_type=None,
    intermediates=0,
    not_before=FIXED_NOW - timedelta(days=30),
    not_after=FIXED_NOW + CA_TEST_LIFETIME,
    issuer_not_before=_DEFAULT,
    issuer_not_after=_DEFAULT,
    trust_domain=TEST_TRUST_DOMAIN,
    **issuer_options,
):
    """
    Make a root, C{intermediates} intermediate CAs and an issuer.

    @param key_type: the key type of every certificate (L{KEY_TYPES}).
    @param issuer_key_type: the issuer's key type, if different.
    @param not_before: when the root and intermediates start.
    @param not_after: when the root and intermediates end.
    @param issuer_not_before: when the issuer starts (default C{not_before}).
    @param issuer_not_after: when the issuer ends (default C{not_after}).
    @param issuer_options: more keyword arguments of L{make_certificate} for
        the issuer (C{ca=False}, C{key_cert_sign=False}, ...).
    @return: a L{CertificateChain}.
    """
    root_key = make_private_key(key_type)
    root = make_certificate(
        root_key, trust_domain, not_before=not_before, not_after=not_after
    )
    signer, signer_key = root, root_key
    chain = []
    for index in range(intermediates):
        key = make_private_key(key_type)
        cert = make_certificate(
            key,
            f"{trust_domain} intermediate {index}",
            signer=signer,
            signer_key=signer_key,
            not_before=not_before,
            not_after=not_after,
        )
        chain.insert(0, (cert, key))
        signer, signer_key = cert, key
    issuer_key = make_private_key(issuer_key_type or key_type)
    issuer_options.setdefault("path_length", 0)
    issuer = make_certificate(
        issuer_key,
        f"spiffe://{trust_domain}/ns/{TEST_NAMESPACE}/dapr-sentry",
        signer=signer,
        signer_key=signer_key,
        not_before=not_before if issuer_not_before is _DEFAULT else issuer_not_before,
        not_after=not_after if issuer_not_after is _DEFAULT else issuer_not_after,
        **issuer_options,
    )
    return CertificateChain(
        root=root,
        root_key=root_key,
        intermediates=tuple(cert for cert, _ in chain),
        intermediate_keys=tuple(key for _, key in chain),
        issuer=issuer,
        issuer_key=issuer_key,
    )


def make_bundle(key_type="ecdsa-p256", now=FIXED_NOW, **chain_options):
    """
    A loaded L{sentry_tx.ca.bundle.TrustBundle} of a new L{make_chain}.
    """
    return make_chain(key_type, **chain_options).load(now)


def make_csr(key="ecdsa-p256", label="CERTIFICATE REQUEST", corrupt_signature=False):
    """
    A certificate signing request and the key it is for.

    Its subject and SAN are deliberately unlike what sentry_tx puts in a
    certificate (they must be ignored).

    @param key: a key type of L{KEY_TYPES} (a new key of that type is made)
        or a private key.
    @param label: the PEM label; old sidecars use C{"CERTIFICATE"}.
    @param corrupt_signature: flip a bit of the signature so that it does
        not verify.
    @return: C{(private_key, csr_pem)}.
    """
    if isinstance(key, str):
        key = make_private_key(key)
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ignored")]))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("ignored.example")]),
            critical=False,
        )
        .sign(key, default_hash(key))
    )
    der = csr.public_bytes(serialization.Encoding.DER)
    if corrupt_signature:
        # The signature is the last field of the DER; its last byte is part
        # of the signature value whatever the algorithm.
        der = der[:-1] + bytes([der[-1] ^ 0x01])
    return key, pem_encode(label, der)


def pem_encode(label, der):
    """
    Wrap C{der} in a PEM block labelled C{label}.

    @param label: a C{str}, like C{"CERTIFICATE"}.
    @param der: C{bytes}.
    @return: C{bytes}.
    """
    body = base64.encodebytes(der).replace(b"\n", b"")
    lines = [body[i : i + 64] for i in range(0, len(body), 64)]
    return (
        f"-----BEGIN {label}-----\n".encode("ascii")
        + b"".join(line + b"\n" for line in lines)
        + f"-----END {label}-----\n".encode("ascii")
    )


# Fakes: each provides the interface it stands for, checked by
# tests/test_testing.py with verifyObject.


class ImmediateThreadPool:
    """
    A thread pool that runs each call at once in the calling thread, for
    C{deferToThreadPool} in tests that must not need a running reactor.
    """

    def callInThreadWithCallback(self, onResult, func, *args, **kw):
        try:
            result = func(*args, **kw)
        except BaseException:
            onResult(False, Failure())
        else:
            onResult(True, result)

    def callInThread(self, func, *args, **kw):
        func(*args, **kw)


class ImmediateReactor(Clock):
    """
    A L{Clock} whose C{callFromThread} runs the call at once and whose thread
    pool is an L{ImmediateThreadPool}: code that crosses to the reactor
    (C{callFromThread} from the gRPC loop, C{deferToThreadPool}) runs
    synchronously.
    """

    def __init__(self, seconds=0.0):
        super().__init__()
        self.advance(seconds)
        self._pool = ImmediateThreadPool()

    def callFromThread(self, f, *args, **kw):
        f(*args, **kw)

    def getThreadPool(self):
        return self._pool


def inline_file_work(reactor):
    """
    A L{sentry_tx.ca.files.BoundedFileWork} that runs its work at once in
    the calling thread: with an L{ImmediateReactor}, code that reads
    credential files answers synchronously, without a running reactor.
    """
    from sentry_tx.ca.files import BoundedFileWork

    return BoundedFileWork(reactor, start_thread=lambda target, name: target())


@implementer(IIdentityValidator)
class FakeValidator:
    """
    A validator that answers with a fixed identity or refusal, and records
    the requests it saw.

    @param name: the TokenValidator number it answers to.
    @param error: when not None, every validation fails with it.
    @param pending: when True, C{validate} returns a Deferred that never
        fires by itself (for timeout tests); they are kept in C{pending}.
    @param needs_reactor: whether the servicer must call it on the reactor.
    """

    def __init__(self, name=1, error=None, pending=False, needs_reactor=True):
        self.name = name
        self.needs_reactor = needs_reactor
        self.error = error
        self.requests = []
        self.deadlines = []
        self._pending = pending
        self.pending = []

    def validate(self, request, deadline=None):
        self.requests.append(request)
        self.deadlines.append(deadline)
        if self._pending:
            d = Deferred()
            self.pending.append(d)
            return d
        if self.error is not None:
            return fail(self.error)
        return succeed(
            CallerIdentity(
                trust_domain=request.trust_domain or "public",
                namespace=request.namespace,
                app_id=request.id,
            )
        )


@implementer(ICertificateAuthority)
class FakeCertificateAuthority:
    """
    An authority with a fixed bundle that records start, stop and restart.
    """

    def __init__(self, bundle=None, config=None):
        self.bundle = bundle
        self.config = config if config is not None else SentryConfig()
        self.ready = False
        self.calls = []

    @property
    def in_service(self):
        """
        The bundle and config, as the servicer reads them.
        """
        from sentry_tx.server.servicer import InService

        return InService(self.bundle, self.config)

    def start(self, config):
        self.calls.append(("start", config))
        self.config = config
        self.ready = True
        return succeed(None)

    def stop(self):
        self.calls.append(("stop",))
        self.ready = False
        return succeed(None)

    def restart(self, config):
        self.calls.append(("restart", config))
        self.config = config
        return succeed(None)


@implementer(ITrustStore)
class FakeTrustStore:
    """
    A trust store holding bundles in memory: C{load} and C{load_or_generate}
    answer with C{bundle}, or fail with C{error} when it is set.
    """

    watch_directories = ()

    def __init__(self, bundle=None, error=None):
        self.bundle = bundle
        self.error = error
        self.loads = 0

    def load(self, now):
        self.loads += 1
        if self.error is not None:
            return fail(self.error)
        return succeed(self.bundle)

    def load_or_generate(self, now):
        return self.load(now)


class AbortingContext:
    """
    The part of C{grpc.aio.ServicerContext} the servicer uses: C{abort}
    records the status and trailing metadata and raises
    L{AbortingContext.Aborted}, as grpcio's raises; C{read} answers with
    C{message} (C{grpc.aio.EOF} when None); C{time_remaining} with
    C{remaining}.
    """

    class Aborted(Exception):
        """
        Raised by L{AbortingContext.abort}.
        """

    def __init__(self, message=None, remaining=None):
        self.message = message
        self.remaining = remaining
        self.trailing_metadata = None

    async def abort(self, code, details, trailing_metadata=None):
        self.code, self.details = code, details
        self.trailing_metadata = trailing_metadata
        raise self.Aborted()

    async def read(self):
        import grpc

        return grpc.aio.EOF if self.message is None else self.message

    def time_remaining(self):
        return self.remaining


def run_now(coroutine):
    """
    Run C{coroutine} to its end at once, with no event loop: for pipeline
    code that must not wait (the INSECURE path).

    @return: its result (its exception is raised).
    @raise AssertionError: if it waited for something.
    """
    try:
        coroutine.send(None)
    except StopIteration as stop:
        return stop.value
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

    def __init__(self, reactor=None):
        self.loop = None

    @property
    def running(self):
        return self.loop is not None

    def start(self):
        import asyncio

        self.loop = asyncio.new_event_loop()

    def run(self, coroutine_function, *args):
        try:
            result = self.loop.run_until_complete(coroutine_function(*args))
        except Exception:
            return fail()
        return succeed(result)

    def stop(self):
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

    def __init__(self, target, anchors_pem, server_name="dapr-sentry.default.svc"):
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

    def sign(self, request, timeout=10.0):
        """
        Call SignCertificate; raises C{grpc.RpcError} on a refusal.
        """
        return self._stub.SignCertificate(request, timeout=timeout)

    def server_chain(self, timeout=10.0):
        """
        The certificate chain the server presents, as cryptography
        certificates (leaf first), read by a TLS 1.2+ handshake.
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
                        raise TimeoutError("TLS handshake timed out")
                    select.select([sock], [], [], left)
            chain = connection.get_peer_cert_chain(as_cryptography=True)
        return chain

    def close(self):
        """
        Close the channel.
        """
        self._channel.close()


# Rotation helpers: what the issuer watch, the expiry check and the rotation
# tests share (tests/test_watcher.py, test_expiry.py, test_rotation.py).

BUNDLE_FILE_NAMES = ("ca.crt", "issuer.crt", "issuer.key")
"""
The names of the three bundle files, in the order anchors, chain, key.
"""

PROJECTED_DATA_LINK = "..data"
"""
The symbolic link through which the kubelet publishes a projected volume's
current version.
"""


def _bundle_file_contents(chain):
    return (
        chain.anchors_pem,
        chain.issuer_chain_pem(),
        chain.issuer_key_pem(),
    )


def reissue_chain(
    chain,
    key_type="ecdsa-p256",
    not_before=_DEFAULT,
    not_after=_DEFAULT,
    **issuer_options,
):
    """
    A new issuer with a new key, signed by the same CA that signed
    C{chain}'s issuer: what an operator rotating the issuer (not the root)
    deploys.

    @param chain: a L{CertificateChain}.
    @param key_type: the new issuer key's type (L{KEY_TYPES}).
    @param not_before: when the new issuer starts (default: as the old).
    @param not_after: when the new issuer ends (default: as the old).
    @param issuer_options: more keyword arguments of L{make_certificate}.
    @return: a L{CertificateChain} with the same root and intermediates.
    """
    if chain.intermediates:
        signer, signer_key = chain.intermediates[0], chain.intermediate_keys[0]
    else:
        signer, signer_key = chain.root, chain.root_key
    if not_before is _DEFAULT:
        not_before = chain.issuer.not_valid_before_utc
    if not_after is _DEFAULT:
        not_after = chain.issuer.not_valid_after_utc
    issuer_key = make_private_key(key_type)
    issuer_options.setdefault("path_length", 0)
    issuer = make_certificate(
        issuer_key,
        chain.issuer.subject,
        signer=signer,
        signer_key=signer_key,
        not_before=not_before,
        not_after=not_after,
        **issuer_options,
    )
    return CertificateChain(
        root=chain.root,
        root_key=chain.root_key,
        intermediates=chain.intermediates,
        intermediate_keys=chain.intermediate_keys,
        issuer=issuer,
        issuer_key=issuer_key,
    )


def replace_bundle_files(chain, directory):
    """
    Replace C{ca.crt}, C{issuer.crt} and C{issuer.key} in C{directory} as
    careful tools do: each is written to a temporary file in the same
    directory, then renamed over the old one.

    @return: the three paths.
    """
    paths = []
    for name, data in zip(BUNDLE_FILE_NAMES, _bundle_file_contents(chain)):
        path = os.path.join(directory, name)
        temporary = os.path.join(directory, f".{name}.new")
        with open(temporary, "wb") as f:
            f.write(data)
        os.chmod(temporary, 0o600)
        os.rename(temporary, path)
        paths.append(path)
    return tuple(paths)


def project_volume(directory, chain, version):
    """
    Lay C{directory} out as the kubelet projects a Secret: the files in a
    version directory, C{..data} pointing at it, and each visible file a
    symbolic link into C{..data/}.

    @param directory: an existing, empty directory.
    @param version: the version directory's name (C{"..2026_x"}).
    """
    chain.write(_make_version(directory, version))
    os.symlink(version, os.path.join(directory, PROJECTED_DATA_LINK))
    for name in BUNDLE_FILE_NAMES:
        os.symlink(
            os.path.join(PROJECTED_DATA_LINK, name), os.path.join(directory, name)
        )


def swap_projected_volume(directory, chain, version):
    """
    Publish C{chain} in a volume laid out by L{project_volume} as the kubelet
    updates one: write a new version directory, point C{..data_tmp} at it,
    rename C{..data_tmp} over C{..data}, remove the old version.

    @param version: the new version directory's name (C{"..2026_y"}).
    """
    import shutil

    data_link = os.path.join(directory, PROJECTED_DATA_LINK)
    old_version = os.readlink(data_link)
    chain.write(_make_version(directory, version))
    temporary_link = data_link + "_tmp"
    os.symlink(version, temporary_link)
    os.rename(temporary_link, data_link)
    shutil.rmtree(os.path.join(directory, old_version))


def _make_version(directory, version):
    path = os.path.join(directory, version)
    os.mkdir(path, 0o700)
    return path


class SchedulingClock(Clock):
    """
    A L{Clock} that tells a test when something is scheduled on it, so a
    test can wait for an event that arrives through the real reactor (an
    inotify read) and then drive time itself.
    """

    def __init__(self):
        super().__init__()
        self._waiting = []

    def when_scheduled(self):
        """
        @return: a Deferred that fires with the L{IDelayedCall} of the next
            C{callLater}.
        """
        d = Deferred()
        self._waiting.append(d)
        return d

    def callLater(self, delay, f, *args, **kw):
        call = super().callLater(delay, f, *args, **kw)
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(call)
        return call


@implementer(ICertificateAuthority)
class ObservedAuthority:
    """
    An authority that forwards everything to another and tells a test when a
    restart it was asked for has finished.

    @ivar outcomes: C{(succeeded, result or Failure)} of every finished
        restart.
    """

    def __init__(self, authority):
        self._authority = authority
        self.outcomes = []
        self._waiting = []

    @property
    def config(self):
        return self._authority.config

    @property
    def bundle(self):
        return self._authority.bundle

    @property
    def ready(self):
        return self._authority.ready

    def start(self, config):
        return self._authority.start(config)

    def stop(self):
        return self._authority.stop()

    def restart(self, config):
        d = self._authority.restart(config)
        d.addBoth(self._finished)
        return d

    def when_restarted(self):
        """
        @return: a Deferred that fires with the C{(succeeded, result or
            Failure)} of the next restart to finish; it never fails.
        """
        d = Deferred()
        self._waiting.append(d)
        return d

    def _finished(self, result):
        outcome = (not isinstance(result, Failure), result)
        self.outcomes.append(outcome)
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(outcome)
        return result


class RefusingCertificateAuthority(FakeCertificateAuthority):
    """
    A L{FakeCertificateAuthority} whose every restart fails with C{error},
    as a refused bundle does.
    """

    def __init__(self, error, bundle=None, config=None):
        super().__init__(bundle, config)
        self.error = error

    def restart(self, config):
        self.calls.append(("restart", config))
        return fail(self.error)


class FakeINotify:
    """
    An in-memory stand-in for Twisted's L{twisted.internet.inotify.INotify},
    made by a L{FakeINotifyFactory}: it holds watches and delivers the events
    a test makes, as the real one does.

    @ivar connected: true until the connection is lost.
    @ivar reading: whether C{startReading} was called.
    @ivar watches: the watched paths (L{FilePath} in bytes mode) and their
        C{(descriptor, mask, callbacks)}.
    """

    def __init__(self, missing):
        self._missing = missing
        self.connected = 1
        self.reading = False
        self.watches = {}
        self._next_descriptor = 1

    def startReading(self):
        self.reading = True

    def loseConnection(self):
        self.connected = 0
        self.reading = False

    def watch(self, path, mask=None, autoAdd=False, callbacks=None, recursive=False):
        """
        Watch C{path}; raise L{INotifyError} when it is in the factory's
        C{missing} set, or when the connection is lost.

        @return: the watch descriptor, the same for a path watched already.
        """
        from twisted.internet import inotify

        path = _as_file_path(path)
        if path in self.watches:
            return self.watches[path][0]
        if not self.connected or path.path in self._missing:
            raise inotify.INotifyError(f"Failed to add watch on '{path!r}' - (-1)")
        if mask is None:
            mask = inotify.IN_WATCH_MASK
        descriptor = self._next_descriptor
        self._next_descriptor += 1
        self.watches[path] = (
            descriptor,
            mask | inotify.IN_DELETE_SELF,
            list(callbacks or ()),
        )
        return descriptor

    def ignore(self, path):
        path = _as_file_path(path)
        if path not in self.watches:
            raise KeyError(f"{path!r} is not watched")
        del self.watches[path]

    def event(self, directory, mask, name=None):
        """
        Deliver an event on C{directory} (on its entry C{name}, when given)
        to the callbacks of its watch, as the real one does when it reads
        one from the kernel: only while reading, only for a watched path and
        an event asked for (or one the kernel always reports); and after
        C{IN_DELETE_SELF} it drops the watch and loses its connection.
        """
        from twisted.internet import inotify

        if not (self.connected and self.reading):
            return
        directory = _as_file_path(directory)
        if directory not in self.watches:
            return
        _, watched_mask, callbacks = self.watches[directory]
        if not mask & (watched_mask | inotify.IN_IGNORED | inotify.IN_UNMOUNT):
            return
        path = directory
        if name is not None:
            path = directory.child(name.encode() if isinstance(name, str) else name)
        watch = _FakeWatch(directory, watched_mask, callbacks)
        for callback in callbacks:
            callback(watch, path, mask)
        if mask & inotify.IN_DELETE_SELF:
            del self.watches[directory]
            self.loseConnection()


@dataclass
class _FakeWatch:
    """
    What the callbacks of a L{FakeINotify} get first: a watch point with its
    C{path}, as Twisted's C{_Watch}.
    """

    path: object
    mask: int
    callbacks: list


class FakeINotifyFactory:
    """
    Makes L{FakeINotify}s, as the watcher's C{inotify_factory}.

    @ivar notifiers: every L{FakeINotify} made, oldest first.
    @ivar missing: the paths (C{bytes}) that cannot be watched now, as if
        they did not exist; use L{remove} and L{restore}.
    """

    def __init__(self):
        self.notifiers = []
        self.missing = set()

    def __call__(self):
        notifier = FakeINotify(self.missing)
        self.notifiers.append(notifier)
        return notifier

    @property
    def current(self):
        """
        The last L{FakeINotify} made.
        """
        return self.notifiers[-1]

    def remove(self, path):
        """
        Make C{path} unwatchable, as if it was deleted.
        """
        self.missing.add(_as_file_path(path).path)

    def restore(self, path):
        """
        Make C{path} watchable again, as if it was created.
        """
        self.missing.discard(_as_file_path(path).path)


def _as_file_path(path):
    """
    C{path} (C{str}, C{bytes} or L{FilePath}) as a L{FilePath} in bytes mode.
    """
    from twisted.python.filepath import FilePath

    if not isinstance(path, FilePath):
        path = FilePath(path)
    return path.asBytesMode()


# Fake Kubernetes API server
#
# A real twisted.web server (HTTPS on 127.0.0.1, or plain HTTP as kubectl
# proxy serves) that answers the calls sentry_tx makes in kubernetes mode
# with Kubernetes' own JSON shapes: TokenReview, Pods, Secrets, ConfigMaps
# and Dapr Configurations, versioned with resourceVersion, and Status
# objects for errors.  It checks sentry_tx's own credentials (bearer token
# or client certificate), can add latency to TokenReviews and Pod reads
# (used by the benchmark), can be made to fail or hang, and can hold
# requests at a barrier so that races are deterministic.

import copy as _copy
import ipaddress as _ipaddress
import itertools as _itertools
import json as _json
import secrets as _secrets

import yaml as _yaml
from twisted.internet.defer import DeferredList as _DeferredList
from twisted.web import http as _http
from twisted.web.resource import Resource as _Resource
from twisted.web.server import NOT_DONE_YET as _NOT_DONE_YET
from twisted.web.server import Site as _Site

FAKE_API_TOKEN = "sentry-tx-fake-api-token"
"""
The bearer token the fake API server accepts from sentry_tx by default.
"""

FAKE_API_SERVER_AUDIENCE = "https://kubernetes.default.svc.cluster.local"
"""
The audience of tokens reviewed without audiences (the API server's own).
"""

FAKE_API_DEFAULT_AUDIENCES = (
    "dapr.io/sentry",
    f"spiffe://{TEST_TRUST_DOMAIN}/ns/{TEST_NAMESPACE}/dapr-sentry",
)
"""
The audiences a workload token gets by default: those sentry_tx reviews for
with trust domain L{TEST_TRUST_DOMAIN} in L{TEST_NAMESPACE}.
"""

_API_GROUPS = {
    "pods": ("v1", "Pod"),
    "secrets": ("v1", "Secret"),
    "configmaps": ("v1", "ConfigMap"),
    "configurations": ("dapr.io/v1alpha1", "Configuration"),
}


def _base64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def make_service_account_token(
    namespace,
    service_account,
    pod_name=None,
    pod_uid=None,
    audiences=FAKE_API_DEFAULT_AUDIENCES,
):
    """
    A token shaped like a projected service-account token (a JWT whose
    payload has the C{kubernetes.io} claims), with a random signature: only
    L{FakeKubernetesAPI}'s TokenReview can vouch for it.

    @param pod_name: the pod it is bound to, or None for a token bound to
        no pod (as a legacy Secret token).
    """
    claims = {
        "aud": list(audiences),
        "exp": 4102444800,
        "iat": 1767225600,
        "iss": "https://kubernetes.default.svc.cluster.local",
        "sub": f"system:serviceaccount:{namespace}:{service_account}",
        "kubernetes.io": {
            "namespace": namespace,
            "serviceaccount": {"name": service_account, "uid": _secrets.token_hex(8)},
        },
    }
    if pod_name is not None:
        claims["kubernetes.io"]["pod"] = {"name": pod_name, "uid": pod_uid or ""}
    header = {"alg": "RS256", "kid": "fake"}
    return ".".join(
        (
            _base64url(_json.dumps(header).encode()),
            _base64url(_json.dumps(claims).encode()),
            _base64url(os.urandom(64)),
        )
    )


@dataclass
class FakeReviewedToken:
    """
    What the fake TokenReview knows about a token it vouches for.

    @ivar pod_extra: whether the review names the pod in
        C{status.user.extra}, as Kubernetes 1.30+ does.
    @ivar username: the username the review reports, when not the service
        account's.
    @ivar authenticated: when False, the review answers "not
        authenticated" without an error.
    """

    namespace: str
    service_account: str
    pod_name: str = None
    pod_uid: str = None
    audiences: tuple = FAKE_API_DEFAULT_AUDIENCES
    pod_extra: bool = True
    username: str = None
    authenticated: bool = True


def make_self_signed_server_certificate(hosts=("127.0.0.1", "localhost")):
    """
    A self-signed TLS server certificate for C{hosts} (IP addresses and DNS
    names), valid around the current time.

    @return: C{(certificate, private_key)}.
    """
    key = make_private_key("ecdsa-p256")
    now = datetime.now(timezone.utc)
    names = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(_ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    certificate = make_certificate(
        key,
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fake-kube-apiserver")]),
        not_before=now - timedelta(hours=1),
        not_after=now + timedelta(days=1),
        ca=False,
        key_cert_sign=False,
        extensions=((x509.SubjectAlternativeName(names), False),),
    )
    return certificate, key


def kubeconfig_document(server, cluster=None, user=None, context="fake"):
    """
    A kubeconfig with one cluster, one user and one current context.

    @param server: the cluster's C{server} URL.
    @param cluster: more fields of the cluster (C{certificate-authority},
        ...); C{bytes} values of C{*-data} fields are base64-encoded.
    @param user: the user's fields (C{token}, C{tokenFile},
        C{client-certificate-data}, ...), likewise.
    """

    def encoded(fields):
        return {
            name: (
                base64.b64encode(value).decode("ascii")
                if isinstance(value, bytes)
                else value
            )
            for name, value in (fields or {}).items()
        }

    return {
        "apiVersion": "v1",
        "kind": "Config",
        "current-context": context,
        "clusters": [
            {
                "name": f"{context}-cluster",
                "cluster": {"server": server, **encoded(cluster)},
            }
        ],
        "users": [{"name": f"{context}-user", "user": encoded(user)}],
        "contexts": [
            {
                "name": context,
                "context": {"cluster": f"{context}-cluster", "user": f"{context}-user"},
            }
        ],
    }


def write_kubeconfig(path, document):
    """
    Write a kubeconfig document (see L{kubeconfig_document}) as YAML.

    @return: C{path}.
    """
    with open(path, "w", encoding="utf-8") as f:
        _yaml.safe_dump(document, f)
    return path


def _status(code, reason, message, details=None):
    """
    A Kubernetes C{Status} object for an error.
    """
    status = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
    if details:
        status["details"] = details
    return status


@dataclass(frozen=True)
class _WatchStart:
    """
    What the fake answers a watch request with: start streaming.
    """

    plural: str
    namespace: str
    resource_version: str
    timeout_seconds: float


class _FakeAnswer(Exception):
    """
    Raised while handling a request to answer it with C{code} and C{body}.
    """

    def __init__(self, code, body):
        super().__init__(code)
        self.code = code
        self.body = body


class _TrackedChannel(_http.HTTPChannel):
    """
    An HTTP channel that tells its fake server when it opens and closes, so
    that L{FakeKubernetesAPI.stop} can close every connection.
    """

    def connectionMade(self):
        super().connectionMade()
        self.site.fake._channels[self] = Deferred()

    def connectionLost(self, reason):
        super().connectionLost(reason)
        closed = self.site.fake._channels.pop(self, None)
        if closed is not None:
            closed.callback(None)


class _FakeSite(_Site):
    protocol = _TrackedChannel
    noisy = False

    def __init__(self, fake):
        super().__init__(_FakeKubernetesResource(fake))
        self.fake = fake

    def log(self, request):
        pass


class _FakeKubernetesResource(_Resource):
    isLeaf = True

    def __init__(self, fake):
        super().__init__()
        self._fake = fake

    def render(self, request):
        self._fake._receive(request)
        return _NOT_DONE_YET


class FakeKubernetesAPI:
    """
    A fake Kubernetes API server, listening for real on 127.0.0.1.

    Objects live in C{objects}, keyed by C{(plural, namespace, name)}
    (plurals: C{pods}, C{secrets}, C{configmaps}, C{configurations}); each
    write gives them a new C{metadata.resourceVersion}, and a PUT naming a
    stale one is answered 409 Conflict.

    @ivar api_tokens: the bearer tokens accepted from sentry_tx.
    @ivar client_common_names: the client certificate CNs accepted (the
        certificate must be issued by L{issue_client_certificate}).
    @ivar forbidden: C{(method, plural)} pairs answered 403 Forbidden
        (C{"tokenreviews"} for TokenReview).
    @ivar tokenreview_latency_seconds: added before each TokenReview answer.
    @ivar pod_latency_seconds: added before each Pod GET answer.
    @ivar audience_aware: when False, authenticated reviews carry no
        C{status.audiences} (an authenticator that ignores audiences).
    @ivar requests: C{(method, path)} of every request received.
    @ivar conflicts: how many 409 answers were given.
    @ivar reviews: the C{spec} of every TokenReview received.
    @ivar before_write: None, or a callable given C{(method, plural,
        namespace, name)} just before a POST or PUT is applied: a test
        changes the stored objects there as another writer would.

    Collections are listed (C{GET} of a collection, cluster-wide as
    C{/api/v1/pods} or in one namespace, with C{limit} and C{continue}) and
    watched (C{?watch=1&resourceVersion=N}): a watch first sends the events
    after version N still in the history (the last C{watch_history}
    writes), then each write as it happens, one JSON object per line, until
    C{timeoutSeconds} or L{break_watches}; a version older than the history
    gets an C{ERROR} event with a C{410 Gone} Status, as Kubernetes sends.

    @ivar watch_history: how many past events a watch may start from.
    @ivar watches: the watches open now (C{twisted.web} requests).

    @param reactor: listens and delays (C{IReactorTCP}, C{IReactorSSL},
        C{IReactorTime}).
    """

    def __init__(self, reactor, api_tokens=(FAKE_API_TOKEN,)):
        self._reactor = reactor
        self.api_tokens = set(api_tokens)
        self.client_common_names = set()
        self.forbidden = set()
        self.tokenreview_latency_seconds = 0.0
        self.pod_latency_seconds = 0.0
        self.audience_aware = True
        self.requests = []
        self.reviews = []
        self.conflicts = 0
        self.before_write = None
        self.objects = {}
        self.tokens = {}
        self.watch_history = 1000
        self.watches = []
        self._history = []
        self._failure = None
        self._barriers = {}
        self._versions = _itertools.count(1000)
        self._channels = {}
        self._delayed = set()
        self._port = None
        self.tls = None
        self.server_certificate, self._server_key = (
            make_self_signed_server_certificate()
        )
        self._client_ca_key = make_private_key("ecdsa-p256")
        self._client_ca = make_certificate(
            self._client_ca_key, "fake kubernetes client CA"
        )

    # Listening

    @property
    def server_certificate_pem(self):
        """
        The PEM of the server's self-signed certificate (its CA).
        """
        return certificate_pem(self.server_certificate)

    def start(self, tls=True):
        """
        Listen on 127.0.0.1, a free port.

        @param tls: HTTPS (default), or plain HTTP as C{kubectl proxy}.
        @return: the server's base URL.
        """
        from OpenSSL import crypto
        from twisted.internet import ssl

        site = _FakeSite(self)
        self.tls = tls
        if tls:
            options = ssl.CertificateOptions(
                privateKey=crypto.PKey.from_cryptography_key(self._server_key),
                certificate=crypto.X509.from_cryptography(self.server_certificate),
                # Client certificates are optional (bearer tokens work too),
                # which trustRoot cannot say; the older arguments can.
                verify=True,
                caCerts=[crypto.X509.from_cryptography(self._client_ca)],
                requireCertificate=False,
            )
            self._port = self._reactor.listenSSL(
                0, site, options, interface="127.0.0.1"
            )
        else:
            self._port = self._reactor.listenTCP(0, site, interface="127.0.0.1")
        return self.url

    @property
    def port(self):
        """
        The port listened on.
        """
        return self._port.getHost().port

    @property
    def url(self):
        """
        C{https://127.0.0.1:<port>} (or C{http://}).
        """
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def stop(self):
        """
        Stop listening, drop pending answers and close every connection.

        @return: Deferred firing when all is closed.
        """
        for delayed in list(self._delayed):
            if delayed.active():
                delayed.cancel()
        self._delayed.clear()
        waits = []
        if self._port is not None:
            waits.append(self._port.stopListening())
            self._port = None
        for channel, closed in list(self._channels.items()):
            waits.append(closed)
            channel.transport.abortConnection()
        return _DeferredList(waits).addCallback(lambda _: None)

    def issue_client_certificate(self, common_name="sentry-tx"):
        """
        A client certificate the server accepts once C{common_name} is in
        C{client_common_names} (this adds it).

        @return: C{(certificate_pem, key_pem)}.
        """
        self.client_common_names.add(common_name)
        key = make_private_key("ecdsa-p256")
        now = datetime.now(timezone.utc)
        certificate = make_certificate(
            key,
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]),
            signer=self._client_ca,
            signer_key=self._client_ca_key,
            not_before=now - timedelta(hours=1),
            not_after=now + timedelta(days=1),
            ca=False,
            key_cert_sign=False,
            extensions=(
                (
                    x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]),
                    False,
                ),
            ),
        )
        return certificate_pem(certificate), private_key_pem(key)

    def kubeconfig(self, user=None, inline=True, directory=None):
        """
        A kubeconfig document for this server (see L{kubeconfig_document}).

        @param user: the user's fields; C{{"token": FAKE_API_TOKEN}} by
            default.
        @param inline: the CA as C{certificate-authority-data}; when False,
            as a file C{fake-ca.crt} written in C{directory}.
        """
        if not self.tls:
            cluster = {}
        elif inline:
            cluster = {"certificate-authority-data": self.server_certificate_pem}
        else:
            ca_path = os.path.join(directory, "fake-ca.crt")
            with open(ca_path, "wb") as f:
                f.write(self.server_certificate_pem)
            cluster = {"certificate-authority": ca_path}
        if user is None:
            user = {"token": FAKE_API_TOKEN}
        return kubeconfig_document(self.url, cluster, user)

    def write_service_account(self, directory, token=FAKE_API_TOKEN):
        """
        Write C{token} and C{ca.crt} into C{directory} (created if missing),
        as Kubernetes mounts them in a pod.

        @return: the environment a pod would have
            (C{KUBERNETES_SERVICE_HOST}, C{KUBERNETES_SERVICE_PORT}).
        """
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "token"), "w") as f:
            f.write(token)
        with open(os.path.join(directory, "ca.crt"), "wb") as f:
            f.write(self.server_certificate_pem)
        return {
            "KUBERNETES_SERVICE_HOST": "127.0.0.1",
            "KUBERNETES_SERVICE_PORT": str(self.port),
        }

    # Faults and races

    def fail_with(
        self,
        code=503,
        reason="ServiceUnavailable",
        message="the server is currently unable to handle the request",
    ):
        """
        Answer every request with a C{Status} error from now on.
        """
        self._failure = (code, reason, message)

    def hang(self):
        """
        Answer no request from now on (they wait until the client gives up
        or the server stops).
        """
        self._failure = "hang"

    def recover(self):
        """
        Answer normally again.
        """
        self._failure = None

    def hold(self, method, plural, count):
        """
        Park the next C{method} requests for C{plural} until C{count} of
        them have arrived, then handle them all, in arrival order.
        """
        self._barriers[(method, plural)] = (count, [])

    # Objects

    def put_object(self, plural, namespace, name, document):
        """
        Store an object (its metadata filled in) and return a copy.
        """
        api_version, kind = _API_GROUPS[plural]
        document = _copy.deepcopy(document)
        document.setdefault("apiVersion", api_version)
        document.setdefault("kind", kind)
        metadata = document.setdefault("metadata", {})
        metadata["name"] = name
        metadata["namespace"] = namespace
        metadata.setdefault("uid", _secrets.token_hex(16))
        metadata.setdefault("creationTimestamp", "2026-01-01T00:00:00Z")
        metadata["resourceVersion"] = str(next(self._versions))
        kind = "MODIFIED" if (plural, namespace, name) in self.objects else "ADDED"
        self.objects[(plural, namespace, name)] = document
        self._record(kind, plural, document)
        return _copy.deepcopy(document)

    def delete_object(self, plural, namespace, name):
        """
        Delete a stored object (watches see C{DELETED}).
        """
        document = self.objects.pop((plural, namespace, name))
        document["metadata"]["resourceVersion"] = str(next(self._versions))
        self._record("DELETED", plural, document)

    def expire_history(self):
        """
        Forget every past event, as etcd compaction does: a watch from an
        older version gets 410 Gone.
        """
        self._history = []
        self._compacted = self._last_version()

    def break_watches(self):
        """
        Cut the connection of every open watch.
        """
        for request in list(self.watches):
            request.channel.transport.abortConnection()

    def end_watches(self):
        """
        End every open watch normally, as its C{timeoutSeconds} would.
        """
        for request in list(self.watches):
            self._end_watch(request)

    _compacted = 0

    def _last_version(self):
        # itertools.count has no peek: the next version, less one.
        version = next(self._versions)
        self._versions = _itertools.count(version)
        return version - 1

    def _record(self, kind, plural, document):
        version = int(document["metadata"]["resourceVersion"])
        event = (version, kind, plural, _copy.deepcopy(document))
        self._history.append(event)
        if len(self._history) > self.watch_history:
            dropped = self._history.pop(0)
            self._compacted = dropped[0]
        for request in list(self.watches):
            if self._watch_matches(request, event):
                self._send_event(request, kind, event[3])

    @staticmethod
    def _watch_matches(request, event):
        plural, namespace = request.watch_scope
        document = event[3]
        return event[2] == plural and (
            namespace is None or document["metadata"]["namespace"] == namespace
        )

    @staticmethod
    def _send_event(request, kind, document):
        line = _json.dumps({"type": kind, "object": document}).encode("utf-8")
        request.write(line + b"\n")

    def send_bookmark(self):
        """
        Send a C{BOOKMARK} event with the current version to every watch.
        """
        for request in list(self.watches):
            self._send_event(
                request,
                "BOOKMARK",
                {"metadata": {"resourceVersion": str(self._last_version())}},
            )

    def _end_watch(self, request):
        if request in self.watches:
            self.watches.remove(request)
            timer = request.watch_timer
            if timer is not None and timer.active():
                timer.cancel()
            request.finish()

    def get_object(self, plural, namespace, name):
        """
        A copy of the stored object, or None.
        """
        document = self.objects.get((plural, namespace, name))
        return _copy.deepcopy(document)

    def add_pod(
        self, namespace, name, service_account="default", annotations=None, uid=None
    ):
        """
        Store a Pod.

        @return: the stored Pod.
        """
        metadata = {"annotations": dict(annotations or {})}
        if uid is not None:
            metadata["uid"] = uid
        return self.put_object(
            "pods",
            namespace,
            name,
            {
                "metadata": metadata,
                "spec": {"serviceAccountName": service_account, "containers": []},
                "status": {"phase": "Running"},
            },
        )

    def add_configuration(self, namespace, name, spec=None):
        """
        Store a Dapr Configuration with C{spec}.
        """
        return self.put_object("configurations", namespace, name, {"spec": spec or {}})

    def add_secret(self, namespace, name, data=None):
        """
        Store a Secret; C{data} maps keys to C{bytes} (base64-encoded here).
        """
        document = {"type": "Opaque"}
        if data is not None:
            document["data"] = {
                key: base64.b64encode(value).decode("ascii")
                for key, value in data.items()
            }
        return self.put_object("secrets", namespace, name, document)

    def add_config_map(self, namespace, name, data=None):
        """
        Store a ConfigMap with C{data} (strings).
        """
        document = {}
        if data is not None:
            document["data"] = dict(data)
        return self.put_object("configmaps", namespace, name, document)

    def secret_data(self, namespace, name):
        """
        The decoded data of a stored Secret, or None when there is none.
        """
        secret = self.objects.get(("secrets", namespace, name))
        if secret is None:
            return None
        return {
            key: base64.b64decode(value)
            for key, value in (secret.get("data") or {}).items()
        }

    def issue_token(
        self,
        namespace,
        service_account,
        pod_name=None,
        pod_uid=None,
        audiences=FAKE_API_DEFAULT_AUDIENCES,
        pod_claim=True,
        pod_extra=True,
    ):
        """
        A workload token the fake TokenReview authenticates.

        @param pod_uid: the pod uid the token is bound to; by default that of
            the stored pod C{pod_name}, if any.
        @param pod_claim: whether the token's payload names the pod.
        @param pod_extra: whether the review's C{user.extra} names it.
        """
        if pod_name is not None and pod_uid is None:
            pod = self.objects.get(("pods", namespace, pod_name))
            if pod is not None:
                pod_uid = pod["metadata"]["uid"]
        token = make_service_account_token(
            namespace,
            service_account,
            pod_name if pod_claim else None,
            pod_uid,
            audiences,
        )
        self.tokens[token] = FakeReviewedToken(
            namespace, service_account, pod_name, pod_uid, tuple(audiences), pod_extra
        )
        return token

    # Serving

    def _receive(self, request):
        method = request.method.decode("ascii")
        path = request.path.decode("utf-8")
        self.requests.append((method, path))
        segments = [segment for segment in path.split("/") if segment]
        plural = self._plural(segments)
        state = {"delayed": None, "lost": False}

        def lost(_):
            state["lost"] = True
            delayed = state["delayed"]
            if delayed is not None and delayed.active():
                delayed.cancel()
                self._delayed.discard(delayed)

        request.notifyFinish().addErrback(lost)

        def answer():
            delayed = state["delayed"]
            if delayed is not None:
                self._delayed.discard(delayed)
            if state["lost"]:
                return
            code, body = self._handle(request, method, segments, plural)
            if isinstance(body, _WatchStart):
                self._start_watch(request, body)
                return
            request.setResponseCode(code)
            request.setHeader(b"content-type", b"application/json")
            request.write(_json.dumps(body).encode("utf-8"))
            request.finish()

        def answer_later():
            if self._failure == "hang":
                return
            latency = 0.0
            if plural == "tokenreviews":
                latency = self.tokenreview_latency_seconds
            elif plural == "pods" and method == "GET" and len(segments) == 6:
                latency = self.pod_latency_seconds
            if latency > 0:
                state["delayed"] = self._reactor.callLater(latency, answer)
                self._delayed.add(state["delayed"])
            else:
                answer()

        barrier = self._barriers.get((method, plural))
        if barrier is not None:
            count, parked = barrier
            parked.append(answer_later)
            if len(parked) >= count:
                del self._barriers[(method, plural)]
                for each in parked:
                    each()
            return
        answer_later()

    @staticmethod
    def _plural(segments):
        if segments[:4] == ["apis", "authentication.k8s.io", "v1", "tokenreviews"]:
            return "tokenreviews"
        if segments[:3] == ["api", "v1", "namespaces"] and len(segments) >= 5:
            return segments[4]
        if segments[:2] == ["api", "v1"] and len(segments) == 3:
            return segments[2]
        if segments[:3] == ["apis", "dapr.io", "v1alpha1"] and len(segments) == 4:
            return segments[3]
        if (
            segments[:4] == ["apis", "dapr.io", "v1alpha1", "namespaces"]
            and len(segments) >= 6
        ):
            return segments[5]
        return None

    def _handle(self, request, method, segments, plural):
        try:
            if isinstance(self._failure, tuple):
                code, reason, message = self._failure
                raise _FakeAnswer(code, _status(code, reason, message))
            user = self._authenticate(request)
            if (method, plural) in self.forbidden:
                raise _FakeAnswer(
                    403,
                    _status(
                        403,
                        "Forbidden",
                        f'{plural} is forbidden: User "{user}" cannot {method.lower()}'
                        f' resource "{plural}"',
                    ),
                )
            return self._route(request, method, segments, plural)
        except _FakeAnswer as answer:
            if answer.code == 409:
                self.conflicts += 1
            return answer.code, answer.body

    def _authenticate(self, request):
        header = request.getHeader(b"authorization") or b""
        if (
            header.startswith(b"Bearer ")
            and header[7:].decode("latin-1") in self.api_tokens
        ):
            return "system:serviceaccount:dapr-system:dapr-sentry"
        transport = request.channel.transport
        get_peer_certificate = getattr(transport, "getPeerCertificate", None)
        peer = get_peer_certificate() if get_peer_certificate is not None else None
        if peer is not None:
            names = peer.to_cryptography().subject.get_attributes_for_oid(
                NameOID.COMMON_NAME
            )
            if names and names[0].value in self.client_common_names:
                return names[0].value
        if not self.api_tokens and not self.tls:
            return "kubectl-proxy"
        raise _FakeAnswer(401, _status(401, "Unauthorized", "Unauthorized"))

    def _body(self, request):
        try:
            body = _json.loads(request.content.read() or b"null")
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise _FakeAnswer(
                400, _status(400, "BadRequest", "the body is not a JSON object")
            )
        return body

    def _route(self, request, method, segments, plural):
        if plural == "tokenreviews" and len(segments) == 4:
            if method != "POST":
                raise self._not_allowed(method)
            return 201, self._review(self._body(request))
        if plural in _API_GROUPS and len(segments) in (3, 4) and method == "GET":
            # A cluster-wide collection: /api/v1/<plural>, /apis/.../<plural>.
            return self._collection(request, plural, None)
        if plural in _API_GROUPS:
            namespace = segments[3] if segments[0] == "api" else segments[4]
            depth = 5 if segments[0] == "api" else 6
            if len(segments) == depth and method == "GET":
                return self._collection(request, plural, namespace)
            if len(segments) == depth and method == "POST":
                return 201, self._create(plural, namespace, self._body(request))
            if len(segments) == depth + 1:
                name = segments[depth]
                if method == "GET":
                    return 200, self._get(plural, namespace, name)
                if method == "PUT":
                    return 200, self._update(
                        plural, namespace, name, self._body(request)
                    )
                raise self._not_allowed(method)
        raise _FakeAnswer(
            404,
            _status(
                404, "NotFound", "the server could not find the requested resource"
            ),
        )

    @staticmethod
    def _argument(request, name):
        values = request.args.get(name.encode("ascii"))
        return values[0].decode("utf-8") if values else None

    def _collection(self, request, plural, namespace):
        if self._argument(request, "watch") in ("1", "true"):
            timeout = self._argument(request, "timeoutSeconds")
            return 200, _WatchStart(
                plural,
                namespace,
                self._argument(request, "resourceVersion"),
                float(timeout) if timeout else None,
            )
        return 200, self._list(request, plural, namespace)

    def _list(self, request, plural, namespace):
        keys = sorted(
            key
            for key in self.objects
            if key[0] == plural and (namespace is None or key[1] == namespace)
        )
        start = int(self._argument(request, "continue") or 0)
        limit = int(self._argument(request, "limit") or 0) or len(keys)
        page = keys[start : start + limit]
        metadata = {"resourceVersion": str(self._last_version())}
        if start + limit < len(keys):
            metadata["continue"] = str(start + limit)
        api_version, kind = _API_GROUPS[plural]
        return {
            "apiVersion": api_version,
            "kind": f"{kind}List",
            "metadata": metadata,
            "items": [_copy.deepcopy(self.objects[key]) for key in page],
        }

    def _start_watch(self, request, watch):
        request.setResponseCode(200)
        request.setHeader(b"content-type", b"application/json")
        request.watch_scope = (watch.plural, watch.namespace)
        request.watch_timer = None
        # Headers go out at once, as the API server flushes them when a
        # watch starts: a client waits for them, then for events.
        request.write(b"")
        since = int(watch.resource_version or 0)
        if watch.resource_version and since < self._compacted:
            self._send_event(
                request,
                "ERROR",
                _status(410, "Expired", f"too old resource version: {since}"),
            )
            request.finish()
            return
        self.watches.append(request)
        request.notifyFinish().addBoth(
            lambda _: self.watches.remove(request) if request in self.watches else None
        )
        for event in list(self._history):
            if event[0] > since and self._watch_matches(request, event):
                self._send_event(request, event[1], event[3])
        if watch.timeout_seconds:
            request.watch_timer = self._reactor.callLater(
                watch.timeout_seconds, self._end_watch, request
            )
            self._delayed.add(request.watch_timer)

    @staticmethod
    def _not_allowed(method):
        return _FakeAnswer(
            405,
            _status(
                405,
                "MethodNotAllowed",
                f"the server does not allow this method ({method})",
            ),
        )

    @staticmethod
    def _not_found(plural, name):
        return _FakeAnswer(
            404,
            _status(
                404,
                "NotFound",
                f'{plural} "{name}" not found',
                {"name": name, "kind": plural},
            ),
        )

    def _get(self, plural, namespace, name):
        document = self.get_object(plural, namespace, name)
        if document is None:
            raise self._not_found(plural, name)
        return document

    def _create(self, plural, namespace, body):
        name = (body.get("metadata") or {}).get("name")
        if not name:
            raise _FakeAnswer(
                422, _status(422, "Invalid", f"{plural}: metadata.name: Required value")
            )
        if self.before_write is not None:
            self.before_write("POST", plural, namespace, name)
        if (plural, namespace, name) in self.objects:
            raise _FakeAnswer(
                409,
                _status(
                    409,
                    "AlreadyExists",
                    f'{plural} "{name}" already exists',
                    {"name": name, "kind": plural},
                ),
            )
        metadata = body.setdefault("metadata", {})
        metadata.pop("resourceVersion", None)
        metadata.pop("uid", None)
        return self.put_object(plural, namespace, name, body)

    def _update(self, plural, namespace, name, body):
        metadata = body.get("metadata") or {}
        if metadata.get("name") != name:
            raise _FakeAnswer(
                400,
                _status(
                    400, "BadRequest", "the name of the object does not match the URL"
                ),
            )
        if self.before_write is not None:
            self.before_write("PUT", plural, namespace, name)
        current = self.objects.get((plural, namespace, name))
        if current is None:
            raise self._not_found(plural, name)
        wanted = metadata.get("resourceVersion")
        if wanted and wanted != current["metadata"]["resourceVersion"]:
            raise _FakeAnswer(
                409,
                _status(
                    409,
                    "Conflict",
                    f'Operation cannot be fulfilled on {plural} "{name}": the object'
                    " has been modified; please apply your changes to the latest"
                    " version and try again",
                    {"name": name, "kind": plural},
                ),
            )
        body["metadata"]["uid"] = current["metadata"]["uid"]
        return self.put_object(plural, namespace, name, body)

    def _review(self, body):
        spec = body.get("spec") or {}
        self.reviews.append(_copy.deepcopy(spec))
        wanted = spec.get("audiences") or [FAKE_API_SERVER_AUDIENCE]
        review = {
            "kind": "TokenReview",
            "apiVersion": "authentication.k8s.io/v1",
            "metadata": {"creationTimestamp": None},
            "spec": spec,
        }
        record = self.tokens.get(spec.get("token"))
        if record is None:
            review["status"] = {
                "user": {},
                "error": "[invalid bearer token, square/go-jose: error in"
                " cryptographic primitive]",
            }
            return review
        if not record.authenticated:
            review["status"] = {"authenticated": False, "user": {}}
            return review
        matching = [audience for audience in wanted if audience in record.audiences]
        if not matching:
            review["status"] = {
                "user": {},
                "error": "[invalid bearer token, token audiences"
                f" {list(record.audiences)} is invalid for the target audiences"
                f" {list(wanted)}]",
            }
            return review
        user = {
            "username": record.username
            or f"system:serviceaccount:{record.namespace}:{record.service_account}",
            "uid": _secrets.token_hex(8),
            "groups": [
                "system:serviceaccounts",
                f"system:serviceaccounts:{record.namespace}",
                "system:authenticated",
            ],
        }
        if record.pod_name is not None and record.pod_extra:
            user["extra"] = {
                "authentication.kubernetes.io/pod-name": [record.pod_name],
                "authentication.kubernetes.io/pod-uid": [record.pod_uid or ""],
            }
        review["status"] = {"authenticated": True, "user": user}
        if self.audience_aware:
            review["status"]["audiences"] = matching
        return review


def kubernetes_client_for(test_case, fake, reactor=None, user=None, **client_options):
    """
    A L{sentry_tx.kube.client.KubernetesClient} for C{fake}, through a kubeconfig
    in a temporary directory, closed at C{test_case}'s cleanup.

    @param user: the kubeconfig user's fields (bearer L{FAKE_API_TOKEN} by
        default).
    @param client_options: more keyword arguments of the client.
    """
    from sentry_tx.kube.client import KubernetesClient
    from sentry_tx.kube.kubeconfig import kubeconfig_connection

    if reactor is None:
        from twisted.internet import reactor
    directory = test_case.mktemp()
    os.makedirs(directory)
    path = write_kubeconfig(
        os.path.join(directory, "kubeconfig"), fake.kubeconfig(user=user)
    )
    client = KubernetesClient(
        reactor, lambda: kubeconfig_connection(path, reactor), **client_options
    )
    test_case.addCleanup(client.close)
    return client


def start_fake_kubernetes(test_case, reactor=None, tls=True, **options):
    """
    Start a L{FakeKubernetesAPI} for C{test_case}, stopped at its cleanup.

    @param reactor: the reactor; the global one by default.
    @return: the fake, listening.
    """
    if reactor is None:
        from twisted.internet import reactor
    fake = FakeKubernetesAPI(reactor, **options)
    fake.start(tls=tls)
    test_case.addCleanup(fake.stop)
    return fake


class ScriptedResponse:
    """
    A streamed answer of L{ScriptedKubernetesClient.open_stream}: the test
    drives the body with C{send}, C{end} and C{cut}.

    @ivar protocol: the protocol given to C{deliverBody}, once it is.
    @ivar stopped: whether the reader closed the connection.
    """

    code = 200

    def __init__(self):
        self.protocol = None
        self.stopped = False

    def deliverBody(self, protocol):
        self.protocol = protocol
        protocol.makeConnection(self)

    def stopProducing(self):
        from twisted.internet.error import ConnectionLost

        if not self.stopped:
            self.stopped = True
            self.protocol.connectionLost(Failure(ConnectionLost("closed by reader")))

    def send(self, *events):
        """
        Send watch events (dicts) as JSON lines.
        """
        for event in events:
            self.protocol.dataReceived(_json.dumps(event).encode("utf-8") + b"\n")

    def end(self):
        """
        End the body normally (the server's C{timeoutSeconds}).
        """
        from twisted.web.client import ResponseDone

        self.stopped = True
        self.protocol.connectionLost(Failure(ResponseDone()))

    def cut(self):
        """
        Break the connection.
        """
        from twisted.internet.error import ConnectionLost

        self.stopped = True
        self.protocol.connectionLost(Failure(ConnectionLost("cut")))


class ScriptedKubernetesClient:
    """
    An in-memory stand-in for L{sentry_tx.kube.client.KubernetesClient}'s calls
    (C{get}, C{create}, C{open_stream}, C{reactor}): each call is recorded
    with a Deferred the test fires, and, as the real client, fails with
    L{sentry_tx.kube.errors.KubernetesUnavailableError} when its C{timeout_seconds}
    pass on C{reactor} (a L{Clock}).  The real client's timeouts are pinned
    in C{tests/test_kube.py}; the informer and validator against the real
    client and L{FakeKubernetesAPI} in C{tests/test_kube_informer.py}.

    @ivar calls: C{(method, path, body, timeout_seconds, Deferred)} of every
        call, in order.
    @ivar response_caps: the C{max_response_bytes} of every GET, in order.
    """

    def __init__(self, reactor):
        self.reactor = reactor
        self.calls = []
        self.response_caps = []

    def _call(self, method, path, body=None, timeout_seconds=None):
        from sentry_tx.kube.errors import KubernetesUnavailableError

        timer = []

        def cancel(d):
            if timer and timer[0].active():
                timer[0].cancel()

        d = Deferred(cancel)
        if timeout_seconds is not None:

            def expire():
                if not d.called:
                    d.errback(
                        KubernetesUnavailableError(
                            f"{method} {path}: no answer within {timeout_seconds:g} s"
                        )
                    )

            timer.append(self.reactor.callLater(timeout_seconds, expire))

            def stop_timer(result):
                if timer[0].active():
                    timer[0].cancel()
                return result

            d.addBoth(stop_timer)
        self.calls.append((method, path, body, timeout_seconds, d))
        return d

    def get(self, path, timeout_seconds=None, max_response_bytes=None):
        self.response_caps.append(max_response_bytes)
        return self._call("GET", path, timeout_seconds=timeout_seconds)

    def create(self, path, body, retry_lost_response=False, timeout_seconds=None):
        return self._call("POST", path, body, timeout_seconds)

    def open_stream(self, path, timeout_seconds=None):
        return self._call("WATCH", path, timeout_seconds=timeout_seconds)

    def pending(self, method=None):
        """
        The calls (as in C{calls}) whose Deferred has not fired, of
        C{method} if given.
        """
        return [
            call
            for call in self.calls
            if not call[4].called and (method is None or call[0] == method)
        ]


# End of the fake Kubernetes API server.


# Hostile-input helpers
#
# Clients that misbehave on purpose, for the transport-limit and TLS tests
# (tests/test_limits.py, test_tls.py): a TLS connection that speaks HTTP/2
# frame by frame (grpcio's own client never pings too often nor opens
# streams past the limit), and sockets that connect and never speak.  They
# block: run them in a thread, never on the reactor.

import socket as _socket
import ssl as _ssl

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

    def settings(self):
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
    def error_code(self):
        """
        The error code of a RST_STREAM or GOAWAY frame.
        """
        start = 4 if self.type == HTTP2_GOAWAY else 0
        return int.from_bytes(self.payload[start : start + 4], "big")

    @property
    def debug_data(self):
        """
        The opaque debug data of a GOAWAY frame (gRPC puts its reason there).
        """
        return self.payload[8:]


def http2_frame(frame_type, flags=0, stream_id=0, payload=b""):
    """
    The bytes of one HTTP/2 frame.
    """
    return (
        len(payload).to_bytes(3, "big")
        + bytes([frame_type, flags])
        + stream_id.to_bytes(4, "big")
        + payload
    )


def _hpack_integer(value, prefix_bits):
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


def _hpack_literal(name, value):
    # "Literal header field without indexing, new name", no Huffman coding.
    return (
        b"\x00"
        + _hpack_integer(len(name), 7)
        + name
        + _hpack_integer(len(value), 7)
        + value
    )


def grpc_request_headers(stream_id, path, authority="dapr-sentry"):
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

    def __init__(self, host, port, anchors_pem, server_name, timeout=10.0):
        context = _ssl.create_default_context(cadata=anchors_pem.decode("ascii"))
        context.set_alpn_protocols(["h2"])
        raw = _socket.create_connection((host, port), timeout=timeout)
        try:
            self._socket = context.wrap_socket(raw, server_hostname=server_name)
        except BaseException:
            raw.close()
            raise
        self._buffer = b""
        self.send(HTTP2_CLIENT_PREFACE, http2_frame(HTTP2_SETTINGS))

    def send(self, *chunks):
        """
        Write C{chunks} (frames from L{http2_frame}, or any bytes).
        """
        self._socket.sendall(b"".join(chunks))

    def read_frame(self):
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
            except (_ssl.SSLEOFError, ConnectionResetError):
                return None
            if not data:
                return None
            self._buffer += data

    def read_until(self, frame_type, stream_id=None):
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

    def close(self):
        """
        Close the connection.
        """
        self._socket.close()


def sign_on_new_connection(host, port, anchors_pem, server_name, request, path=None):
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
            grpc_request_headers(1, path or b"/dapr.proto.sentry.v1.CA/SignCertificate"),
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
            if frame.type in (HTTP2_HEADERS, HTTP2_DATA) and frame.flags & HTTP2_FLAG_END_STREAM:
                break
            if frame.type == HTTP2_RST_STREAM:
                break
    finally:
        client.close()
    if len(body) < 5:
        return certificate, None
    return certificate, sentry_pb2.SignCertificateResponse.FromString(body[5:])


def open_silent_connections(host, port, count, timeout=10.0):
    """
    Open C{count} TCP connections to C{host}:C{port} that never send a byte.

    @return: the connected sockets; the caller closes them.
    """
    sockets = []
    try:
        for _ in range(count):
            sockets.append(_socket.create_connection((host, port), timeout=timeout))
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


# End of the hostile-input helpers.
