"""Atomic checkpoints: round trip, keep-last-K, a crash mid-write, torn and corrupt files, foreign configs."""

import json
import os

import numpy as np
import pytest

from minglm import checkpoint as ck
from minglm.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint


def _arrays(seed=0):
    rng = np.random.default_rng(seed)
    return {"model/w": rng.standard_normal((3, 4)).astype(np.float32), "optim/m": np.arange(5, dtype=np.float32),
            "ids": np.array([1, 2, 3], dtype=np.int64)}


def test_round_trip(tmp_path):
    arrays = _arrays()
    meta = {"model_config": {"d_model": 8}, "rng": {"state": 2**100 + 7}, "note": "é"}
    path = save_checkpoint(tmp_path, 5, arrays, meta)
    assert path == tmp_path / "step_5.json" and (tmp_path / "step_5.npz").is_file()
    record = json.loads(path.read_text())
    assert record["npz"] == "step_5.npz" and len(record["sha256"]) == 64
    assert record["arrays"]["model/w"] == {"shape": [3, 4], "dtype": "<f4"}
    for where in (tmp_path, path, tmp_path / "step_5.npz"):  # a folder, the record, or the npz
        c = load_checkpoint(where)
        assert c.step == 5 and c.meta == meta
        assert set(c.arrays) == set(arrays)
        for k, v in arrays.items():
            np.testing.assert_array_equal(c.arrays[k], v)
            assert c.arrays[k].dtype == v.dtype
    assert not list(tmp_path.glob("*.tmp"))


def test_keep_last_k(tmp_path):
    for step in range(1, 6):
        save_checkpoint(tmp_path, step, _arrays(step), {}, keep=2)
    assert ck.checkpoint_steps(tmp_path) == [4, 5]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_4.json", "step_4.npz", "step_5.json", "step_5.npz"]
    assert latest_checkpoint(tmp_path) == tmp_path / "step_5.json"
    with pytest.raises(ValueError, match="keep"):
        ck.prune_checkpoints(tmp_path, 0)


def test_crash_while_writing_the_npz_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, 1, _arrays(1), {"step": 1})
    real_replace = os.replace

    def dying_replace(src, dst):
        if str(dst).endswith("step_2.npz"):
            raise OSError("simulated power loss")
        return real_replace(src, dst)

    monkeypatch.setattr(ck.os, "replace", dying_replace)
    with pytest.raises(OSError, match="power loss"):
        save_checkpoint(tmp_path, 2, _arrays(2), {"step": 2})
    monkeypatch.setattr(ck.os, "replace", real_replace)
    assert not (tmp_path / "step_2.npz").exists() and not (tmp_path / "step_2.json").exists()
    assert not list(tmp_path.glob(".*.tmp"))  # the temp file was removed
    c = load_checkpoint(tmp_path)
    assert c.step == 1
    np.testing.assert_array_equal(c.arrays["model/w"], _arrays(1)["model/w"])


def test_crash_before_the_json_leaves_an_ignored_npz(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, 1, _arrays(1), {})

    def dying_json(path, obj, **kw):
        raise OSError("killed before the commit record")

    monkeypatch.setattr(ck, "write_json_atomic", dying_json)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, 2, _arrays(2), {})
    assert (tmp_path / "step_2.npz").exists() and not (tmp_path / "step_2.json").exists()
    assert latest_checkpoint(tmp_path) == tmp_path / "step_1.json"


