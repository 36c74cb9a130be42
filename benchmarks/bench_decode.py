"""Input pipeline benchmark: JPEG photos decoded and resized per second on one core, full decode vs PIL's draft mode.

    python -m benchmarks.bench_decode                       # the real JPEG photos shipped with scikit-learn / matplotlib
    python -m benchmarks.bench_decode --images DIR --sizes 128 256

Every image is decoded from its file bytes in memory and turned into the `[3, size, size]` uint8 array the training
collator produces (`hf_distill.data.image_datasets`: shorter side resized to `size` bicubic, center crop), either by
decoding the full JPEG or with `Image.draft("RGB", (size, size))`, which lets libjpeg decode at 1/2, 1/4 or 1/8 scale
(in the DCT domain) when the result stays at least `size` on both sides. Reported: images/s on one core (single
process, one thread: decoding scales with the data-loader workers), the speed-up, and the PSNR of the draft result
against the full decode (same resize and crop). With `--step_results`, the number of cores needed to feed the step
rates measured by `make bench` follows.

Writes `{output_dir}/decode.json` and `.md`.
"""

import argparse
import glob
import io
import json
import os
import platform
import statistics
import time

import numpy as np
import torch
from PIL import Image

from hf_distill.data.image_datasets import ImageCollator

from .report import command_line, write_report


def shipped_photos() -> list[str]:
    """Real JPEG photos installed with the project's dependencies: scikit-learn's `china.jpg` and `flower.jpg` (640 x
    427) and matplotlib's `grace_hopper.jpg` (512 x 600); scikit-image's JPEGs too when it is installed."""
    paths = []
    try:
        import sklearn.datasets

        folder = os.path.join(os.path.dirname(sklearn.datasets.__file__), "images")
        paths += sorted(glob.glob(os.path.join(folder, "*.jpg")))
    except ImportError:
        pass
    try:
        import matplotlib

        paths += sorted(glob.glob(os.path.join(matplotlib.get_data_path(), "sample_data", "*.jpg")))
    except ImportError:
        pass
    try:
        import skimage

        paths += sorted(glob.glob(os.path.join(os.path.dirname(skimage.__file__), "data", "*.jpg")))
    except ImportError:
        pass
    return paths


def to_array(data: bytes, size: int, draft: bool) -> np.ndarray:
    """What the training collator makes of one undecoded image: `[3, size, size]` uint8."""
    return ImageCollator(size, jpeg_draft=draft)._pixels({"image": {"bytes": data, "path": None}})


