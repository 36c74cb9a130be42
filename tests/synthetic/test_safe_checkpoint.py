"""`safe_load`: PyTorch Lightning checkpoints read without pytorch_lightning, pickles that run code refused unrun."""

import builtins
import gc
import os
import sys
import types
from collections import OrderedDict
from contextlib import contextmanager

import numpy as np
import pytest
import torch

from hf_distill.synthetic.safe_checkpoint import PickledObject, UnsafeCheckpointError, safe_load

CALLBACK_MODULE = "pytorch_lightning.callbacks.model_checkpoint"


@contextmanager
def throwaway_pytorch_lightning(marker=None):
    """
    Register a fake `pytorch_lightning.callbacks.model_checkpoint` module in `sys.modules` and yield its
    `ModelCheckpoint` class; the modules are removed on exit. Every method of the class that unpickling could call
    writes `marker`, if given.
    """

    def touch(*args, **kwargs):
        if marker is not None:
            marker.write_text("code from the checkpoint ran")

    class ModelCheckpoint:
        def __init__(self, monitor=None):
            self.monitor = monitor

        def __new__(cls, *args, **kwargs):
            touch()
            return super().__new__(cls)

        def __setstate__(self, state):
            touch()
            self.__dict__.update(state)

    names = ["pytorch_lightning", "pytorch_lightning.callbacks", CALLBACK_MODULE]
    assert not any(name in sys.modules for name in names)
    modules = {name: types.ModuleType(name) for name in names}
    ModelCheckpoint.__module__ = CALLBACK_MODULE
    ModelCheckpoint.__qualname__ = "ModelCheckpoint"
    modules[CALLBACK_MODULE].ModelCheckpoint = ModelCheckpoint
    sys.modules.update(modules)
    try:
        yield ModelCheckpoint
    finally:
        for name in names:
            del sys.modules[name]


def lightning_checkpoint(state_dict: dict, model_checkpoint: type) -> dict:
    """The top-level entries of a PyTorch Lightning 1.4 checkpoint (`CheckpointConnector.dump_checkpoint`), with a
    real AdamW state and LambdaLR state; the callback states are keyed by the callback class, as in Lightning 1.4."""
    parameter = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([parameter], lr=1e-4)
    parameter.sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return {
        "epoch": 4,
        "global_step": 1250,
        "pytorch-lightning_version": "1.4.2",
        "state_dict": OrderedDict(state_dict),
        "callbacks": {
            model_checkpoint: {
                "monitor": None,
                "best_model_score": torch.tensor(0.125),
                "best_model_path": "/logs/checkpoints/last.ckpt",
                "current_score": None,
                "dirpath": "/logs/checkpoints",
            }
        },
        "optimizer_states": [optimizer.state_dict()],
        "lr_schedulers": [scheduler.state_dict()],
    }


