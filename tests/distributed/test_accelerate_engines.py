"""The UNIC student through the sharding engines' own preparation code, as `accelerate launch` with the configs of
recipes/accelerate_configs runs it on GPUs (both failed on an H200 before):

- FSDP2: accelerate's `fsdp2_prepare_model` with the wrap policy of fsdp.yaml, in a gloo process on CPU, shards the
  student and gives the unsharded step's loss and gradients. It used to fail inside torch's device mesh: the student
  named the backbone's patch embedding as its input embedding, which accelerate shards a second time.
- DeepSpeed ZeRO-3 (not installed here): with ZeRO-3 initialisation active, the student is built as one plain module,
  never half inside `zero.Init` (a bf16-partitioned backbone next to fp32 heads made DeepSpeed's optimizer fail).
"""

import os
import socket
import types

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import transformers.modeling_utils
import yaml

from hf_distill.models import UnicStudentConfig, UnicStudentModel

from ..conftest import tiny_vit_config
from ..unic_steps import IMAGE, MEAN, STD, build_student, build_teachers, unic_step

pytestmark = pytest.mark.distributed

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "recipes", "accelerate_configs")


def fsdp_plugin():
    """accelerate's FSDP plugin with the sharding options of recipes/accelerate_configs/fsdp.yaml."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    with open(os.path.join(CONFIGS, "fsdp.yaml")) as handle:
        options = yaml.safe_load(handle)["fsdp_config"]
    return FullyShardedDataParallelPlugin(
        fsdp_version=options["fsdp_version"],
        auto_wrap_policy=options["fsdp_auto_wrap_policy"].lower(),
        reshard_after_forward=options["fsdp_reshard_after_forward"],
        state_dict_type=options["fsdp_state_dict_type"],
    )


def pixels() -> torch.Tensor:
    generator = torch.Generator().manual_seed(7)
    return (torch.rand(4, 3, IMAGE, IMAGE, generator=generator) - MEAN.view(1, 3, 1, 1)) / STD.view(1, 3, 1, 1)


def _worker(rank: int, port: int, out_dir: str) -> None:
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model
    from torch.distributed.fsdp import FSDPModule

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=1)
    try:
        teachers = build_teachers()
        accelerator = types.SimpleNamespace(
            state=types.SimpleNamespace(fsdp_plugin=fsdp_plugin()),
            torch_device_mesh=None,
            mixed_precision="no",
            is_main_process=True,
            device=torch.device("cpu"),
        )
        student = fsdp2_prepare_model(accelerator, build_student(teachers))
        units = [name for name, module in student.named_modules() if isinstance(module, FSDPModule)]
        loss = unic_step(student, teachers, pixels())
        loss.backward()
        grads = {name: p.grad.full_tensor() for name, p in student.named_parameters() if p.grad is not None}
        torch.save({"units": units, "loss": loss.detach(), "grads": grads}, os.path.join(out_dir, "rank0.pt"))
    finally:
        dist.destroy_process_group()


def test_accelerate_fsdp2_preparation_shards_the_student_and_keeps_its_step(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_worker, args=(port, str(tmp_path)), nprocs=1, join=True)
    record = torch.load(tmp_path / "rank0.pt", weights_only=False)
    # the root, the embeddings and every transformer block are FSDP units (the policy of fsdp.yaml)
    assert "" in record["units"] and "backbone.embeddings" in record["units"]
    assert sum(name.startswith("backbone.layers.") for name in record["units"]) == 2

    teachers = build_teachers()
    student = build_student(teachers)
    loss = unic_step(student, teachers, pixels())
    loss.backward()
    torch.testing.assert_close(record["loss"], loss.detach(), rtol=1e-5, atol=1e-6)
    expected = {name: p.grad for name, p in student.named_parameters() if p.grad is not None}
    assert record["grads"].keys() == expected.keys()
    for name, grad in expected.items():
        torch.testing.assert_close(record["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_student_is_built_plain_under_zero3_initialisation(monkeypatch):
    """transformers' `from_config` enters `deepspeed.zero.Init` when ZeRO-3 initialisation is active (here it would
    import DeepSpeed, which is not installed): the student must not."""
    config = UnicStudentConfig(
        backbone_config=tiny_vit_config(), teachers=[{"name": "t", "summary_dim": 8, "patch_dim": 8}]
    )
    torch.manual_seed(0)
    reference = UnicStudentModel(config)
    monkeypatch.setattr(transformers.modeling_utils, "is_deepspeed_zero3_enabled", lambda: True)
    torch.manual_seed(0)
    student = UnicStudentModel(config)
    assert {p.dtype for p in student.parameters()} == {torch.float32}
    assert not any(hasattr(p, "ds_id") for p in student.parameters())
    for (name, value), expected in zip(student.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(value, expected, rtol=0, atol=0, msg=name)
