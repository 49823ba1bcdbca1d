"""The one atomic directory swap (``deltatune.atomic.atomic_directory``) and its callers:
adapters, training checkpoints and the GGUF cache all switch a finished directory in whole."""
from __future__ import annotations

import os

import pytest
import torch

from deltatune import atomic
from deltatune.atomic import atomic_directory
from deltatune.training.checkpoints import TrainState, load_checkpoint, save_checkpoint


def _tree(root) -> dict[str, str]:
    return {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*")) if p.is_file()}


def test_owned_none_replaces_the_whole_directory(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    (target / "sub").mkdir()
    (target / "sub" / "x").write_text("x")
    with atomic_directory(target) as tmp:
        (tmp / "new.txt").write_text("new")
    assert _tree(target) == {"new.txt": "new"}
    assert os.listdir(tmp_path) == ["out"]  # no temporary directory left beside it


def test_owned_entries_are_replaced_and_the_rest_carried(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "weights").write_text("old")
    (target / "README.md").write_text("mine")
    with atomic_directory(target, owned={"weights"}) as tmp:
        (tmp / "weights").write_text("new")
    assert _tree(target) == {"README.md": "mine", "weights": "new"}


def test_an_error_in_the_body_or_the_switch_leaves_the_old_directory(tmp_path, monkeypatch):
    target = tmp_path / "out"
    target.mkdir()
    (target / "a").write_text("old")
    (target / "README.md").write_text("mine")
    with pytest.raises(RuntimeError, match="body"):
        with atomic_directory(target) as tmp:
            (tmp / "a").write_text("half")
            raise RuntimeError("body")

    def broken(a, b):
        raise OSError("exchange failed")

    monkeypatch.setattr(atomic, "_exchange", broken)
    with pytest.raises(OSError, match="exchange failed"):
        with atomic_directory(target, owned={"a"}) as tmp:  # README.md is carried, then given back
            (tmp / "a").write_text("new")
    assert _tree(target) == {"README.md": "mine", "a": "old"}
    assert os.listdir(tmp_path) == ["out"]


def test_new_directory_is_created_with_mkdirs_mode(tmp_path):
    with atomic_directory(tmp_path / "deep" / "out") as tmp:
        (tmp / "f").write_text("1")
    mode = (tmp_path / "deep" / "out").stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o777 & ~umask  # not mkdtemp's 0700


def test_a_file_in_the_way_is_refused_by_name(tmp_path):
    (tmp_path / "out").write_text("a file")
    with pytest.raises(NotADirectoryError, match="out"):
        with atomic_directory(tmp_path / "out"):
            pass


def _checkpoint_inputs(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    return model, optimizer


def test_resaving_a_training_checkpoint_swaps_it_whole(tmp_path, monkeypatch):
    """A second save of the same step used to delete the old folder and then rename the new one in:
    a failure between the two lost the checkpoint. Now the old one stays until the switch."""
    model, optimizer = _checkpoint_inputs(0)
    path = save_checkpoint(tmp_path, TrainState(step=5), model, optimizer, {"run": 1})
    before = {name: (path / name).read_bytes() for name in os.listdir(path)}

    monkeypatch.setattr(atomic, "_exchange", lambda a, b: (_ for _ in ()).throw(OSError("disk gone")))
    other, other_opt = _checkpoint_inputs(1)
    with pytest.raises(OSError, match="disk gone"):
        save_checkpoint(tmp_path, TrainState(step=5), other, other_opt, {"run": 2})
    assert {name: (path / name).read_bytes() for name in os.listdir(path)} == before
    monkeypatch.undo()

    save_checkpoint(tmp_path, TrainState(step=5), other, other_opt, {"run": 2})
    fresh, fresh_opt = _checkpoint_inputs(2)
    state, config = load_checkpoint(path, fresh, fresh_opt)
    assert state.step == 5 and config == {"run": 2}
    torch.testing.assert_close(fresh.weight, other.weight, rtol=0, atol=0)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step-00000005"]
