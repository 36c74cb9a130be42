"""The distributed setup a run asked for against the one it got (hf_distill/distributed_checks.py): the silent
fallbacks seen with `accelerate launch` on a machine without a GPU are refused with a message, before loading."""

from types import SimpleNamespace

import pytest
import torch

from hf_distill.distributed_checks import (
    DistributedSetupError,
    RequestedSetup,
    RunningSetup,
    check_accelerator,
    check_distributed_setup,
    describe_setup,
    setup_problems,
)
from hf_distill.trainers import UnicConfig

from .conftest import load_recipe


def test_fsdp_config_with_use_cpu_running_ddp_is_refused():
    """`accelerate launch --config_file fsdp.yaml --num_processes 2 ... --use_cpu true`: accelerate runs MULTI_CPU."""
    requested = RequestedSetup(world_size=2, fsdp=True, cpu=True)
    running = RunningSetup("MULTI_CPU", num_processes=2, torch_world_size=2, device="cpu:0")
    (problem,) = setup_problems(requested, running, cuda_available=False)
    assert "FSDP was asked" in problem and "MULTI_CPU with 2 process(es)" in problem
    assert "full copy" in problem and "--multi_gpu" in problem  # what happens and the fix


def test_ranks_running_as_independent_jobs_are_refused():
    """`--use_cpu false` on a machine without a GPU: the launcher starts 2 ranks, each one runs alone."""
    requested = RequestedSetup(world_size=2)
    running = RunningSetup("NO", num_processes=1, torch_world_size=None, device="cpu")
    (problem,) = setup_problems(requested, running, cuda_available=False)
    assert "WORLD_SIZE=2" in problem and "independent one-process job" in problem
    assert "pass --use_cpu true" in problem
    # with GPUs seen, the advice is about the launch settings, not the device
    (problem,) = setup_problems(requested, running, cuda_available=True)
    assert "--num_processes" in problem and "--use_cpu true" not in problem


def test_torch_distributed_world_size_differing_from_accelerate_is_refused():
    """DeepSpeed with --use_cpu false on CPU: accelerate counts 1 process, torch.distributed 2."""
    requested = RequestedSetup(world_size=None, deepspeed=True)
    running = RunningSetup("DEEPSPEED", num_processes=1, torch_world_size=2, device="cpu")
    (problem,) = setup_problems(requested, running, cuda_available=False)
    assert "torch.distributed has 2 processes" in problem and "1 process(es)" in problem
    assert "pass --use_cpu true" in problem


def test_deepspeed_asked_but_not_active_is_refused():
    requested = RequestedSetup(world_size=2, deepspeed=True, cpu=True)
    running = RunningSetup("MULTI_CPU", num_processes=2, torch_world_size=2, device="cpu:0")
    (problem,) = setup_problems(requested, running, cuda_available=False)
    assert problem.startswith("DeepSpeed was asked") and "MULTI_CPU" in problem


@pytest.mark.parametrize(
    ("requested", "running"),
    [
        (RequestedSetup(), RunningSetup("NO", 1, None, "cpu")),  # python recipes/unic.py
        (RequestedSetup(world_size=1), RunningSetup("NO", 1, None, "cuda:0")),  # accelerate launch, one GPU
        (RequestedSetup(world_size=2, cpu=True), RunningSetup("MULTI_CPU", 2, 2, "cpu:0")),  # DDP on CPU
        (RequestedSetup(world_size=8, fsdp=True), RunningSetup("FSDP", 8, 8, "cuda:0")),
        (RequestedSetup(world_size=1, deepspeed=True), RunningSetup("DEEPSPEED", 1, 1, "cuda:0", zero_stage=3)),
    ],
)
def test_matching_setups_pass(requested, running):
    assert setup_problems(requested, running, cuda_available=running.device.startswith("cuda")) == []


def fake_args(kind: str, num_processes: int, **kwargs):
    state = SimpleNamespace(distributed_type=SimpleNamespace(value=kind))
    return SimpleNamespace(distributed_state=state, world_size=num_processes, device="cuda:0", **kwargs)


def test_running_setup_resolves_fsdp_as_the_accelerator_does():
    """accelerate turns MULTI_GPU into FSDP when FSDP is asked, never MULTI_CPU (its silent fallback)."""
    asked = RequestedSetup(world_size=2, fsdp=True)
    assert RunningSetup.from_args(fake_args("MULTI_GPU", 2), asked).distributed_type == "FSDP"
    assert RunningSetup.from_args(fake_args("MULTI_CPU", 2), asked).distributed_type == "MULTI_CPU"
    assert RunningSetup.from_args(fake_args("MULTI_GPU", 2), RequestedSetup(2)).distributed_type == "MULTI_GPU"
    # DeepSpeed: the Accelerator turns any type into DEEPSPEED (it runs on CPU too)
    asked = RequestedSetup(world_size=1, deepspeed=True, cpu=True)
    assert RunningSetup.from_args(fake_args("MULTI_CPU", 1), asked).distributed_type == "DEEPSPEED"
    plugin = SimpleNamespace(zero_stage=3)
    running = RunningSetup.from_args(fake_args("DEEPSPEED", 2, deepspeed_plugin=plugin), RequestedSetup(2))
    assert running.zero_stage == 3


