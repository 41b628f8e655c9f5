"""Stage 2 as an adaptor: a small head on F's frozen patch embeddings, trained for the scorer's own distance.

The scorer is the Euclidean distance from a patch to its nearest patch in the memory bank, so the head is trained
on exactly that distance (our design, after CFA's attraction term and ReConPatch's adaptor head):

* **Compactness.** Each normal training patch is pulled towards its nearest item of a memory of patches from
  *other* training images (:func:`components.losses.compactness_loss`), measured against the memory's own spread.
  Excluding the patch's own image makes the loss see what a new normal part sees: an image is never in the bank it
  is scored against.
* **Margin.** Patches that are flagged as anomalous on G's synthetic images (by the frozen D when the guide is on,
  else by G's mask) are pushed until their nearest-memory distance exceeds ``1 + margin`` times a high quantile of
  the normal patches' distances (:func:`components.losses.margin_loss`).
* **Scale-free.** Both terms are ratios of distances, so neither shrinking the space (collapse) nor blowing it up
  lowers them; the scorer's ranking and the calibrated threshold do not depend on the scale either. (A first
  version with an absolute margin and a memory refreshed once per epoch diverged on a toy case: the memory target
  moved and the margin rewarded expanding the space.)
* **Memory.** A greedy coreset of the frozen embeddings is chosen once (the same rule as the bank); at every step
  its items pass through the current head, with gradient, so the memory is always the bank the head would build.
* **Head.** ``x + W2 relu(W1 x)`` with 1x1 convolutions and ``W2 = 0`` at the start: training starts from frozen-F
  PatchCore exactly, and the bank is built from the head's output.

It trains from embeddings computed once, so it costs seconds to minutes on a CPU where fine-tuning F's blocks costs
many minutes (bench/RESULTS.md section 8).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from components.config import TocoadConfig
from components.losses import compactness_loss, margin_loss, nearest_memory_distance
from components.memory_bank import coreset_indices
from components.training import run_epochs


class PatchAdaptor(nn.Module):
    """A residual 1x1-convolution head on patch embeddings ``[B, C, h, w]``; the identity at initialisation.

    ``linear``: ``x + W x``, a learnt linear metric (it cannot fold an anomaly onto the normal memory); else the MLP
    ``x + W2 relu(W1 x)``.
    """

    def __init__(self, dim: int, linear: bool = False) -> None:
        super().__init__()
        self.linear = linear
        self.fc1 = nn.Identity() if linear else nn.Conv2d(dim, dim, 1)
        self.fc2 = nn.Conv2d(dim, dim, 1)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return emb + self.fc2(emb if self.linear else F.relu(self.fc1(emb)))


def flag_patches(prob: torch.Tensor, grid: tuple[int, int], threshold: float = 0.5) -> torch.Tensor:
    """``[B, h, w]`` bool: patches whose mean anomaly probability (or mask cover) ``[B, 1, H, W]`` exceeds
    ``threshold`` on the ``grid``."""
    return F.adaptive_avg_pool2d(prob.float(), grid)[:, 0] > threshold


def train_adaptor(
    cfg: TocoadConfig,
    normal: torch.Tensor,
    synthetic: torch.Tensor,
    flags: torch.Tensor,
    progress: bool = True,
) -> tuple[PatchAdaptor, list[dict[str, float]]]:
    """Train the head on frozen embeddings.

    ``normal`` ``[N, C, h, w]``: one map per training image; ``synthetic`` ``[M, C, h, w]``: maps of G's synthetic
    images; ``flags`` ``[M, h, w]`` bool: their anomalous patches. Returns the head (eval mode) and the history.
    """
    c = cfg.contrastive
    seed = cfg.runtime.seed
    n, dim, h, w = normal.shape
    if n < 2:
        raise ValueError(
            "the adaptor needs at least 2 training images (its memory excludes a patch's own image)"
        )
    gen = torch.Generator().manual_seed(seed + 3)
    torch.manual_seed(seed + 3)
    flat = normal.permute(0, 2, 3, 1).reshape(-1, dim).contiguous()
    image_of = torch.arange(n).repeat_interleave(h * w)
    size = max(2, round(len(flat) * cfg.bank.coreset_ratio))  # the bank's rule, at least 2 patches
    memory_idx = torch.from_numpy(coreset_indices(flat.numpy(), cfg.bank, seed, progress=False, n=size))
    memory_ids = image_of[memory_idx]
    memory_rows = flat[memory_idx]
    pairs = torch.randint(len(memory_idx), (2, min(4096, len(memory_idx) ** 2)), generator=gen)
    head = PatchAdaptor(dim, linear=c.adaptor_linear)
    opt = torch.optim.AdamW(head.parameters(), lr=c.head_lr, weight_decay=1e-4)
    batch = min(c.batch_size, n)
    per_image = min(c.adaptor_patches, h * w)
    steps_per_epoch = max(1, n // batch)

    class Batches:
        def __len__(self) -> int:
            return steps_per_epoch

        def __iter__(self):
            order = torch.randperm(n, generator=gen)
            picks = (
                torch.randint(len(synthetic), (steps_per_epoch, batch), generator=gen)
                if len(synthetic)
                else None
            )
            for i in range(steps_per_epoch):
                yield {
                    "image": order[i * batch : (i + 1) * batch],
                    "synthetic": None if picks is None else picks[i],
                }

    def step(b: dict) -> dict[str, float]:
        head.train()
        idx = b["image"]
        memory = _patches(head(_as_maps(memory_rows)))  # the memory follows the head, with gradient
        spread = (memory[pairs[0]] - memory[pairs[1]]).norm(dim=1).mean().clamp(min=1e-6)
        # a random sample of each image's patches: the cost is the distance matrix to the memory
        take = torch.rand(len(idx), h * w, generator=gen).argsort(dim=1)[:, :per_image]
        rows = (idx[:, None] * (h * w) + take).reshape(-1)
        d_normal = nearest_memory_distance(
            _patches(head(_as_maps(flat[rows]))), memory, image_of[rows], memory_ids
        )
        out = {"compact": compactness_loss(d_normal, spread)}
        total = c.compact_weight * out["compact"]
        if c.distill_weight > 0:  # the forgetting guard: stay near the pretrained features
            moved = memory - memory_rows
            out["distill"] = moved.norm(dim=1).mean() / spread
            total = total + c.distill_weight * out["distill"]
        if b["synthetic"] is not None and c.margin_weight > 0:
            s_idx = b["synthetic"]
            mask = flags[s_idx].reshape(-1)
            if mask.any():
                d_anom = nearest_memory_distance(_patches(head(synthetic[s_idx]))[mask], memory)
                tau = torch.quantile(d_normal, c.margin_quantile)
                out["margin"] = margin_loss(d_anom, tau, c.margin)
                total = total + c.margin_weight * out["margin"]
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        out["total"] = total
        return {k: float(v.detach()) for k, v in out.items()}

    history = run_epochs(Batches(), c.adaptor_epochs, step, "stage C (adaptor)", progress)
    return head.eval().requires_grad_(False), history


def _patches(maps: torch.Tensor) -> torch.Tensor:
    """``[B, C, h, w]`` -> ``[B * h * w, C]``."""
    return maps.permute(0, 2, 3, 1).reshape(-1, maps.shape[1])


def _as_maps(rows: torch.Tensor) -> torch.Tensor:
    """``[M, C]`` -> ``[1, C, M, 1]``, so a 1x1-convolution head applies to a list of patches."""
    return rows.t().unsqueeze(0).unsqueeze(-1)
