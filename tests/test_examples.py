"""Smoke tests of the example programs, each run as a subprocess."""
import importlib.util
import os
import signal
import sys

import gevent
import pytest
from gevent import subprocess

from gp2p.testing import next_host, wait_until

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
WAIT = 30  # generous: other test runs may share the machine


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

    def expect(self, text, timeout=WAIT, after=0):
        """The first stdout line containing ``text`` (from line ``after`` on), waiting up to
        ``timeout``."""
        return self.wait_for(lambda line: text in line, timeout, after, f"no line with {text!r}")

    def wait_for(self, predicate, timeout=WAIT, after=0, failure="no matching line"):
        """The first stdout line (from line ``after`` on) for which ``predicate`` is true."""
        def match():
            return next((line for line in self.stdout[after:] if predicate(line)), None)

        try:
            return wait_until(match, timeout, interval=0.02)
        except AssertionError:
            raise AssertionError(f"{failure} within {timeout}s\n{self.output()}") from None

    def address(self):
        """The address of the ``listening <address> ...`` line."""
        return self.expect("listening ").split()[1]

    def mark(self):
        """How many stdout lines there are so far: pass it as ``after=`` to expect."""
        return len(self.stdout)

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

    def terminate(self, timeout=WAIT):
        """SIGTERM, then the exit code."""
        self.proc.send_signal(signal.SIGTERM)
        return self.exit_code(timeout)

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        gevent.killall(self._readers)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            stream.close()


def kill_all(programs):
    for program in programs:
        program.kill()


def start_chat(nick, *args):
    # --target-outbound 0: each chat keeps to its --connect peers, so the topology is the
    # one the test builds even though discovery could introduce the others
    chat = Program("chat.py", "--listen", f"{next_host()}:0", "--nick", nick,
                   "--target-outbound", "0", *args)
    _, address, _, prefix = chat.expect("listening ").split()
    return chat, address, prefix


def test_chat_room_relays_lines_along_a_line_of_three():
    programs = []
    try:
        alice, alice_address, alice_id = start_chat("alice")
        programs.append(alice)
        bob, bob_address, bob_id = start_chat("bob", "--connect", alice_address)
        programs.append(bob)
        carol, _, carol_id = start_chat("carol", "--connect", bob_address)
        programs.append(carol)
        alice.expect(f"* {bob_id} joined (inbound)")
        bob.expect(f"* {alice_id} joined (outbound)")
        bob.expect(f"* {carol_id} joined (inbound)")
        carol.expect(f"* {bob_id} joined (outbound)")

        alice.type("hello room")
        bob.expect("<alice> hello room")
        carol.expect("<alice> hello room")
        carol.type("hi from the far end")
        alice.expect("<carol> hi from the far end")
        bob.expect("<carol> hi from the far end")
        # alice and carol never met: their lines were relayed by bob
        assert not any(carol_id in line for line in alice.stdout), alice.output()
        assert not any(alice_id in line for line in carol.stdout), carol.output()
        # nobody sees their own line echoed back
        assert not any("<alice>" in line for line in alice.stdout), alice.output()
        assert not any("<carol>" in line for line in carol.stdout), carol.output()

        alice.proc.stdin.close()
        assert alice.exit_code() == 0, alice.output()
        bob.expect(f"* {alice_id} left (shutdown)")
        for chat in (bob, carol):
            chat.proc.stdin.close()
            assert chat.exit_code() == 0, chat.output()
    finally:
        kill_all(programs)


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


def last_head(program):
    """``(height, hash8)`` of the last ``head`` line, or None."""
    for line in reversed(program.stdout):
        if line.startswith("head "):
            _, height, hash8 = line.split()
            return int(height), hash8
    return None


def wait_same_head(programs, height, timeout=WAIT):
    """Wait until every program's last head is at ``height`` and the same; that head."""
    def same():
        heads = {last_head(p) for p in programs}
        return len(heads) == 1 and heads.pop()[0] == height

    try:
        wait_until(same, timeout, interval=0.05)
        return last_head(programs[0])
    except AssertionError:
        outputs = "\n\n".join(p.output()[-3000:] for p in programs)
        raise AssertionError(f"heads did not converge at {height}: "
                             f"{[last_head(p) for p in programs]}\n{outputs}") from None


