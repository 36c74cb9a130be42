"""`make gpu-check`: everything hf_distill promises on a CUDA GPU, checked in one command on a machine with one GPU and
no internet, in under 8 minutes.

Steps (each with its own timeout, inside a total budget; a failing step does not stop the next ones):

1. `install`: the wheels of `.whl/` (made beforehand by `make gpu-wheels`) whose package is missing here, into a
   private folder put on `PYTHONPATH` (nothing is installed into the machine's Python; torch is never installed);
2. `environment`: nvidia-smi, versions, bf16 support;
3. `cuda_tests`: the test suite's tests marked `cuda`;
4. `assets`: random ViT-B/16 and DINOv2-B/14 teachers, a ViT-B/16 student config and 256 images (tiny ones on CPU);
5. `unic_bf16`: the UNIC recipe in bf16 with these teachers;
6. `unic_fsdp2`: the same through `accelerate launch` with recipes/accelerate_configs/fsdp.yaml, one process;
7. `unic_zero3`: the same with recipes/accelerate_configs/deepspeed_zero3.yaml, one process;
8. `bench`: benchmarks/bench_unic_step.py (what `make bench` runs) with a short setting;
9. `unic_compile`: the recipe with `--torch_compile true` (last: compilation takes what time is left).

Results (logs, `summary.json`, `summary.md`) go to benchmarks/results/gpu/ (benchmarks/results/gpu-dry-cpu/ with
`--device cpu`), and the summary and an archive of all of them are copied to `$OUT` when it is set.

`--device cpu` is a dry run of the same steps on CPU with tiny sizes: the CUDA tests run on CPU, FSDP (which
accelerate runs only on GPUs) is expected to be refused by the recipe's distributed check, DeepSpeed runs on CPU.

    python3 scripts/gpu_check.py                # on the GPU machine, from the repository root (make gpu-check)
    python3 scripts/gpu_check.py --device cpu   # the dry run (make gpu-check DEVICE=cpu)
"""

import argparse
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SITE = Path(os.environ.get("HF_DISTILL_GPU_SITE", "/tmp/hf_distill_gpu_site"))
BUDGET_S = {"cuda": 460, "cpu": 1200}  # the whole check stays under 8 minutes on a GPU


def wheel_distribution(path: Path) -> str:
    return path.name.split("-")[0].replace("_", "-").lower()


def install_wheels(wheel_dir: Path, log) -> tuple[str, str]:
    """Install the wheels of `wheel_dir` that fit this interpreter and whose distribution is missing here or older
    than the wheel (e.g. a GPU image's transformers older than the APIs hf_distill uses)."""
    from packaging.tags import sys_tags
    from packaging.utils import parse_wheel_filename
    from packaging.version import Version

    if not wheel_dir.is_dir():
        return "SKIP", f"no {wheel_dir}/ (run `make gpu-wheels` on a machine with internet first)"
    supported = set(sys_tags())
    chosen, present, unfit = {}, [], []
    for wheel in sorted(wheel_dir.glob("*.whl")):
        name = wheel_distribution(wheel)
        try:
            if Version(importlib.metadata.version(name)) >= parse_wheel_filename(wheel.name)[1]:
                present.append(name)
                continue
        except importlib.metadata.PackageNotFoundError:
            pass
        if not set(parse_wheel_filename(wheel.name)[3]) & supported:
            unfit.append(wheel.name)
            continue
        chosen.setdefault(name, wheel)
    log.write(f"already installed here, same or newer (kept): {sorted(set(present))}\nnot for this Python: {unfit}\n")
    if not chosen:
        return "PASS", "nothing to install"
    SITE.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--upgrade"]
    command += ["--target", str(SITE), *map(str, chosen.values())]
    log.write(" ".join(command) + "\n")
    log.flush()
    result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT)
    status = "PASS" if result.returncode == 0 else "FAIL"
    return status, f"installed into {SITE}: {', '.join(sorted(chosen))}"


