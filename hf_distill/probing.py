"""Probe a frozen teacher on a labelled task: a linear head fitted on its cached summary features, saved and reused.

```python
from hf_distill.probing import probe_teacher

probed, results = probe_teacher(teacher, train, evaluation, "outputs/run/probe", image_size=224)
probed(pixel_values, mean, std)  # class logits of the frozen teacher + fitted head
results["accuracy"]  # top-1 (%) of the probed teacher on `evaluation`
```

This module sits above `evaluation/` (feature extraction, the L-BFGS probe) and `models/` ([`ProbedTeacher`]) and ties
them together; neither of them imports it.
"""

import json
import logging
import os

from datasets import Dataset
from torch import nn

from .evaluation.features import encoder_fingerprint, extract_features
from .evaluation.linear_probe import fit_linear_probe
from .io_utils import write_json_atomically
from .models.probed_teacher import HEAD_FILE, ProbedTeacher

logger = logging.getLogger(__name__)
PROBE_RESULTS = "probe_results.json"


def probe_teacher(
    teacher: nn.Module,
    train: Dataset,
    evaluation: Dataset,
    probe_dir: str | os.PathLike,
    image_size: int,
    seed: int = 0,
    batch_size: int = 64,
    device=None,
    save: bool = True,
) -> tuple[ProbedTeacher, dict]:
    """Fit (or reuse) a linear head on the frozen `teacher`'s summary features of `train` (`image` + int `label`
    columns), and measure the probed teacher on `evaluation`.

    The features are cached in `probe_dir/features`; with `save`, the head (`linear_head.safetensors`) and the results
    (`probe_results.json`, keyed by the teacher's weights fingerprint, both datasets' fingerprints, `image_size` and
    `seed`) are written to `probe_dir`, atomically. A later call with the same key reuses the head without computing
    anything; another key fits a new one.

    Returns:
        `(probed teacher, results)`: `results` holds `key`, `accuracy` (top-1 % on `evaluation`), `val_accuracy` (on
        the held-out part of `train` that chose the L2) and `weight_decay`.
    """
    probe_dir = os.fspath(probe_dir)
    key = {
        "teacher_fingerprint": encoder_fingerprint(teacher),
        "train": train._fingerprint,
        "eval": evaluation._fingerprint,
        "image_size": image_size,
        "seed": seed,
    }
    results_path = os.path.join(probe_dir, PROBE_RESULTS)
    if os.path.exists(results_path) and os.path.exists(os.path.join(probe_dir, HEAD_FILE)):
        with open(results_path) as handle:
            saved = json.load(handle)
        if saved.get("key") == key:
            logger.info("Reusing the probe in %s: teacher accuracy %.2f%%", probe_dir, saved["accuracy"])
            return ProbedTeacher.from_saved_head(teacher, probe_dir), saved
        logger.info("The probe in %s is for other data or another teacher: fitting a new one", probe_dir)
    options = dict(
        label_column="label",
        image_size=image_size,
        batch_size=batch_size,
        cache_dir=os.path.join(probe_dir, "features"),
        device=device,
    )
    train_set = extract_features(teacher, train, description="Teacher features (train)", **options)
    eval_set = extract_features(teacher, evaluation, description="Teacher features (eval)", **options)
    logger.info("Fitting the linear probe on %d x %d teacher features", *train_set.features.shape)
    fit = fit_linear_probe(train_set.features, train_set.labels, eval_set.features, eval_set.labels, seed=seed)
    probed = ProbedTeacher(teacher, fit.weight, fit.bias, fit.mean, fit.std)
    results = {"key": key, "accuracy": fit.test_top1, "val_accuracy": fit.val_top1, "weight_decay": fit.weight_decay}
    if save:
        probed.save_head(probe_dir)
        write_json_atomically(results_path, results)
    logger.info("Probed teacher accuracy on the eval split: %.2f%%", fit.test_top1)
    return probed, results
