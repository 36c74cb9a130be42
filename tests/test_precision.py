"""`auto` dtypes: bfloat16 only where the hardware runs it natively (both branches by patching the probes)."""

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_distill import precision
from hf_distill.trainers import UnicConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def cpu(monkeypatch):
    """Set what the CPU probes report: `cpu(capability, avx512_bf16, amx)`; `None` removes a private probe."""

    def configure(capability: str, avx512_bf16: bool | None, amx: bool | None):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
        for name, value in (("_is_avx512_bf16_supported", avx512_bf16), ("_is_amx_tile_supported", amx)):
            if value is None:
                monkeypatch.delattr(torch.cpu, name, raising=False)
            else:
                monkeypatch.setattr(torch.cpu, name, lambda value=value: value)

    return configure


@pytest.mark.parametrize(
    "capability, avx512_bf16, amx, expected",
    [
        ("AVX2", True, True, torch.float32),  # kernels dispatched at AVX2 never use the bf16 instructions
        ("AVX512", False, False, torch.float32),  # AVX512 without BF16 / AMX: emulated
        ("AVX512", True, False, torch.bfloat16),
        ("AVX512", False, True, torch.bfloat16),
        ("AVX512", None, None, torch.float32),  # a torch without the private probes: fall back to float32
        ("DEFAULT", True, True, torch.float32),
    ],
)
def test_auto_on_cpu_follows_the_hardware(cpu, capability, avx512_bf16, amx, expected):
    cpu(capability, avx512_bf16, amx)
    dtype, reason = precision.auto_dtype("cpu")
    assert dtype == expected
    assert capability in reason


@pytest.mark.parametrize("supported, expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_on_cuda_asks_the_device(monkeypatch, supported, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: supported)
    assert precision.auto_dtype("cuda")[0] == expected


def test_teacher_dtype_auto_is_the_default_and_logs_its_choice(cpu, tmp_path, caplog):
    args = UnicConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    assert args.teacher_dtype == "auto"
    cpu("AVX2", False, False)
    with caplog.at_level(logging.INFO, logger="hf_distill.precision"):
        assert args.teacher_torch_dtype() == torch.float32
    assert "dtype of the teachers: auto -> float32 (CPU kernels run at capability AVX2" in caplog.text
    cpu("AVX512", True, True)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="hf_distill.precision"):
        assert args.teacher_torch_dtype() == torch.bfloat16
    assert "auto -> bfloat16 (CPU has AVX512-BF16 and AMX" in caplog.text


def test_explicit_dtypes_are_kept_with_a_warning_when_emulated(cpu, tmp_path, caplog):
    cpu("AVX2", False, False)
    for name in ("float32", "bfloat16", "float16"):
        args = UnicConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", teacher_dtype=name)
        assert args.teacher_torch_dtype() == getattr(torch, name)
    assert "bfloat16 as requested, but CPU kernels run at capability AVX2" in caplog.text
    with pytest.raises(ValueError, match="dtype must be 'auto' or one of"):
        precision.resolve_dtype("float64")


def test_aten_cpu_capability_avx2_gives_float32():
    """The real probe, not a patched one: `ATEN_CPU_CAPABILITY=avx2` makes any x86 machine look like an AVX2 CPU."""
    path = str(ROOT / "hf_distill" / "precision.py")
    code = (  # the module alone (not the whole package): a fast subprocess
        f"import importlib.util as u; s = u.spec_from_file_location('p', {path!r}); m = u.module_from_spec(s); "
        "s.loader.exec_module(m); print(m.auto_dtype('cpu')[0])"
    )
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "torch.float32"


def test_the_demo_config_lets_the_hardware_choose():
    text = (ROOT / "recipes" / "configs" / "demo_fashion_mnist.yaml").read_text()
    assert "\nteacher_dtype: auto" in text
