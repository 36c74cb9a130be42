"""Recipe plumbing shared by recipes/*.py: YAML defaults under command-line options, logging, resuming, profiling,
a clean exit."""

import argparse
import dataclasses
import logging
import os
import sys

import datasets
import transformers
import yaml
from transformers import HfArgumentParser, TrainerCallback, TrainingArguments

from .profiling import ProfilerCallback
from .restarts.checkpoints import newest_complete_checkpoint
from .restarts.run_folder import Run

logger = logging.getLogger(__name__)
ALLOW_CODE_FLAG = "--allow_code_teachers"  # consent, on the command line only, to `py:` teachers read from a YAML


def parse_with_yaml(
    dataclass_types: tuple, argv: list[str] | None = None, list_keys: tuple[str, ...] = ()
) -> tuple[tuple, dict]:
    """Parse `argv` into `dataclass_types`, with the YAML file of `--config` (if any) as defaults that the command
    line overrides. Unknown YAML keys are an error. Keys in `list_keys` (e.g. a `datasets:` list) are not options:
    they are taken out of the YAML and returned.

    Returns:
        `(dataclass instances, {key: value for key in list_keys})`.
    """
    namespace, argv, extra = parse_namespace_with_yaml(dataclass_types, argv, list_keys)
    instances = tuple(dataclass_from_namespace(kind, namespace) for kind in dataclass_types)
    for instance in instances:
        if isinstance(instance, TrainingArguments):
            instance.allow_config_change = list(namespace.allow_config_change)
    if not namespace.allow_code_teachers:
        for instance in instances:
            check_code_specs(vars(instance).values(), argv, namespace.config)
    return instances, extra


def parse_namespace_with_yaml(
    dataclass_types: tuple,
    argv: list[str] | None = None,
    list_keys: tuple[str, ...] = (),
    defaults: dict | None = None,
) -> tuple[argparse.Namespace, list[str], dict]:
    """The options of `dataclass_types` parsed from `argv` into a namespace, without building the dataclasses (for a
    recipe that checks or completes the values first, e.g. to resolve `auto`).

    Defaults, from lowest to highest priority: the dataclass fields, `defaults`, the YAML file of `--config`, the
    command line. A YAML key is an option name (the field, or one of its `aliases`). An option without default is
    required on the command line unless `defaults` or the YAML set it. Keys in `list_keys` are taken out of the YAML
    and returned.

    Returns:
        `(namespace, argv, {key: value for key in list_keys})`: the namespace also holds `config`,
        `allow_code_teachers` and, when one of the types is a `TrainingArguments`, `allow_config_change`.
    """
    parser = HfArgumentParser(dataclass_types)
    parser.add_argument("--config", default=None, help="YAML file whose keys set the defaults of any option.")
    if any(issubclass(kind, TrainingArguments) for kind in dataclass_types):  # the option of restarts.start_run
        parser.add_argument(
            "--allow_config_change",
            nargs="+",
            default=[],
            metavar="FIELD",
            help="Resume a run although these fields of its run manifest changed (e.g. learning_rate, max_steps, "
            "teachers, data); see README 'Restarts and failures'.",
        )
    parser.add_argument(
        ALLOW_CODE_FLAG,
        action="store_true",
        help="Accept `py:module:function` teachers read from the --config YAML: loading one imports that module and "
        "runs that function (arbitrary code). A `py:` teacher typed on the command line needs no flag.",
    )
    defaults = dict(defaults or {})
    parser.set_defaults(**defaults)
    required = [action for action in parser._actions if action.required]
    for action in required:  # until the YAML is read
        action.required = False
    argv = sys.argv[1:] if argv is None else list(argv)
    known, _ = parser.parse_known_args(argv)
    extra = {}
    if known.config is not None:
        if not os.path.isfile(known.config):
            raise FileNotFoundError(f"--config {known.config}: no such file.")
        with open(known.config) as handle:
            values = yaml.safe_load(handle) or {}
        extra = {key: values.pop(key) for key in list_keys if key in values}
        if "allow_code_teachers" in values:
            raise ValueError(
                f"{known.config} sets allow_code_teachers: a config file cannot allow itself to run code; pass "
                f"{ALLOW_CODE_FLAG} on the command line."
            )
        actions = {key: parser._option_string_actions.get(f"--{key}") for key in values}
        unknown = sorted(
            key
            for key, action in actions.items()  # `no_<flag>` is a negation on the command line only
            if action is None or (action.dest != key and isinstance(action, argparse._StoreFalseAction))
        )
        if unknown:
            raise ValueError(f"Unknown options in {known.config}: {unknown}. See the recipe's --help.")
        defaults = {actions[key].dest: value for key, value in values.items()}
        parser.set_defaults(**defaults)
    for action in required:
        action.required = action.dest not in defaults
    namespace, remaining = parser.parse_known_args(argv)
    if remaining:
        raise ValueError(f"Some specified arguments are not used by the HfArgumentParser: {remaining}")
    return namespace, argv, extra


