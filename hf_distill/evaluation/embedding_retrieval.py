"""UnED-style retrieval of an embedding model over several domains: one merged index, R@1 and mMP@5 per domain and
averaged (the protocol of [`retrieval_metrics`])."""

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..data.augmentations import resize_center
from ..data.image_datasets import ImageCollator
from .retrieval import retrieval_metrics


@torch.inference_mode()
def embed_images(model, dataset, image_size: int, mean, std, batch_size: int = 64, device=None, description=None):
    """`model(pixel_values).image_embeds` for every image of `dataset` (resized, center-cropped, normalized)."""
    device = torch.device(device or next(model.parameters()).device)
    mean = torch.tensor(mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(std, device=device).view(1, -1, 1, 1)
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=ImageCollator(image_size))
    embeddings = []
    for batch in tqdm(loader, desc=description or "Embedding", unit="batch", leave=False):
        pixels = (resize_center(batch["pixel_values"].to(device), image_size) - mean) / std
        embeddings.append(model(pixel_values=pixels).image_embeds.float().cpu())
    return torch.cat(embeddings)


def multi_domain_retrieval(
    model, eval_sets: dict, image_size: int, mean, std, batch_size: int = 64, k: int = 5
) -> dict:
    """Embed every domain's eval set, merge them into one index and compute R@1 / mMP@k per domain and averaged.

    `eval_sets` maps domain name -> dataset with `image` and `label` columns (labels in the domain's own space).
    """
    features, labels, domains = [], [], []
    for index, (name, dataset) in enumerate(eval_sets.items()):
        features.append(
            embed_images(model, dataset, image_size, mean, std, batch_size, description=f"Embedding {name}")
        )
        labels.append(torch.tensor(dataset["label"], dtype=torch.long))
        domains.append(torch.full((len(dataset),), index, dtype=torch.long))
    return retrieval_metrics(
        torch.cat(features), torch.cat(labels), torch.cat(domains), k=k, domain_names=list(eval_sets)
    )
