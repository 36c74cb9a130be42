"""The distributed setup a run asked for against the one it got: refused at start, before anything heavy is loaded.

accelerate and transformers fall back silently when a launch cannot give what was asked. Seen on a machine without a
GPU: `accelerate launch --config_file fsdp.yaml ... --use_cpu true` runs plain DDP (every parameter replicated, no
FSDP); `--use_cpu false` makes every rank an independent one-process job (each thinks it is the main process and
writes the same output folder); under DeepSpeed accelerate counts 1 process while torch.distributed has 2. Each
recipe calls [`check_distributed_setup`] first: it compares what was asked (the launcher's environment and the
`--fsdp` / `--deepspeed` / `--use_cpu` options) with what runs (accelerate's state, torch.distributed), raises
[`DistributedSetupError`] saying what was asked, what is running and how to fix it, and otherwise logs one line with
the resolved setup: processes, devices, dtypes, and how the student and the teachers are sharded.

The sharding helpers used by the trainers live here too: [`shard_with_fsdp2`] and [`is_sharded`].
"""

import dataclasses
import logging
import os

import torch
import torch.distributed as dist
from torch import nn

logger = logging.getLogger(__name__)

# the accelerate distributed types accelerate turns into FSDP when FSDP is asked for (never MULTI_CPU or NO)
ACCELERATOR_TYPES = (
    "MULTI_GPU", "MULTI_XPU", "MULTI_NPU", "MULTI_MLU", "MULTI_SDAA", "MULTI_MUSA", "MULTI_HPU", "MULTI_NEURON"
)  # fmt: skip
TEACHER_SHARDING = ("with_student", "replicated", "in_student")


class DistributedSetupError(ValueError):
    """The run's distributed setup is not the one that was asked for (see [`check_distributed_setup`])."""


def _flag(environ, name: str) -> bool:
    return environ.get(name, "false").strip().lower() in ("1", "true", "yes")


@dataclasses.dataclass(frozen=True)
class RequestedSetup:
    """What the launch asked for.

    Args:
        world_size (`int`, *optional*): `WORLD_SIZE` set by the launcher (torchrun, `accelerate launch`); `None`
            when the script was started without one.
        fsdp (`bool`): FSDP asked (`ACCELERATE_USE_FSDP`, set by an accelerate config with `distributed_type: FSDP`,
            or the `--fsdp` option).
        deepspeed (`bool`): DeepSpeed asked (`ACCELERATE_USE_DEEPSPEED`, or `--deepspeed`).
        cpu (`bool`): CPU asked (`--use_cpu`, or `ACCELERATE_USE_CPU` from `accelerate launch --cpu`).
    """

    world_size: int | None = None
    fsdp: bool = False
    deepspeed: bool = False
    cpu: bool = False

    @classmethod
    def from_args(cls, training_args, environ=None) -> "RequestedSetup":
        environ = os.environ if environ is None else environ
        world_size = environ.get("WORLD_SIZE")
        return cls(
            world_size=int(world_size) if world_size not in (None, "") else None,
            fsdp=_flag(environ, "ACCELERATE_USE_FSDP") or bool(getattr(training_args, "fsdp", None)),
            deepspeed=_flag(environ, "ACCELERATE_USE_DEEPSPEED") or bool(getattr(training_args, "deepspeed", None)),
            cpu=bool(getattr(training_args, "use_cpu", False)) or _flag(environ, "ACCELERATE_USE_CPU"),
        )


@dataclasses.dataclass(frozen=True)
class RunningSetup:
    """What runs.

    Args:
        distributed_type (`str`): accelerate's distributed type (`NO`, `MULTI_CPU`, `MULTI_GPU`, `FSDP`,
            `DEEPSPEED`, ...), FSDP resolved the way the `Accelerator` resolves it.
        num_processes (`int`): accelerate's process count (the Trainer's `world_size`).
        torch_world_size (`int`, *optional*): torch.distributed's world size, `None` when it is not initialized.
        device (`str`): this process's device.
        zero_stage (`int`, *optional*): the DeepSpeed ZeRO stage.
    """

    distributed_type: str
    num_processes: int
    torch_world_size: int | None = None
    device: str = "cpu"
    zero_stage: int | None = None

    @classmethod
    def from_args(cls, training_args, requested: RequestedSetup | None = None) -> "RunningSetup":
        """The setup of `training_args.distributed_state` (accelerate's `PartialState`, built by the
        `TrainingArguments`), with FSDP applied as the `Accelerator` will apply it."""
        requested = requested or RequestedSetup.from_args(training_args)
        state = training_args.distributed_state
        kind = getattr(state.distributed_type, "value", str(state.distributed_type)) if state is not None else "NO"
        # as accelerate.state.AcceleratorState.__init__ decides for the Trainer's Accelerator (built without cpu=True):
        # DeepSpeed runs on any device, FSDP only on accelerators (MULTI_CPU silently stays DDP)
        if requested.deepspeed and kind != "XLA":
            kind = "DEEPSPEED"
        elif requested.fsdp and kind in ACCELERATOR_TYPES:
            kind = "FSDP"
        zero_stage = None
        if kind == "DEEPSPEED":
            plugin = getattr(training_args, "deepspeed_plugin", None)
            zero_stage = getattr(plugin, "zero_stage", None)
            if zero_stage is None and os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE"):
                zero_stage = int(os.environ["ACCELERATE_DEEPSPEED_ZERO_STAGE"])
        return cls(
            distributed_type=kind,
            num_processes=training_args.world_size,
            torch_world_size=dist.get_world_size() if dist.is_available() and dist.is_initialized() else None,
            device=str(training_args.device),
            zero_stage=zero_stage,
        )


