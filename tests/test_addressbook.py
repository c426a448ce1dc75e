"""The address book: a pure core, tested with explicit times and seeded randomness."""
import ast
import json
import logging
import os
import random
from itertools import islice
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gp2p import addressfile, jsonfile
from gp2p.addressbook import EVICTED_BASE, EVICTED_CAP, AddressBook, canonical_address, network_group
from gp2p.addressfile import AddressBookCorrupt, load, load_or_quarantine, save

SECRET = bytes(range(32))
T0 = 1_700_000_000.0
DAY = 86400.0
ID_A, ID_B, ID_OWN = "a" * 64, "b" * 64, "c" * 64


def make_book(**kwargs):
    kwargs.setdefault("rng", random.Random(7))
    return AddressBook(SECRET, **kwargs)


def tiny_book(new_buckets=1, tried_buckets=1, bucket_size=1, **kwargs):
    return make_book(new_buckets=new_buckets, tried_buckets=tried_buckets, bucket_size=bucket_size, **kwargs)


def check_invariants(book):
    """Capacity is never exceeded and every entry owns exactly the slot it names."""
    assert len(book) <= book.capacity
    assert book.new_count <= book.new_capacity and book.tried_count <= book.tried_capacity
    assert len(book) == book.new_count + book.tried_count
    for entry in book.entries():
        table = book._tried if entry.tried else book._new
        assert table[(entry.bucket, entry.slot)] == entry.address
        assert 0 <= entry.slot < book.bucket_size


# -- network groups and addresses -------------------------------------------------------

@pytest.mark.parametrize("host, group", [
    ("127.5.1.2", "127.5.0.0/16"),
    ("127.5.200.9", "127.5.0.0/16"),
    ("127.6.1.2", "127.6.0.0/16"),
    ("10.0.0.1", "10.0.0.0/16"),
    ("2001:db8:1:2::1", "2001:db8::/32"),
    ("[2001:db8:ffff::1]", "2001:db8::/32"),
    ("::ffff:10.1.2.3", "10.1.0.0/16"),
    ("Seed.Example.COM", "seed.example.com"),
])
def test_network_group(host, group):
    assert network_group(host) == group


def test_fake_hosts_are_distinct_groups():
    assert network_group("127.5.0.1") != network_group("127.6.0.1")
    assert network_group("127.0.0.2") == network_group("127.0.0.3")


@pytest.mark.parametrize("text, canonical", [
    ("127.0.0.1:7000", "127.0.0.1:7000"),
    ("[0:0::1]:7", "[::1]:7"),
    ("Host.Example.com:80", "host.example.com:80"),
    ("127.0.0.1:0", None), ("0.0.0.0:7", None), ("[::]:7", None), ("224.0.0.1:7", None),
    ("nohost", None), ("bad host:1", None), ("1.2.3.4:99999", None), (7, None), (None, None),
])
def test_canonical_address(text, canonical):
    assert canonical_address(text) == canonical


def test_pure_modules_import_neither_gevent_nor_socket():
    for name in ("addressbook", "addressfile", "netgroup", "jsonfile"):
        source = (Path(__file__).parent.parent / "gp2p" / f"{name}.py").read_text()
        imported = set()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Import):
                imported.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                imported.add((node.module or "").split(".")[0])
        assert not imported & {"gevent", "socket", "time"}, name


# -- adding, refreshing, promoting -------------------------------------------------------

def test_add_creates_a_new_entry_then_refreshes_it():
    book = make_book()
    assert book.add("127.5.0.1:7000", ID_A, "127.9.0.1", T0, seen=T0 - 100)
    entry = book.get("127.5.0.1:7000")
    assert not entry.tried and entry.node_id == ID_A and entry.last_seen == T0 - 100
    assert entry.source == "127.9.0.0/16" and entry.group == "127.5.0.0/16"
    assert not book.add("127.5.0.1:7000", ID_B, "127.10.0.1", T0 + 5, seen=T0 + 1)
    assert entry.last_seen == T0 + 1 and entry.node_id == ID_B and entry.source == "127.9.0.0/16"
    assert not book.add("127.5.0.1:7000", None, "127.10.0.1", T0 + 6, seen=T0 - 50)
    assert entry.last_seen == T0 + 1 and entry.node_id == ID_B
    assert (len(book), book.new_count, book.tried_count) == (1, 1, 0)
    assert book.counters["added"] == 1 and book.counters["refreshed"] == 2
    assert "127.5.0.1:7000" in book and "127.5.0.2:7000" not in book and "junk" not in book


