"""Smoke tests of the example programs, each run as a subprocess."""
import os
import signal
import sys

import gevent
import pytest
from gevent import subprocess

from gp2p.testing import next_host

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
WAIT = 20  # generous: other test runs may share the machine


class Program:
    """An example running as a subprocess; stdout and stderr are collected by greenlets."""

    def __init__(self, script, *args):
        self.proc = subprocess.Popen([sys.executable, os.path.join(EXAMPLES, script), *args],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.stdout, self.stderr = [], []
        self._readers = [gevent.spawn(self._collect, self.proc.stdout, self.stdout),
                         gevent.spawn(self._collect, self.proc.stderr, self.stderr)]

    @staticmethod
    def _collect(stream, lines):
        for line in stream:
            lines.append(line.rstrip("\n"))

    def output(self):
        return "\n".join(["stdout:", *self.stdout, "stderr:", *self.stderr])

    def expect(self, text, timeout=WAIT):
        """The first stdout line containing ``text``, waiting up to ``timeout``."""
        try:
            with gevent.Timeout(timeout):
                while True:
                    for line in self.stdout:
                        if text in line:
                            return line
                    gevent.sleep(0.02)
        except gevent.Timeout:
            raise AssertionError(f"no line with {text!r} within {timeout}s\n{self.output()}") from None

    def type(self, line):
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def exit_code(self, timeout=WAIT):
        """Wait for the process to exit (and its output to be read); its return code."""
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running after {timeout}s\n{self.output()}") from None
        gevent.joinall(self._readers, timeout=timeout)
        return code

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        gevent.killall(self._readers)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            stream.close()


def start_chat(nick, *args):
    chat = Program("chat.py", "--listen", f"{next_host()}:0", "--nick", nick, *args)
    _, address, _, prefix = chat.expect("listening ").split()
    return chat, address, prefix


def test_chat_between_two_processes():
    alice = bob = None
    try:
        alice, alice_address, alice_id = start_chat("alice")
        bob, _, bob_id = start_chat("bob", "--connect", alice_address)
        alice.expect(f"* {bob_id} joined (inbound)")
        bob.expect(f"* {alice_id} joined (outbound)")

        bob.type("hello from bob")
        alice.expect("<bob> hello from bob")
        alice.type("hi bob")
        bob.expect("<alice> hi bob")

        alice.proc.stdin.close()
        assert alice.exit_code() == 0, alice.output()
        bob.expect(f"* {alice_id} left (shutdown)")
        bob.proc.stdin.close()
        assert bob.exit_code() == 0, bob.output()
    finally:
        for chat in (alice, bob):
            if chat is not None:
                chat.kill()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_chat_stops_on_signal(signum):
    chat = None
    try:
        chat, _, _ = start_chat("carol")
        chat.proc.send_signal(signum)
        assert chat.exit_code() == 0, chat.output()
    finally:
        if chat is not None:
            chat.kill()


def test_monkeypatched_app():
    app = Program("monkeypatched_app.py")
    try:
        assert app.exit_code() == 0, app.output()
        bob_id = app.expect("bob ").split()[1]
        assert app.stdout[-3:] == [f"worker: alice got 'hi alice' from {bob_id}",
                                   f"worker: GET /peers -> ['{bob_id}']",
                                   "ok"], app.output()
    finally:
        app.kill()
