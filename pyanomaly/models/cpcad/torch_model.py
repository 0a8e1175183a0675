"""CPC-AD as a pure ``nn.Module``: encoders, per-direction predictors, per-sub-patch InfoNCE losses.

No data handling, optimisers or file formats here (those live in ``detector.py``).

Geometry. Sub-patches of ``sub_size`` at ``sub_stride`` lie on one global grid of G x G positions.
Each patch (``patch_size`` at ``patch_stride``) is an m x m window of that grid, m =
(patch_size - sub_size) / sub_stride + 1 (7 in the paper), and window (i, j) starts at grid
position (i * r, j * r), r = patch_stride / sub_stride. Every InfoNCE term lives inside one window.

Loss (Greedy InfoMax's ``InfoNCE_Loss``, made per-position): for direction d and step k = 1..K, in
the window rotated so that d predicts downwards, the context vector at row y is the query, the
target at row y + k + 1 (one row skipped: the adjacent row overlaps the context by 50%) passed
through the bias-free linear map W_k^d is the positive, and 16 rows of a bank of W_k^d-transformed
vectors are the negatives; score = plain dot product. The loss of each term is credited to the
*target* sub-patch (the one whose embedding is the positive: CPC-AD keeps anomalies out of the
negatives so that they can only show up in the positive).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pyanomaly.distributed import gather_rows
from pyanomaly.nn.preact_resnet import PreActResNetEncoder
from pyanomaly.ops import infonce, sample_negatives

__all__ = ["CPCADModel", "CREDITS", "DIRECTIONS", "orient", "unorient", "windows_from_grid", "windows_to_grid"]

#: The side the context comes from. "above" = predict downwards (Greedy InfoMax's only direction).
DIRECTIONS = ("above", "below", "left", "right")
#: Which sub-patch of an InfoNCE term its loss is credited to: the predicted target (CPC-AD), the
#: context that predicts it, or both (each term counted at both positions).
CREDITS = ("target", "context", "both")


def orient(z: torch.Tensor, direction: str) -> torch.Tensor:
    """Rotate windows (P, m, m, D) so that ``direction``'s prediction runs down the rows."""
    if direction == "above":
        return z
    if direction == "below":
        return z.flip(1)
    if direction == "left":
        return z.transpose(1, 2)
    if direction == "right":
        return z.transpose(1, 2).flip(1)
    raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")


def unorient(s: torch.Tensor, direction: str) -> torch.Tensor:
    """Inverse of :func:`orient` for per-position maps (P, m, m)."""
    if direction == "above":
        return s
    if direction == "below":
        return s.flip(1)
    if direction == "left":
        return s.transpose(1, 2)
    if direction == "right":
        return s.flip(1).transpose(1, 2)
    raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")


def windows_from_grid(grid: torch.Tensor, window: int, step: int) -> torch.Tensor:
    """Cut a feature grid (B, G, G, D) into overlapping windows (B, nh, nw, m, m, D)."""
    g = grid.shape[1]
    starts = torch.arange(0, g - window + 1, step, device=grid.device)
    index = starts[:, None] + torch.arange(window, device=grid.device)  # (nh, m) rows of each window
    rows = grid[:, index]  # B nh m G D (a gather, not unfold: exports to ONNX with a dynamic batch)
    return rows[:, :, :, index].permute(0, 1, 3, 2, 4, 5)  # B nh m nw m D -> B nh nw m m D


def windows_to_grid(values: torch.Tensor, window: int, step: int, grid_size: tuple[int, int]) -> torch.Tensor:
    """Sum per-window maps (B, nh, nw, m, m) onto the global grid (B, G, G) (overlaps add up)."""
    b, nh, nw, m, _ = values.shape
    cols = values.reshape(b, nh * nw, m * m).transpose(1, 2)  # B (m m) L
    return F.fold(cols, grid_size, kernel_size=window, stride=step)[:, 0]


