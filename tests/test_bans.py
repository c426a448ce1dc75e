"""Bans: ``node.ban`` / ``unban`` / ``banned`` on loopback, expiry, persistence in datadir,
and the pure :class:`~gp2p.bans.BanList` underneath."""
import json
import os
import time
from pathlib import Path

import pytest

from gp2p import DisconnectReason, PeerGone, jsonfile
from gp2p.bans import BanList, parse_subnet
from gp2p.testing import RawPeer, wait_until

ROOMY = {"heartbeat_interval": 1.0, "peer_timeout": 30.0}


def reasons_of(node):
    got = []
    node.on_event("peer_disconnected")(lambda peer, reason: got.append(reason))
    return got


def refused_at_accept(node, source):
    """A raw socket from ``source`` is closed by ``node`` with nothing written, and counted."""
    before = node.metrics["refused.banned"]
    raw = RawPeer.dial(node.address, source=source)
    assert raw.wait_closed() == b""
    wait_until(lambda: node.metrics["refused.banned"] == before + 1)
    raw.close()


def test_subnet_ban_drops_matching_peers_and_refuses_new_ones_before_the_handshake(nodes):
    a = nodes.make(listen="127.30.0.1:0", **ROOMY)
    inside_in = nodes.make(listen="127.31.0.2:0", **ROOMY)    # dials a
    inside_out = nodes.make(listen="127.31.0.3:0", **ROOMY)   # dialled by a
    outside = nodes.make(listen="127.32.0.2:0", **ROOMY)
    seen_in, seen_out, seen_outside = reasons_of(inside_in), reasons_of(inside_out), reasons_of(outside)
    inside_in.connect(a.address)
    a.connect(inside_out.address)
    outside.connect(a.address)
    assert len(a.peers) == 3

    a.ban("127.31.0.0/24", 60)
    assert [p.id for p in a.peers] == [outside.id]
    wait_until(lambda: seen_in == [DisconnectReason.BANNED] and seen_out == [DisconnectReason.BANNED])
    assert set(a.banned) == {"127.31.0.0/24"}
    assert a.banned["127.31.0.0/24"] == pytest.approx(time.time() + 60, abs=5)
    # refused at accept: nothing written, not even a preamble
    refused_at_accept(a, "127.31.0.9")
    with pytest.raises(PeerGone):
        inside_in.connect(a.address)
    assert a.metrics["refused.banned"] == 2
    # and never dialled: connect() refuses before any socket is made
    with pytest.raises(PeerGone, match="banned"):
        a.connect(inside_out.address)
    assert a.metrics["dial_failed"] == 0
    # outside the subnet nothing changed
    got = []
    outside.on("mark")(lambda peer, payload: got.append(payload))
    a.send(outside.id, "mark", 1)
    wait_until(lambda: got == [1])
    assert seen_outside == []
    assert not a._pm.is_banned("127.31.1.2") and not a._pm.is_banned("127.30.0.9")


def test_the_book_never_selects_a_banned_address(nodes):
    a = nodes.make(listen="127.33.0.1:0", **ROOMY)
    banned = [nodes.make(listen=f"127.34.0.{i}:0", **ROOMY) for i in (2, 3)]
    for other in banned:
        other.connect(a.address)
    wait_until(lambda: all(o.address in a._pm.book for o in banned))
    for other in banned:
        other.stop()
    wait_until(lambda: not a.peers)
    assert a._dialer._select([]) in {o.address for o in banned}
    a.ban("127.34.0.0/16", 60)
    assert a._dialer._select([]) is None
    book = a._pm.book
    for _ in range(50):
        assert book.select(time.time(), is_banned=a._pm.is_banned) is None
    a.unban("127.34.0.0/16")
    assert a._dialer._select([]) in {o.address for o in banned}


def test_a_short_ban_expires(nodes):
    a = nodes.make(listen="127.35.0.1:0", **ROOMY)
    b = nodes.make(listen="127.36.0.2:0", **ROOMY)
    a.ban("127.36.0.0/16", 0.5)
    assert "127.36.0.0/16" in a.banned and a._pm.is_banned("127.36.0.2")
    wait_until(lambda: not a.banned, timeout=5)
    assert not a._pm.is_banned("127.36.0.2")
    assert b.connect(a.address).id == a.id
    assert [p.id for p in a.peers] == [b.id]


def test_unban_lifts_the_ban(nodes):
    a = nodes.make(listen="127.37.0.1:0", **ROOMY)
    b = nodes.make(listen="127.38.0.2:0", **ROOMY)
    a.ban("127.38.0.2", 60)
    assert set(a.banned) == {"127.38.0.2/32"}
    refused_at_accept(a, "127.38.0.2")
    assert a.unban("127.38.0.2")
    assert not a.unban("127.38.0.2")
    assert a.banned == {}
    assert b.connect(a.address).id == a.id
    # unban names the ban exactly: a narrower unban leaves a wider ban in place
    a.ban("127.38.0.0/16", 60)
    assert not a.unban("127.38.0.0/24")
    assert set(a.banned) == {"127.38.0.0/16"}
    assert not a.peers  # and b is dropped again