def test_source_defaults_to_the_address_own_group():
    book = make_book()
    book.add("127.5.0.1:7000", None, None, T0)
    assert book.get("127.5.0.1:7000").source == "127.5.0.0/16"


@pytest.mark.parametrize("address, node_id", [
    ("127.0.0.1:0", None), ("0.0.0.0:7000", None), ("nonsense", None), (None, None),
    ("127.5.0.1:7000", "not-an-id"), ("127.5.0.1:7000", "A" * 64), ("127.5.0.1:7000", ID_OWN),
    ("127.0.0.9:7000", None),
])
def test_add_ignores_invalid_and_own(address, node_id):
    book = make_book()
    book.set_own(["127.0.0.9:7000"], ID_OWN)
    assert not book.add(address, node_id, "127.9.0.1", T0)
    assert len(book) == 0 and book.counters["ignored"] == 1


def test_set_own_drops_entries_for_ourselves():
    book = make_book()
    book.add("127.5.0.1:7000", None, None, T0)
    book.add("127.5.0.2:7000", ID_OWN, None, T0)
    book.add("127.5.0.3:7000", ID_A, None, T0)
    book.set_own(["127.5.0.1:7000"], ID_OWN)
    assert [e.address for e in book.entries()] == ["127.5.0.3:7000"]
    assert not book.good("127.5.0.1:7000", T0)


def test_future_and_bad_timestamps_are_clamped_or_ignored():
    book = make_book()
    book.add("127.5.0.1:7000", None, "127.9.0.1", T0, seen=T0 + 10 * DAY)
    assert book.get("127.5.0.1:7000").last_seen == T0
    book.add("127.5.0.1:7000", None, "127.9.0.1", T0 + 1, seen=T0 + 10 * DAY)
    assert book.get("127.5.0.1:7000").last_seen == T0 + 1
    book.add("127.5.0.2:7000", None, "127.9.0.1", T0, seen=-5)
    assert book.get("127.5.0.2:7000").last_seen == 0.0
    for bad in (float("nan"), float("inf"), "soon", True):
        assert not book.add("127.5.0.3:7000", None, "127.9.0.1", T0, seen=bad)
    assert "127.5.0.3:7000" not in book


def test_good_promotes_to_tried_and_add_never_demotes():
    book = make_book()
    book.add("127.5.0.1:7000", None, "127.9.0.1", T0)
    assert book.good("127.5.0.1:7000", T0 + 10, node_id=ID_A)
    entry = book.get("127.5.0.1:7000")
    assert entry.tried and entry.last_success == T0 + 10 and entry.last_seen == T0 + 10
    assert (book.new_count, book.tried_count) == (0, 1)
    assert not book.add("127.5.0.1:7000", ID_B, "127.9.0.1", T0 + 20)
    assert entry.tried and entry.node_id == ID_A and entry.last_seen == T0 + 20
    assert book.good("127.5.0.1:7000", T0 + 30) and book.tried_count == 1
    check_invariants(book)


def test_good_adds_an_unknown_address_straight_to_tried():
    book = make_book()
    assert book.good("[::1]:7000", T0, node_id=ID_A)
    assert book.get("[0::1]:7000").tried and book.tried_count == 1 and book.new_count == 0
    assert not book.good("127.0.0.1:0", T0)
    assert not book.good("127.5.0.1:7000", T0, node_id="nope")


def test_tried_collision_moves_the_old_entry_back_to_new():
    book = tiny_book(new_buckets=4, tried_buckets=1, bucket_size=1)
    book.add("127.5.0.1:7000", None, "127.9.0.1", T0)
    book.good("127.5.0.1:7000", T0)
    book.add("127.6.0.1:7000", None, "127.10.0.1", T0)
    assert book.good("127.6.0.1:7000", T0 + 1)
    assert book.get("127.6.0.1:7000").tried
    old = book.get("127.5.0.1:7000")
    assert old is not None and not old.tried and old.last_success == T0
    assert book.counters["demoted"] == 1 and book.tried_count == 1 and book.new_count == 1
    check_invariants(book)