def test_lightning_checkpoint_loads_without_pytorch_lightning_or_its_code(tmp_path):
    marker = tmp_path / "marker"
    weights = {"model.weight": torch.randn(4, 3, generator=torch.Generator().manual_seed(0))}
    with throwaway_pytorch_lightning(marker) as model_checkpoint:
        checkpoint = lightning_checkpoint(weights, model_checkpoint)
        instance = model_checkpoint.__new__(model_checkpoint)
        instance.__dict__.update(monitor="val/loss", best_k_models={"a.ckpt": torch.tensor(0.5)})
        checkpoint["loops"] = instance  # an object: pickled as the class, NEWOBJ and its state, BUILD
        checkpoint["numpy"] = {"scalar": np.float64(0.25), "array": np.arange(6, dtype=np.int16).reshape(2, 3)}
        marker.unlink()
        torch.save(checkpoint, tmp_path / "last.ckpt")

        # Even with the class importable, the safe loader does not use it: no __new__ or __setstate__ of it runs.
        loaded = safe_load(tmp_path / "last.ckpt")
    assert not marker.exists()
    assert "pytorch_lightning" not in sys.modules

    torch.testing.assert_close(loaded["state_dict"]["model.weight"], weights["model.weight"], rtol=0, atol=0)
    assert (loaded["epoch"], loaded["global_step"], loaded["pytorch-lightning_version"]) == (4, 1250, "1.4.2")
    (placeholder_class, callback_state), *others = loaded["callbacks"].items()
    assert others == [] and issubclass(placeholder_class, PickledObject)
    assert f"{placeholder_class.__module__}.{placeholder_class.__qualname__}" == f"{CALLBACK_MODULE}.ModelCheckpoint"
    assert callback_state["best_model_score"].item() == 0.125
    assert type(loaded["loops"]) is placeholder_class and loaded["loops"].args == ()
    assert loaded["loops"].state["monitor"] == "val/loss"
    assert loaded["loops"].state["best_k_models"]["a.ckpt"].item() == 0.5
    assert loaded["optimizer_states"][0]["state"][0]["exp_avg"].shape == (3,)
    assert loaded["lr_schedulers"][0]["last_epoch"] == 0
    assert loaded["numpy"]["scalar"] == 0.25 and type(loaded["numpy"]["scalar"]) is np.float64
    np.testing.assert_array_equal(loaded["numpy"]["array"], np.arange(6, dtype=np.int16).reshape(2, 3))
    with pytest.raises(UnsafeCheckpointError, match=f"calls `{CALLBACK_MODULE}.ModelCheckpoint`"):
        placeholder_class("a call, as a pickle REDUCE would make")


class WritesMarker:
    """Unpickles as a call of `func(*args)`, the way a malicious pickle runs code."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def code_running_objects(marker) -> dict:
    return {
        "exec": WritesMarker(builtins.exec, f"open({str(marker)!r}, 'w').write('ran')"),
        "os.system": WritesMarker(os.system, f"touch {marker}"),
        "print": WritesMarker(print, "a call of a builtin outside the allowlist"),
    }


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("exec", "calls `builtins.exec` while it is loaded"),
        ("os.system", "GLOBAL posix.system whose module posix is blocked"),
        ("print", "calls `builtins.print` while it is loaded"),
    ],
)
def test_a_pickle_that_would_execute_code_is_refused_without_running_it(tmp_path, name, message):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "callbacks": code_running_objects(marker)[name]}, path)
    with pytest.raises(UnsafeCheckpointError, match=message):
        safe_load(path)
    assert not marker.exists()

    if name != "print":  # the same file, fully unpickled, does run the code: the test pickle is a real exploit
        torch.load(path, weights_only=False)
        assert marker.exists()


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads the resident memory from /proc")
def test_only_the_tensors_used_are_read_into_memory(tmp_path):
    size = 192 * 2**20
    path = tmp_path / "full.ckpt"
    big = torch.full((size // 4,), 3.0)
    torch.save({"state_dict": {"small": torch.arange(4.0)}, "optimizer_states": [{"exp_avg": big}]}, path)
    del big
    gc.collect()

    def resident_bytes() -> int:
        with open("/proc/self/statm") as stream:
            return int(stream.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    before = resident_bytes()
    loaded = safe_load(path)
    torch.testing.assert_close(loaded["state_dict"]["small"], torch.arange(4.0))
    assert loaded["optimizer_states"][0]["exp_avg"][-1].item() == 3.0  # readable: one page is read
    assert resident_bytes() - before < size // 4  # not read whole: memory-mapped


def test_legacy_checkpoints_and_other_files(tmp_path):
    legacy = tmp_path / "legacy.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "step": np.int64(3)}, legacy, _use_new_zipfile_serialization=False)
    loaded = safe_load(legacy)
    assert loaded["state_dict"]["w"].tolist() == [1.0, 1.0] and loaded["step"] == 3

    with throwaway_pytorch_lightning() as model_checkpoint:
        torch.save({"callbacks": {model_checkpoint: {}}}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(UnsafeCheckpointError, match=f"GLOBAL {CALLBACK_MODULE}.ModelCheckpoint"):
        safe_load(legacy)

    (tmp_path / "notes.ckpt").write_text("not a checkpoint")
    with pytest.raises(UnsafeCheckpointError):
        safe_load(tmp_path / "notes.ckpt")
