"""The patch mode the suite claims is really in force."""
import socket
import threading

import gevent.monkey
import gevent.socket

from conftest import PATCHED


def test_patch_mode_is_in_force():
    assert gevent.monkey.is_module_patched("socket") is PATCHED
    assert (socket.socket is gevent.socket.socket) is PATCHED
    assert gevent.monkey.is_module_patched("threading") is PATCHED
    assert (threading.get_ident is gevent.monkey.get_original("threading", "get_ident")) is not PATCHED


def test_importing_gp2p_patches_nothing():
    import subprocess
    import sys

    code = ("import gp2p, gp2p.cli, gp2p.testing, gevent.monkey, sys;"
            "sys.exit(1 if gevent.monkey.is_module_patched('socket') else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