def test_new_collision_keeps_the_occupant_and_counts_the_drop():
    book = tiny_book()
    assert book.add("127.5.0.1:7000", None, "127.9.0.1", T0)
    assert not book.add("127.5.0.2:7000", None, "127.9.0.1", T0 + 1)
    assert "127.5.0.1:7000" in book and "127.5.0.2:7000" not in book
    assert book.counters["dropped"] == 1 and len(book) == 1


@pytest.mark.parametrize("spoil", ["unseen_30_days", "three_failures", "ten_failures", "future"])
def test_terrible_entries_are_replaced_first(spoil):
    book = tiny_book()
    now = T0 + 40 * DAY
    address = "127.5.0.1:7000"
    if spoil == "unseen_30_days":
        book.add(address, None, "127.9.0.1", T0)
    elif spoil == "three_failures":
        book.add(address, None, "127.9.0.1", now - 600)
        for _ in range(3):
            book.failed(address, now - 300)
    elif spoil == "ten_failures":
        book.good(address, now - 8 * DAY)
        book.good("127.6.0.1:7000", now - 8 * DAY)  # takes the one tried slot: address is new again
        book.add(address, None, "127.9.0.1", now - 600)
        assert not book.get(address).tried and book.get(address).last_success
        for _ in range(10):
            book.failed(address, now - 300)
    else:  # the clock went back, so the entry was seen "in the future"
        book.add(address, None, "127.9.0.1", now + 3600)
    assert book.get(address).is_terrible(now)
    assert book.add("127.5.0.2:7000", None, "127.9.0.1", now)
    assert address not in book and "127.5.0.2:7000" in book
    assert book.counters["evicted"] == 1


def test_recent_or_healthy_entries_are_not_terrible():
    book = tiny_book()
    book.add("127.5.0.1:7000", None, "127.9.0.1", T0)
    for _ in range(3):
        book.failed("127.5.0.1:7000", T0)
    book.attempt("127.5.0.1:7000", T0 + 40 * DAY)  # dialled a moment ago: keep it for now
    assert not book.get("127.5.0.1:7000").is_terrible(T0 + 40 * DAY + 30)
    fresh = tiny_book()
    fresh.add("127.5.0.1:7000", None, "127.9.0.1", T0)
    assert not fresh.get("127.5.0.1:7000").is_terrible(T0 + 29 * DAY)


def test_attempt_failed_remove():
    book = make_book()
    assert not book.attempt("127.5.0.1:7000", T0) and not book.failed("127.5.0.1:7000", T0)
    assert not book.remove("127.5.0.1:7000")
    book.add("127.5.0.1:7000", None, None, T0)
    assert book.attempt("127.5.0.1:7000", T0 + 1) and book.failed("127.5.0.1:7000", T0 + 2)
    entry = book.get("127.5.0.1:7000")
    assert (entry.attempts, entry.failures, entry.last_attempt, entry.last_failure) == (1, 1, T0 + 1, T0 + 2)
    book.good("127.5.0.1:7000", T0 + 3)
    assert entry.failures == 0 and entry.attempts == 1
    assert book.remove("127.5.0.1:7000") and len(book) == 0
    check_invariants(book)


# -- capacity and floods --------------------------------------------------------------

def flood_addresses(count, rng):
    for _ in range(count):
        a, b, c, d = (rng.randrange(1, 224), rng.randrange(256), rng.randrange(256), rng.randrange(1, 255))
        yield f"{a}.{b}.{c}.{d}:{rng.randrange(1024, 65536)}"


