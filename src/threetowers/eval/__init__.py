"""Evaluation: zero-shot classification, image-text retrieval, few-shot probes, 3T/LiT score mixing.

Every metric here is a pure function of embeddings; `suite.evaluate` applies them to a model's
embeddings of labelled and captioned sets, and `tasks.run_tasks` runs named tasks (few-shot included).
"""

from threetowers.eval.fewshot import DEFAULT_L2, L2_GRID, fewshot_eval, fewshot_ridge, linear_probe, sample_shots
from threetowers.eval.retrieval import positive_ranks, retrieval_ranks_mixed, retrieval_recall, retrieval_recall_mixed
from threetowers.eval.suite import evaluate
from threetowers.eval.zeroshot import class_embeddings, zeroshot_accuracy, zeroshot_accuracy_mixed

__all__ = [
    "DEFAULT_L2",
    "L2_GRID",
    "class_embeddings",
    "evaluate",
    "fewshot_eval",
    "fewshot_ridge",
    "linear_probe",
    "positive_ranks",
    "retrieval_ranks_mixed",
    "retrieval_recall",
    "retrieval_recall_mixed",
    "sample_shots",
    "zeroshot_accuracy",
    "zeroshot_accuracy_mixed",
]
