"""`hf-distill RECIPE [OPTIONS]` ([project.scripts]) runs recipes/RECIPE.py with OPTIONS."""

import sys

import pytest

from hf_distill import commands


def test_hf_distill_runs_the_recipe_with_its_options(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(sys, "argv", ["hf-distill"])
    with pytest.raises(SystemExit) as exited:
        commands.main(["task-distill", "--help"])  # the dash name runs recipes/task_distill.py
    assert exited.value.code == 0 and "--synthetic_ratio" in capsys.readouterr().out
    with pytest.raises(ValueError, match="Nothing to evaluate"):  # the options reach the recipe's parser
        commands.main(["evaluate", "--dataset", "mnist=somewhere"])
    with pytest.raises(ValueError, match="--dataset takes NAME=PATH, got 'mnist'"):
        commands.main(["evaluate", "--models", "m", "--dataset", "mnist"])
    with pytest.raises(SystemExit, match=r"usage: hf-distill \{unic,udon,task-distill"):
        commands.main(["distil"])
    monkeypatch.setattr(commands, "RECIPES_DIR", str(tmp_path))  # a wheel install: no recipes beside the package
    with pytest.raises(SystemExit, match="source checkout.*pip install -e"):
        commands.main(["unic"])