@pytest.mark.parametrize("layout", ["default", "swarm-1024"])
def test_flood_from_one_source_group_cannot_push_out_earlier_entries(layout):
    """The issue's acceptance test: 50,000 addresses from one source group leave >= 95 % of
    200 new entries learned earlier from 20 other groups, and every tried entry, in place."""
    book = make_book() if layout == "default" else AddressBook.with_capacity(1024, SECRET, rng=random.Random(7))
    learned = []
    for g in range(20):  # 10 entries from each of 20 source groups (skipping the odd collision)
        candidates = (f"127.{100 + g}.{i}.1:7000" for i in range(100))
        learned += islice((a for a in candidates if book.add(a, None, f"127.{30 + g}.0.1", T0)), 10)
    for g in range(20):
        assert book.good(f"127.{200 + g}.0.1:7000", T0)
    tried = [e.address for e in book.entries() if e.tried]  # a tried collision may demote one
    assert len(learned) == 200 and all(a in book for a in learned) and len(tried) >= 18
    rng = random.Random(3)
    now, attacker = T0 + 60, "66.6.6.6"
    flood = list(flood_addresses(50_000, rng))
    for start in range(0, len(flood), 1000):
        now += 60
        for address in flood[start:start + 1000]:
            book.add(address, None, attacker, now, seen=now + 10 * DAY)
        assert len(book) <= book.capacity
        assert book.new_count <= book.new_capacity and book.tried_count <= book.tried_capacity
    kept = [a for a in learned if a in book and not book.get(a).tried]
    assert len(kept) >= 0.95 * len(learned)
    assert all(book.get(a) is not None and book.get(a).tried for a in tried)
    from_attacker = [e for e in book.entries() if e.source == network_group(attacker)]
    assert len({e.bucket for e in from_attacker}) <= 8  # one source group reaches 8 buckets
    assert len(from_attacker) <= 8 * book.bucket_size
    assert book.counters["dropped"] > 40_000
    check_invariants(book)


def test_with_capacity_expresses_a_swarm_sized_book():
    book = AddressBook.with_capacity(1024, SECRET)
    assert book.capacity == 1024 and book.tried_capacity < book.new_capacity
    assert AddressBook().capacity == 10240
    assert AddressBook.with_capacity(100).capacity <= 100
    for bad in ({"new_buckets": 0}, {"bucket_size": -1}, {"tried_buckets": 1.5}, {"tried_bias": 2}):
        with pytest.raises(ValueError):
            AddressBook(SECRET, **bad)
    with pytest.raises(ValueError):
        AddressBook(b"short")


ops = st.lists(st.tuples(
    st.sampled_from(["add", "good", "attempt", "failed", "remove", "select"]),
    st.integers(0, 40), st.integers(0, 5), st.floats(0, 40 * DAY)), max_size=60)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops)
def test_any_sequence_keeps_the_book_within_capacity(sequence):
    book = tiny_book(new_buckets=3, tried_buckets=2, bucket_size=2)
    now = T0
    for op, index, source, dt in sequence:
        now += dt / 100
        address = f"127.{index % 7}.0.{index}:7000"
        if op == "add":
            book.add(address, None, f"10.{source}.0.1", now, seen=now - dt)
        elif op == "select":
            assert book.select(now, rng=random.Random(index)) in {None, *(e.address for e in book.entries())}
        elif op == "remove":
            book.remove(address)
        else:
            getattr(book, op)(address, now)
        check_invariants(book)


# -- select -------------------------------------------------------------------------

def test_select_on_an_empty_book_is_none():
    assert make_book().select(T0) is None


def test_select_never_returns_own_excluded_banned_or_connected_ids():
    book = make_book()
    book.add("127.5.0.1:7000", ID_A, None, T0)   # connected, by id
    book.add("127.5.0.2:7000", None, None, T0)   # connected, by address
    book.add("127.6.0.1:7000", None, None, T0)   # banned host
    book.add("127.5.0.4:7000", ID_OWN, None, T0)
    book.own_id = ID_OWN
    book.add("127.5.0.5:7000", None, None, T0)
    rng = random.Random(1)
    picks = {book.select(T0, exclude={"127.5.0.2:7000"}, exclude_ids={ID_A},
                         is_banned=lambda host: host.startswith("127.6."), rng=rng) for _ in range(200)}
    assert picks == {"127.5.0.5:7000"}
    assert book.select(T0, exclude={"127.5.0.2:7000", "127.5.0.5:7000"}, exclude_ids={ID_A},
                       is_banned=lambda host: host.startswith("127.6."), rng=rng) is None


