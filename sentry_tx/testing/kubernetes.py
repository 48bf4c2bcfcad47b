"""
A fake Kubernetes API server: a real C{twisted.web} server (HTTPS on
127.0.0.1, or plain HTTP as C{kubectl proxy} serves) that answers the calls
sentry_tx makes in kubernetes mode with Kubernetes' own JSON shapes:
TokenReview, Pods, Secrets, ConfigMaps and Dapr Configurations, versioned
with C{resourceVersion}, and C{Status} objects for errors.

It checks sentry_tx's own credentials (bearer token or client certificate),
can add latency to TokenReviews and Pod reads (used by the benchmark), can be
made to fail or hang, and can hold requests at a barrier so that races are
deterministic.  How it answers a request is in
L{sentry_tx.testing.kubernetes_requests}.
"""

import base64
import copy
import itertools
import json
import os
import secrets
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, cast

from cryptography import x509
from cryptography.x509.oid import NameOID
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IListeningPort, ITCPTransport
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from sentry_tx.testing.certificates import (
    certificate_pem,
    make_certificate,
    make_private_key,
    private_key_pem,
)
from sentry_tx.testing.kubeconfig import (
    kubeconfig_document,
    make_self_signed_server_certificate,
    write_kubeconfig,
)
from sentry_tx.testing.kubernetes_requests import (
    API_GROUPS,
    Document,
    Event,
    FakeAPIRequest,
    KubernetesAPIRequests,
)
from sentry_tx.testing.kubernetes_tokens import (
    FAKE_API_DEFAULT_AUDIENCES,
    FAKE_API_TOKEN,
    FakeReviewedToken,
    make_service_account_token,
)

if TYPE_CHECKING:
    from twisted.internet.protocol import ServerFactory

    from sentry_tx.kube.client import KubernetesClient
    from sentry_tx.kube.loop_client import LoopKubernetesClient
    from sentry_tx.testing.web import IServingReactor


def _abort(channel: http.HTTPChannel) -> None:
    """
    Abort C{channel}'s connection.
    """
    # Its transport is a TCP connection, or TLS over one: both provide
    # ITCPTransport, which HTTPChannel's declared ITransport does not say.
    cast(ITCPTransport, channel.transport).abortConnection()


def _global_reactor() -> "IServingReactor":
    """
    Twisted's global reactor, which provides TCP, TLS and time (its declared
    type omits TLS).
    """
    from twisted.internet import reactor

    return cast("IServingReactor", reactor)


class _TrackedChannel(http.HTTPChannel):
    """
    An HTTP channel that tells its fake server when it opens and closes, so
    that L{FakeKubernetesAPI.stop} can close every connection.
    """

    site: "_FakeSite"

    def connectionMade(self) -> None:
        super().connectionMade()
        self.site.fake._channels[self] = Deferred()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)
        closed = self.site.fake._channels.pop(self, None)
        if closed is not None:
            closed.callback(None)


class _FakeSite(Site):
    # Site takes any channel factory; its declared type names only the
    # HTTP/1.1-or-2 wrapper it makes by default.
    protocol = _TrackedChannel  # type: ignore[assignment]
    requestFactory = FakeAPIRequest
    noisy = False

    def __init__(self, fake: "FakeKubernetesAPI") -> None:
        super().__init__(_FakeKubernetesResource(fake))
        self.fake = fake

    def log(self, request: http.Request) -> None:
        pass


class _FakeKubernetesResource(Resource):
    isLeaf = True

    def __init__(self, fake: "FakeKubernetesAPI") -> None:
        super().__init__()
        self._fake = fake

    def render(self, request: FakeAPIRequest) -> int:
        self._fake._receive(request)
        return NOT_DONE_YET