ENVIRONMENT_PY = r"""
import importlib.metadata, platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda)
print("cuda available:", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device:", torch.cuda.get_device_name(0), "| capability", torch.cuda.get_device_capability(0))
    print("bf16 supported:", torch.cuda.is_bf16_supported())
    free, total = torch.cuda.mem_get_info()
    print(f"memory: {total / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free")
else:
    print("cpu capability:", torch.backends.cpu.get_cpu_capability(), "| threads", torch.get_num_threads())
for name in ("transformers", "accelerate", "datasets", "diffusers", "evaluate", "deepspeed", "huggingface_hub",
             "safetensors", "numpy", "pyarrow", "pytest"):
    try:
        print(f"{name} {importlib.metadata.version(name)}")
    except importlib.metadata.PackageNotFoundError:
        print(f"{name} MISSING")
import hf_distill
print("hf_distill from", hf_distill.__file__)
"""

ASSETS_PY = r"""
import sys
import numpy as np
import torch
from datasets import Dataset
from PIL import Image
from transformers import Dinov2Config, Dinov2Model, ViTConfig, ViTImageProcessor, ViTModel

root, size = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
if size == "vitb":  # ViT-B-sized: hidden 768, 12 blocks, 12 heads, MLP 3072
    base = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
    vit, dinov2 = ViTConfig(**base, image_size=224, patch_size=16), Dinov2Config(**base, image_size=224, patch_size=14)
    student, images, side = ViTConfig(**base, image_size=224, patch_size=16), 256, 256
else:  # tiny: hidden 32, 2 blocks
    base = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    vit, dinov2 = ViTConfig(**base, image_size=32, patch_size=8), Dinov2Config(**base, image_size=28, patch_size=7)
    student, images, side = ViTConfig(**base, image_size=32, patch_size=8), 32, 40
for name, model, config in (("vit", ViTModel, vit), ("dinov2", Dinov2Model, dinov2)):
    kwargs = {"add_pooling_layer": False} if model is ViTModel else {}
    model(config, **kwargs).save_pretrained(f"{root}/{name}")
    ViTImageProcessor(size={"height": config.image_size, "width": config.image_size}).save_pretrained(f"{root}/{name}")
student.save_pretrained(f"{root}/student")
rng = np.random.default_rng(0)
pictures = []
for _ in range(images):  # smooth random colour fields (compressible, unlike white noise)
    low = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    pictures.append(Image.fromarray(low).resize((side, side), Image.BICUBIC))
Dataset.from_dict({"image": pictures}).save_to_disk(f"{root}/images")
print("assets in", root)
"""