def test_failures_back_off_exponentially_with_deterministic_jitter():
    book = make_book(backoff_base=1.0, backoff_cap=300.0)
    book.add("127.5.0.1:7000", None, None, T0)
    assert book.retry_at("127.5.0.1:7000") == 0.0 and book.retry_at("127.9.9.9:1") == 0.0
    delays = []
    for failures in range(1, 13):
        book.attempt("127.5.0.1:7000", T0)
        book.failed("127.5.0.1:7000", T0)
        delay = book.retry_at("127.5.0.1:7000") - T0
        expected = min(300.0, 2.0 ** (failures - 1))
        assert 0.5 * expected <= delay <= 1.5 * expected
        delays.append(delay)
        assert book.select(T0 + delay - 0.001, rng=random.Random(0)) is None
        assert book.select(T0 + delay, rng=random.Random(0)) == "127.5.0.1:7000"
    assert delays[-1] <= 450 and delays[5] > delays[0]
    twin = make_book()
    twin.add("127.5.0.1:7000", None, None, T0)
    for _ in range(12):
        twin.failed("127.5.0.1:7000", T0)
    assert twin.retry_at("127.5.0.1:7000") == book.retry_at("127.5.0.1:7000")
    book.good("127.5.0.1:7000", T0 + 1000)
    assert book.retry_at("127.5.0.1:7000") == 0.0


def test_select_is_biased_toward_tried():
    book = make_book()
    for i in range(100):
        book.add(f"127.{10 + i}.0.1:7000", None, None, T0)
    for i in range(2):
        book.good(f"127.{200 + i}.0.1:7000", T0)
    rng = random.Random(5)
    picks = [book.get(book.select(T0 + 3600, rng=rng)).tried for _ in range(4000)]
    assert 0.45 < sum(picks) / len(picks) < 0.55  # 2 % of the book, half of the picks


def test_select_weighs_failures_and_recent_attempts_down():
    book = make_book()
    book.add("127.5.0.1:7000", None, None, T0)
    book.add("127.6.0.1:7000", None, None, T0)
    for _ in range(3):
        book.attempt("127.5.0.1:7000", T0)
        book.failed("127.5.0.1:7000", T0)
    rng = random.Random(9)
    picks = [book.select(T0 + 1000, rng=rng) for _ in range(4000)]
    share = picks.count("127.5.0.1:7000") / len(picks)
    assert 0.15 < share < 0.30  # 0.66**3 / (1 + 0.66**3) = 0.22
    book.attempt("127.6.0.1:7000", T0 + 1000)  # dialled a moment ago: 100 times less likely
    picks = [book.select(T0 + 1010, rng=rng) for _ in range(2000)]
    assert picks.count("127.6.0.1:7000") < 100


def test_select_prefers_groups_we_are_not_connected_to_without_excluding_them():
    book = make_book()
    book.add("127.5.0.1:7000", None, None, T0)
    book.add("127.6.0.1:7000", None, None, T0)
    rng = random.Random(2)
    picks = [book.select(T0, avoid_groups={"127.5.0.0/16"}, rng=rng) for _ in range(2000)]
    assert 0 < picks.count("127.5.0.1:7000") < 300
    assert book.select(T0, exclude={"127.6.0.1:7000"}, avoid_groups={"127.5.0.0/16"}) == "127.5.0.1:7000"


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_select_only_returns_allowed_addresses(data):
    book = make_book()
    addresses = [f"127.{g}.0.{i}:7000" for g in range(1, 5) for i in range(1, 5)]
    ids = {}
    for n, address in enumerate(addresses):
        node_id = data.draw(st.sampled_from([None, ID_A, ID_B, format(n, "064x")]))
        book.add(address, node_id, f"10.{n % 3}.0.1", T0)
        ids[address] = book.get(address).node_id
        if data.draw(st.booleans()):
            book.good(address, T0 + 1)
        for _ in range(data.draw(st.integers(0, 4))):
            book.failed(address, T0 + 2)
    exclude = data.draw(st.sets(st.sampled_from(addresses)))
    exclude_ids = data.draw(st.sets(st.sampled_from([ID_A, ID_B])))
    banned = data.draw(st.sets(st.sampled_from(["127.1.", "127.2.", "127.3."])))
    now = T0 + 2 + data.draw(st.floats(0, 30))
    allowed = {a for a in addresses if a not in exclude and ids[a] not in exclude_ids
               and not any(a.startswith(b) for b in banned) and book.retry_at(a) <= now}
    pick = book.select(now, exclude, exclude_ids, lambda host: any(host.startswith(b) for b in banned),
                       rng=random.Random(data.draw(st.integers(0, 1000))))
    assert pick in allowed if allowed else pick is None


