"""Evaluation metrics: effective rank, weighted kNN accuracy, linear probe, CSV logging."""
from __future__ import annotations

import csv
import math
import os

import torch
import torch.nn.functional as F

__all__ = ["effective_rank", "knn_accuracy", "linear_probe", "CSVLogger"]


@torch.no_grad()
def effective_rank(features: torch.Tensor, center: bool = False, eps: float = 1e-12) -> float:
    """Effective rank ``exp(H(p))`` of a (N, D) feature matrix (Roy & Vetterli 2007; RankMe).

    ``p = σ / Σσ`` are the normalised singular values and ``H`` their Shannon entropy, so
    the value lies in ``[1, min(N, D)]``: 1 for a rank-1 (collapsed) matrix, ``min(N, D)``
    when all singular values are equal.  ``center=True`` subtracts the column means first
    (RankMe does not).  Computed in float64; a zero matrix returns 0.0.
    """
    if not isinstance(features, torch.Tensor) or features.dim() != 2:
        raise ValueError(f"features must be a 2-D (N, D) tensor, got "
                         f"{tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__}")
    x = features.detach().to(torch.float64)
    if center:
        x = x - x.mean(dim=0, keepdim=True)
    s = torch.linalg.svdvals(x)
    total = s.sum()
    if not torch.isfinite(total):
        raise ValueError("features contain NaN or Inf values")
    if total <= 0:
        return 0.0
    p = s / total
    entropy = -(p * torch.log(p + eps)).sum()
    return float(torch.exp(entropy))


@torch.no_grad()
def knn_accuracy(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 test_labels: torch.Tensor, k: int = 20, temperature: float = 0.07,
                 num_classes: int | None = None, chunk: int = 1024) -> float:
    """Weighted kNN accuracy (%) with cosine similarity (Wu et al. 2018, as in DINO).

    Each query votes with its ``k`` nearest training features, weighted by
    ``exp(cos / temperature)``.
    """
    if num_classes is None:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    k = min(k, train_feats.shape[0])
    bank = F.normalize(train_feats.float(), dim=1)
    correct = 0
    for start in range(0, test_feats.shape[0], chunk):
        q = F.normalize(test_feats[start:start + chunk].float(), dim=1)
        sim = q @ bank.T
        top, idx = sim.topk(k, dim=1)
        votes = torch.zeros(q.shape[0], num_classes, dtype=torch.float32, device=q.device)
        votes.scatter_add_(1, train_labels[idx].to(q.device), (top / temperature).exp())
        correct += int((votes.argmax(1) == test_labels[start:start + chunk].to(q.device)).sum())
    return 100.0 * correct / test_feats.shape[0]


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor,
                 test_y: torch.Tensor, max_iter: int = 200, weight_decay: float = 0.0,
                 num_classes: int | None = None) -> dict:
    """Multinomial logistic regression on standardised features, trained with L-BFGS.

    Features are standardised with the training mean/std; the full-batch cross-entropy
    (+ ``weight_decay``·||W||²/2) is minimised by ``torch.optim.LBFGS`` (strong-Wolfe line
    search) for up to ``max_iter`` iterations.  Returns ``{"train_acc", "test_acc"}`` in %.
    """
    if num_classes is None:
        num_classes = int(max(train_y.max(), test_y.max())) + 1
    train_x = train_x.float()
    mean = train_x.mean(0, keepdim=True)
    std = train_x.std(0, keepdim=True).clamp_min(1e-6)
    xtr = (train_x - mean) / std
    xte = (test_x.float() - mean) / std
    ytr, yte = train_y.to(xtr.device).long(), test_y.to(xte.device).long()
    lin = torch.nn.Linear(xtr.shape[1], num_classes).to(xtr.device)
    torch.nn.init.zeros_(lin.weight)
    torch.nn.init.zeros_(lin.bias)
    opt = torch.optim.LBFGS(lin.parameters(), lr=1.0, max_iter=max_iter, history_size=20,
                            line_search_fn="strong_wolfe", tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(lin(xtr), ytr)
        if weight_decay:
            loss = loss + 0.5 * weight_decay * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        tr = float((lin(xtr).argmax(1) == ytr).float().mean()) * 100.0
        te = float((lin(xte).argmax(1) == yte).float().mean()) * 100.0
    return {"train_acc": tr, "test_acc": te}


class CSVLogger:
    """Appends rows (dicts) to a CSV file; the header is the first row's keys."""

    def __init__(self, path: str, fieldnames: list[str]):
        self.path = path
        self.fieldnames = list(fieldnames)
        if not os.path.exists(path):
            with open(path, "w", newline="") as f:
                csv.DictWriter(f, fieldnames=self.fieldnames).writeheader()

    def rewrite(self, rows: list[dict]) -> None:
        """Replace the file by the header and ``rows`` (written to a temporary file, then renamed)."""
        tmp = f"{self.path}.{os.getpid()}.tmp"
        try:
            with open(tmp, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=self.fieldnames, extrasaction="ignore")
                w.writeheader()
                for row in rows:
                    w.writerow({k: _fmt(row.get(k)) for k in self.fieldnames})
            os.replace(tmp, self.path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    def log(self, row: dict) -> None:
        with open(self.path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.fieldnames, extrasaction="ignore")
            w.writerow({k: _fmt(row.get(k)) for k in self.fieldnames})


def _fmt(v):
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.6g}"
    return "" if v is None else v
