"""Test setup: patch mode, hub error checks and the node factory.

The suite runs twice: monkey-patched (the default, as most gevent applications are) and
unpatched with GP2P_NO_PATCH=1. gp2p itself never patches.
"""
import os

PATCHED = not os.environ.get("GP2P_NO_PATCH")
if PATCHED:
    from gevent import monkey

    monkey.patch_all()

import logging  # noqa: E402

import pytest  # noqa: E402

from gp2p import testing  # noqa: E402


def pytest_report_header(config):
    mode = "monkey-patched" if PATCHED else "unpatched (GP2P_NO_PATCH=1)"
    return f"gp2p patch mode: {mode}"


@pytest.fixture(autouse=True)
def hub_errors():
    """Fail the test if any background greenlet died of an exception."""
    with testing.HubErrors() as errors:
        yield errors
    errors.check()


@pytest.fixture
def nodes():
    """A :class:`gp2p.testing.NodeFactory`; every node it made is stopped and leak-checked."""
    factory = testing.NodeFactory()
    try:
        yield factory
    finally:
        factory.stop_all()


@pytest.fixture(autouse=True)
def _log_level(caplog):
    caplog.set_level(logging.DEBUG, logger="gp2p")