def psnr(reference: np.ndarray, other: np.ndarray) -> float:
    mse = np.mean((reference.astype(np.float64) - other.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def measure(files: dict[str, bytes], size: int, repeats: int) -> dict:
    """Alternating full / draft passes over all images; median images/s per pass."""
    rates = {"full": [], "draft": []}
    for _ in range(repeats):
        for mode in ("full", "draft"):
            start = time.perf_counter()
            for data in files.values():
                to_array(data, size, mode == "draft")
            rates[mode].append(len(files) / (time.perf_counter() - start))
    per_image = {}
    for name, data in files.items():
        full, draft = to_array(data, size, False), to_array(data, size, True)
        with Image.open(io.BytesIO(data)) as image:
            original = image.size
            reduced = image.draft("RGB", (size, size))
            scale = original[0] / image.size[0] if reduced else 1.0
        per_image[name] = {"original": list(original), "draft_scale": f"1/{scale:.0f}", "psnr_db": psnr(full, draft)}
    full_rate, draft_rate = statistics.median(rates["full"]), statistics.median(rates["draft"])
    return {
        "size": size,
        "full_images_per_s": full_rate,
        "draft_images_per_s": draft_rate,
        "speedup": statistics.median([d / f for f, d in zip(rates["full"], rates["draft"])]),
        "min_psnr_db": min(entry["psnr_db"] for entry in per_image.values()),
        "images": per_image,
    }


def feeding(rows: list[dict], step_results: list[str]) -> list[dict]:
    """Cores needed to decode as fast as each measured step consumes images (`make bench` JSON files)."""
    needs = []
    for path in step_results:
        with open(path) as handle:
            report = json.load(handle)
        load_size = report["settings"]["image_size"] * 8 // 7  # the trainers' default load size
        row = min(rows, key=lambda r: abs(r["size"] - load_size))
        for result in report.get("results", []):
            for arm_name in ("hf_distill", "cached teachers"):
                arm = result.get("arms", {}).get(arm_name)  # files of the previous bench format have no arms
                if arm is None:
                    continue
                needs.append(
                    {
                        "step_results": os.path.basename(path),
                        "device": report["device"],
                        "model": result["size"],
                        "num_teachers": result["num_teachers"],
                        "arm": arm_name,
                        "images_per_s": arm["images_per_s"],
                        "decode_size": row["size"],
                        "cores_full": arm["images_per_s"] / row["full_images_per_s"],
                        "cores_draft": arm["images_per_s"] / row["draft_images_per_s"],
                    }
                )
    return needs


def format_tables(report: dict) -> str:
    lines = [
        f"Device: {report['device']}, one core (1 thread), Pillow {report['pillow']}, {len(report['files'])} JPEG "
        f"photos ({', '.join(report['files'])}); {report['command']}",
        "",
        "| size | full decode img/s/core | draft img/s/core | speed-up | min PSNR draft vs full (dB) | draft scales |",
        "|---:|---:|---:|---:|---:|---|",
    ]
    for row in report["results"]:
        scales = ", ".join(sorted({entry["draft_scale"] for entry in row["images"].values()}))
        lines.append(
            f"| {row['size']} | {row['full_images_per_s']:.0f} | {row['draft_images_per_s']:.0f} | "
            f"{row['speedup']:.2f}x | {row['min_psnr_db']:.1f} | {scales} |"
        )
    if report["feeding"]:
        lines += [
            "",
            "| step results | model | K | arm | step img/s | decode size | cores, full decode | cores, draft |",
            "|---|---|---:|---|---:|---:|---:|---:|",
        ]
        for row in report["feeding"]:
            lines.append(
                f"| {row['step_results']} | {row['model']} | {row['num_teachers']} | {row['arm']} | "
                f"{row['images_per_s']:.0f} | {row['decode_size']} | {row['cores_full']:.2f} | "
                f"{row['cores_draft']:.2f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", default=None, help="Folder of JPEG files (default: the shipped photos).")
    parser.add_argument("--sizes", nargs="+", type=int, default=[64, 128, 256])
    parser.add_argument("--repeats", type=int, default=15, help="Timed passes over the images per mode.")
    parser.add_argument(
        "--step_results",
        nargs="*",
        default=None,
        help="`make bench` JSON files (default: every unic_step_*.json under --output_dir).",
    )
    parser.add_argument("--output_dir", default="benchmarks/results")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    paths = (
        sorted(glob.glob(os.path.join(args.images, "*.jp*g")) + glob.glob(os.path.join(args.images, "*.JP*G")))
        if args.images
        else shipped_photos()
    )
    if not paths:
        raise ValueError("No JPEG photo found: pass a folder of .jpg files with --images.")
    files = {}
    for path in paths:
        with open(path, "rb") as handle:
            files[os.path.basename(path)] = handle.read()
    rows = []
    for size in args.sizes:
        rows.append(measure(files, size, args.repeats))
        print(
            f"{size} px: full {rows[-1]['full_images_per_s']:.0f} img/s, draft {rows[-1]['draft_images_per_s']:.0f} "
            f"img/s, min PSNR {rows[-1]['min_psnr_db']:.1f} dB",
            flush=True,
        )
    step_results = args.step_results
    if step_results is None:
        step_results = sorted(glob.glob(os.path.join(args.output_dir, "**", "unic_step_*.json"), recursive=True))
    import PIL

    report = {
        "device": f"{platform.processor() or platform.machine()}",
        "pillow": PIL.__version__,
        "command": command_line("bench_decode", argv),
        "files": list(files),
        "results": rows,
        "feeding": feeding(rows, step_results),
    }
    table = format_tables(report)
    write_report(os.path.join(args.output_dir, "decode"), report, table)
    return report


if __name__ == "__main__":
    main()
