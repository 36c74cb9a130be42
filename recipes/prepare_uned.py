"""Prepare UnED, the 8-domain benchmark of UDON, for `recipes/udon.py`: one `datasets` folder per domain.

    python recipes/prepare_uned.py --info_files_dir data/info_files --images_dir data/images --output_dir data/uned
    accelerate launch recipes/udon.py --config recipes/configs/udon_uned_clip_vitb16.yaml

UnED is not on the Hugging Face Hub. Get the split files (https://cmp.felk.cvut.cz/univ_emb/info_files.zip) and the
images of the 8 source datasets (links on https://cmp.felk.cvut.cz/univ_emb/#dataset, folder layout in
https://github.com/nikosips/Universal-Image-Embeddings) first. `--hub_prefix my-org/uned-` also pushes every domain to
the Hub as `my-org/uned-DOMAIN`; the UDON config then names those ids instead of the folders. Rerunning the same
command after an interruption skips the domains already written.
"""

import logging
from dataclasses import dataclass, field

from transformers import HfArgumentParser

from hf_distill.data.uned import UNED_DOMAINS, prepare_uned

logger = logging.getLogger("hf_distill.recipes.prepare_uned")


@dataclass
class PrepareUnedArguments:
    info_files_dir: str = field(metadata={"help": "Folder of the extracted UnED info files (DOMAIN/SPLIT.json)."})
    images_dir: str = field(metadata={"help": "Folder holding the images of the source datasets (images/DOMAIN/...)."})
    output_dir: str = field(default="data/uned", metadata={"help": "One `save_to_disk` folder per domain goes here."})
    domains: list[str] = field(default_factory=lambda: list(UNED_DOMAINS), metadata={"nargs": "+"})
    splits: list[str] = field(
        default_factory=lambda: ["train", "val"],
        metadata={"help": "Splits to write (UDON trains on train, validates on val; test for the final numbers).",
                  "nargs": "+"},
    )  # fmt: skip
    hub_prefix: str | None = field(default=None, metadata={"help": "Also push every domain as HUB_PREFIX + DOMAIN."})
    private: bool = field(default=False, metadata={"help": "Create the Hub datasets as private."})


def main(argv: list[str] | None = None) -> dict[str, str]:
    (args,) = HfArgumentParser(PrepareUnedArguments).parse_args_into_dataclasses(args=argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    folders = prepare_uned(
        args.info_files_dir, args.images_dir, args.output_dir, args.domains, args.splits, args.hub_prefix, args.private
    )
    logger.info("UnED domains ready: %s", folders)
    return folders


if __name__ == "__main__":
    main()
