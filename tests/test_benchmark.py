"""`make bench` runs end to end on tiny settings and writes its JSON and table (no timing is asserted)."""

import json

import pytest

from benchmarks import bench_unic_step


def test_benchmark_writes_results_for_every_configuration(tmp_path):
    report = bench_unic_step.main(
        ["--sizes", "vit-tiny", "--teachers", "1", "2", "--image_size", "32", "--batch_size", "2", "--steps", "1"]
        + ["--warmup", "0", "--output_dir", str(tmp_path)]
    )
    saved = json.loads((tmp_path / "unic_step_cpu.json").read_text())
    assert saved == json.loads(json.dumps(report))
    assert [(row["size"], row["num_teachers"]) for row in saved["results"]] == [("vit-tiny", 1), ("vit-tiny", 2)]
    for row in saved["results"]:
        for name in ("hf_distill", "reference"):
            measured = row[name]
            assert measured["images_per_s"] > 0 and measured["peak_memory_mib"] >= 0
            assert set(measured["breakdown_ms"]) == set(bench_unic_step.PARTS)
            assert sum(measured["share"].values()) == pytest.approx(1.0)
            assert measured["breakdown_ms"]["teacher_forward"] > 0
        assert row["speedup"] == pytest.approx(row["hf_distill"]["images_per_s"] / row["reference"]["images_per_s"])
    assert saved["cache"][0]["cache_step_ms"] > 0 and saved["cache"][0]["student_only_step_ms"] > 0
    assert saved["heads"][0]["grouped_ms"] > 0 and saved["heads"][0]["plain_ms"] > 0
    table = (tmp_path / "unic_step_cpu.md").read_text()
    assert "| vit-tiny | 2 |" in table and "speed-up" in table
