"""Where bfloat16 pays off: the one rule every `auto` dtype of hf_distill follows (teachers, benchmark, synthesis).

bfloat16 halves memory and speeds up matmuls only where the hardware runs it natively: CUDA GPUs that support it
(Ampere and later) and CPUs with AVX512-BF16 or AMX tiles. Elsewhere (e.g. an AVX2-only CPU) PyTorch emulates it and a
512x512 matmul is tens of times slower than in float32, so `auto` means bfloat16 on the first kind and float32 on the
second. Explicit dtypes are always kept as given.
"""

import logging

import torch

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def native_bf16(device: torch.device | str | None = None) -> tuple[bool, str]:
    """Whether `device` (default: CPU) runs bfloat16 natively, with the reason (for logs).

    CUDA: `torch.cuda.is_bf16_supported()`. CPU: AVX512-BF16 or AMX tiles (`torch.cpu._is_avx512_bf16_supported` /
    `_is_amx_tile_supported`, private probes used when present), else what `torch.backends.cpu.get_cpu_capability()`
    reports (set `ATEN_CPU_CAPABILITY=avx2` to see the float32 branch on any machine).
    """
    device = torch.device(device if device is not None else "cpu")
    if device.type == "cuda":
        supported = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return supported, f"CUDA device {'supports' if supported else 'does not support'} bfloat16"
    if device.type != "cpu":
        return False, f"no bfloat16 probe for {device.type} devices"
    capability = torch.backends.cpu.get_cpu_capability()
    if capability in ("AVX2", "DEFAULT", "NO AVX", "ZVECTOR", "VSX", "SVE256"):
        # kernels dispatched below AVX512 never use the bf16 instructions, whatever the CPU has
        return False, f"CPU kernels run at capability {capability} (bfloat16 emulated)"
    features = []
    for name, probe in (("AVX512-BF16", "_is_avx512_bf16_supported"), ("AMX", "_is_amx_tile_supported")):
        check = getattr(torch.cpu, probe, None)
        if check is not None and check():
            features.append(name)
    if features:
        return True, f"CPU has {' and '.join(features)} (capability {capability})"
    return False, f"CPU has neither AVX512-BF16 nor AMX (capability {capability}, bfloat16 emulated)"


def auto_dtype(device: torch.device | str | None = None) -> tuple[torch.dtype, str]:
    """`(torch.bfloat16, reason)` where `device` runs bfloat16 natively, else `(torch.float32, reason)`."""
    native, reason = native_bf16(device)
    return (torch.bfloat16 if native else torch.float32), reason


def resolve_dtype(name: str, device: torch.device | str | None = None, purpose: str = "weights") -> torch.dtype:
    """The `torch.dtype` for a setting `name` (`auto` or a key of `DTYPES`) on `device`, logged with its reason.

    Args:
        name (`str`): `auto`, `float32`, `bfloat16` or `float16`.
        device: where the computation runs (`auto` depends on it).
        purpose (`str`): what the dtype is for, in the log line (e.g. `"teachers"`).
    """
    if name == "auto":
        dtype, reason = auto_dtype(device)
        logger.info("dtype of the %s: auto -> %s (%s)", purpose, str(dtype).removeprefix("torch."), reason)
        return dtype
    if name not in DTYPES:
        raise ValueError(f"dtype must be 'auto' or one of {list(DTYPES)}, got {name!r}.")
    dtype = DTYPES[name]
    if dtype == torch.bfloat16:
        native, reason = native_bf16(device)
        if not native:
            logger.warning(
                "dtype of the %s: bfloat16 as requested, but %s: expect it to be much slower than float32 "
                "(use `auto` or `float32`).",
                purpose,
                reason,
            )
            return dtype
    logger.info("dtype of the %s: %s (as requested)", purpose, name)
    return dtype


def warn_if_emulated_autocast(args) -> None:
    """Warn when `--bf16` autocast was asked for on a device that only emulates bfloat16 (`args`: a
    `TrainingArguments`); the explicit choice is kept."""
    if getattr(args, "bf16", False):
        native, reason = native_bf16(args.device)
        if not native:
            logger.warning(
                "--bf16 autocast on %s, but %s: expect it to be much slower than float32.", args.device, reason
            )