class FakeKubernetesAPI(KubernetesAPIRequests):
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

    _reactor: "IServingReactor"

    def __init__(
        self, reactor: "IServingReactor", api_tokens: Iterable[str] = (FAKE_API_TOKEN,)
    ) -> None:
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
        self._versions = itertools.count(1000)
        self._channels: dict[_TrackedChannel, Deferred[None]] = {}
        self._delayed = set()
        self._port: IListeningPort | None = None
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
    def server_certificate_pem(self) -> bytes:
        """
        The PEM of the server's self-signed certificate (its CA).
        """
        return certificate_pem(self.server_certificate)

    def start(self, tls: bool = True) -> str:
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
            # listenTCP is declared to take a ServerFactory of a narrower
            # protocol type than a Site's channel.
            self._port = self._reactor.listenTCP(
                0, cast("ServerFactory[Any]", site), interface="127.0.0.1"
            )
        return self.url

    @property
    def port(self) -> int:
        """
        The port listened on.

        @raise RuntimeError: when not listening.
        """
        if self._port is None:
            raise RuntimeError("the fake Kubernetes API server is not listening")
        address = self._port.getHost()
        if not isinstance(address, IPv4Address):
            raise TypeError(f"listening on {address!r}, not IPv4")
        return address.port

    @property
    def url(self) -> str:
        """
        C{https://127.0.0.1:<port>} (or C{http://}).
        """
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def stop(self) -> Deferred[None]:
        """
        Stop listening, drop pending answers and close every connection.

        @return: Deferred firing when all is closed.
        """
        for delayed in list(self._delayed):
            if delayed.active():
                delayed.cancel()
        self._delayed.clear()
        waits: list[Deferred[Any]] = []
        if self._port is not None:
            stopped = self._port.stopListening()
            if stopped is not None:
                waits.append(stopped)
            self._port = None
        for channel, closed in list(self._channels.items()):
            waits.append(closed)
            _abort(channel)
        return DeferredList(waits).addCallback(lambda _: None)

    def issue_client_certificate(
        self, common_name: str = "sentry-tx"
    ) -> tuple[bytes, bytes]:
        """
        A client certificate the server accepts once C{common_name} is in
        C{client_common_names} (this adds it).

        @return: C{(certificate_pem, key_pem)}.
        """
        self.client_common_names.add(common_name)
        key = make_private_key("ecdsa-p256")
        now = datetime.now(UTC)
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

    def kubeconfig(
        self,
        user: Mapping[str, object] | None = None,
        inline: bool = True,
        directory: str | None = None,
    ) -> dict[str, Any]:
        """
        A kubeconfig document for this server (see L{kubeconfig_document}).

        @param user: the user's fields; C{{"token": FAKE_API_TOKEN}} by
            default.
        @param inline: the CA as C{certificate-authority-data}; when False,
            as a file C{fake-ca.crt} written in C{directory}.
        """
        cluster: dict[str, object]
        if not self.tls:
            cluster = {}
        elif inline:
            cluster = {"certificate-authority-data": self.server_certificate_pem}
        else:
            if directory is None:
                raise ValueError("a kubeconfig with a CA file needs its directory")
            ca_path = os.path.join(directory, "fake-ca.crt")
            with open(ca_path, "wb") as f:
                f.write(self.server_certificate_pem)
            cluster = {"certificate-authority": ca_path}
        if user is None:
            user = {"token": FAKE_API_TOKEN}
        return kubeconfig_document(self.url, cluster, user)

    def write_service_account(
        self, directory: str, token: str = FAKE_API_TOKEN
    ) -> dict[str, str]:
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

    def rotate_service_account_token(self, directory: str, token: str) -> None:
        """
        Replace the token file in C{directory} atomically, as the kubelet
        does, with C{token}, which this server then accepts (and only it).
        """
        with open(os.path.join(directory, "token.new"), "w") as f:
            f.write(token)
        os.replace(
            os.path.join(directory, "token.new"), os.path.join(directory, "token")
        )
        self.api_tokens = {token}

    # Faults and races

    def fail_with(
        self,
        code: int = 503,
        reason: str = "ServiceUnavailable",
        message: str = "the server is currently unable to handle the request",
    ) -> None:
        """
        Answer every request with a C{Status} error from now on.
        """
        self._failure = (code, reason, message)

    def hang(self) -> None:
        """
        Answer no request from now on (they wait until the client gives up
        or the server stops).
        """
        self._failure = "hang"

    def recover(self) -> None:
        """
        Answer normally again.
        """
        self._failure = None

    def hold(self, method: str, plural: str, count: int) -> None:
        """
        Park the next C{method} requests for C{plural} until C{count} of
        them have arrived, then handle them all, in arrival order.
        """
        self._barriers[(method, plural)] = (count, [])

    # Objects

    def put_object(
        self, plural: str, namespace: str, name: str, document: Document
    ) -> Document:
        """
        Store an object (its metadata filled in) and return a copy.
        """
        api_version, kind = API_GROUPS[plural]
        document = copy.deepcopy(document)
        document.setdefault("apiVersion", api_version)
        document.setdefault("kind", kind)
        metadata = document.setdefault("metadata", {})
        metadata["name"] = name
        metadata["namespace"] = namespace
        metadata.setdefault("uid", secrets.token_hex(16))
        metadata.setdefault("creationTimestamp", "2026-01-01T00:00:00Z")
        metadata["resourceVersion"] = str(next(self._versions))
        kind = "MODIFIED" if (plural, namespace, name) in self.objects else "ADDED"
        self.objects[(plural, namespace, name)] = document
        self._record(kind, plural, document)
        return copy.deepcopy(document)

    def delete_object(self, plural: str, namespace: str, name: str) -> None:
        """
        Delete a stored object (watches see C{DELETED}).
        """
        document = self.objects.pop((plural, namespace, name))
        document["metadata"]["resourceVersion"] = str(next(self._versions))
        self._record("DELETED", plural, document)

    def expire_history(self) -> None:
        """
        Forget every past event, as etcd compaction does: a watch from an
        older version gets 410 Gone.
        """
        self._history = []
        self._compacted = self._last_version()

    def break_watches(self) -> None:
        """
        Cut the connection of every open watch.
        """
        for request in list(self.watches):
            _abort(request.channel)

    def end_watches(self) -> None:
        """
        End every open watch normally, as its C{timeoutSeconds} would.
        """
        for request in list(self.watches):
            self._end_watch(request)

    _compacted = 0

    def _last_version(self) -> int:
        # itertools.count has no peek: the next version, less one.
        version = next(self._versions)
        self._versions = itertools.count(version)
        return version - 1

    def _record(self, kind: str, plural: str, document: Document) -> None:
        version = int(document["metadata"]["resourceVersion"])
        event: Event = (version, kind, plural, copy.deepcopy(document))
        self._history.append(event)
        if len(self._history) > self.watch_history:
            dropped = self._history.pop(0)
            self._compacted = dropped[0]
        for request in list(self.watches):
            if self._watch_matches(request, event):
                self._send_event(request, kind, event[3])

    @staticmethod
    def _watch_matches(request: FakeAPIRequest, event: Event) -> bool:
        plural, namespace = request.watch_scope
        document = event[3]
        return event[2] == plural and (
            namespace is None or document["metadata"]["namespace"] == namespace
        )

    @staticmethod
    def _send_event(request: FakeAPIRequest, kind: str, document: Document) -> None:
        line = json.dumps({"type": kind, "object": document}).encode("utf-8")
        request.write(line + b"\n")

    def send_bookmark(self) -> None:
        """
        Send a C{BOOKMARK} event with the current version to every watch.
        """
        for request in list(self.watches):
            self._send_event(
                request,
                "BOOKMARK",
                {"metadata": {"resourceVersion": str(self._last_version())}},
            )

    def _end_watch(self, request: FakeAPIRequest) -> None:
        if request in self.watches:
            self.watches.remove(request)
            timer = request.watch_timer
            if timer is not None and timer.active():
                timer.cancel()
            request.finish()

    def get_object(self, plural: str, namespace: str, name: str) -> Document | None:
        """
        A copy of the stored object, or None.
        """
        document = self.objects.get((plural, namespace, name))
        return copy.deepcopy(document)

    def add_pod(
        self,
        namespace: str,
        name: str,
        service_account: str = "default",
        annotations: Mapping[str, str] | None = None,
        uid: str | None = None,
    ) -> Document:
        """
        Store a Pod.

        @return: the stored Pod.
        """
        metadata: Document = {"annotations": dict(annotations or {})}
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

    def add_configuration(
        self, namespace: str, name: str, spec: Document | None = None
    ) -> Document:
        """
        Store a Dapr Configuration with C{spec}.
        """
        return self.put_object("configurations", namespace, name, {"spec": spec or {}})

    def add_secret(
        self, namespace: str, name: str, data: Mapping[str, bytes] | None = None
    ) -> Document:
        """
        Store a Secret; C{data} maps keys to C{bytes} (base64-encoded here).
        """
        document: Document = {"type": "Opaque"}
        if data is not None:
            document["data"] = {
                key: base64.b64encode(value).decode("ascii")
                for key, value in data.items()
            }
        return self.put_object("secrets", namespace, name, document)

    def add_config_map(
        self, namespace: str, name: str, data: Mapping[str, str] | None = None
    ) -> Document:
        """
        Store a ConfigMap with C{data} (strings).
        """
        document: Document = {}
        if data is not None:
            document["data"] = dict(data)
        return self.put_object("configmaps", namespace, name, document)

    def secret_data(self, namespace: str, name: str) -> dict[str, bytes] | None:
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
        namespace: str,
        service_account: str,
        pod_name: str | None = None,
        pod_uid: str | None = None,
        audiences: Iterable[str] = FAKE_API_DEFAULT_AUDIENCES,
        pod_claim: bool = True,
        pod_extra: bool = True,
    ) -> str:
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


