"""The demo's adaptor path on a tiny scale: the demo config exports the student's adaptors, and the demo's evaluation
options score them against both kinds of teachers, the EfficientNet adaptor also through EfficientNet-Lite0's own
ImageNet classifier."""

import torch

from demo.run_demo import EFFICIENTNET, emulation_args
from demo.teachers import efficientnet_lite0_classifier, efficientnet_lite0_teacher


def test_efficientnet_classifier_reads_the_teacher_summary():
    teacher, head = efficientnet_lite0_teacher(), efficientnet_lite0_classifier()
    pixels = torch.randn(1, 3, 224, 224)
    with torch.inference_mode():
        summary = teacher(pixels, grid_size=(7, 7)).summary
        torch.testing.assert_close(head(summary), teacher.module(pixels), rtol=1e-4, atol=1e-4)  # the model's logits


def test_demo_evaluation_scores_the_adaptors_of_both_teachers(tmp_path, image_dataset_dir, mnist_splits_dir, capsys):
    from transformers import ViTConfig

    from demo.convert_dinov2 import convert_onnx_to_dinov2

    from .recipes.test_evaluate import recipe as evaluate_recipe
    from .recipes.test_unic import recipe as unic_recipe
    from .test_demo import export_tiny_dinov2

    export_tiny_dinov2(tmp_path / "tiny.onnx")
    dinov2 = convert_onnx_to_dinov2(str(tmp_path / "tiny.onnx"), str(tmp_path / "dinov2"), num_heads=2)
    ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=8,
              image_size=56).save_pretrained(tmp_path / "student-config")  # fmt: skip
    student = tmp_path / "student"
    unic_recipe.main(
        [
            "--config", "recipes/configs/demo_fashion_mnist.yaml",  # exports the adaptors
            "--teachers", dinov2, EFFICIENTNET, "--teacher_image_size", "56", "224", "--teacher_dtype", "float32",
            "--student_config", str(tmp_path / "student-config"), "--train_data", image_dataset_dir,
            "--max_train_samples", "8", "--per_device_train_batch_size", "8", "--max_steps", "1",
            "--output_dir", str(student), "--teacher_cache", str(tmp_path / "cache"), "--disable_tqdm", "true",
        ]
    )  # fmt: skip
    suite = tmp_path / "suite.yaml"
    suite.write_text(f"datasets:\n  - {{name: mnist, path: {mnist_splits_dir}, protocols: [knn], max_train_samples: "
                     "10, max_test_samples: 6}\nbatch_size: 6\n")  # fmt: skip
    results = evaluate_recipe.main(
        ["--models", str(student), "--model_names", "student", "--image_size", "56", "--config", str(suite),
         "--knn_k", "5", "--output_dir", str(tmp_path / "eval"), *emulation_args(str(student), [dinov2, EFFICIENTNET])]
    )  # fmt: skip
    table = capsys.readouterr().out
    for name in ("dinov2", "efficientnet-lite0-128"):  # the teachers' names in the demo (its 128 px factory)
        assert f"| mnist/emulation/{name}/patch_r2 |" in table
    assert "| mnist/emulation/efficientnet-lite0-128/top1_agreement |" in table
    assert 0.0 <= results["student"]["mnist/emulation/efficientnet-lite0-128/top1_agreement"] <= 100.0
