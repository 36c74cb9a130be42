"""Counting the FLOPs of a step and measuring the machine's matmul peak, for `make bench`'s "fraction of peak".

`torch.utils.flop_counter.FlopCounterMode` counts matmuls, convolutions and the CUDA attention kernels, but in torch
2.13 it has no formula for the CPU attention kernel (`aten._scaled_dot_product_flash_attention_for_cpu`, what SDPA runs
on the CPU) nor for int8 dynamic linear layers (`quantized::linear_dynamic`): both are registered here, with torch's
own attention formulas (`sdpa_flop_count`, backward 2.5x the forward) and `2 * M * N * K` for an int8 linear layer.
"""

import time

import torch
from torch.utils.flop_counter import (
    FlopCounterMode,
    register_flop_formula,
    sdpa_backward_flop_count,
    sdpa_flop_count,
)
from torch.utils.flop_counter import flop_registry as _flop_registry

aten = torch.ops.aten


def _register_missing_formulas() -> None:
    if aten._scaled_dot_product_flash_attention_for_cpu not in _flop_registry:

        @register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu)
        def _cpu_attention(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
            return sdpa_flop_count(query_shape, key_shape, value_shape)

    if aten._scaled_dot_product_flash_attention_for_cpu_backward not in _flop_registry:

        @register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu_backward)
        def _cpu_attention_backward(
            grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs
        ) -> int:
            return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)

    linear_dynamic = getattr(torch.ops.quantized, "linear_dynamic", None)
    if linear_dynamic is not None and linear_dynamic not in _flop_registry:

        @register_flop_formula(linear_dynamic, get_raw=True)
        def _int8_linear(inputs, packed, *args, out_shape=None, **kwargs) -> int:
            weight = packed.unpack()[0]  # [out_features, in_features]
            return 2 * (inputs.numel() // inputs.shape[-1]) * weight.shape[0] * weight.shape[1]


_register_missing_formulas()


def count_flops(function, *args, **kwargs) -> tuple[int, dict[str, int]]:
    """Run `function(*args, **kwargs)` once under `FlopCounterMode`: total FLOPs and FLOPs per operator name."""
    with FlopCounterMode(display=False) as counter:
        function(*args, **kwargs)
    per_op = {str(op).split(".")[-1]: int(count) for op, count in counter.get_flop_counts()["Global"].items()}
    return int(counter.get_total_flops()), per_op


def matmul_peak(device: torch.device, dtype: torch.dtype, size: int | None = None, repeats: int = 5) -> dict:
    """Measured throughput of a `size^3` matmul (FLOP/s): median and range over `repeats` timings after one warm-up.

    The number to compare a step's achieved FLOP/s with: what this machine reaches on the most favourable large
    matmul, in this process, with the threads torch uses.
    """
    size = size or (8192 if device.type == "cuda" else 2048)
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, generator=generator).to(dtype)
    b = torch.randn(size, size, device=device, generator=generator).to(dtype)
    rates = []
    for index in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if index:  # the first call is a warm-up
            rates.append(2 * size**3 / (time.perf_counter() - start))
    rates.sort()
    return {"size": size, "median": rates[len(rates) // 2], "min": rates[0], "max": rates[-1]}
