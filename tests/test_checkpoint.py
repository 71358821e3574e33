"""Atomic checkpoints: manifests, corruption detection, resume selection, pruning."""

import logging

import pytest

from rewardtune.checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    prune_checkpoints,
    save_checkpoint,
    verify_checkpoint,
)
from rewardtune.errors import CheckpointError


def _writer(payload: bytes):
    def write(directory):
        (directory / "weights.bin").write_bytes(payload)
        (directory / "sub").mkdir()
        (directory / "sub" / "state.json").write_text("{}")

    return write


def test_save_writes_manifest_and_verifies(tmp_path):
    path = save_checkpoint(tmp_path, 3, "regular", _writer(b"abc"), {"k": 1})
    manifest = verify_checkpoint(path)
    assert path.name == "epoch-000003" and manifest["epochs_done"] == 3 and manifest["meta"] == {"k": 1}
    assert set(manifest["files"]) == {"weights.bin", "sub/state.json"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]


def test_flipped_byte_is_detected(tmp_path):
    path = save_checkpoint(tmp_path, 1, "regular", _writer(b"abc"), {})
    (path / "weights.bin").write_bytes(b"abd")
    with pytest.raises(CheckpointError, match="sha256"):
        verify_checkpoint(path)


def test_failed_write_leaves_nothing_loadable(tmp_path):
    def crash(directory):
        (directory / "weights.bin").write_bytes(b"partial")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        save_checkpoint(tmp_path, 1, "regular", crash, {})
    assert list_checkpoints(tmp_path) == [] and latest_checkpoint(tmp_path) is None


def test_latest_skips_broken_and_pre_reset(tmp_path, caplog):
    save_checkpoint(tmp_path, 1, "regular", _writer(b"1"), {})
    save_checkpoint(tmp_path, 2, "pre_reset", _writer(b"2"), {})
    good = save_checkpoint(tmp_path, 2, "post_reset", _writer(b"2"), {})
    broken = save_checkpoint(tmp_path, 3, "regular", _writer(b"3"), {})
    (broken / "manifest.json").unlink()
    with caplog.at_level(logging.WARNING):
        path, manifest = latest_checkpoint(tmp_path)
    assert path == good and manifest["kind"] == "post_reset"
    assert "never completed" in caplog.text


def test_prune_keeps_reset_checkpoints(tmp_path):
    for epoch in range(1, 5):
        save_checkpoint(tmp_path, epoch, "regular", _writer(b"x"), {})
    save_checkpoint(tmp_path, 2, "pre_reset", _writer(b"x"), {})
    prune_checkpoints(tmp_path, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["epoch-000002-pre-reset", "epoch-000003", "epoch-000004"]


def test_a_file_named_like_a_checkpoint_is_skipped_with_a_warning(tmp_path, caplog):
    good = save_checkpoint(tmp_path, 1, "regular", _writer(b"1"), {})
    (tmp_path / "epoch-000002.tar").write_bytes(b"an archived checkpoint")
    with caplog.at_level(logging.WARNING):
        path, _ = latest_checkpoint(tmp_path)
    assert path == good
    assert "epoch-000002.tar: named like a checkpoint but not a directory" in caplog.text


def test_evaluate_warns_about_a_file_named_like_a_checkpoint(tmp_path, caplog):
    from rewardtune.evaluate import checkpoint_names

    save_checkpoint(tmp_path / "checkpoints", 1, "regular", _writer(b"1"), {})
    (tmp_path / "checkpoints" / "epoch-000002").write_text("not a directory")
    with caplog.at_level(logging.WARNING):
        assert checkpoint_names(tmp_path) == ["base", "epoch-000001"]
    assert "named like a checkpoint but not a directory" in caplog.text