def running_setup_of(accelerator) -> RunningSetup:
    """The setup an `accelerate.Accelerator` runs (e.g. the Trainer's, once built)."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return RunningSetup(
        distributed_type=accelerator.distributed_type.value,
        num_processes=accelerator.num_processes,
        torch_world_size=dist.get_world_size() if dist.is_available() and dist.is_initialized() else None,
        device=str(accelerator.device),
        zero_stage=getattr(plugin, "zero_stage", None),
    )


def setup_problems(requested: RequestedSetup, running: RunningSetup, cuda_available: bool | None = None) -> list[str]:
    """The ways `running` differs from `requested`, each a sentence with the fix; `[]` when they agree.

    Args:
        requested ([`RequestedSetup`]): what the launch asked for.
        running ([`RunningSetup`]): what runs.
        cuda_available (`bool`, *optional*): whether torch sees a GPU (defaults to `torch.cuda.is_available()`),
            for the advice.
    """
    cuda_available = torch.cuda.is_available() if cuda_available is None else cuda_available
    problems = []
    here = f"accelerate runs {running.distributed_type} with {running.num_processes} process(es) on {running.device}"
    if requested.world_size is not None and requested.world_size != running.num_processes:
        if running.num_processes == 1 and requested.world_size > 1:
            cause = (
                "each rank would train as an independent one-process job on the same data, all writing the same "
                "output folder. "
            )
            if not requested.cpu and not cuda_available:
                cause += (
                    "This machine has no GPU that torch can use and --use_cpu is false: pass --use_cpu true to run "
                    "the processes on CPU (gloo), or launch on a machine whose GPUs torch sees."
                )
            else:
                cause += "Launch with matching settings (accelerate launch --num_processes N / torchrun)."
        else:
            cause = "Launch with matching settings (accelerate launch --num_processes N / torchrun)."
        problems.append(f"The launcher started WORLD_SIZE={requested.world_size} processes but {here}: {cause}")
    if running.torch_world_size is not None and running.torch_world_size != running.num_processes:
        problems.append(
            f"torch.distributed has {running.torch_world_size} processes but {here}: the batch size, data sharding "
            "and gradient averaging would use the wrong count (DeepSpeed stops on it, other engines go on silently). "
            "It happens when the device setting does not match the machine (e.g. --use_cpu false without a GPU): "
            + ("pass --use_cpu true." if not cuda_available and not requested.cpu else "check --use_cpu and the GPUs.")
        )
    if requested.fsdp and running.distributed_type != "FSDP":
        problems.append(
            f"FSDP was asked (accelerate config distributed_type: FSDP / ACCELERATE_USE_FSDP or --fsdp) but {here}, "
            "without FSDP: every process would hold a full copy of the student and the teachers. accelerate's FSDP "
            "needs GPUs (with --use_cpu true, or without a GPU, it silently runs plain DDP). Fix: run on GPUs with "
            "--use_cpu false, or drop FSDP (recipes/accelerate_configs/multi_gpu.yaml, or on CPU `accelerate launch "
            "--multi_gpu --num_processes N ... --use_cpu true`)."
        )
    if requested.deepspeed and running.distributed_type != "DEEPSPEED":
        problems.append(
            f"DeepSpeed was asked (accelerate config distributed_type: DEEPSPEED / ACCELERATE_USE_DEEPSPEED or "
            f"--deepspeed) but {here}, without DeepSpeed. Fix: check that deepspeed is installed and the devices "
            "match --use_cpu, or drop DeepSpeed (recipes/accelerate_configs/multi_gpu.yaml)."
        )
    return problems


def describe_setup(
    running: RunningSetup, mixed_precision: str, teacher_dtype: torch.dtype | None, teachers: str = "with_student"
) -> str:
    """One line: processes, devices, dtypes, sharding of the student and of the teachers.

    Args:
        running ([`RunningSetup`]): the checked setup.
        mixed_precision (`str`): `no`, `bf16` or `fp16` (the student's autocast).
        teacher_dtype (`torch.dtype`, *optional*): the teachers' weights dtype (`None`: the recipe has no separate
            teachers).
        teachers (`str`): how the recipe places its teachers: `with_student` (sharded like the student under FSDP /
            ZeRO-3, UNIC), `replicated` (a full copy on every process, task distillation), `in_student` (part of
            the trained model, UDON).
    """
    if teachers not in TEACHER_SHARDING:
        raise ValueError(f"teachers must be one of {TEACHER_SHARDING}, got {teachers!r}.")
    kind = running.distributed_type
    if kind == "FSDP":
        student = "sharded (FSDP2)"
    elif kind == "DEEPSPEED":
        stage = running.zero_stage
        student = "sharded (ZeRO-3)" if stage == 3 else f"replicated, optimizer states sharded (ZeRO-{stage})"
    elif running.num_processes > 1:
        student = "replicated (DDP)"
    else:
        student = "one copy"
    if teachers == "in_student":
        teacher_part = "teachers inside the student"
    elif teachers == "replicated" or student.startswith(("replicated", "one copy")):
        teacher_part = "teachers replicated" if running.num_processes > 1 else "teachers one copy"
    else:
        teacher_part = f"teachers {student.split(' (')[0]} ({'FSDP2' if kind == 'FSDP' else 'ZeRO-3'})"
    dtype = str(teacher_dtype).removeprefix("torch.") if teacher_dtype is not None else "-"
    return (
        f"Distributed setup: {running.num_processes} process(es), {kind}, device {running.device}; mixed precision "
        f"{mixed_precision}, teachers {dtype}; student {student}, {teacher_part}"
    )


def check_distributed_setup(training_args, teachers: str = "with_student", environ=None) -> str:
    """Refuse a run whose distributed setup is not the one asked for; log and return the one-line resolved setup.

    Call it right after parsing, before loading teachers or data.

    Args:
        training_args (`TrainingArguments`): the run's arguments (their `distributed_state` is accelerate's).
        teachers (`str`): how the recipe places its teachers (see [`describe_setup`]).
        environ (`Mapping`, *optional*): the environment (defaults to `os.environ`).

    Raises:
        [`DistributedSetupError`]: what was asked, what runs and how to fix it.
    """
    requested = RequestedSetup.from_args(training_args, environ)
    running = RunningSetup.from_args(training_args, requested)
    problems = setup_problems(requested, running)
    if problems:
        raise DistributedSetupError("The distributed setup is not the one asked for:\n- " + "\n- ".join(problems))
    mixed_precision = "bf16" if training_args.bf16 else "fp16" if training_args.fp16 else "no"
    teacher_dtype = training_args.teacher_torch_dtype() if hasattr(training_args, "teacher_torch_dtype") else None
    line = describe_setup(running, mixed_precision, teacher_dtype, teachers)
    logger.info(line)
    return line


def check_accelerator(training_args, accelerator) -> None:
    """[`check_distributed_setup`]'s refusals for the Trainer's `Accelerator` itself, once built (for trainers used
    without a recipe); raises [`DistributedSetupError`]."""
    problems = setup_problems(RequestedSetup.from_args(training_args), running_setup_of(accelerator))
    if problems:
        raise DistributedSetupError("The distributed setup is not the one asked for:\n- " + "\n- ".join(problems))


def shard_with_fsdp2(module: nn.Module, device: torch.device | str | None = None) -> nn.Module:
    """Shard `module` in place with FSDP2 (`fully_shard` on each block named by `_no_split_modules`, then on the
    root), over the default process group; moved to `device` first when given."""
    from torch.distributed.fsdp import fully_shard

    if device is not None:
        module.to(device)
    block_names = set(getattr(module, "_no_split_modules", None) or [])
    for child in module.modules():
        if child is not module and type(child).__name__ in block_names:
            fully_shard(child)
    fully_shard(module)
    return module


def is_sharded(module: nn.Module) -> bool:
    """Whether `module` gathers its parameters in forward hooks: FSDP2 (`fully_shard`) or DeepSpeed (an engine, or
    ZeRO-3 partitioned parameters). Such a module runs frozen under `torch.no_grad`, not `torch.inference_mode`:
    ZeRO-3's parameter gathering is known to fail under inference mode (FSDP2 ran under it in torch 2.13 on CPU, but
    takes the same tested `no_grad` path)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        FSDPModule = ()
    if isinstance(module, FSDPModule) or type(module).__name__ == "DeepSpeedEngine":
        return True
    first = next(module.parameters(), None)
    return first is not None and hasattr(first, "ds_id")
