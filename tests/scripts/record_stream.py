"""Run the UNIC recipe recording, per process, the ids of the id images (tests/data/test_streaming.py) each training
step trains on, and optionally kill every process (SIGKILL) when it starts step RECORD_STREAM_KILL_AT.

Usage: accelerate launch ... tests/scripts/record_stream.py RECORD_DIR [recipe arguments ...]
Environment: RECORD_STREAM_RUN (name of the record files: RECORD_DIR/{name}-{rank}.jsonl), RECORD_STREAM_KILL_AT.
"""

import json
import os
import signal
import sys

from hf_distill.recipe_utils import exit_cleanly

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from tests.conftest import load_recipe  # noqa: E402 (the one recipe loader of the tests)
from tests.data.test_streaming import batch_ids  # noqa: E402

record_dir, recipe_args = sys.argv[1], sys.argv[2:]
kill_at = int(os.environ.get("RECORD_STREAM_KILL_AT", "0"))
run_name = os.environ.get("RECORD_STREAM_RUN", "run")
recipe = load_recipe("unic")
original = recipe.UnicTrainer.compute_loss


def compute_loss(trainer, model, inputs, *args, **kwargs):
    if model.training:
        step = trainer.state.global_step + 1
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)  # a hard kill: no checkpoint, no cleanup
        os.makedirs(record_dir, exist_ok=True)
        path = os.path.join(record_dir, f"{run_name}-{trainer.args.process_index}.jsonl")
        with open(path, "a") as handle:
            handle.write(json.dumps({"step": step, "ids": batch_ids(inputs["pixel_values"])}) + "\n")
    return original(trainer, model, inputs, *args, **kwargs)


recipe.UnicTrainer.compute_loss = compute_loss
recipe.main(recipe_args)
exit_cleanly(0)
