"""Many small Bradley–Terry reward heads trained at once, for the noise filter.

The trainer's ``fit`` trains one head and keeps only its final weights; noise detection
needs dozens of heads (k folds x seeds, co-teaching peers) and each pair's margin at
every epoch (training dynamics). Training them as one batched tensor program keeps the
frozen-encoder features in memory once, costs one pass over the data per epoch for all
heads together, and records each visited row's margin from the forward pass the step
makes anyway, so the dynamics cost nothing extra.

Each head is the trainer's ``RewardHead`` shape (Linear -> GELU -> Linear) with its
initialisation, trained with the Bradley–Terry loss, AdamW and a linear decay to zero as
in ``factory.trainer.loop``. Heads differ in their training rows (a mask per head) and
their initial weights; Adam and weight decay act elementwise, so a stacked parameter
tensor trains exactly like separate models.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class HeadConfig:
    epochs: int = 12
    lr: float = 1e-3
    batch_size: int = 64
    hidden: int = 128
    weight_decay: float = 0.01
    seed: int = 0


@dataclass
class HeadRun:
    """What a batched run leaves behind: margins are r(chosen) - r(rejected)."""

    final: np.ndarray  # (heads, n): margins of the trained heads, every row
    history: np.ndarray  # (heads, epochs, n): each row's margin when visited in that epoch
    both_rejected: np.ndarray | None = None  # (n,) co-teaching: share of late visits both peers left out


@contextmanager
def _threads(n: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, min(n, previous)))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class _Stack(torch.nn.Module):
    """``heads`` independent MLPs d -> hidden -> 1 as stacked parameter tensors.

    All heads read the same rows, so the first layer of every head is one matrix
    product (rows x dim) @ (dim x heads*hidden): one large GEMM instead of many small ones.
    """

    def __init__(self, heads: int, dim: int, hidden: int, generator: torch.Generator):
        super().__init__()
        self.heads, self.hidden = heads, hidden

        def uniform(shape: tuple[int, ...], fan_in: int) -> torch.nn.Parameter:
            bound = 1.0 / math.sqrt(fan_in)
            return torch.nn.Parameter((torch.rand(shape, generator=generator) * 2 - 1) * bound)

        self.w1 = uniform((dim, heads * hidden), dim)
        self.b1 = uniform((heads * hidden,), dim)
        self.w2 = uniform((heads, hidden), hidden)
        self.b2 = uniform((heads,), hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(rows, dim) shared by all heads -> (heads, rows) rewards."""
        hidden = F.gelu(torch.addmm(self.b1, x, self.w1)).view(len(x), self.heads, self.hidden)
        return ((hidden * self.w2).sum(-1) + self.b2).T


def train_heads(
    x_chosen: np.ndarray,
    x_rejected: np.ndarray,
    train_mask: np.ndarray,
    cfg: HeadConfig,
    *,
    peers: np.ndarray | None = None,
    forget: np.ndarray | None = None,
    threads: int = 1,
    on_epoch: Callable[[], None] | None = None,
) -> HeadRun:
    """Train one head per row of ``train_mask`` (heads, n) on its rows, all at once.

    Co-teaching (CRM peer review): with ``peers`` (the index of each head's peer, whose
    training rows must be the same) and ``forget`` (per-epoch share of each batch to leave
    out), every head ranks its batch by its own loss and its peer learns only from the
    small-loss rows it kept, so a pair that both peers find hard stops being learnt.
    ``on_epoch`` is called after each epoch (progress).
    """
    n, dim = x_chosen.shape
    mask = np.asarray(train_mask, dtype=bool)
    heads = mask.shape[0]
    generator = torch.Generator().manual_seed(cfg.seed)
    xc = torch.from_numpy(np.ascontiguousarray(x_chosen, dtype=np.float32))
    xr = torch.from_numpy(np.ascontiguousarray(x_rejected, dtype=np.float32))
    in_train = torch.from_numpy(mask)
    history = np.zeros((heads, cfg.epochs, n), dtype=np.float32)
    coteach = peers is not None
    peer_index = torch.from_numpy(np.asarray(peers, dtype=np.int64)) if coteach else None
    rejected_count = np.zeros(n, dtype=np.float64)
    rejected_seen = np.zeros(n, dtype=np.float64)
    ramp_done = int(np.argmax(forget >= forget.max())) if coteach and forget is not None else 0

    with _threads(threads):
        model = _Stack(heads, dim, cfg.hidden, generator)
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        steps_per_epoch = math.ceil(n / cfg.batch_size)
        total = steps_per_epoch * cfg.epochs
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.0, 1.0 - s / total))
        rng = np.random.default_rng(cfg.seed)
        for epoch in range(cfg.epochs):
            order = rng.permutation(n)
            for start in range(0, n, cfg.batch_size):
                idx = torch.from_numpy(order[start: start + cfg.batch_size])
                rewards = model(torch.cat([xc[idx], xr[idx]]))
                margin = rewards[:, : len(idx)] - rewards[:, len(idx):]
                loss = F.softplus(-margin)  # -log sigmoid(margin), per head and row
                history[:, epoch, idx.numpy()] = margin.detach().numpy()
                use = in_train[:, idx]
                if coteach:
                    selected = _small_loss(loss.detach(), use, float(forget[epoch]))
                    if epoch >= ramp_done:
                        both_out = use & ~selected & ~selected[peer_index]
                        first = torch.arange(heads) < peer_index  # count each peer pair once
                        rejected_count[idx.numpy()] += both_out[first].sum(0).numpy()
                        rejected_seen[idx.numpy()] += use[first].sum(0).numpy()
                    use = selected[peer_index]
                weights = use.float()
                per_head = (weights * loss).sum(1) / weights.sum(1).clamp(min=1.0)
                optimizer.zero_grad(set_to_none=True)
                per_head.sum().backward()
                optimizer.step()
                scheduler.step()
            if on_epoch is not None:
                on_epoch()
        final = np.zeros((heads, n), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, n, 1024):
                part = slice(start, min(start + 1024, n))
                rewards = model(torch.cat([xc[part], xr[part]]))
                rows = part.stop - part.start
                final[:, part] = (rewards[:, :rows] - rewards[:, rows:]).numpy()
    both = None
    if coteach:
        both = np.divide(rejected_count, rejected_seen, out=np.zeros(n), where=rejected_seen > 0)
    return HeadRun(final=final, history=history, both_rejected=both)


def _small_loss(loss: torch.Tensor, use: torch.Tensor, forget: float) -> torch.Tensor:
    """Per head, the (1 - forget) share of its batch rows with the smallest loss."""
    if forget <= 0:
        return use.clone()
    ranked = torch.where(use, loss, torch.full_like(loss, math.inf))
    rank = ranked.argsort(dim=1).argsort(dim=1)
    keep = torch.ceil(use.sum(1, keepdim=True) * (1.0 - forget))
    return use & (rank < keep)
