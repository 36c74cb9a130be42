"""UDON: one compact universal embedding over several fine-grained domains, with online per-domain teacher heads on a
shared backbone and a dynamic domain sampler. `--method uscrr` trains the USCRR baseline on the same data.

    accelerate launch recipes/udon.py --config recipes/configs/udon_uned_clip_vitb16.yaml   # UnED (prepare_uned.py)
    accelerate launch recipes/udon.py --config recipes/configs/udon_mnist_fashion_small.yaml  # offline, CPU
    accelerate launch recipes/udon.py --backbone google/vit-base-patch16-224 --domains a=DIR_A b=HUB_ID ...

Domains come from the YAML (`domains:` list of {name, path, train_split, eval_split, image_column, label_column, ...})
or from `--domains NAME=PATH ...`. The final `--output_dir` holds the universal embedding model:
`AutoModel.from_pretrained(output_dir, trust_remote_code=True)(pixel_values).image_embeds` is the 64-d embedding. After
training, retrieval (one index merged over all domains: R@1, mMP@5 per domain and averaged) is computed on the
domains' eval splits and written to `eval_results.json`, with a model card (`README.md`: retrieval results in its
`model-index`) and plots of the per-domain results and of the domain sampler. `--push_to_hub true --hub_model_id
you/udon` then uploads exactly that export (weights, config with `auto_map`, its two code files, image processor,
card, `eval_results.json`, plots): no checkpoint, teacher head or training argument. A killed run restarts from its
last checkpoint with the same command.
"""

import logging
from dataclasses import dataclass, field

import torch
from transformers import set_seed

from hf_distill.data.domains import DomainSpec, load_domains
from hf_distill.data.image_verification import verify_domain_images
from hf_distill.distributed_checks import check_distributed_setup
from hf_distill.evaluation.retrieval import multi_domain_retrieval
from hf_distill.hub import publishable_name, take_hub_options
from hf_distill.hub.method_cards import write_udon_card
from hf_distill.losses.udon import MARGIN_TYPES
from hf_distill.models import UdonModel, UdonModelConfig
from hf_distill.models.builders import build_udon_model
from hf_distill.models.configuration_teacher import IMAGENET_MEAN, IMAGENET_STD
from hf_distill.recipe_utils import exit_cleanly, parse_with_yaml, profiler_callbacks, setup_logging
from hf_distill.restarts import start_run
from hf_distill.trainers import UdonConfig, UdonTrainer

logger = logging.getLogger("hf_distill.recipes.udon")
METHODS = ("udon", "uscrr")


@dataclass
class ScriptArguments:
    """Data and model options of the UDON recipe (training options are in `UdonConfig`)."""

    backbone: str | None = field(
        default=None,
        metadata={"help": "Hub id or folder of the pretrained backbone (ViT-family model or CLIP checkpoint)."},
    )
    random_init: bool = field(
        default=False, metadata={"help": "Build the backbone from its config with random weights (tests, tiny runs)."}
    )
    domains: list[str] | None = field(
        default=None, metadata={"help": "Domains as NAME=PATH (or a `domains:` list in the YAML).", "nargs": "+"}
    )
    method: str = field(default="udon", metadata={"help": f"One of {METHODS}: UDON, or the USCRR baseline."})
    teacher_dim: int = field(default=256, metadata={"help": "Width of the per-domain teacher embeddings."})
    embedding_dim: int = field(default=64, metadata={"help": "Width of the universal embedding."})
    logit_scale: float = field(default=16.0, metadata={"help": "Scale of the normalized-softmax logits."})
    margin: float = field(default=0.0, metadata={"help": "ArcFace / CosFace margin."})
    margin_type: str = field(default="none", metadata={"help": f"One of {MARGIN_TYPES}."})
    distill_temperature: float = field(default=0.1, metadata={"help": "Temperature of the logit distillation."})
    relational_scale: float = field(
        default=32.0,
        metadata={
            "help": "Relational term = scale x mean of (S_s - S_t)^2; 32 = the UDON code at 128 images on 4 GPUs."
        },
    )
    distill_to_backbone: bool = field(
        default=True,
        metadata={"help": "Distillation gradients reach the backbone (code) or stop at the head (paper)."},
    )
    image_mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN), metadata={"nargs": 3})
    image_std: list[float] = field(default_factory=lambda: list(IMAGENET_STD), metadata={"nargs": 3})
    eval_batch_size: int = field(default=64, metadata={"help": "Batch size of the retrieval evaluation."})
    profile: bool = field(default=False, metadata={"help": "Profiler trace of steps 3-5 into OUTPUT_DIR/profile."})


def parse_args(argv: list[str] | None = None) -> tuple[ScriptArguments, UdonConfig, list]:
    (script_args, training_args), extra = parse_with_yaml((ScriptArguments, UdonConfig), argv, list_keys=("domains",))
    domains = script_args.domains or extra.get("domains") or []
    if not script_args.backbone:
        raise ValueError("--backbone is required (a Hub id or folder; with --random_init a config is enough).")
    if script_args.method not in METHODS:
        raise ValueError(f"--method must be one of {METHODS}, got {script_args.method!r}.")
    if not domains:
        raise ValueError("No domains: pass --domains NAME=PATH ... or a `domains:` list in the --config YAML.")
    strategy = getattr(training_args.eval_strategy, "value", training_args.eval_strategy)
    if strategy != "no":
        raise ValueError(
            f"--eval_strategy {strategy} is not supported by recipes/udon.py: its evaluation is the retrieval on the "
            "domains' eval splits (merged index, R@1 / mMP@5), run once after training into eval_results.json. Leave "
            "--eval_strategy no."
        )
    return script_args, training_args, domains