# -- sample and fresh -------------------------------------------------------------------

def fill(book, count, now, tried_every=0):
    for i in range(count):
        address = f"127.{i % 250}.{i // 250}.1:7000"
        book.add(address, None, f"10.{i % 97}.0.1", now)
        if tried_every and i % tried_every == 0:
            book.good(address, now)


def test_sample_is_bounded_by_max_count_and_a_quarter_of_the_book():
    big = make_book()
    fill(big, 8000, T0)
    assert len(big) > 4000
    sample = big.sample(T0)
    assert len(sample) == 1000 and len({e.address for e in sample}) == 1000
    assert len(big.sample(T0, max_count=10)) == 10
    small = make_book()
    fill(small, 100, T0)
    assert len(small.sample(T0)) == 25
    assert len(small.sample(T0, fraction=0.1)) == 10
    assert make_book().sample(T0) == []


def test_sample_prefers_tried_and_recent_and_skips_terrible():
    book = make_book()
    fill(book, 400, T0, tried_every=20)
    # tried entries are 5 % of the book; over many draws they are well over twice that
    # share of a sample (one draw of 100 is too noisy to judge)
    tried = [sum(e.tried for e in book.sample(T0, rng=random.Random(seed))) for seed in range(40)]
    assert sum(tried) / len(tried) >= 10
    mixed = make_book()
    for i in range(200):
        mixed.add(f"127.{i}.0.1:7000", None, None, T0 - (0 if i % 2 else 2 * DAY))
    recent = sum(e.last_seen == T0 for e in mixed.sample(T0, rng=random.Random(2)))
    assert recent >= 35  # of 50
    stale = make_book()
    stale.add("127.5.0.1:7000", None, None, T0 - 40 * DAY)
    stale.add("127.5.0.2:7000", None, None, T0)
    assert [e.address for e in stale.sample(T0, fraction=1.0)] == ["127.5.0.2:7000"]


def test_sample_and_fresh_by_last_seen():
    book = make_book()
    book.add("127.5.0.1:7000", None, None, T0, seen=T0 - 60)
    book.add("127.5.0.2:7000", None, None, T0, seen=T0 - 3600)
    assert [e.address for e in book.fresh(T0)] == ["127.5.0.1:7000"]
    assert len(book.fresh(T0, within=7200)) == 2
    assert [e.address for e in book.sample(T0, fraction=1.0, fresh_within=600)] == ["127.5.0.1:7000"]


def test_anchors_are_canonical_unique_and_at_most_two():
    book = make_book()
    book.anchors = ["127.0.0.2:7000", "127.0.0.2:7000", "bad", "[0::1]:7", "127.0.0.4:7000"]
    assert book.anchors == ["127.0.0.2:7000", "[::1]:7"]


# -- persistence -----------------------------------------------------------------------

def populated_book():
    book = make_book()
    fill(book, 300, T0, tried_every=10)
    book.add("127.250.0.1:7000", ID_A, "127.9.0.1", T0, seen=T0 - 5)
    book.attempt("127.250.0.1:7000", T0 + 1)
    book.failed("127.250.0.1:7000", T0 + 2)
    book.anchors = ["127.0.0.1:7000", "127.1.0.1:7000"]
    return book


def snapshot(book):
    return {e.address: (e.source, e.node_id, e.last_seen, e.last_success, e.last_attempt,
                        e.last_failure, e.attempts, e.failures, e.tried, e.bucket, e.slot)
            for e in book.entries()}


def test_save_load_round_trip_with_anchors(tmp_path):
    book = populated_book()
    path = str(tmp_path / "addrbook.json")
    save(book, path)
    again = load(path, rng=random.Random(7))
    assert snapshot(again) == snapshot(book) and again.secret == book.secret
    assert again.anchors == ["127.0.0.1:7000", "127.1.0.1:7000"]
    assert (again.new_count, again.tried_count) == (book.new_count, book.tried_count)
    assert os.listdir(tmp_path) == ["addrbook.json"]  # no temporary file left behind
    check_invariants(again)


