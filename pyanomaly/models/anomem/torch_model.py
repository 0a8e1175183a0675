"""AnoMem's networks as plain ``nn.Module`` s: memory layers, the multi-scale model, the losses.

The training loops, data handling and persistence live in :mod:`pyanomaly.models.anomem.detector`.
Equation numbers refer to the AnoMem paper (Jezequel et al., "Anomaly Detection via Multi-Scale
Contrasted Memory").
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pyanomaly.distributed import gather_rows, world
from pyanomaly.models._precision import encoder_memory_format
from pyanomaly.models.anomem.augment import CropParams, matching_points
from pyanomaly.nn.hopfield import HopfieldMemory
from pyanomaly.nn.resnet import ResNet, resnet18, resnet50

__all__ = [
    "AnoMemModel",
    "double_hinge_loss",
    "nt_xent",
    "variance_loss",
]


def nt_xent(
    first: torch.Tensor,
    second: torch.Tensor,
    temperature: float,
    groups: torch.Tensor | None = None,
) -> torch.Tensor:
    """SimCLR's NT-Xent over a two-view batch (Eq. 4-5): row i of ``first`` and ``second`` pair up.

    Args:
        first, second: (N, P) representations of the two branches.
        temperature: tau.
        groups: optional (N,) ints, the source image of each row. Rows of the anchor's own group
            (other than its positive) are left out of its denominator, so vectors from other
            positions of the same image are not used as negatives. None = every other row is a
            negative (plain SimCLR).

    In distributed training ``first`` / ``second`` are this rank's rows of the global batch: its
    2N anchors are contrasted against the rows of every rank (:func:`pyanomaly.distributed.gather_rows`),
    ``groups`` holding global image ids.

    Returns:
        Scalar loss, the mean over the 2N anchors.
    """
    n = first.shape[0]
    z = F.normalize(torch.cat([first, second]).float(), dim=-1)
    # distributed: this rank's anchors against every rank's vectors (gathered with their gradients)
    all_first, offset = gather_rows(first)
    total = all_first.shape[0]
    candidates = z if total == n else F.normalize(torch.cat([all_first, gather_rows(second)[0]]).float(), dim=-1)
    logits = z @ candidates.T / temperature
    rows = torch.arange(offset, offset + n, device=z.device)
    own = torch.cat([rows, rows + total])
    targets = torch.cat([rows + total, rows])
    anchors = torch.arange(2 * n, device=z.device)
    if groups is None:
        logits = logits.index_put((anchors, own), logits.new_tensor(float("-inf")))
    else:
        all_groups = groups if total == n else gather_rows(groups.to(z.device))[0]
        both, all_both = torch.cat([groups, groups]).to(z.device), torch.cat([all_groups, all_groups]).to(z.device)
        excluded = both[:, None] == all_both[None, :]
        excluded[anchors, targets] = False
        logits = logits.masked_fill(excluded, float("-inf"))
    return F.cross_entropy(logits, targets)


def variance_loss(retrieved: torch.Tensor, target_std: float = 1.0, eps: float = 1e-4) -> torch.Tensor:
    """Hinge on the per-dimension std of the retrieved prototypes (Eq. 6, VICReg's variance term).

    ``mean_d max(0, target_std - sqrt(Var_batch(retrieved[:, d]) + eps))``; zero for fewer than 2 rows.
    """
    if retrieved.shape[0] < 2:
        return retrieved.new_zeros(()).float()
    std = torch.sqrt(retrieved.float().var(dim=0) + eps)
    return F.relu(target_std - std).mean()


def double_hinge_loss(distance: torch.Tensor, is_anomaly: torch.Tensor, margin: float) -> torch.Tensor:
    """Double-hinge distance loss (Eq. 11), per sample.

    Normal samples are pushed inside the ball of radius ``1 - margin``, anomalies outside radius
    ``1 + margin``; nothing pushes anomalies further once they are past the margin.

    Args:
        distance: (N,) anomaly distances.
        is_anomaly: (N,) bool.
        margin: half-width of the band around the unit sphere.
    """
    inside = F.relu(distance - (1.0 - margin))
    outside = F.relu((1.0 + margin) - distance)
    return torch.where(is_anomaly, outside, inside)


class _ScaleClassifier(nn.Module):
    """Average pooling to ``pool`` x ``pool`` then a two-layer MLP with one output (Eq. 10)."""

    def __init__(self, channels: int, pool: int, hidden: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(pool)
        self.mlp = nn.Sequential(
            nn.Flatten(),
            nn.Linear(channels * pool * pool, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, 1),
        )

    def forward(self, deviation: torch.Tensor) -> torch.Tensor:
        """Deviation map (B, C, H, W) -> anomaly distance (B,)."""
        return self.mlp(self.pool(deviation)).squeeze(1)


class AnoMemModel(nn.Module):
    """Encoder, per-scale memory layers, projection heads and anomaly-distance classifiers.

    Args:
        backbone: "resnet50" or "resnet18".
        in_channels: image channels.
        width: the encoder's base width (64 = the standard network).
        small_input: CIFAR stem (3x3 stride 1, no max pool) instead of the ImageNet stem.
        scales: encoder stages (1-4) that get a memory layer.
        memory_sizes: stored patterns per scale.
        beta: the memories' inverse temperature; None = 1 / sqrt(C_s), hopfield-layers' default.
        hopfield_iters, hopfield_tol: retrieval steps at most and the per-query tolerance.
        projection_dim: output of each scale's SimCLR projection head (Linear-ReLU-Linear); None
            = no head: the (normalised) features and recollections are contrasted directly.
        classifier_pool, classifier_hidden: the semi-supervised scale classifiers.
        mean, std: per-channel input normalisation (applied inside :meth:`features`).
        rotation_head: add a linear 4-way head on the last scale's pooled features for the
            rotation pretext task (:meth:`rotation_loss`).
    """

    def __init__(
        self,
        *,
        backbone: str,
        in_channels: int,
        width: int,
        small_input: bool,
        scales: Sequence[int],
        memory_sizes: Sequence[int],
        beta: float | None,
        hopfield_iters: int,
        hopfield_tol: float,
        projection_dim: int | None,
        classifier_pool: int,
        classifier_hidden: int,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        rotation_head: bool = False,
    ) -> None:
        super().__init__()
        factory = {"resnet18": resnet18, "resnet50": resnet50}[backbone]
        self.encoder: ResNet = factory(in_channels=in_channels, width=width, small_input=small_input)
        self.scales = tuple(int(s) for s in scales)
        self.num_stages = max(self.scales)
        dims = [self.encoder.stage_channels[s - 1] for s in self.scales]
        # hopfield-layers' HopfieldLayer as AnoMem uses it: learned patterns, LayerNorm-ed
        # queries and patterns, no projections
        self.memories = nn.ModuleList(
            HopfieldMemory(m, d, beta=beta, max_iter=hopfield_iters, tol=hopfield_tol, normalize=True)
            for d, m in zip(dims, memory_sizes)
        )
        self.projectors = nn.ModuleList(
            nn.Identity()
            if projection_dim is None
            else nn.Sequential(nn.Linear(d, d), nn.ReLU(inplace=True), nn.Linear(d, projection_dim))
            for d in dims
        )
        self.classifiers = nn.ModuleList(
            _ScaleClassifier(d, classifier_pool, classifier_hidden) for d in dims
        )
        self.rotation_head = nn.Linear(dims[-1], 4) if rotation_head else None
        mean = torch.tensor(mean if mean is not None else [0.5] * in_channels, dtype=torch.float32)
        std = torch.tensor(std if std is not None else [0.25] * in_channels, dtype=torch.float32)
        self.register_buffer("mean", mean.view(1, -1, 1, 1))
        self.register_buffer("std", std.view(1, -1, 1, 1))

    # -- features and deviations --------------------------------------------------------------
    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Images (B, C, H, W) in [0, 1] -> the fp32 feature map of each memory scale (B, C_s, H_s, W_s).

        The encoder runs in ``_precision.ENCODER_MEMORY_FORMAT`` (channels_last), under whatever autocast
        the caller set (the detector's ``precision``); its outputs are cast to fp32 for the memories,
        heads and losses.
        """
        x = ((images - self.mean) / self.std).contiguous(memory_format=encoder_memory_format())
        stages = self.encoder(x, num_stages=self.num_stages)
        return [stages[s - 1].float() for s in self.scales]

    def rotation_loss(self, turned: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
        """The rotation pretext loss: cross-entropy of the 4-way head on the last scale's
        average-pooled features of images (B, C, H, W) turned by ``turns`` (B,) quarter turns."""
        if self.rotation_head is None:
            raise RuntimeError("this model has no rotation head (build it with rotation_head=True)")
        pooled = self.features(turned)[-1].mean(dim=(2, 3))
        with _fp32(turned.device):
            return F.cross_entropy(self.rotation_head(pooled), turns)

    def deviations(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Per scale, the map of (features - memory recollection) (Eq. 8), each (B, C_s, H_s, W_s).

        Every spatial position's feature vector is normalised and recalled from the scale's memory.
        """
        out = []
        maps = self.features(images)
        with _fp32(images.device):
            for memory, fmap in zip(self.memories, maps):
                recall = memory(fmap)
                out.append(recall.features.float() - recall.retrieved.float())
        return out

    def one_class_scores(self, deviations: Sequence[torch.Tensor]) -> torch.Tensor:
        """Per-scale one-class scores ||D_s|| (Eq. 9) of :meth:`deviations`' maps: (B, S)."""
        return torch.stack([d.flatten(1).norm(dim=1) for d in deviations], dim=1)

    def classifier_scores(self, deviations: Sequence[torch.Tensor]) -> torch.Tensor:
        """Per-scale anomaly distances of the semi-supervised classifiers (Eq. 10): (B, S)."""
        return torch.stack([clf(d).float() for clf, d in zip(self.classifiers, deviations)], dim=1)

    # -- stage 1 ------------------------------------------------------------------------------
    def contrastive_loss(
        self,
        first: torch.Tensor,
        first_crop: CropParams,
        second: torch.Tensor,
        second_crop: CropParams,
        is_normal: torch.Tensor,
        *,
        sampling_ratios: Sequence[float],
        scale_weights: Sequence[float],
        temperature: float,
        variance_weight: float,
        generator: torch.Generator,
        negatives: str = "all",
        part: tuple[int, int] | None = None,
        train_encoder: bool = True,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Multi-scale contrasted memory loss (Eq. 7) on a two-view batch.

        At each scale s, ``ceil(ratio_s * H_s * W_s)`` points per image are drawn where the two
        crops overlap (the same image patch in both views: the positive pair); the feature vectors
        there are read from both views' maps (bilinear). Branch 1 vectors of normal images are
        replaced by their memory recollection (Eq. 3); both branches go through the scale's
        projection head and NT-Xent contrasts every sampled vector of the batch (Eq. 4-5). The
        variance loss (Eq. 6) acts on the recollections.

        Args:
            first, second: the two views (B, C, H, W) in [0, 1].
            first_crop, second_crop: where each view was cropped (:func:`augment.simclr_view`).
            is_normal: (B,) bool; memory is applied to normal images only.
            negatives: "other_images" (vectors of other images only are negatives) or "all"
                (every other sampled vector of the batch, the same image's other positions too).
            part: (first row, total rows) of this batch in the global batch (distributed training):
                points are drawn for the whole global batch and sliced, NT-Xent contrasts against
                every rank's vectors and the variance loss spans every rank's recollections.
            train_encoder: False runs the encoder without gradient (its BatchNorm statistics still
                update): the loss then trains the memories and projections only.

        Returns:
            (total loss, {"contrastive": ..., "variance": ...} weighted sums as floats).
        """
        batch = first.shape[0]
        with torch.set_grad_enabled(train_encoder and torch.is_grad_enabled()):
            maps = self.features(torch.cat([first, second]))
        with _fp32(first.device):  # the encoder's maps are fp32; nothing after it runs in bf16
            total = first.new_zeros((), dtype=torch.float32)
            contrastive_sum, variance_sum = 0.0, 0.0
            for s, fmap in enumerate(maps):
                h, w = fmap.shape[-2:]
                count = max(1, math.ceil(sampling_ratios[s] * h * w))
                p1, p2 = matching_points(first_crop, second_crop, count, generator, part)
                v1 = _sample(fmap[:batch], p1)  # (B * count, C)
                v2 = _sample(fmap[batch:], p2)
                memory = self.memories[s]
                q1 = memory.states(v1)
                q2 = memory.states(v2)
                normal_rows = is_normal.repeat_interleave(count)
                first_image = part[0] if part is not None else 0
                source_image = torch.arange(first_image, first_image + batch, device=first.device).repeat_interleave(count)
                if bool(normal_rows.any()) or world()[1] > 1:  # every rank joins the gather
                    recalled, _ = memory.retrieve(q1[normal_rows])
                    q1 = q1.float().index_put((normal_rows.nonzero().squeeze(1),), recalled.float())
                    var = variance_loss(gather_rows(recalled)[0])
                else:
                    var = total.new_zeros(())
                projector = self.projectors[s]
                groups = source_image if negatives == "other_images" else None
                contrast = nt_xent(projector(q1), projector(q2), temperature, groups)
                total = total + scale_weights[s] * (contrast + variance_weight * var)
                contrastive_sum += scale_weights[s] * float(contrast.detach())
                variance_sum += scale_weights[s] * float(var.detach())
            return total, {"contrastive": contrastive_sum, "variance": variance_sum}


def _fp32(device: torch.device):
    """Autocast off: what follows the encoder runs in fp32 whatever precision the encoder used."""
    return torch.autocast(device.type, enabled=False)


def _sample(fmap: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Bilinear read of (B, C, H, W) at (B, K, 2) points in [-1, 1] -> (B * K, C)."""
    b, c = fmap.shape[:2]
    values = F.grid_sample(
        fmap,
        points[:, :, None, :].to(fmap.dtype),
        mode="bilinear",
        padding_mode="border",
        align_corners=False,
    )
    return values.squeeze(-1).permute(0, 2, 1).reshape(-1, c)
