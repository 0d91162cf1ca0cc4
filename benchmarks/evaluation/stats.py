"""Bootstrap intervals on a method's average accuracy, and paired comparisons of two methods on the same examples.

The average is over tasks (each task counts once, as in the table), so each bootstrap sample resamples every
task's evaluated examples with replacement and averages the tasks' accuracies. A paired comparison draws the same
examples for both methods, which removes the between-example variance the two share.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import torch

SAMPLES = 2000


def _resampled_means(hits: Mapping[str, Sequence[int]], tasks: Sequence[str], samples: int, seed: int,
                     other: Optional[Mapping[str, Sequence[int]]] = None) -> torch.Tensor:
    """(samples,) averages over `tasks` of resampled accuracies (of `hits` minus `other`, when given)."""
    generator = torch.Generator().manual_seed(seed)
    per_task = []
    for task in tasks:
        values = torch.tensor(hits[task], dtype=torch.float64)
        if other is not None:
            paired = torch.tensor(other[task], dtype=torch.float64)
            if paired.shape != values.shape:
                raise ValueError(f"Task {task!r}: the two methods were scored on different examples.")
            values = values - paired
        draws = torch.randint(len(values), (samples, len(values)), generator=generator)
        per_task.append(values[draws].mean(dim=1))
    return torch.stack(per_task).mean(dim=0)


def _interval(means: torch.Tensor) -> tuple[float, float]:
    low, high = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return low, high


def bootstrap_average(hits: Mapping[str, Sequence[int]], tasks: Sequence[str], samples: int = SAMPLES,
                      seed: int = 0) -> Optional[tuple[float, float, float]]:
    """(average, 95% low, 95% high) of the per-task accuracies over `tasks`; None if a task has no hits."""
    if not tasks or any(task not in hits for task in tasks):
        return None
    average = sum(sum(hits[t]) / len(hits[t]) for t in tasks) / len(tasks)
    return (average, *_interval(_resampled_means(hits, tasks, samples, seed)))


def paired_difference(hits: Mapping[str, Sequence[int]], baseline: Mapping[str, Sequence[int]],
                      tasks: Sequence[str], samples: int = SAMPLES,
                      seed: int = 0) -> Optional[tuple[float, float, float]]:
    """(average of method - baseline, 95% low, 95% high) on the same examples; None if a task lacks hits."""
    if not tasks or any(task not in hits or task not in baseline for task in tasks):
        return None
    difference = sum((sum(hits[t]) - sum(baseline[t])) / len(hits[t]) for t in tasks) / len(tasks)
    return (difference, *_interval(_resampled_means(hits, tasks, samples, seed, other=baseline)))
