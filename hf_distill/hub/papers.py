"""The paper of each distillation method: what its trainer declares as `_paper` (TRL's convention) and what the
model card of a student trained with it names and cites (`title`, `authors`, `venue`, BibTeX `citation`)."""

PAPERS = {
    "unic": {
        "title": "UNIC: Universal Classification Models via Multi-teacher Distillation",
        "authors": "Sariyildiz, Weinzaepfel, Lucas, Larlus, Kalantidis",
        "venue": "ECCV 2024",
        "citation": """@inproceedings{sariyildiz2024unic,
  title={{UNIC}: Universal Classification Models via Multi-teacher Distillation},
  author={Sariyildiz, Mert Bulent and Weinzaepfel, Philippe and Lucas, Thomas and Larlus, Diane and Kalantidis, Yannis},
  booktitle={European Conference on Computer Vision (ECCV)},
  year={2024}
}""",
    },
    "udon": {
        "title": "UDON: Universal Dynamic Online distillatioN for generic image representations",
        "authors": "Ypsilantis, Chen, Araujo, Chum",
        "venue": "NeurIPS 2024",
        "citation": r"""@inproceedings{ypsilantis2024udon,
  title={{UDON}: Universal Dynamic Online distillatioN for generic image representations},
  author={Ypsilantis, Nikolaos-Antonios and Chen, Kaifeng and Araujo, Andr{\'e} and Chum, Ond{\v{r}}ej},
  booktitle={Advances in Neural Information Processing Systems (NeurIPS)},
  year={2024}
}""",
    },
    "task": {
        "title": "On Good Practices for Task-Specific Distillation of Large Pretrained Visual Models",
        "authors": "Marrie, Arbel, Mairal, Larlus",
        "venue": "TMLR 2024",
        "citation": """@article{marrie2024taskspecific,
  title={On Good Practices for Task-Specific Distillation of Large Pretrained Visual Models},
  author={Marrie, Juliette and Arbel, Michael and Mairal, Julien and Larlus, Diane},
  journal={Transactions on Machine Learning Research},
  year={2024}
}""",
    },
}
