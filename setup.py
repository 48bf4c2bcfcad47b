"""
Packaging for sentry_tx.

The twistd plugin lives in twisted/plugins/ (a namespace directory without
__init__.py, as Twisted's plugin system wants); it is installed by listing
it in py_modules' neighbour, package_data-free ``twisted.plugins``.
"""

from setuptools import find_packages, setup

setup(
    name="sentry_tx",
    version="0.1.0",
    description="The Dapr certificate authority (Sentry) as a Twisted service",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["sentry_tx", "sentry_tx.*"]) + ["twisted.plugins"],
    package_data={"sentry_tx._proto": ["*.proto", "*.pyi"]},
    include_package_data=True,
    install_requires=[
        "twisted[tls]>=24.7.0",
        # The generated stubs in sentry_tx/_proto check these at import time.
        "grpcio>=1.85.1",
        "protobuf>=7.35.1",
        "pyopenssl>=24.0.0",
        "cryptography>=44.0.0",
        "treq>=24.9.1",
        # The per-call TokenReview on the gRPC loop (sentry_tx/kube/loop_client.py).
        "aiohttp>=3.10",
        "prometheus-client>=0.20.0",
        "zope.interface>=6.0",
        "PyYAML>=6.0",
        # JWT-SVIDs and the JWKS validator (README: "JWT-SVIDs and OIDC").
        "joserfc>=1.8.0",
    ],
    extras_require={
        # PyJWT verifies sentry_tx's tokens in the tests, independently of
        # joserfc, which the code uses; asn1crypto reads the certificates'
        # container images extension independently of cryptography;
        # helm-python-sdk (Helm v4 as a library) renders Dapr's chart in
        # tests/test_helm_chart.py.
        "test": [
            "hypothesis>=6.100",
            "PyJWT[crypto]>=2.10",
            "asn1crypto>=1.5",
            "helm-python-sdk>=0.2.2",
        ],
        # bench/run.py draws its plot with matplotlib when it is installed.
        "bench": ["matplotlib>=3.8"],
        "proto": ["grpcio-tools==1.85.1"],
        # The checkers (pyproject.toml: [tool.mypy], [tool.ruff]), pinned:
        # mypy-zope follows mypy's internals, so the two move together.
        "lint": [
            "mypy==2.4.1",
            "mypy-zope==1.0.17",
            "ruff==0.17.6",
            "types-PyYAML==6.0.12.20261122",
            "types-grpcio==1.85.0.20261028",
            "types-protobuf==7.35.1.20261122",
        ],
    },
    zip_safe=False,
)