def test_saved_file_is_private_and_replaced_atomically(tmp_path, monkeypatch):
    path = tmp_path / "addrbook.json"
    path.write_text("old")
    os.chmod(path, 0o644)
    save(populated_book(), str(path))
    assert os.stat(path).st_mode & 0o777 == 0o600
    before = path.read_bytes()

    def crash(src, dst):
        raise OSError("disk full")
    monkeypatch.setattr(jsonfile.os, "replace", crash)
    with pytest.raises(OSError):
        save(make_book(), str(path))
    monkeypatch.undo()
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["addrbook.json"]


def test_loading_into_a_smaller_layout_respects_capacity(tmp_path):
    path = str(tmp_path / "addrbook.json")
    save(populated_book(), path)
    small = load(path, new_buckets=2, tried_buckets=1, bucket_size=4)
    assert 0 < len(small) <= small.capacity == 12
    check_invariants(small)


def corrupt_variants(text):
    doc = json.loads(text)
    flipped = text.replace('"tried":true', '"tried":false', 1)
    assert flipped != text
    future = dict(doc, version=2)
    bad_entry = dict(doc)
    bad_entry["body"] = dict(doc["body"], entries=[{"address": "nowhere"}])
    bad_entry["checksum"] = jsonfile.checksum(bad_entry["body"])
    return {
        "flipped": flipped.encode(),
        "truncated": text[: len(text) // 2].encode(),
        "empty": b"",
        "garbage": b"\xff\xfe\x00binary",
        "not_a_book": json.dumps({"hello": 1}).encode(),
        "future_version": json.dumps(future).encode(),
        "bad_entry": json.dumps(bad_entry).encode(),
    }


@pytest.mark.parametrize("kind", ["flipped", "truncated", "empty", "garbage", "not_a_book",
                                  "future_version", "bad_entry"])
def test_a_corrupt_file_is_never_loaded_silently(tmp_path, caplog, kind):
    path = tmp_path / "addrbook.json"
    data = corrupt_variants(addressfile.to_json(populated_book()))[kind]
    path.write_bytes(data)
    with pytest.raises(AddressBookCorrupt):
        load(str(path))
    caplog.clear()
    book = load_or_quarantine(str(path), SECRET)
    assert len(book) == 0 and book.anchors == [] and book.secret == SECRET
    assert not path.exists() and (tmp_path / "addrbook.json.bak").read_bytes() == data
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "gp2p.addressfile"]
    assert len(warnings) == 1 and "corrupt" in warnings[0].getMessage()


def test_load_or_quarantine_without_a_file_starts_empty(tmp_path, caplog):
    book = load_or_quarantine(str(tmp_path / "missing.json"))
    assert len(book) == 0 and len(book.secret) == 32
    assert not any(r.levelno >= logging.WARNING for r in caplog.records)
    with pytest.raises(FileNotFoundError):
        load(str(tmp_path / "missing.json"))
    path = str(tmp_path / "addrbook.json")
    save(populated_book(), path)
    assert len(load_or_quarantine(path)) == len(populated_book())


def test_a_node_that_evicts_us_is_left_alone_longer_each_time():
    book = make_book()
    address = "127.5.0.1:7000"
    book.add(address, None, "127.9.0.1", T0)
    book.good(address, T0)
    assert book.evicted(address, T0) and not book.evicted("127.5.0.9:7000", T0)
    assert book.retry_at(address) == T0 + EVICTED_BASE
    book.good(address, T0 + EVICTED_BASE)  # a completed handshake does not reset it
    book.evicted(address, T0 + EVICTED_BASE)
    assert book.retry_at(address) == T0 + 3 * EVICTED_BASE
    later = T0 + EVICTED_BASE + EVICTED_CAP + 1  # forgotten after a quiet spell
    book.evicted(address, later)
    assert book.retry_at(address) == later + EVICTED_BASE
    assert book.select(later + 1, rng=random.Random(0)) is None
    assert book.select(later + EVICTED_BASE, rng=random.Random(0)) == address
