"""Evaluation: cross-modal retrieval R@K for every ordered modality pair, and a linear probe.

Retrieval scoring (``scoring``):

* ``"cosine"`` — for InfoNCE-trained models (anchor, centroid, pairwise): the gallery item with the
  highest cosine similarity ranks first.
* ``"volume"`` — for GRAM, as GRAM evaluates: the gallery item with the smallest Gram volume ranks
  first. For the ordered pair (query a -> gallery b) the query modality is the anchor and b is the
  single data modality (k = 2), i.e. ``fastbind.gram_volume(z_a, z_b)``. (GRAM's own benchmarks use a
  text query against all other modalities of a sample jointly; :func:`joint_volume_retrieval` gives
  that k = M variant.)

A query's rank is the number of gallery items scored strictly better than its own pair.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import fastbind as fb

__all__ = ["retrieval", "pairwise_retrieval", "joint_volume_retrieval", "linear_probe", "KS"]

KS = (1, 5, 10)


def _recalls(scores: torch.Tensor, higher_is_better: bool) -> dict[str, float]:
    """scores [N, N] (row = query, column = gallery item; the correct item of query i is i)."""
    if not higher_is_better:
        scores = -scores
    own = scores.diagonal()[:, None]
    rank = (scores > own).sum(dim=1)
    return {f"R@{k}": float((rank < k).float().mean()) for k in KS}


def retrieval(query: torch.Tensor, gallery: torch.Tensor, scoring: str = "cosine") -> dict[str, float]:
    """R@1/5/10 of retrieving gallery[i] for query[i] among all N gallery rows. query/gallery [N, D]."""
    query, gallery = query.float(), gallery.float()
    if scoring == "cosine":
        return _recalls(F.normalize(query, dim=-1) @ F.normalize(gallery, dim=-1).t(), higher_is_better=True)
    if scoring == "volume":
        return _recalls(fb.gram_volume(query, gallery), higher_is_better=False)
    raise ValueError(f"retrieval: scoring must be 'cosine' or 'volume', got {scoring!r}")


def pairwise_retrieval(embeddings: list[torch.Tensor], scoring: str = "cosine") -> dict[str, dict[str, float]]:
    """{"a->b": {"R@1", "R@5", "R@10"}} for every ordered pair of modalities a != b."""
    out = {}
    for a, za in enumerate(embeddings):
        for b, zb in enumerate(embeddings):
            if a != b:
                out[f"{a}->{b}"] = retrieval(za, zb, scoring)
    return out


def joint_volume_retrieval(embeddings: list[torch.Tensor]) -> dict[str, dict[str, float]]:
    """GRAM's multimodal retrieval: query modality a as anchor against the (M-1)-tuple of all other
    modalities of each gallery sample, ranked by ascending volume (k = M). {"a->rest": R@K}."""
    out = {}
    for a, za in enumerate(embeddings):
        rest = [z.float() for i, z in enumerate(embeddings) if i != a]
        out[f"{a}->rest"] = _recalls(fb.gram_volume(za.float(), *rest), higher_is_better=False)
    return out


def linear_probe(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    num_classes: int,
    steps: int = 100,
    weight_decay: float = 1e-3,
) -> float:
    """Accuracy on (test_x, test_y) of a multinomial logistic regression fitted on (train_x, train_y).

    Full-batch L-BFGS on the L2-regularised cross-entropy (a convex problem: a few dozen iterations
    converge), float32, deterministic. Features are standardised with the training statistics.
    """
    with torch.enable_grad():
        train_x, test_x = train_x.detach().float(), test_x.detach().float()
        mean, std = train_x.mean(0), train_x.std(0).clamp(min=1e-6)
        train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
        weight = torch.zeros(train_x.shape[1], num_classes, requires_grad=True)
        bias = torch.zeros(num_classes, requires_grad=True)
        opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(train_x @ weight + bias, train_y) + weight_decay * weight.pow(2).sum()
            loss.backward()
            return loss

        opt.step(closure)
    with torch.no_grad():
        return float(((test_x @ weight + bias).argmax(1) == test_y).float().mean())
