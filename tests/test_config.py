"""Config validation and address parsing."""
import pytest

import gp2p
from gp2p.backoff import backoff_delay
from gp2p.config import Config, parse_address, parse_listen


def test_defaults_match_the_contract():
    c = Config()
    assert (c.heartbeat_interval, c.peer_timeout, c.handshake_timeout, c.connect_timeout) == (2.0, 5.0, 10, 5)
    assert c.send_timeout == c.peer_timeout
    assert (c.max_inbound, c.max_pending, c.max_per_ip, c.target_outbound) == (125, 64, 8, 8)
    assert c.max_frame_size == 4 * 1024 * 1024
    assert (c.handler_concurrency, c.max_requests_per_peer, c.seen_ttl, c.max_hops) == (100, 256, 120, 64)
    assert c.out_queue_bytes == 8 * 1024 * 1024
    assert c.datadir is None and c.codec == "msgpack"


def test_lists_accept_commas_and_repeats():
    c = Config(bootstrap="127.0.0.1:1,127.0.0.1:2", persistent_peers=["127.0.0.1:3", "127.0.0.1:4,127.0.0.1:5"])
    assert c.bootstrap == ["127.0.0.1:1", "127.0.0.1:2"]
    assert len(c.persistent_peers) == 3


@pytest.mark.parametrize("fields", [
    {"peer_timeout": 3.0, "heartbeat_interval": 2.0},
    {"codec": "xml"}, {"max_inbound": -1}, {"handler_concurrency": 0},
    {"bootstrap": ["nohost"]}, {"listen": "127.0.0.1:99999"}, {"network_id": ""},
    {"max_frame_size": 10}, {"out_queue_bytes": 100},
])
def test_bad_values_are_refused(fields):
    with pytest.raises(ValueError):
        Config(**fields)


def test_listen_specs():
    assert parse_listen("127.0.0.5:0") == ("127.0.0.5", [0])
    assert parse_listen("127.0.0.5:7000-7003") == ("127.0.0.5", [7000, 7001, 7002, 7003])
    assert parse_listen("127.0.0.5:7000,7003,7010") == ("127.0.0.5", [7000, 7003, 7010])
    assert parse_address("[::1]:7001") == ("::1", 7001)
    with pytest.raises(ValueError):
        parse_listen("127.0.0.5:7003-7000")


def test_source_address_defaults_to_specific_listen_host():
    assert Config(listen="127.0.0.9:0").source_host == "127.0.0.9"
    assert Config(listen="0.0.0.0:0").source_host is None
    assert Config(listen=None).source_host is None
    assert Config(listen="127.0.0.9:0", source_address="127.0.0.8").source_host == "127.0.0.8"


def test_node_refuses_config_and_fields_together():
    with pytest.raises(TypeError):
        gp2p.Node(config=Config(), listen="127.0.0.1:0")


def test_backoff_grows_caps_and_jitters():
    assert backoff_delay(0) == 0
    assert backoff_delay(1, base=1, draw=0.5) == 1
    assert backoff_delay(4, base=1, draw=0.5) == 8
    assert backoff_delay(50, base=1, cap=60, draw=0.5) == 60
    assert backoff_delay(3, base=1, draw=0.0) == 2 and backoff_delay(3, base=1, draw=0.999) < 6


def test_replace_keeps_a_defaulted_send_timeout_following_peer_timeout():
    c = Config().replace(peer_timeout=12.0)
    assert c.send_timeout == 12.0
    assert Config(send_timeout=3.0).replace(peer_timeout=12.0).send_timeout == 3.0