def test_bans_persist_in_datadir_across_a_restart(nodes, tmp_path):
    datadir = str(tmp_path / "a")
    a = nodes.make(listen="127.39.0.1:0", datadir=datadir, **ROOMY)
    a.ban("127.41.0.0/16", 3600)
    a.ban("127.42.0.5", 0.2)      # expires before the restart
    until = a.banned["127.41.0.0/16"]
    path = os.path.join(datadir, "bans.json")
    assert os.path.exists(path)   # saved at once, not only at stop
    assert os.stat(path).st_mode & 0o777 == 0o600
    wait_until(lambda: "127.42.0.5/32" not in a.banned)
    a.stop()
    again = nodes.make(listen="127.39.0.1:0", datadir=datadir, **ROOMY)
    assert again.banned == {"127.41.0.0/16": until}
    refused_at_accept(again, "127.41.3.4")
    # an unban persists too
    assert again.unban("127.41.0.0/16")
    again.stop()
    third = nodes.make(listen="127.39.0.1:0", datadir=datadir, **ROOMY)
    assert third.banned == {}


@pytest.mark.parametrize("damage", ["garbage", "truncated", "checksum", "bad-entry"])
def test_a_corrupt_ban_list_is_moved_aside_and_the_node_starts_without_bans(nodes, tmp_path, caplog, damage):
    datadir = str(tmp_path / "a")
    a = nodes.make(listen="127.43.0.1:0", datadir=datadir, **ROOMY)
    a.ban("127.44.0.0/16", 3600)
    a.stop()
    path = Path(datadir, "bans.json")
    text = path.read_text()
    if damage == "garbage":
        text = "\x00not json"
    elif damage == "truncated":
        text = text[: len(text) // 2]
    elif damage == "checksum":
        text = text.replace("127.44.0.0/16", "127.45.0.0/16")
    else:
        text = jsonfile.dumps("gp2p-bans", 1, {"bans": {"not a subnet": 1e12}})
    path.write_text(text)
    again = nodes.make(listen="127.43.0.1:0", datadir=datadir, **ROOMY)
    assert again.banned == {}
    assert Path(f"{path}.bak").read_text() == text
    assert any("corrupt" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)
    # the node runs and saves a good list again
    again.ban("127.46.0.0/16", 60)
    assert json.loads(path.read_text())["body"]["bans"].keys() == {"127.46.0.0/16"}


# -- BanList (pure) ------------------------------------------------------------------

def test_banlist_covers_subnets_and_single_addresses():
    bans = BanList()
    bans.ban("10.1.0.0/16", 10, now=100)
    bans.ban("127.0.0.5:7001", 10, now=100)   # host:port counts as its host
    bans.ban("[::1]:7", 10, now=100)
    assert bans.is_banned("10.1.200.3", 105)
    assert not bans.is_banned("10.2.0.1", 105)
    assert bans.is_banned("127.0.0.5", 105) and not bans.is_banned("127.0.0.6", 105)
    assert bans.is_banned("::1", 105)
    assert not bans.is_banned("not-an-ip", 105)
    assert set(bans.banned(105)) == {"10.1.0.0/16", "127.0.0.5/32", "::1/128"}


def test_banlist_expiry_and_extension():
    bans = BanList()
    bans.ban("10.0.0.0/8", 10, now=0)
    bans.ban("10.0.0.0/8", 5, now=0)          # a shorter ban does not cut a longer one
    assert bans.is_banned("10.9.9.9", 9.9)
    assert not bans.is_banned("10.9.9.9", 10.0)
    assert bans.banned(10.0) == {}
    with pytest.raises(ValueError):
        bans.ban("10.0.0.0/8", 0, now=0)
    with pytest.raises(ValueError):
        bans.ban("nonsense", 10, now=0)


def test_discouragement_is_shorter_lived_and_not_listed():
    bans = BanList()
    bans.discourage("127.0.0.9", 60, now=0)
    assert bans.is_banned("127.0.0.9", 59) and not bans.is_banned("127.0.0.9", 60)
    assert bans.banned(0) == {}
    bans.discourage("127.0.0.9", 60, now=0)
    assert bans.unban("127.0.0.9")            # unban lifts a discouragement of that IP
    assert not bans.is_banned("127.0.0.9", 1)


def test_parse_subnet():
    assert str(parse_subnet("127.0.0.5")) == "127.0.0.5/32"
    assert str(parse_subnet("127.0.0.5:7001")) == "127.0.0.5/32"
    assert str(parse_subnet("127.0.9.0/24")) == "127.0.9.0/24"
    assert str(parse_subnet("127.0.9.7/24")) == "127.0.9.0/24"
    assert str(parse_subnet("[::1]:7")) == "::1/128"
    assert str(parse_subnet("::1")) == "::1/128"
    with pytest.raises(ValueError):
        parse_subnet("host.example:7")


def test_save_and_load_keep_only_active_bans(tmp_path):
    path = str(tmp_path / "bans.json")
    bans = BanList()
    bans.ban("127.0.0.0/24", 100, now=0)
    bans.ban("127.0.1.0/24", 10, now=0)
    bans.save(path, now=5)
    loaded = BanList()
    loaded.load(path, now=50)
    assert loaded.banned(50) == {"127.0.0.0/24": 100}
    missing = BanList()
    missing.load(str(tmp_path / "absent.json"), now=0)
    assert missing.banned(0) == {}