def build_model(script_args: ScriptArguments, domains: list[dict], image_size: int) -> UdonModel:
    config = UdonModelConfig(
        domains=[{"name": d["name"], "num_classes": d["num_classes"]} for d in domains],
        teacher_dim=script_args.teacher_dim,
        embedding_dim=script_args.embedding_dim,
        logit_scale=script_args.logit_scale,
        margin=script_args.margin,
        margin_type=script_args.margin_type,
        distill_temperature=script_args.distill_temperature,
        relational_scale=script_args.relational_scale,
        distill_to_backbone=script_args.distill_to_backbone,
        use_teacher_heads=script_args.method == "udon",
        image_mean=script_args.image_mean,
        image_std=script_args.image_std,
    )
    return build_udon_model(script_args.backbone, config, image_size, script_args.random_init)


def main(argv: list[str] | None = None, callbacks: list | None = None) -> tuple[UdonTrainer, dict]:
    script_args, training_args, domain_specs = parse_args(argv)
    hub_options = take_hub_options(training_args)  # the Trainer never pushes; the final export is pushed below
    setup_logging(training_args)
    # refuses a silent fallback, before anything is loaded
    check_distributed_setup(training_args, teachers="in_student")
    set_seed(training_args.seed)
    data = load_domains(domain_specs, seed=training_args.seed)  # every data problem is reported here, before weights
    data = verify_domain_images(data, training_args)  # unreadable images too (listed, or skipped and logged)
    model = build_model(script_args, data.domains, training_args.image_size)
    logger.info(
        "%s on %s: %d domains, %d training images, %s parameters",
        script_args.method.upper(),
        model.config.backbone_config.model_type,
        len(data.domains),
        len(data.train),
        f"{model.num_parameters():,}",
    )
    run = start_run(  # lock, complete checkpoint, manifest: a rerun resumes only the same run
        training_args, "udon", student_config=model.config, data={"train": data.train},
        initial_weights={} if script_args.random_init else {"backbone": script_args.backbone},
        options=(script_args, training_args),
    )  # fmt: skip
    trainer = UdonTrainer(
        model=model,
        args=training_args,
        train_dataset=data.train,
        domain_sizes=[d["num_train"] for d in data.domains],
        callbacks=(callbacks or []) + profiler_callbacks(script_args.profile, training_args),
    )
    result = run.train(trainer)  # a finished run trains nothing; a stopped one raises TrainingStopped
    trainer.log_metrics("train", result.metrics)
    trainer.save_metrics("train", result.metrics)
    trainer.save_state()
    trainer.save_model()

    results = {}
    if training_args.should_save:
        embedding = model.embedding_model().to(training_args.device)
        results = multi_domain_retrieval(
            embedding,
            data.eval,
            training_args.image_size,
            model.config.image_mean,
            model.config.image_std,
            batch_size=script_args.eval_batch_size,
        )
        results["method"] = script_args.method
        lines = [f"{name}: R@1 {v['R@1']:.2f}  mMP@5 {v['mMP@5']:.2f}" for name, v in results["per_domain"].items()]
        logger.info("Retrieval (merged index)\n%s\nmean: R@1 %.2f  mMP@5 %.2f", "\n".join(lines),
                    results["mean"]["R@1"], results["mean"]["mMP@5"])  # fmt: skip
        export(trainer, script_args, training_args, domain_specs, results)
        if hub_options is not None:
            hub_options.push(training_args.output_dir, f"Upload {script_args.method.upper()} embedding model")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    run.close()
    return trainer, results


def export(trainer, script_args, training_args, domain_specs, results: dict) -> None:
    """`eval_results.json` (tied to the exported weights), plots (retrieval per domain, sampler weights) and the model
    card beside the exported embedding model in `output_dir`."""
    config = trainer.udon_model.config
    backbone = publishable_name(script_args.backbone)
    settings = {
        "method": script_args.method.upper(),
        "backbone": f"{backbone}{' (random init)' if script_args.random_init else ''}",
        "embedding dim": config.embedding_dim,
        "teacher dim": config.teacher_dim if script_args.method == "udon" else "-",
        "domain sampling": training_args.sampling,
        "image size": training_args.image_size,
        "training steps": trainer.state.global_step,
        "batch size (one domain per step)": training_args.per_device_train_batch_size * training_args.world_size,
        "learning rate (heads / backbone)": f"{training_args.learning_rate:g} / "
        f"{training_args.backbone_learning_rate:g}",
    }
    write_udon_card(
        training_args.output_dir, results, [DomainSpec.parse(spec) for spec in domain_specs],
        method=script_args.method, backbone=script_args.backbone, random_init=script_args.random_init,
        settings=settings, log_history=trainer.state.log_history, embedding_dim=config.embedding_dim,
        repo_id=training_args.hub_model_id, paper=trainer._paper, tags=trainer._tag_names,
    )  # fmt: skip


if __name__ == "__main__":
    main()
    exit_cleanly(0)