class CPCADModel(nn.Module):
    """Encoders and per-direction predictors of CPC-AD.

    Args:
        in_channels: encoder input channels (1: CPC-AD works on grayscale).
        directions: which of ``DIRECTIONS`` to model (the paper uses all four).
        shared_encoder: one encoder for all directions (each keeps its own W_k) instead of the
            paper's four separate models.
        prediction_steps: K, rows predicted ahead (Greedy InfoMax: 5).
        widths, blocks, strides, stem: the :class:`PreActResNetEncoder`.
    """

    def __init__(
        self,
        in_channels: int = 1,
        directions: Sequence[str] = DIRECTIONS,
        shared_encoder: bool = False,
        prediction_steps: int = 5,
        widths: Sequence[int] = (64, 128, 256),
        blocks: Sequence[int] = (2, 2, 2),
        strides: Sequence[int] = (1, 2, 2),
        stem: str = "gim",
    ) -> None:
        super().__init__()
        directions = tuple(directions)
        valid = all(d in DIRECTIONS for d in directions)
        if not directions or len(set(directions)) != len(directions) or not valid:
            raise ValueError(f"directions must be distinct values from {DIRECTIONS}, got {directions}")
        if prediction_steps < 1:
            raise ValueError(f"prediction_steps must be >= 1, got {prediction_steps}")
        self.directions = directions
        self.shared_encoder = bool(shared_encoder)
        self.prediction_steps = int(prediction_steps)
        n_enc = 1 if shared_encoder else len(directions)
        self.encoders = nn.ModuleList(
            PreActResNetEncoder(in_channels, widths, blocks, strides, stem) for _ in range(n_enc)
        )
        dim = self.encoders[0].out_channels
        self.dim = dim
        self.predictors = nn.ModuleList(
            nn.ModuleList(nn.Linear(dim, dim, bias=False) for _ in range(prediction_steps))
            for _ in directions
        )

    def encoder_of(self, direction_index: int) -> int:
        """Index into ``encoders`` of the encoder that direction ``direction_index`` uses."""
        return 0 if self.shared_encoder else direction_index

    def encode(self, subpatches: torch.Tensor) -> list[torch.Tensor]:
        """(N, C, h, w) sub-patches -> one (N, D) embedding tensor per encoder."""
        return [encoder(subpatches) for encoder in self.encoders]

    def direction_losses(
        self,
        windows: torch.Tensor,
        direction_index: int,
        *,
        bank: torch.Tensor | None = None,
        num_negatives: int = 16,
        draws: int = 1,
        generator: torch.Generator | None = None,
        credit: str = "target",
        negatives: Sequence[Sequence[torch.Tensor]] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """InfoNCE losses of one direction, credited to the target sub-patches (or see ``credit``).

        Args:
            windows: (P, m, m, D) embeddings of P windows (from this direction's encoder).
            direction_index: index into ``directions``.
            bank: (M, D) raw embeddings to draw negatives from (scoring: training-set vectors);
                None = the W_k-transformed targets of all windows given (training, as GIM).
            num_negatives: negatives per query.
            draws: independent negative draws averaged per term (scoring).
            generator: for the negative draws.
            credit: one of ``CREDITS``: where each term's loss is counted (scoring maps only; the
                objective does not depend on it).
            negatives: instead of drawing, ``negatives[k - 1][draw]`` (Q, K) rows of ``bank`` for
                one image's Q queries of step k, repeated for every image (scoring: an image's scores
                then do not depend on the other images scored with it, and an exported graph holds
                them as constants).

        Returns:
            loss_sum (P, m, m) and count (m, m): the summed losses credited to each position and how
            many terms were credited to it (in the original orientation); objective (): the mean
            over terms of each step, averaged over steps (Greedy InfoMax's training loss).
        """
        direction = self.directions[direction_index]
        z = orient(windows, direction).float()  # predictors and InfoNCE in fp32 (encoders may be bf16)
        p, m, _, dim = z.shape
        loss_sum = z.new_zeros(p, m, m)
        count = z.new_zeros(m, m)
        objective = z.new_zeros(())
        steps = 0
        for k in range(1, self.prediction_steps + 1):
            rows = m - k - 1
            if rows <= 0:
                break
            w_k = self.predictors[direction_index][k - 1]
            queries = z[:, :rows].reshape(-1, dim)
            positives = w_k(z[:, k + 1 :]).reshape(-1, dim)
            # training: GIM draws from the W_k-transformed targets of all windows in the batch (the
            # global batch when distributed: every rank's targets, gathered with their gradients;
            # each rank draws the whole batch's negatives with the same generator and keeps its rows)
            first_query = 0
            if bank is None:
                bank_k, first_query = gather_rows(positives)
            else:
                bank_k = w_k(bank.float())
            total = None
            for draw in range(draws):
                if negatives is None:
                    neg_idx = sample_negatives(
                        bank_k.shape[0] if bank is None else queries.shape[0], num_negatives, bank_k.shape[0],
                        generator=generator, device=queries.device,
                    )[first_query : first_query + queries.shape[0]]
                else:
                    fixed = negatives[k - 1][draw]  # (Q, K) for one image: the same for each
                    neg_idx = fixed.unsqueeze(0).expand(queries.shape[0] // fixed.shape[0], -1, -1).reshape(-1, fixed.shape[1])
                loss = infonce(queries, positives, bank_k, neg_idx)
                total = loss if total is None else total + loss
            loss = total / draws
            objective = objective + loss.mean()
            per_term = loss.detach().view(p, rows, m)
            if credit in ("target", "both"):
                loss_sum[:, k + 1 :] += per_term
                count[k + 1 :] += 1
            if credit in ("context", "both"):
                loss_sum[:, :rows] += per_term
                count[:rows] += 1
            steps += 1
        if steps == 0:
            raise ValueError(f"windows of {m}x{m} sub-patches are too small to predict even one step ahead")
        return (
            unorient(loss_sum, direction),
            unorient(count[None], direction)[0],
            objective / steps,
        )

    def forward(
        self,
        windows: Sequence[torch.Tensor],
        *,
        banks: Sequence[torch.Tensor] | None = None,
        num_negatives: int = 16,
        draws: int = 1,
        generator: torch.Generator | None = None,
        credit: str = "target",
        negatives: Sequence[Sequence[Sequence[torch.Tensor]]] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """All directions: per-position summed losses, term counts and the training objective.

        Args:
            windows: one (P, m, m, D) tensor per encoder.
            banks: None (training) or one (M, D) bank per encoder.
            credit: where each term's loss is counted (see :meth:`direction_losses`).
            negatives: per direction, :meth:`direction_losses`' fixed negatives (scoring).

        Returns:
            loss_sum (P, m, m) and count (m, m): summed over all (direction, step) terms credited to
            each position (loss_sum / count is the per-position mean); objective (): the mean over
            directions of each direction's objective (chance level: ln(1 + num_negatives)).
        """
        loss_sum = None
        count = None
        objective = None
        for index in range(len(self.directions)):
            e = self.encoder_of(index)
            s, c, o = self.direction_losses(
                windows[e], index, bank=None if banks is None else banks[e],
                num_negatives=num_negatives, draws=draws, generator=generator, credit=credit,
                negatives=None if negatives is None else negatives[index],
            )
            loss_sum = s if loss_sum is None else loss_sum + s
            count = c if count is None else count + c
            objective = o if objective is None else objective + o
        return loss_sum, count, objective / len(self.directions)