def kubernetes_client_for(
    test_case: TestCase,
    fake: FakeKubernetesAPI,
    reactor: "IServingReactor | None" = None,
    user: Mapping[str, object] | None = None,
    **client_options: Any,
) -> "KubernetesClient":
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
        reactor = _global_reactor()
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


def loop_client_for(
    test_case: TestCase,
    fake: FakeKubernetesAPI,
    reactor: "IServingReactor | None" = None,
    user: Mapping[str, object] | None = None,
    **client_options: Any,
) -> "LoopKubernetesClient":
    """
    A L{sentry_tx.kube.loop_client.LoopKubernetesClient} for C{fake},
    through a kubeconfig in a temporary directory (use it on a gRPC loop:
    L{sentry_tx.testing.loops.start_grpc_loop}).

    @param user: the kubeconfig user's fields (bearer L{FAKE_API_TOKEN} by
        default).
    """
    from sentry_tx.kube.kubeconfig import kubeconfig_connection
    from sentry_tx.kube.loop_client import LoopKubernetesClient

    if reactor is None:
        reactor = _global_reactor()
    directory = test_case.mktemp()
    os.makedirs(directory)
    path = write_kubeconfig(
        os.path.join(directory, "kubeconfig"), fake.kubeconfig(user=user)
    )
    return LoopKubernetesClient(
        reactor, lambda: kubeconfig_connection(path, reactor), **client_options
    )


def start_fake_kubernetes(
    test_case: TestCase,
    reactor: "IServingReactor | None" = None,
    tls: bool = True,
    **options: Iterable[str],
) -> FakeKubernetesAPI:
    """
    Start a L{FakeKubernetesAPI} for C{test_case}, stopped at its cleanup.

    @param reactor: the reactor; the global one by default.
    @return: the fake, listening.
    """
    if reactor is None:
        reactor = _global_reactor()
    fake = FakeKubernetesAPI(reactor, **options)
    fake.start(tls=tls)
    test_case.addCleanup(fake.stop)
    return fake
