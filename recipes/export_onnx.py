"""Export a distilled student to ONNX and check it against PyTorch with onnxruntime.

    hf-distill export-onnx outputs/unic-tiny                        # -> outputs/unic-tiny/onnx/model.onnx
    hf-distill export-onnx outputs/task-classifier --output_dir onnx/classifier
    hf-distill export-onnx outputs/udon --trust_remote_code          # the UDON embedding model ships its own code

Works on every export of hf_distill (UNIC encoder, task-distilled classifier, UDON embedding model). The graph takes
`pixel_values` `[batch, 3, S, S]` at the export's image size `S` (its image processor's) with a dynamic batch axis, and
returns the model's outputs under their transformers names. A random batch is run through PyTorch and onnxruntime;
a difference above `--atol + --rtol x max|output|` (both 1e-4) is an error and nothing is written. Needs
`pip install 'hf_distill[onnx]'`.
"""

import logging
from dataclasses import dataclass, field

from hf_distill.onnx_export import export_onnx
from hf_distill.recipe_utils import parse_with_yaml

logger = logging.getLogger("hf_distill.recipes.export_onnx")


@dataclass
class ExportOnnxArguments:
    model_dir: str | None = field(default=None, metadata={"help": "Export folder of a recipe (or any model folder)."})
    output_dir: str | None = field(default=None, metadata={"help": "Folder of model.onnx (default MODEL_DIR/onnx)."})
    image_size: int | None = field(default=None, metadata={"help": "Input side (default: the export's own)."})
    opset: int = field(default=17, metadata={"help": "ONNX opset."})
    atol: float = field(
        default=1e-4, metadata={"help": "Accepted |ONNX - PyTorch|: atol + rtol * max|PyTorch output|."}
    )
    rtol: float = field(
        default=1e-4, metadata={"help": "Part of the accepted difference relative to the output's scale."}
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Load a model that ships its own code (the UDON embedding model)."}
    )


def main(argv: list[str] | None = None):
    argv = list(argv) if argv is not None else None
    if argv and not argv[0].startswith("-"):  # `export-onnx DIR [OPTIONS]`
        argv = ["--model_dir", *argv]
    (args,), _ = parse_with_yaml((ExportOnnxArguments,), argv)
    if not args.model_dir:
        raise ValueError("Give the folder to export: hf-distill export-onnx MODEL_DIR [--output_dir DIR].")
    result = export_onnx(
        args.model_dir,
        output_dir=args.output_dir,
        image_size=args.image_size,
        opset=args.opset,
        trust_remote_code=args.trust_remote_code,
        atol=args.atol,
        rtol=args.rtol,
    )
    diffs = ", ".join(f"{name} {diff:.2e}" for name, diff in result.max_abs_diff.items())
    print(
        f"Wrote {result.path} ({result.image_size} px, outputs {', '.join(result.output_names)}) in "
        f"{result.export_seconds:.2f} s; max |ONNX - PyTorch|: {diffs}"
    )
    return result


if __name__ == "__main__":
    import sys

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main(sys.argv[1:])
