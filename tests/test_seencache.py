"""The seen-cache, pure: new and duplicate ids, expiry at 1.5 x ttl, the acceptance window for
origin timestamps, and eviction under capacity pressure."""
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gp2p.seencache import SeenCache

pytestmark = pytest.mark.timeout(60)


def test_add_says_whether_an_id_is_new():
    cache = SeenCache(ttl=10)
    assert cache.add("a", 0.0) is True
    assert cache.add("a", 1.0) is False
    assert cache.add("b", 1.0) is True
    assert "a" in cache and "b" in cache and "c" not in cache
    assert len(cache) == 2
    assert cache.evicted == 0


def test_an_id_is_kept_for_one_and_a_half_ttl():
    cache = SeenCache(ttl=10)
    cache.add("a", 0.0)
    cache.add("other", 14.99)  # expiry runs when an id is added
    assert "a" in cache
    assert cache.add("a", 14.99) is False
    cache.add("later", 15.0)
    assert "a" not in cache
    assert cache.add("a", 15.0) is True  # forgotten: new again
    assert cache.evicted == 0  # expiry is not eviction


def test_expiry_drops_every_due_id_and_only_those():
    cache = SeenCache(ttl=2)  # kept for 3 s
    for i in range(10):
        cache.add(f"id{i}", i * 0.3)  # 0.0 .. 2.7: none due yet
    assert len(cache) == 10
    cache.add("now", 4.0)  # those first seen at 0.0 .. 0.9 are due (0.9 + 3 <= 4.0)
    assert [f"id{i}" in cache for i in range(10)] == [False] * 4 + [True] * 6
    assert len(cache) == 7


def test_acceptable_window_is_from_ttl_behind_to_half_ttl_ahead():
    cache = SeenCache(ttl=100)
    now = 1_000_000.0
    assert cache.acceptable(now, now)
    assert cache.acceptable(now - 100, now)
    assert not cache.acceptable(now - 100.001, now)
    assert cache.acceptable(now + 50, now)
    assert not cache.acceptable(now + 50.001, now)
    assert not cache.acceptable(0.0, now)
    assert not cache.acceptable(float("inf"), now)
    assert not cache.acceptable(float("-inf"), now)
    assert not cache.acceptable(float("nan"), now)


def test_capacity_evicts_the_oldest_and_counts_it():
    cache = SeenCache(ttl=10, capacity=3)
    for i, name in enumerate("abc"):
        assert cache.add(name, float(i))
    assert cache.add("d", 3.0)
    assert len(cache) == 3 and cache.evicted == 1
    assert "a" not in cache and all(n in cache for n in "bcd")
    assert cache.add("e", 3.0) and cache.evicted == 2 and "b" not in cache
    assert cache.add("a", 4.0) is True  # evicted early: it reads as new again
    assert cache.evicted == 3
    # duplicates neither grow the cache nor evict
    assert cache.add("a", 4.0) is False
    assert len(cache) == 3 and cache.evicted == 3


def test_expired_ids_make_room_before_anything_is_evicted():
    cache = SeenCache(ttl=2, capacity=3)  # kept for 3 s
    cache.add("a", 0.0)
    cache.add("b", 0.0)
    cache.add("c", 1.0)
    cache.add("d", 3.0)  # a and b are due: no eviction needed
    assert cache.evicted == 0
    assert sorted(n for n in "abcd" if n in cache) == ["c", "d"]


@pytest.mark.parametrize("ttl, capacity", [(0, 10), (-1, 10), (10, 0), (10, -5)])
def test_ttl_and_capacity_must_be_positive(ttl, capacity):
    with pytest.raises(ValueError):
        SeenCache(ttl=ttl, capacity=capacity)


@given(ttl=st.floats(0.5, 1000),
       first_seen=st.floats(0, 1e6),
       ts_offset=st.floats(-1, 0.5),
       later=st.lists(st.floats(0, 1), min_size=1, max_size=20))
def test_an_id_is_never_forgotten_while_a_copy_is_still_acceptable(ttl, first_seen, ts_offset, later):
    """Whatever the origin timestamp of the first copy, every later copy the window still
    accepts is recognised as a duplicate, however much traffic came in between."""
    cache = SeenCache(ttl=ttl)
    ts = first_seen + ts_offset * ttl  # acceptable when first seen
    assert cache.acceptable(ts, first_seen)
    assert cache.add("x", first_seen)
    for i, fraction in enumerate(sorted(later)):
        now = first_seen + fraction * 2 * ttl
        cache.add(f"filler{i}", now)  # traffic in between runs the expiry
        if cache.acceptable(ts, now):
            assert cache.add("x", now) is False
