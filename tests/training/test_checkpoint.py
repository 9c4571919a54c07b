"""Checkpoint housekeeping: what counts as complete, pruning, and leftovers of killed saves."""

from __future__ import annotations

from pathlib import Path

from mopd.training.checkpoint import (
    COMPLETE,
    _prune,
    checkpoint_dir,
    clean_checkpoints,
    is_complete,
    latest_checkpoint,
)


def _fake(run_dir: Path, step: int, *, marker: bool = True, state: bool = True) -> Path:
    ckpt = checkpoint_dir(run_dir, step)
    (ckpt / "student").mkdir(parents=True)
    if state:
        (ckpt / "trainer_state.pt").write_bytes(b"x")
    if marker:
        (ckpt / COMPLETE).write_text(str(step))
    return ckpt


def test_complete_needs_the_marker_and_the_trainer_state(tmp_path):
    assert is_complete(_fake(tmp_path, 1))
    assert not is_complete(_fake(tmp_path, 2, marker=False))
    # What an interrupted prune of an older format could leave: marker, no state.
    assert not is_complete(_fake(tmp_path, 3, state=False))


def test_latest_skips_a_marked_folder_without_state(tmp_path):
    _fake(tmp_path, 1)
    _fake(tmp_path, 2, state=False)
    (tmp_path / "checkpoints" / "latest").write_text("step-000002")
    assert latest_checkpoint(tmp_path) == checkpoint_dir(tmp_path, 1)


def test_prune_keeps_the_newest(tmp_path):
    for step in (1, 2, 3):
        _fake(tmp_path, step)
    _prune(tmp_path, keep_last=1)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000003"]


def test_clean_removes_temporary_and_incomplete_folders_only(tmp_path):
    good = _fake(tmp_path, 4)
    half_pruned = _fake(tmp_path, 2, marker=False)
    tmp = tmp_path / "checkpoints" / ".tmp-step-000006-123"
    (tmp / "student").mkdir(parents=True)
    (tmp_path / "checkpoints" / ".latest.tmp").write_text("step-000006")
    removed = clean_checkpoints(tmp_path)
    assert set(removed) == {half_pruned, tmp}
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [good.name]
    assert clean_checkpoints(tmp_path / "no-such-run") == []


def test_prune_keeps_the_newest_checkpoint_that_holds_a_model(tmp_path):
    final = _fake(tmp_path, 3)  # a finished LoRA run: its last checkpoint holds student/
    for step in (4, 5):  # then resumed: periodic checkpoints with the adapter alone
        (_fake(tmp_path, step) / "student").rmdir()
    _prune(tmp_path, keep_last=1)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == [final.name, "step-000005"]