def test_ledger_five_nodes_one_late_catches_up():
    blocks, late_after = 40, 22
    produce = ("--produce", "--interval", "0.15", "--blocks", str(blocks))
    programs = []
    try:
        first = Program("ledger.py", "--listen", f"{next_host()}:0", *produce, "--pay", "0.3")
        programs.append(first)
        connect = ("--connect", first.address())
        programs += [Program("ledger.py", "--listen", f"{next_host()}:0", *connect, *args)
                     for args in (produce, (*produce, "--pay", "0.5"), ())]
        observer = programs[-1]  # not a producer
        first.wait_for(lambda line: line.startswith("head ") and int(line.split()[1]) >= late_after,
                       failure=f"no head at height {late_after}")
        late = Program("ledger.py", "--listen", f"{next_host()}:0", "--connect", observer.address())
        programs.append(late)

        height, hash8 = wait_same_head(programs, blocks, timeout=30)
        # it missed all of them, so only requests could bring them
        caught_up = sum(int(line.split()[2]) for line in late.stdout
                        if line.startswith("caught up"))
        assert caught_up >= 20, late.output()
        for program in programs:
            assert program.terminate() == 0, program.output()
            assert "Traceback" not in program.output(), program.output()
    finally:
        kill_all(programs)


def load_example(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(EXAMPLES, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ledger_rules():
    """The ledger's validation and fork rules, in-process (they do no I/O)."""
    ledger = load_example("ledger")
    chain = ledger.Chain()
    key = ledger.Ed25519PrivateKey.generate()
    account = key.public_key().public_bytes(ledger.Encoding.Raw, ledger.PublicFormat.Raw).hex()
    tx = {"from": account, "to": "acct-1", "amount": 5, "nonce": 1}
    tx["sig"] = key.sign(ledger.canonical(tx)).hex()
    assert ledger.tx_problem(tx) is None
    assert ledger.tx_problem({**tx, "amount": 6}) == "bad signature"
    assert ledger.tx_problem({**tx, "amount": -1}) == "bad transaction format"

    genesis = ledger.GENESIS
    one = ledger.make_block(1, genesis["hash"], "p1", [tx], 1.0)
    assert chain.problem(one) is None
    assert chain.problem({**one, "producer": "p2"}) == "bad hash"
    assert chain.problem(ledger.make_block(2, genesis["hash"], "p1", [], 1.0)) == "wrong height"
    assert chain.problem(ledger.make_block(2, "ab" * 32, "p1", [], 1.0)) == "unknown parent"
    forged = {**tx, "amount": 6}
    assert chain.problem(ledger.make_block(1, genesis["hash"], "p1", [forged], 1.0)) \
        == "bad signature"
    assert chain.problem(ledger.make_block(1, genesis["hash"], "p1", [tx, tx], 1.0)) \
        == "duplicate transaction"

    # longest chain first, lowest hash between equals
    siblings = sorted((ledger.make_block(1, genesis["hash"], f"p{i}", [], 1.0) for i in range(3)),
                      key=lambda b: b["hash"])
    assert chain.add(siblings[1]) and chain.head == siblings[1]
    assert not chain.add(siblings[2]) and chain.head == siblings[1]
    assert chain.add(siblings[0]) and chain.head == siblings[0]
    two = ledger.make_block(2, siblings[2]["hash"], "p2", [], 2.0)
    assert chain.add(two) and chain.main == [genesis["hash"], siblings[2]["hash"], two["hash"]]
    assert chain.since(1, 100) == [siblings[2], two]


def start_kv(*args):
    store = Program("kvstore.py", "--listen", f"{next_host()}:0", *args)
    _, address, _, prefix = store.expect("listening ").split()
    return store, address, prefix


def test_kvstore_put_get_and_remote_get():
    programs = []
    try:
        one, one_address, one_id = start_kv()
        programs.append(one)
        two, two_address, two_id = start_kv("--connect", one_address)
        programs.append(two)
        one.expect(f"* {two_id} joined")

        one.type("put color blue")
        two.expect(f"* color = blue (from {one_id})")
        mark = two.mark()
        two.type("get color")
        two.type("get size")
        assert two.expect("color", after=mark) == "color = blue", two.output()
        assert two.expect("size", after=mark) == "size is not set", two.output()
        mark = two.mark()
        two.type("rget color")
        assert two.expect("color", after=mark) == f"color = blue (asked {one_id})", two.output()

        two.type("put color green")  # the later write wins everywhere
        one.expect(f"* color = green (from {two_id})")
        mark = one.mark()
        one.type("get color")
        assert one.expect("color", after=mark) == "color = green", one.output()

        # a node that joins later copies what was written before
        three, _, _ = start_kv("--connect", two_address)
        programs.append(three)
        three.expect("* copied 1 entries from")
        mark = three.mark()
        three.type("get color")
        assert three.expect("color", after=mark) == "color = green", three.output()

        for store in programs:
            store.proc.stdin.close()
            assert store.exit_code() == 0, store.output()
    finally:
        kill_all(programs)
