"""`make bench` runs end to end on tiny settings and writes its JSON and tables (no timing is asserted)."""

import json

import pytest
import torch
from torch.nn import functional as F

from benchmarks import bench_unic_step
from benchmarks.flops import count_flops
from benchmarks.report import command_line, write_report


def test_benchmark_writes_every_arm_with_flops_and_fraction_of_peak(tmp_path):
    report = bench_unic_step.main(
        ["--sizes", "vit-micro", "--teachers", "1", "2", "--image_size", "32", "--batch_size", "2", "--steps", "2"]
        + ["--warmup", "0", "--no_extras", "--peak_size", "256", "--output_dir", str(tmp_path)]
    )
    name = f"unic_step_cpu-{torch.backends.cpu.get_cpu_capability().lower()}"
    saved = json.loads((tmp_path / f"{name}.json").read_text())
    assert saved == json.loads(json.dumps(report))
    assert saved["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert saved["peak_gflops"]["fp32"]["median"] > 0
    assert [(row["size"], row["num_teachers"]) for row in saved["results"]] == [("vit-micro", 1), ("vit-micro", 2)]
    assert set(saved["results"][0]["arms"]) == {"reference", "hf_distill"}
    largest = set(saved["results"][1]["arms"])
    assert {"reference", "hf_distill", "int8 teachers", "cached teachers"} <= largest
    for row in saved["results"]:
        reference = row["arms"]["reference"]
        assert "768/3072" in reference["config"] and reference["speedup_vs_reference"] == pytest.approx(1.0)
        for arm in row["arms"].values():
            assert arm["images_per_s"] > 0 and arm["peak_memory_mib"] >= 0
            assert set(arm["breakdown_ms"]) == set(bench_unic_step.PARTS)
            assert sum(arm["share"].values()) == pytest.approx(1.0)
            assert arm["gflop_per_step"] > 0 and 0 < arm["fraction_of_peak"]["fp32"]
            if "cached" not in arm["config"]:  # the teachers' attention is counted
                assert arm["gflop_per_step_by_op"]["_scaled_dot_product_flash_attention_for_cpu"] > 0
        # the authors' heads are wider than d / 4d for a 32-wide student: more FLOPs than the fp32 hf_distill step
        fp32 = row["arms"].get("hf_distill fp32", row["arms"]["hf_distill"])
        assert reference["gflop_per_step"] > fp32["gflop_per_step"]
    assert "quantized.linear_dynamic" not in saved["results"][1]["arms"]["hf_distill"]["gflop_per_step_by_op"]
    assert saved["results"][1]["arms"]["int8 teachers"]["gflop_per_step_by_op"]["linear_dynamic"] > 0
    table = (tmp_path / f"{name}.md").read_text()
    assert "| vit-micro | 2 | int8 teachers |" in table and "% of fp32 peak" in table and "authors (768" in table


def test_attention_flops_are_counted_on_cpu():
    query = torch.randn(2, 3, 10, 8, requires_grad=True)
    flops, per_op = count_flops(lambda: F.scaled_dot_product_attention(query, query, query).sum().backward())
    forward = 2 * 2 * (2 * 3 * 10 * 10 * 8)  # two matmuls (Q K^T, A V) of B H L L E multiply-adds, 2 FLOPs each
    assert per_op["_scaled_dot_product_flash_attention_for_cpu"] == forward
    assert flops == forward + per_op["_scaled_dot_product_flash_attention_for_cpu_backward"]
    assert per_op["_scaled_dot_product_flash_attention_for_cpu_backward"] == 2.5 * forward


def test_write_report_writes_json_markdown_and_plot_side_by_side(tmp_path, capsys):
    stem = str(tmp_path / "results" / "run")
    write_report(stem, {"a": [1, 2]}, "| x |\n|---|", plot=lambda path: open(path, "wb").write(b"png"))
    assert json.loads((tmp_path / "results" / "run.json").read_text()) == {"a": [1, 2]}
    assert (tmp_path / "results" / "run.md").read_text() == "| x |\n|---|\n"
    assert (tmp_path / "results" / "run.png").read_bytes() == b"png"
    assert "| x |" in capsys.readouterr().out
    assert command_line("bench_decode", ["--sizes", "64"]) == "python -m benchmarks.bench_decode --sizes 64"