def dataclass_from_namespace(kind: type, namespace: argparse.Namespace):
    """An instance of the dataclass `kind` from the values of its init fields in `namespace`."""
    return kind(**{field.name: getattr(namespace, field.name) for field in dataclasses.fields(kind) if field.init})


def check_code_specs(values, argv: list[str], source: str | None) -> None:
    """Refuse `py:module:function` specs (code that loading runs) that are not on the command line `argv`.

    A `py:` teacher imports a module and calls a function when it is loaded. Typed on the command line it is the
    user's explicit choice; read from a YAML file (possibly shared, downloaded or written by someone else) it needs
    `--allow_code_teachers` on the command line.
    """
    typed = set(argv)
    for value in values:
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(item, str) and item.startswith("py:") and item not in typed:
                raise ValueError(
                    f"{source or 'The configuration'} names the code teacher {item!r}: loading it imports and runs "
                    f"Python code. Pass {ALLOW_CODE_FLAG} on the command line to allow it, or give the teacher on "
                    "the command line."
                )


def setup_logging(training_args: TrainingArguments) -> None:
    """hf_distill says what it is doing on the main process (INFO); transformers and datasets follow `--log_level`."""
    level = training_args.get_process_log_level()
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        handlers=[logging.StreamHandler()],
    )
    if training_args.log_level == "passive" and training_args.should_log:
        logging.getLogger("hf_distill").setLevel(logging.INFO)
    else:
        logging.getLogger("hf_distill").setLevel(level)
    datasets.utils.logging.set_verbosity(level)
    transformers.utils.logging.set_verbosity(level)


def checkpoint_to_resume(training_args: TrainingArguments) -> str | None:
    """`--resume_from_checkpoint` if given, else the newest complete checkpoint in `--output_dir` (recipes use
    [`~hf_distill.restarts.start_run`], which also removes incomplete ones and says why)."""
    checkpoint = training_args.resume_from_checkpoint
    if checkpoint is None:
        checkpoint, skipped = newest_complete_checkpoint(
            training_args.output_dir, training_args.world_size, training_args.save_only_model
        )
        for folder, reason in skipped:
            logger.warning("Skipping the incomplete checkpoint %s: %s.", folder, reason)
        if checkpoint is not None:
            logger.info("Resuming from the newest complete checkpoint in the output directory: %s", checkpoint)
    return checkpoint


def profiler_callbacks(profile: bool, training_args: TrainingArguments) -> list[TrainerCallback]:
    """`[ProfilerCallback]` writing to `{output_dir}/profile` when `profile` is set, else `[]`."""
    return [ProfilerCallback(os.path.join(training_args.output_dir, "profile"))] if profile else []


def exit_cleanly(code: int = 0) -> None:
    """Flush and leave without running interpreter finalizers: accelerate/gloo runs sometimes abort at exit
    ("terminate called without an active exception") after all the work is done."""
    import torch.distributed as dist

    if Run._active is not None:  # os._exit skips atexit: release the output folder's lock here
        Run._active.close()
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
