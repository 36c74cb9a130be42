import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("evaluate_recipe", ROOT / "recipes" / "evaluate.py")
recipe = importlib.util.module_from_spec(spec)
spec.loader.exec_module(recipe)


def test_evaluate_student_and_two_teachers(exported_student_dir, tiny_teachers, mnist_splits_dir, tmp_path, capsys):
    results = recipe.main(
        [
            "--models", exported_student_dir, tiny_teachers["vit"], tiny_teachers["dinov2"],
            "--model_names", "student", "vit", "dinov2",
            "--dataset", f"mnist={mnist_splits_dir}",
            "--knn_k", "5", "20",
            "--output_dir", str(tmp_path / "eval"),
            "--cache_dir", str(tmp_path / "cache"),
        ]
    )  # fmt: skip
    table = capsys.readouterr().out
    assert "| metric | student | vit | dinov2 |" in table and "| mnist/knn_top1@20 |" in table
    assert set(results) == {"student", "vit", "dinov2"}
    for values in results.values():
        assert set(values) == {"mnist/knn_top1@5", "mnist/knn_top1@20", "mnist/linear_top1"}
        assert all(0.0 <= value <= 100.0 for value in values.values())
    saved = json.loads((tmp_path / "eval" / "eval_results.json").read_text())
    assert saved["models"]["vit"]["results"] == results["vit"]
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 6  # 3 models x (train, test)


def test_yaml_suite_with_retrieval(exported_student_dir, tmp_path):
    from datasets import Dataset

    from .conftest import mnist_images

    images, labels = mnist_images(40)
    domains = ["digits-a" if i % 2 else "digits-b" for i in range(40)]
    Dataset.from_dict({"image": images, "label": labels, "domain": domains}).save_to_disk(str(tmp_path / "uned"))
    config = tmp_path / "suite.yaml"
    config.write_text(
        "datasets:\n"
        f"  - {{name: toy-uned, path: {tmp_path / 'uned'}, protocols: [retrieval], test_split: train, domain_column: domain}}\n"
        "batch_size: 16\n"
    )
    results = recipe.main(["--models", exported_student_dir, "--config", str(config), "--output_dir", str(tmp_path)])
    values = results[Path(exported_student_dir).name]
    assert {"toy-uned/R@1", "toy-uned/mMP@5", "toy-uned/digits-a/R@1", "toy-uned/digits-b/mMP@5"} <= set(values)


def test_bad_suites_are_reported_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="NAME=PATH"):
        recipe.parse_args(["--models", "x", "--dataset", "no-equals-sign"])
    with pytest.raises(ValueError, match="No datasets"):
        recipe.parse_args(["--models", "x"])
    config = tmp_path / "bad.yaml"
    config.write_text("datasets:\n  - {name: d, path: p, protocols: [retrieval]}\n")
    with pytest.raises(ValueError, match="retrieval needs `domain_column`"):
        recipe.parse_args(["--models", "x", "--config", str(config)])
