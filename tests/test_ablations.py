"""The plumbing of `make ablations` (demo/ablations.py) on a tiny setting: each row becomes the intended recipe
options (read back from what the recipe parsed and saved), the caches are shared across seeds, a rerun skips the
finished runs, and the verdict rule. The real-scale run is `make ablations`, not part of the suite."""

import json
import sys

import pytest
import yaml

from demo import ablations

from .conftest import ROOT, load_recipe


@pytest.fixture
def tiny_preset(tmp_path, tiny_teachers, student_config_dir, image_dataset_dir, mnist_splits_dir):
    """A custom-setting preset: two tiny teachers with per-teacher grid alignments, 2 training steps, k-NN on 60 / 30
    MNIST digits, runs in this process."""
    base = yaml.safe_load((ROOT / "recipes" / "configs" / "unic_tiny.yaml").read_text())
    base.update(teacher_grid_alignment=["resize", "interpolate"], per_device_train_batch_size=8, save_steps=1)
    base.update(logging_steps=1, teacher_cache_crops=True, export_adaptors=False)
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    suite = {"datasets": [{"name": "mnist", "path": mnist_splits_dir, "protocols": ["knn"]}], "knn_k": [5, 20]}
    (tmp_path / "suite.yaml").write_text(yaml.safe_dump(suite))
    preset = {
        "setting": "custom",
        "base_config": str(tmp_path / "base.yaml"),
        "teachers": [tiny_teachers["vit"], tiny_teachers["dinov2"]],
        "student_options": ["--student_config", student_config_dir],
        "train_data": image_dataset_dir,
        "eval_suite": str(tmp_path / "suite.yaml"),
        "teacher_cache": True,
        "launcher": ["python"],
        "max_steps": 2,
        "seeds": [3],
        "rows": ["default", "only-dinov2-p7"],
        "plot_rows": ["default", "only-dinov2-p7"],
        "phi_s_warmup_steps": 1,
    }
    path = tmp_path / "preset.yaml"
    path.write_text(yaml.safe_dump(preset))
    return path


def test_every_row_is_parsed_by_the_recipe_into_its_options(tiny_preset, tmp_path):
    preset = ablations.load_preset(str(tiny_preset))
    setting = ablations.prepare_setting(preset, str(tmp_path / "out"))
    rows = ablations.row_names(setting, {**preset, "rows": None})
    assert rows == ["default", "only-vit-p4", "only-dinov2-p7", *[r for r in ablations.ROWS if r != "default"]]
    recipe = load_recipe("unic")
    parsed = {}
    for row in rows:
        command, _ = ablations.run_command(row, 5, setting, preset, str(tmp_path / "out"))
        assert command[:2] == [sys.executable, str(ROOT / "recipes" / "unic.py")]
        parsed[row] = recipe.parse_args(command[2:])
    for row, (script, train) in parsed.items():
        assert (train.seed, train.max_steps) == (5, 2)
        assert script.use_ladder is (row != "no-ladder")
        assert train.teacher_drop_prob == (0.0 if row == "no-teacher-drop" else 0.5)
        expected = {"no-standardization": "none", "standardization-dune": "dune", "standardization-phi-s": "phi-s"}
        assert script.standardization == expected.get(row, "unic")
        assert script.standardization_warmup_steps == (1 if row == "standardization-phi-s" else 100)
        assert train.loss_normalization == ("batch" if row == "batch-normalization" else "image")
        assert train.teacher_dtype == ("float32" if row in ("online-teachers-fp32", "teachers-fp32") else "auto")
        assert train.teacher_quantization == ("int8" if row == "teachers-int8" else "none")
        if row == "online-teachers-fp32":
            assert train.teacher_cache is None
        else:  # one cache per teacher subset (and teacher form), its crops drawn with the base config's seed (42: none
            # set) whatever --seed
            cache = {"only-vit-p4": "vit-p4", "only-dinov2-p7": "dinov2-p7"}.get(row, "vit-p4+dinov2-p7")
            cache += f"-{row}" if row in ("teachers-fp32", "teachers-int8") else ""
            assert train.teacher_cache_seed == 42 and train.teacher_cache.endswith("teacher-cache/" + cache)
    assert [len(t.teachers) for _, t in parsed.values()] == [2, 1, 1] + [2] * (len(rows) - 3)
    assert parsed["only-vit-p4"][1].teacher_grid_alignment == ["resize"]
    assert parsed["only-dinov2-p7"][1].teacher_grid_alignment == ["interpolate"]
    with pytest.raises(ValueError, match="Unknown row 'no-such-row'"):
        ablations.row_plan("no-such-row", setting, preset)


