"""Old name of [`hf_distill.evaluation.suite`], kept only until `recipes/evaluate.py` imports the new one: remove then."""

from .suite import *  # noqa: F401,F403
