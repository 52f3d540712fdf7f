"""Checkpoint storage: atomic writes, manifest checks, corruption detection and pruning."""

import torch

from plait.train import checkpoint as ckpt


def write(root, step):
    return ckpt.write_checkpoint(root, step, {"model.pt": {"w": torch.arange(1000.0) * step},
                                              "trainer.json": {"step": step}, "config.toml": "x = 1\n"})


def test_round_trip(tmp_path):
    path = write(tmp_path, 3)
    assert path.name == "step-00000003" and ckpt.problem_with(path) is None
    assert torch.equal(ckpt.read_file(path, "model.pt")["w"], torch.arange(1000.0) * 3)
    assert ckpt.read_file(path, "trainer.json") == {"step": 3}
    assert ckpt.read_file(path, "config.toml") == "x = 1\n"


def test_truncated_file_falls_back_to_previous(tmp_path):
    write(tmp_path, 5)
    newest = write(tmp_path, 10)
    model = newest / "model.pt"
    model.write_bytes(model.read_bytes()[:100])
    found, rejected = ckpt.newest_valid(tmp_path)
    assert found.name == "step-00000005"
    assert rejected[0][0] == newest and "truncated" in rejected[0][1]


def test_flipped_byte_and_missing_manifest_are_detected(tmp_path):
    path = write(tmp_path, 1)
    data = bytearray((path / "model.pt").read_bytes())
    data[-20] ^= 0xFF
    (path / "model.pt").write_bytes(bytes(data))
    assert "sha256" in ckpt.problem_with(path)
    other = write(tmp_path, 2)
    (other / "manifest.json").unlink()
    assert "no manifest" in ckpt.problem_with(other)
    assert ckpt.newest_valid(tmp_path)[0] is None


def test_interrupted_write_is_invisible_and_cleaned_up(tmp_path):
    write(tmp_path, 1)
    (tmp_path / ".tmp-step-00000002-999").mkdir()  # a crash mid-write leaves only this
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-00000001"]
    write(tmp_path, 3)
    assert not list(tmp_path.glob(".tmp-*"))


def test_rewriting_a_step_replaces_it_and_prune_keeps_the_newest(tmp_path):
    for step in (1, 2, 3, 4):
        write(tmp_path, step)
    write(tmp_path, 4)
    assert ckpt.problem_with(tmp_path / "step-00000004") is None
    removed = ckpt.prune(tmp_path, keep=2)
    assert sorted(p.name for p in removed) == ["step-00000001", "step-00000002"]
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-00000004", "step-00000003"]