def test_runs_write_one_table_and_a_rerun_skips_them(tiny_preset, tmp_path, monkeypatch):
    out, results = tmp_path / "out", tmp_path / "results"
    argv = ["--preset", str(tiny_preset), "--output_dir", str(out), "--results_dir", str(results)]
    report = ablations.main(argv, in_process=True)
    # what the runs themselves recorded: teachers, seed, cache of the teacher subset drawn with the shared seed
    for row, teachers, cache in [("default", ["vit-p4", "dinov2-p7"], "vit-p4+dinov2-p7"), ("only-dinov2-p7", ["dinov2-p7"], "dinov2-p7")]:  # fmt: skip
        run = out / "runs" / row / "seed-3"
        manifest = json.loads((run / "student" / "run_manifest.json").read_text())
        assert sorted(manifest["teachers"]) == sorted(teachers)
        assert (manifest["settings"]["seed"], manifest["settings"]["teacher_cache_seed"]) == (3, 42)
        cache = json.loads((out / "teacher-cache" / cache / "cache.json").read_text())
        assert [t["name"] for t in cache["teachers"]] == teachers and cache["content"]["crops"]["seed"] == 42
        assert json.loads((run / "student" / "trainer_state.json").read_text())["global_step"] == 2
    entry = report["rows"]["only-dinov2-p7"]
    assert report["metrics"] == ["mnist/knn_top1@20"]  # the preset names none: every k-NN@20 and linear probe
    assert entry["seeds"] == [3] and entry["steps"] == [2] and entry["std"]["mnist/knn_top1@20"] is None
    assert entry["diff"]["mnist/knn_top1@20"]["verdict"] == "1 seed"
    written = json.loads((results / "ablations.json").read_text())
    assert '"/' not in (results / "ablations.json").read_text()  # no absolute path of this machine is published
    assert written["rows"]["default"]["values"] == report["rows"]["default"]["values"]
    assert "| only-dinov2-p7 | 1 | 2 |" in (results / "ablations.md").read_text()
    assert (results / "ablation_bars.png").stat().st_size > 0 and (results / "training_curves.png").stat().st_size > 0

    def no_run(*args, **kwargs):
        raise AssertionError("a finished run ran again")

    monkeypatch.setattr(ablations, "execute", no_run)
    assert ablations.main(argv, in_process=True)["rows"] == report["rows"]
    with pytest.raises(ValueError, match="written by another command"):
        ablations.main([*argv, "--max_steps", "3"], in_process=True)


@pytest.mark.parametrize(
    ("diff", "std_row", "std_default", "expected"),
    [
        (2.1, 1.0, 0.5, "real"),  # 2.1 > 2 x max(1.0, 0.5)
        (-2.1, 0.5, 1.0, "real"),
        (1.9, 1.0, 0.2, "unclear"),  # 1 x 1.0 < 1.9 <= 2 x 1.0
        (0.9, 0.3, 1.0, "noise"),
        (0.1, 0.0, 0.0, "real"),  # identical seeds: any difference is beyond the spread
        (3.0, None, 0.5, "1 seed"),
    ],
)
def test_verdict_rule(diff, std_row, std_default, expected):
    assert ablations.verdict(diff, std_row, std_default) == expected