def test_torn_and_corrupt_npz_are_refused(tmp_path):
    save_checkpoint(tmp_path, 1, _arrays(1), {})
    save_checkpoint(tmp_path, 2, _arrays(2), {})
    npz = tmp_path / "step_2.npz"
    data = npz.read_bytes()
    npz.write_bytes(data[: len(data) // 2])  # truncated, as by a crash during a non-atomic copy
    with pytest.raises(CheckpointError, match="corrupt or torn"):
        load_checkpoint(tmp_path / "step_2.json")
    assert latest_checkpoint(tmp_path) == tmp_path / "step_1.json"  # the newest *valid* one
    assert load_checkpoint(tmp_path).step == 1
    flipped = bytearray(data)
    flipped[len(flipped) // 2] ^= 0xFF  # one flipped byte, same length
    npz.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_checkpoint(npz)
    npz.unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(tmp_path / "step_2.json")


def test_a_valid_hash_with_a_bad_zip_is_a_clear_error(tmp_path):
    path = save_checkpoint(tmp_path, 1, _arrays(), {})
    (tmp_path / "step_1.npz").write_bytes(b"not a zip at all")
    record = json.loads(path.read_text())
    record["sha256"] = ck.sha256_file(tmp_path / "step_1.npz")  # a record that matches garbage
    path.write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(path)


def test_bad_records(tmp_path):
    path = save_checkpoint(tmp_path, 3, _arrays(), {})
    path.write_text("{not json")
    with pytest.raises(CheckpointError, match="not a readable JSON"):
        load_checkpoint(path)
    path.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(CheckpointError, match="not a minglm-checkpoint"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "step_99.json")
    with pytest.raises(CheckpointError, match="no valid checkpoint"):
        load_checkpoint(tmp_path)  # the only record is broken


def test_expectations_are_checked_before_returning(tmp_path):
    save_checkpoint(tmp_path, 1, _arrays(), {"model_config": {"d_model": 8, "n_layer": 2}, "vocab_sha256": "aa"})
    ok = load_checkpoint(tmp_path, expect={"model_config": {"d_model": 8, "n_layer": 2}, "vocab_sha256": "aa"})
    assert ok.step == 1
    with pytest.raises(CheckpointError, match=r"another model_config \(d_model: checkpoint 8 vs expected 16"):
        load_checkpoint(tmp_path, expect={"model_config": {"d_model": 16, "n_layer": 2}})
    with pytest.raises(CheckpointError, match="another vocab_sha256"):
        load_checkpoint(tmp_path, expect={"vocab_sha256": "bb"})
    with pytest.raises(CheckpointError, match="shape"):
        load_checkpoint(tmp_path, expect_arrays={"model/w": (4, 3)})
    with pytest.raises(CheckpointError, match="no array"):
        load_checkpoint(tmp_path, expect_arrays={"model/nope": (1,)})


def test_save_refuses_what_cannot_round_trip(tmp_path):
    with pytest.raises(ValueError, match="object"):
        save_checkpoint(tmp_path, 1, {"x": np.array([{"a": 1}], dtype=object)}, {})
    with pytest.raises(ValueError, match="JSON"):
        save_checkpoint(tmp_path, 1, _arrays(), {"bad": object()})
    with pytest.raises(ValueError, match="step"):
        save_checkpoint(tmp_path, -1, _arrays(), {})


def test_a_record_must_agree_with_its_file_name_and_its_meta(tmp_path):
    """An edited meta.step = 999 was accepted and resumed at the wrong point of the schedule."""
    save_checkpoint(tmp_path, 3, _arrays(3), {"step": 3})
    path = save_checkpoint(tmp_path, 6, _arrays(6), {"step": 6})
    record = json.loads(path.read_text())
    record["meta"]["step"] = 999
    path.write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match="meta says step 999"):
        load_checkpoint(path)
    assert latest_checkpoint(tmp_path) == tmp_path / "step_3.json"  # the newest that verifies
    record["meta"]["step"] = record["step"] = 9
    path.write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match="records step 9, its file name says 6"):
        load_checkpoint(path)
    path_problems = ck.checkpoint_problems(tmp_path)
    assert path_problems[0] == tmp_path / "step_3.json" and "step_6.json" in path_problems[1][0]


def test_no_write_goes_through_a_symbolic_link(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / "step_1.npz").symlink_to(victim)
    with pytest.raises(ValueError, match="symbolic link"):
        save_checkpoint(tmp_path, 1, _arrays(), {})
    with pytest.raises(ValueError, match="symbolic link"):
        ck.write_json_atomic(tmp_path / "step_1.npz", {"a": 1})
    assert victim.read_text() == "precious" and not list(tmp_path.glob(".*.tmp"))
