"""Instance-level retrieval metrics of the Universal Embeddings Dataset (UnED) benchmark (UDON paper).

All items of all domains form ONE index. Each query searches the whole index by exact cosine similarity, its own item
excluded; a retrieved item is correct iff it has the same label AND the same domain as the query. Metrics are averaged
over the queries of each domain, then over domains. [`multi_domain_retrieval`] runs the protocol for an embedding
model over several domains' evaluation sets.
"""

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..data.augmentations import resize_center
from ..data.image_datasets import ImageCollator
from .knn import _check_features, _check_labels


def retrieval_metrics(
    features: torch.Tensor,
    labels: torch.Tensor,
    domains: torch.Tensor,
    query_mask: torch.Tensor | None = None,
    k: int = 5,
    chunk_size: int = 1024,
    domain_names: list[str] | None = None,
) -> dict:
    """R@1 and mMP@k of the UnED protocol, per domain and averaged over domains.

    For a query `q`, its positives are the OTHER index items with the same (domain, label) pair. Queries without any
    positive are skipped (counted in `skipped_queries`). Over the remaining queries:

    - `R@1`: fraction of queries whose nearest neighbour (itself excluded) is a positive (this is also P@1);
    - `mMP@k`: mean over queries of `(number of positives among the top k) / min(number of positives, k)`.

    Queries are processed in chunks of `chunk_size`, each with one `(chunk_size, N)` similarity block and a
    `torch.topk`, so memory is `O(chunk_size * N)` (about `4 * chunk_size * N` bytes in float32); the `N x N` matrix
    is never built.

    Args:
        features (`torch.Tensor` of shape `(N, D)`): embeddings of all items of all domains (L2-normalized here;
            computed in float32, or float64 when given float64).
        labels (`torch.Tensor` of shape `(N,)`): int64 class / instance ids; the same id may be reused across domains.
        domains (`torch.Tensor` of shape `(N,)`): int64 domain ids (non-negative).
        query_mask (`torch.Tensor` of shape `(N,)`, dtype bool, *optional*): items used as queries (all by default);
            the index is always all `N` items.
        k (`int`): cut-off of the mean precision (5 in UnED).
        chunk_size (`int`): number of queries searched at once.
        domain_names (`list[str]`, *optional*): name of each domain id (`domain_names[d]` for domain `d`); by default
            the ids as strings.

    Returns:
        `dict`: `{"per_domain": {name: {"R@1": %, "mMP@k": %, "num_queries": int}}, "mean": {"R@1": %, "mMP@k": %},
        "skipped_queries": int}` with `k` the given cut-off (e.g. `"mMP@5"`). Only domains with at least one evaluated
        query are listed (in increasing domain id) and averaged; the mean is `nan` when no query was evaluated.
    """
    index = _check_features(features, "features")
    num_items = index.shape[0]
    labels = _check_labels(labels, num_items, "labels", "features")
    domains = _check_labels(domains, num_items, "domains", "features")
    if query_mask is None:
        query_index = torch.arange(num_items)
    else:
        if not isinstance(query_mask, torch.Tensor) or query_mask.dtype != torch.bool:
            raise ValueError("`query_mask` must be a bool torch.Tensor of shape (N,).")
        if query_mask.shape != (num_items,):
            raise ValueError(
                f"`query_mask` has shape {tuple(query_mask.shape)} but `features` has {num_items} rows; "
                f"expected shape ({num_items},)."
            )
        query_index = query_mask.nonzero().flatten()
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"`k` must be a positive int, got {k!r}.")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"`chunk_size` must be a positive int, got {chunk_size!r}.")
    num_domains = int(domains.max()) + 1 if num_items else 0
    if domain_names is not None and len(domain_names) < num_domains:
        raise ValueError(
            f"`domain_names` has {len(domain_names)} names but `domains` holds domain id {num_domains - 1}; "
            f"one name per domain id is needed."
        )
    if domain_names is not None and len(set(domain_names)) != len(domain_names):
        raise ValueError("`domain_names` must not contain duplicates.")

    # one group id per (domain, label) pair; positives of an item = size of its group - 1 (itself)
    pairs = torch.stack([domains, labels], dim=1)
    _, group, group_size = torch.unique(pairs, dim=0, return_inverse=True, return_counts=True)
    num_positives = group_size[group] - 1
    has_positive = num_positives[query_index] > 0
    skipped = int((~has_positive).sum())
    query_index = query_index[has_positive]

    metric = f"mMP@{k}"
    num_queries = query_index.shape[0]
    hit_at_1 = torch.zeros(num_queries, dtype=torch.float64)
    precision = torch.zeros(num_queries, dtype=torch.float64)
    if num_queries:
        cut = min(k, num_items - 1)  # a query with a positive implies num_items >= 2
        normalized = F.normalize(index, dim=1)
        for start in range(0, num_queries, chunk_size):
            end = min(start + chunk_size, num_queries)
            rows = query_index[start:end]
            similarity = normalized[rows] @ normalized.T  # (c, N)
            similarity[torch.arange(end - start), rows] = float("-inf")  # the query is not its own result
            top_index = similarity.topk(cut, dim=1).indices  # most similar first
            del similarity
            correct = group[top_index] == group[rows, None]  # (c, cut): same domain and same label
            hit_at_1[start:end] = correct[:, 0].double()
            denominator = num_positives[rows].clamp(max=cut).double()
            precision[start:end] = correct.sum(dim=1).double() / denominator

    query_domains = domains[query_index]
    counts = torch.bincount(query_domains, minlength=num_domains)
    hit_sums = torch.bincount(query_domains, weights=hit_at_1, minlength=num_domains)
    precision_sums = torch.bincount(query_domains, weights=precision, minlength=num_domains)
    per_domain = {}
    for domain in counts.nonzero().flatten().tolist():
        count = int(counts[domain])
        name = domain_names[domain] if domain_names is not None else str(domain)
        per_domain[name] = {
            "R@1": 100.0 * float(hit_sums[domain]) / count,
            metric: 100.0 * float(precision_sums[domain]) / count,
            "num_queries": count,
        }
    if per_domain:
        mean = {key: sum(values[key] for values in per_domain.values()) / len(per_domain) for key in ("R@1", metric)}
    else:
        mean = {"R@1": float("nan"), metric: float("nan")}
    return {"per_domain": per_domain, "mean": mean, "skipped_queries": skipped}


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
