"""Ed25519 identities."""
import os
import stat

import pytest

from gp2p.identity import Identity, is_node_id, verify


def test_sign_and_verify():
    me = Identity()
    assert is_node_id(me.id)
    sig = me.sign(b"data")
    assert verify(me.id, sig, b"data")
    assert not verify(me.id, sig, b"other")
    assert not verify(Identity().id, sig, b"data")
    assert not verify("zz" * 32, sig, b"data")


def test_load_or_create_persists_with_mode_0600(tmp_path):
    path = str(tmp_path / "node.key")
    first = Identity.load_or_create(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert Identity.load_or_create(path).id == first.id


def test_corrupt_key_file_is_an_error(tmp_path):
    path = tmp_path / "node.key"
    path.write_bytes(b"short")
    with pytest.raises(ValueError):
        Identity.load_or_create(str(path))