def test_unclear_rows_get_more_seeds_with_default(tiny_preset, tmp_path, monkeypatch):
    """Hand-made results: `only-dinov2-p7` 1.0 below default with stds 0.71 (unclear) gets seed 5 with default; still
    unclear with 3 seeds (std 0.5: 0.5 < 1.0 <= 2 x 0.5), it gets no 4th: --max_seeds 3."""
    values = {("default", 3): 80.0, ("default", 4): 81.0, ("default", 5): 80.5,
              ("only-dinov2-p7", 3): 79.0, ("only-dinov2-p7", 4): 80.0, ("only-dinov2-p7", 5): 79.5}  # fmt: skip
    ran = []

    def fake_run(row, seed, *args, **kwargs):
        ran.append((row, seed))
        metrics = {"mnist/knn_top1@20": values[row, seed], "mnist/linear_top1": 50.0}
        return {"metrics": metrics, "steps": 2, "train_runtime_s": 1.0, "wall_s": 2.0}

    monkeypatch.setattr(ablations, "run_one", fake_run)
    monkeypatch.setattr(ablations, "plot_training", lambda *args: None)
    argv = ["--preset", str(tiny_preset), "--output_dir", str(tmp_path / "o"), "--results_dir", str(tmp_path / "r")]
    report = ablations.main([*argv, "--seeds", "3", "4", "--max_seeds", "3"])
    assert ran == [("default", 3), ("default", 4), ("only-dinov2-p7", 3), ("only-dinov2-p7", 4),
                   ("default", 5), ("only-dinov2-p7", 5)]  # fmt: skip
    entry = report["rows"]["only-dinov2-p7"]
    # by hand: means 80.5 and 79.5, sample std of (80, 81, 80.5) and (79, 80, 79.5) = 0.5
    assert entry["mean"]["mnist/knn_top1@20"] == pytest.approx(79.5)
    assert entry["std"]["mnist/knn_top1@20"] == pytest.approx(0.5)
    assert entry["diff"]["mnist/knn_top1@20"] == {"value": pytest.approx(-1.0), "verdict": "unclear"}
    assert entry["diff"]["mnist/linear_top1"]["verdict"] == "noise"  # no difference at all


def test_the_demo_preset_reads_the_demo_setting(tmp_path, monkeypatch):
    """`setting: demo` takes the student config, evaluation suite, base config and teachers from demo/run_demo.py
    (data and teacher conversion replaced by stand-ins here), and a single-teacher row keeps that teacher's values of
    the demo config's per-teacher options."""
    from demo import run_demo

    data = {"fashion-mnist": str(tmp_path / "fm"), "mnist": str(tmp_path / "mnist")}
    monkeypatch.setattr("demo.data.prepare_datasets", lambda root: data)
    monkeypatch.setattr(run_demo, "prepare_teachers", lambda out: [str(tmp_path / "dinov2"), run_demo.EFFICIENTNET])
    preset = ablations.load_preset(ablations.DEFAULT_PRESET)
    setting = ablations.prepare_setting(preset, str(tmp_path / "out"))
    saved = json.loads((tmp_path / "out" / "student-config" / "config.json").read_text())
    assert saved == json.loads(run_demo.student_config().to_json_string())
    assert json.loads((tmp_path / "out" / "eval_suite.json").read_text()) == run_demo.eval_suite(data)
    assert setting["student_image_size"] == run_demo.STUDENT_IMAGE_SIZE and setting["teacher_cache"]
    rows = ablations.row_names(setting, preset)
    assert rows[:3] == ["default", "only-dinov2", "only-efficientnet-lite0-128"] and "online-teachers-fp32" in rows
    recipe = load_recipe("unic")
    demo_yaml = yaml.safe_load((ROOT / "recipes" / "configs" / "demo_fashion_mnist.yaml").read_text())
    command, _ = ablations.run_command("only-efficientnet-lite0-128", 0, setting, preset, str(tmp_path / "out"))
    assert command[1:4] == ["-m", "accelerate.commands.launch", "--num_processes"]
    script, train = recipe.parse_args(command[command.index(str(ROOT / "recipes" / "unic.py")) + 1 :])
    assert train.teachers == [run_demo.EFFICIENTNET] and train.max_steps == preset["max_steps"]
    assert train.teacher_image_size == demo_yaml["teacher_image_size"][1:]
    assert train.teacher_grid_alignment == demo_yaml["teacher_grid_alignment"][1:]
    assert train.teacher_cache_seed == demo_yaml["seed"] and train.teacher_cache.endswith("efficientnet-lite0-128")
