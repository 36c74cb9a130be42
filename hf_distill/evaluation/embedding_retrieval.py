"""Old name of [`hf_distill.evaluation.retrieval`], kept only until `recipes/udon.py` imports the new one: remove then."""

from .retrieval import embed_images, multi_domain_retrieval  # noqa: F401
