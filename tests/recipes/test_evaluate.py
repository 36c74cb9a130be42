import json
from pathlib import Path

import pytest

from ..conftest import load_recipe

ROOT = Path(__file__).resolve().parents[2]
recipe = load_recipe("evaluate")


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

    from ..conftest import mnist_images

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


def test_the_example_suite_parses():
    args, suite = recipe.parse_args(
        ["--models", "x", "--config", str(ROOT / "recipes" / "configs" / "eval_example.yaml")]
    )
    assert [(item.name, item.protocols) for item in suite] == [("cifar10", ["knn", "linear"]), ("mnist", ["knn"])]
    assert (args.batch_size, args.knn_k) == (128, [10, 20])


def test_bad_suites_are_reported_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="NAME=PATH"):
        recipe.parse_args(["--models", "x", "--dataset", "no-equals-sign"])
    with pytest.raises(ValueError, match="No datasets"):
        recipe.parse_args(["--models", "x"])
    config = tmp_path / "bad.yaml"
    config.write_text("datasets:\n  - {name: d, path: p, protocols: [retrieval]}\n")
    with pytest.raises(ValueError, match="retrieval needs `domain_column`"):
        recipe.parse_args(["--models", "x", "--config", str(config)])


def test_training_card_gets_the_evaluation(
    tiny_teachers, image_dataset_dir, student_config_dir, mnist_splits_dir, tmp_path
):
    """Train -> card with teachers and loss plot; evaluate -> model-index with the printed numbers, teachers kept."""
    from huggingface_hub import ModelCard

    from .test_unic import recipe as unic_recipe
    from .test_unic import recipe_args

    student_dir = tmp_path / "student"
    unic_recipe.main(recipe_args(tiny_teachers, image_dataset_dir, student_config_dir, student_dir))
    assert (student_dir / "plots" / "teacher_losses.png").stat().st_size > 1000
    card = ModelCard.load(student_dir / "README.md")
    assert "vit-p4" in card.text and "dinov2-p7" in card.text and "teacher_losses.png" in card.text

    results = recipe.main(
        [
            "--models", str(student_dir), tiny_teachers["vit"], tiny_teachers["dinov2"],
            "--model_names", "student", "vit-p4", "dinov2-p7",
            "--dataset", f"mnist={mnist_splits_dir}", "--knn_k", "10",
            "--output_dir", str(tmp_path / "eval"), "--model_card_dir", str(student_dir),
        ]
    )  # fmt: skip
    card = ModelCard.load(student_dir / "README.md")
    model_index = {(r.metric_name, r.dataset_name): r.metric_value for r in card.data.eval_results}
    assert model_index[("k-NN top-1 (k=10)", "mnist")] == round(results["student"]["mnist/knn_top1@10"], 2)
    assert model_index[("Linear probe top-1", "mnist")] == round(results["student"]["mnist/linear_top1"], 2)
    assert "vit-p4" in card.text and "teacher_losses.png" in card.text and "eval_comparison.png" in card.text
    assert (student_dir / "plots" / "eval_comparison.png").exists() and (student_dir / "eval_results.json").exists()
    # teachers' values in the comparison table
    row = next(line for line in card.text.splitlines() if line.startswith("| Linear probe"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    expected = [results[name]["mnist/linear_top1"] for name in ("student", "vit-p4", "dinov2-p7")]
    assert cells[3:] == [f"{value:.2f}" for value in expected]


def test_yaml_suite_with_segmentation(exported_student_dir, tmp_path):
    """Dense linear probe through the recipe: MNIST digits with foreground masks (pixel > 127 -> class 1)."""
    import numpy as np
    from datasets import Dataset, DatasetDict
    from PIL import Image

    from ..conftest import mnist_images

    images, _ = mnist_images(24)
    masks = [Image.fromarray((np.asarray(image.convert("L")) > 127).astype(np.uint8)) for image in images]
    DatasetDict(
        {
            "train": Dataset.from_dict({"image": images[:16], "mask": masks[:16]}),
            "test": Dataset.from_dict({"image": images[16:], "mask": masks[16:]}),
        }
    ).save_to_disk(str(tmp_path / "seg"))
    config = tmp_path / "suite.yaml"
    config.write_text(
        "datasets:\n"
        f"  - {{name: digits-seg, path: {tmp_path / 'seg'}, protocols: [segmentation], mask_column: mask, "
        "num_classes: 2}\n"
    )
    results = recipe.main(["--models", exported_student_dir, "--config", str(config), "--output_dir", str(tmp_path)])
    (values,) = results.values()
    assert set(values) == {"digits-seg/mIoU"} and 0.0 < values["digits-seg/mIoU"] <= 100.0
