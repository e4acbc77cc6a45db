from setuptools import setup

setup(
    name="twistedcluster",
    version="0.1.0",
    description="A load balancer for Twisted: proxy and redirect modes, "
    "least-load routing on load reported over AMP, admin CLI.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    # Flat layout; twisted/plugins has no __init__.py on purpose (Twisted's
    # plugin convention), so it is listed as a package by name.
    packages=[
        "twistedcluster",
        "twistedcluster.backend",
        "twistedcluster.balancer",
        "twistedcluster.cli",
        "twistedcluster.client",
        "twistedcluster.core",
        "twistedcluster.fast",
        "twistedcluster.wire",
        "twisted.plugins",
    ],
    package_data={
        "twisted.plugins": [
            "twistedcluster_plugins.py",
            "twistedcluster_endpoints.py",
            "twistedcluster_mtls.py",
            "twistedcluster_reactor.py",
        ]
    },
    install_requires=[
        # [tls]: pyOpenSSL, for ssl:/tls:/mtls: endpoints.
        "twisted[tls]>=24.7",
        "service-identity>=24.1",
        "attrs>=23.1",
        # /metrics: the exposition format and the process metrics.
        "prometheus_client>=0.17",
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-twisted>=1.14",
            "hypothesis>=6.100",
            # The deployment files' checks (tests/test_deploy.py).
            "pyyaml>=6.0",
            "kubernetes-validate>=1.28",
            "compose-spec>=0.2.1; python_version >= '3.10'",
            "dockerfile>=3.3",
            # The status page in a real browser (tests/test_e2e_observe.py,
            # with Debian's chromium and chromium-driver, from .ci/run).
            "selenium>=4.11",
        ],
    },
    entry_points={
        "console_scripts": [
            "cluster-admin = twistedcluster.cli.admin:main",
            "cluster-local = twistedcluster.cli.local:main",
            "cluster-connect = twistedcluster.cli.connect:main",
        ],
    },
)