def test_requested_setup_reads_the_launcher_environment_and_options():
    args = SimpleNamespace(fsdp=[], deepspeed=None, use_cpu=False)
    environ = {"WORLD_SIZE": "4", "ACCELERATE_USE_FSDP": "true", "ACCELERATE_USE_DEEPSPEED": "false"}
    assert RequestedSetup.from_args(args, environ) == RequestedSetup(world_size=4, fsdp=True)
    args = SimpleNamespace(fsdp=[], deepspeed="ds.json", use_cpu=True)
    assert RequestedSetup.from_args(args, {}) == RequestedSetup(deepspeed=True, cpu=True)


@pytest.mark.parametrize(
    ("running", "teachers", "expected"),
    [
        (RunningSetup("FSDP", 8, 8, "cuda:0"), "with_student", "student sharded (FSDP2), teachers sharded (FSDP2)"),
        (
            RunningSetup("DEEPSPEED", 8, 8, "cuda:0", zero_stage=3),
            "with_student",
            "student sharded (ZeRO-3), teachers sharded (ZeRO-3)",
        ),
        (
            RunningSetup("DEEPSPEED", 8, 8, "cuda:0", zero_stage=2),
            "with_student",
            "student replicated, optimizer states sharded (ZeRO-2), teachers replicated",
        ),
        (RunningSetup("MULTI_CPU", 2, 2, "cpu:0"), "with_student", "student replicated (DDP), teachers replicated"),
        (RunningSetup("FSDP", 8, 8, "cuda:0"), "replicated", "student sharded (FSDP2), teachers replicated"),
        (RunningSetup("NO", 1, None, "cpu"), "in_student", "student one copy, teachers inside the student"),
    ],
)
def test_resolved_setup_line(running, teachers, expected):
    line = describe_setup(running, "bf16", torch.bfloat16, teachers)
    assert line.endswith(expected)
    assert f"{running.num_processes} process(es), {running.distributed_type}" in line
    assert "mixed precision bf16, teachers bfloat16" in line


def test_check_with_real_arguments_logs_one_line_or_refuses(tmp_path, monkeypatch):
    args = UnicConfig(output_dir=str(tmp_path), use_cpu=True, teacher_dtype="float32", report_to="none")
    line = check_distributed_setup(args, environ={})
    assert line.startswith("Distributed setup: 1 process(es), NO, device cpu; mixed precision no, teachers float32")
    with pytest.raises(DistributedSetupError, match="FSDP was asked.*accelerate runs NO with 1 process"):
        check_distributed_setup(args, environ={"ACCELERATE_USE_FSDP": "true"})


@pytest.mark.parametrize(
    ("name", "argv"),
    [
        ("unic", ["--teachers", "missing/teacher", "--student_config", "missing", "--train_data", "missing"]),
        ("udon", ["--backbone", "missing", "--domains", "a=missing/a"]),
        ("task_distill", ["--teacher", "missing", "--student", "missing", "--dataset", "missing"]),
    ],
)
def test_every_recipe_refuses_before_loading_anything(name, argv, tmp_path, monkeypatch):
    """The launcher says 2 processes, this one runs alone (`--use_cpu false` where torch sees no GPU, or a rank
    started without its launcher): refused before the (missing) teachers or data are read and before the output
    folder is created."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    output_dir = tmp_path / "out"
    with pytest.raises(DistributedSetupError, match="WORLD_SIZE=2 processes but accelerate runs NO with 1"):
        load_recipe(name).main(argv + ["--output_dir", str(output_dir), "--use_cpu", "false", "--report_to", "none"])
    assert not output_dir.exists()


def test_the_trainers_accelerator_is_checked_too(monkeypatch):
    """A trainer built without a recipe: its Accelerator's own state is compared with what was asked."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    accelerator = SimpleNamespace(
        state=SimpleNamespace(), distributed_type=SimpleNamespace(value="MULTI_CPU"), num_processes=2, device="cpu"
    )
    with pytest.raises(DistributedSetupError, match="FSDP was asked.*MULTI_CPU with 2 process"):
        check_accelerator(SimpleNamespace(fsdp=[], deepspeed=None, use_cpu=True), accelerator)
    accelerator.distributed_type.value = "FSDP"
    check_accelerator(SimpleNamespace(fsdp=[], deepspeed=None, use_cpu=False), accelerator)