class Check:
    def __init__(self, args):
        self.args = args
        self.cuda = args.device == "cuda"
        default = "gpu" if self.cuda else "gpu-dry-cpu"
        self.results = Path(args.results or ROOT / "benchmarks" / "results" / default)
        self.results.mkdir(parents=True, exist_ok=True)
        work = Path(os.environ.get("HF_DISTILL_GPU_WORK", f"/tmp/hf_distill_gpu_check/{args.device}"))
        self.assets, self.runs = work / "assets", work / "runs"  # weights, images and run folders: not results
        self.rows = []
        previous = self.results / "summary.json"
        if args.only and previous.exists():  # a rerun of some steps keeps the other steps' rows
            self.rows = json.loads(previous.read_text())["steps"]
        self.start = time.monotonic()
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(SITE), *filter(None, [os.environ.get("PYTHONPATH")])])
        self.env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HUB_DISABLE_PROGRESS_BARS="1")
        self.env.setdefault("TOKENIZERS_PARALLELISM", "false")
        self.env["PATH"] = os.pathsep.join([str(SITE / "bin"), self.env.get("PATH", "")])
        self.port = 29700

    # ------------------------------------------------------------------ bookkeeping

    def remaining(self) -> float:
        return BUDGET_S[self.args.device] - (time.monotonic() - self.start)

    def record(self, name, status, seconds, note=""):
        row = {"step": name, "status": status, "seconds": round(seconds, 1), "note": note}
        names = [r["step"] for r in self.rows]
        if name in names:
            self.rows[names.index(name)] = row
        else:
            self.rows.append(row)
        print(f"[gpu-check] {name}: {status} ({seconds:.0f} s) {note}", flush=True)
        self.write_summary()

    def run(self, name, command, timeout, expect_refusal=False, note_from=None):
        """Run `command` (list) with its own timeout inside the total budget; the log goes to results/<name>.log."""
        if self.args.only and name not in self.args.only:
            return None
        timeout = min(timeout if self.cuda else 2 * timeout, self.remaining())  # CPU: tiny sizes, slower
        log_path = self.results / f"{name}.log"
        if timeout < 10:
            return self.record(name, "SKIP", 0, "total time budget spent")
        start = time.monotonic()
        with open(log_path, "w") as log:
            log.write("$ " + " ".join(map(str, command)) + "\n")
            log.flush()
            try:
                result = subprocess.run(
                    list(map(str, command)), cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                    timeout=timeout, start_new_session=True,
                )  # fmt: skip
                code = result.returncode
            except subprocess.TimeoutExpired:
                code = None
        seconds = time.monotonic() - start
        text = log_path.read_text(errors="replace")
        if code is None:
            status, note = "FAIL", f"timed out after {timeout:.0f} s"
        elif expect_refusal:
            refused = code != 0 and "DistributedSetupError" in text
            status, note = ("PASS", "refused as expected") if refused else ("FAIL", f"not refused (exit {code})")
        else:
            status, note = ("PASS" if code == 0 else "FAIL"), ("" if code == 0 else f"exit {code}")
        if note_from is not None and status == "PASS":
            note = note_from(text) or note
        return self.record(name, status, seconds, note)

    def write_summary(self):
        total = time.monotonic() - self.start
        summary = {"device": self.args.device, "total_seconds": round(total, 1), "steps": self.rows}
        (self.results / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        lines = [
            f"# gpu-check ({self.args.device}), {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
            "",
            "| step | status | seconds | note |",
            "|---|---|---|---|",
        ]
        lines += [f"| {r['step']} | {r['status']} | {r['seconds']} | {r['note']} |" for r in self.rows]
        lines += ["", f"Total: {total:.0f} s. Logs: {self.results}/<step>.log"]
        (self.results / "summary.md").write_text("\n".join(lines) + "\n")

    # ------------------------------------------------------------------ steps

    def recipe_args(self, name, steps):
        common = [
            "--config", ROOT / "recipes" / "configs" / "unic_gpu_check.yaml",
            "--teachers", self.assets / "vit", self.assets / "dinov2",
            "--student_config", self.assets / "student", "--train_data", self.assets / "images",
            "--output_dir", self.runs / name, "--max_steps", steps,
        ]  # fmt: skip
        if not self.cuda:
            common += ["--image_size", "32", "--per_device_train_batch_size", "8", "--use_cpu", "true"]
            common += ["--dataloader_num_workers", "0"]
        return common

    def launch(self, config, name, steps, extra=(), cpu_precision="no"):
        self.port += 1
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config]
        command += ["--num_processes", "1", "--main_process_port", self.port]
        if not self.cuda:
            command += ["--mixed_precision", cpu_precision]
        return command + [ROOT / "recipes" / "unic.py", *self.recipe_args(name, steps), *extra]

    def main(self):
        print(f"[gpu-check] device {self.args.device}; results in {self.results}", flush=True)
        start = time.monotonic()
        with open(self.results / "install.log", "w") as log:
            status, note = install_wheels(ROOT / ".whl", log)
        self.record("install", status, time.monotonic() - start, note)  # always: the other steps need it

        self.run("environment", ["bash", "-c", f"nvidia-smi; {sys.executable} - <<'EOF'\n{ENVIRONMENT_PY}\nEOF"], 60)

        env_device = {} if self.cuda else {"HF_DISTILL_TEST_DEVICE": "cpu"}
        self.env.update(env_device)
        self.run(
            "cuda_tests",
            [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "--durations=0",
             "--continue-on-collection-errors", "--junitxml", self.results / "cuda_tests.xml", "tests"],
            150, note_from=pytest_tail,
        )  # fmt: skip

        if not self.args.only or "assets" in self.args.only or not self.assets.is_dir():
            shutil.rmtree(self.assets, ignore_errors=True)
            self.args.only = self.args.only and self.args.only + ["assets"]
            self.run("assets", [sys.executable, "-c", ASSETS_PY, self.assets, "vitb" if self.cuda else "tiny"], 90)

        shutil.rmtree(self.runs, ignore_errors=True)
        recipe = [sys.executable, ROOT / "recipes" / "unic.py"]
        steps = 30 if self.cuda else 4
        self.run("unic_bf16", recipe + self.recipe_args("unic_bf16", steps), 120, note_from=throughput)

        fsdp = ROOT / "recipes" / "accelerate_configs" / "fsdp.yaml"
        self.run("unic_fsdp2", self.launch(fsdp, "unic_fsdp2", 10 if self.cuda else 3), 120, expect_refusal=not self.cuda,
                 note_from=throughput)  # fmt: skip
        zero3 = ROOT / "recipes" / "accelerate_configs" / "deepspeed_zero3.yaml"
        # bf16 on CPU too: DeepSpeed's CPU accelerator runs it, and the ZeRO-3 bf16 setup is where the student's dtypes
        # once disagreed (a backbone partitioned in bf16 at construction next to fp32 heads)
        extra = () if self.cuda else ("--bf16", "true")
        self.run(
            "unic_zero3",
            self.launch(zero3, "unic_zero3", 10 if self.cuda else 3, extra, cpu_precision="bf16"),
            150 if self.cuda else 400,
            note_from=throughput,
        )

        bench = [sys.executable, "-m", "benchmarks.bench_unic_step", "--output_dir", self.results]
        if self.cuda:
            bench += ["--sizes", "vit-base", "--teachers", "4", "--steps", "5", "--warmup", "2", "--no_cache"]
        else:
            bench += ["--sizes", "vit-tiny", "--teachers", "1", "--image_size", "32", "--batch_size", "4"]
            bench += ["--steps", "1", "--warmup", "1", "--no_cache"]
        self.run("bench", bench, 90)

        compile_args = ["--torch_compile", "true"]
        if not self.cuda:  # dynamo's tracing without inductor's C++ compilation (minutes on 2 cores)
            compile_args += ["--torch_compile_backend", "aot_eager"]
        self.run(
            "unic_compile", recipe + self.recipe_args("unic_compile", 20 if self.cuda else 3) + compile_args, 180,
            note_from=throughput,
        )  # fmt: skip

        self.write_summary()
        print((self.results / "summary.md").read_text(), flush=True)
        self.copy_to_out()
        return 0 if all(row["status"] != "FAIL" for row in self.rows) else 1

    def copy_to_out(self):
        """To `$OUT` (at most 8 files come back from a remote run): the summary, and every result in one archive."""
        out = os.environ.get("OUT")
        if not out:
            return
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        for name in ("summary.md", "summary.json"):
            shutil.copy(self.results / name, out / name)
        with tarfile.open(out / f"gpu_check_{self.args.device}.tar.gz", "w:gz") as archive:
            archive.add(self.results, arcname=self.results.name)


def pytest_tail(text: str) -> str:
    lines = [line for line in text.splitlines() if " passed" in line or " skipped" in line or " failed" in line]
    return lines[-1].strip("= ") if lines else ""


def throughput(text: str) -> str:
    for line in reversed(text.splitlines()):
        if "train_samples_per_second" in line and "=" in line:
            return "train samples/s " + line.split("=")[-1].strip()
    return ""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--results", default=None, help="Results folder (default benchmarks/results/gpu/).")
    parser.add_argument("--only", nargs="+", default=None, metavar="STEP", help="Run only these steps (a rerun).")
    args = parser.parse_args(argv)
    if args.device == "cuda" and shutil.which("nvidia-smi") is None:
        print("[gpu-check] no nvidia-smi here: for a dry run on CPU use `make gpu-check DEVICE=cpu`.", flush=True)
    return Check(args).main()


if __name__ == "__main__":
    sys.exit(main())
