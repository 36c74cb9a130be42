"""Share a distilled student on the Hugging Face Hub: model card, training and evaluation plots, and a clean upload.

A recipe leaves its export folder with the model (`config.json`, weights, `preprocessor_config.json`, and for a
remote-code export such as UDON's its code files) next to training leftovers (`checkpoint-*/`, `trainer_state.json`,
`training_args.bin`, ...). This package writes the model card (`README.md`, rendered from the packaged
`hub/templates/model_card.md`; [`create_or_update_model_card`]), draws the figures under `plots/`, and pushes exactly
the files of the model, never the leftovers ([`push_to_hub`]):

```python
from huggingface_hub import EvalResult
from hf_distill.hub import create_or_update_model_card, plot_training_curves, push_to_hub

plot = plot_training_curves(trainer.state.log_history, "outputs/unic/plots/teacher_losses.png")
create_or_update_model_card(
    "outputs/unic",
    model_name="unic-vitb16-in1k",
    teachers=[{"name": "dino-vitb16", "source": "facebook/dino-vitb16", "summary": "cls", "grid_alignment": "resize"}],
    training_data="ILSVRC/imagenet-1k",
    settings={"student": "ViT-B/16", "image size": 224, "teacher dropping p": 0.5},
    eval_results=[EvalResult(task_type="image-classification", task_name="Linear probe", dataset_type="imagenet-1k",
                             dataset_name="ImageNet-1K", metric_type="accuracy", metric_value=0.78)],
    plots=[plot],
    repo_id="me/unic-vitb16-in1k",
    method="unic",
)
push_to_hub("outputs/unic", "me/unic-vitb16-in1k")
```
"""

from huggingface_hub import EvalResult

from .card import CARD_END_MARKER, CARD_START_MARKER, METHODS, create_or_update_model_card
from .model_index import ProtocolCardData, model_index, validate_card_metadata
from .papers import PAPERS
from .plots import (
    plot_domain_retrieval,
    plot_eval_comparison,
    plot_loss_terms,
    plot_sampler_weights,
    plot_training_curves,
)
from .provenance import is_hub_id, publishable_name, scrub_local_paths, weight_files_sha256
from .push import (
    UPLOAD_PATTERNS,
    HubOptions,
    HubTokenNotPickled,
    PushExportMixin,
    code_files,
    push_to_hub,
    take_hub_options,
    upload_file_list,
)

__all__ = [
    "CARD_END_MARKER",
    "CARD_START_MARKER",
    "UPLOAD_PATTERNS",
    "EvalResult",
    "METHODS",
    "PAPERS",
    "HubOptions",
    "HubTokenNotPickled",
    "ProtocolCardData",
    "PushExportMixin",
    "code_files",
    "create_or_update_model_card",
    "is_hub_id",
    "model_index",
    "plot_domain_retrieval",
    "plot_eval_comparison",
    "plot_loss_terms",
    "plot_sampler_weights",
    "plot_training_curves",
    "publishable_name",
    "push_to_hub",
    "scrub_local_paths",
    "take_hub_options",
    "upload_file_list",
    "validate_card_metadata",
    "weight_files_sha256",
]
