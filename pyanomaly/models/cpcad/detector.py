"""CPC-AD detector: fit on normal images, score images and sub-patches, save and load.

de Haan and Löwe, "Contrastive Predictive Coding for Anomaly Detection and Segmentation" (2021).
The InfoNCE loss of a sub-patch, with negatives drawn from training-set embeddings, is its anomaly
score; overlapping sub-patch scores averaged onto pixels give the segmentation map.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pyanomaly import distributed
from pyanomaly._progress import logger, progress
from pyanomaly.data import as_images, stack_resized
from pyanomaly.data._sources import ImageSource
from pyanomaly.models._precision import check_precision, encoder_autocast, encoder_memory_format, resolve_precision
from pyanomaly.models.base import Detector, resolve_device
from pyanomaly.models.cpcad.torch_model import CREDITS, DIRECTIONS, CPCADModel, windows_from_grid, windows_to_grid
from pyanomaly.nn.preact_resnet import STEMS
from pyanomaly.ops import extract_patches, fold_patches, sample_negatives

__all__ = ["CPCAD", "LAYOUTS"]

LAYOUTS = ("grid", "nested")
LR_SCHEDULES = ("constant", "cosine")
ASPECTS = ("squash", "pad")
SCORE_NORMS = ("none", "position")
ANOMALY_SCORES = ("infonce", "knn", "combined")
INFONCE_SIDES = ("upper", "both")

#: Greedy InfoMax's grayscale normalisation (loeweX/Greedy_InfoMax, STL-10 gray statistics).
GIM_MEAN, GIM_STD = 0.4120, 0.2570


def _pad_square(image: torch.Tensor) -> torch.Tensor:
    """uint8 (C, H, W) -> (C, S, S), S = max(H, W), centred, the margin reflected (replicated where
    the margin is wider than the image)."""
    c, h, w = image.shape
    side = max(h, w)
    if h == w:
        return image
    top, left = (side - h) // 2, (side - w) // 2
    pad = (left, side - w - left, top, side - h - top)
    mode = "reflect" if max(pad[0], pad[1]) < w and max(pad[2], pad[3]) < h else "replicate"
    return F.pad(image[None].float(), pad, mode=mode)[0].round().to(torch.uint8)


def position_stats(train_grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per grid position, the mean and std (G, G) of the training images' (N, G, G) scores; the std
    is floored at a tenth of its median, so near-constant positions do not blow up."""
    std = train_grid.std(dim=0)
    return train_grid.mean(dim=0), std.clamp(min=0.1 * float(std.median()) + 1e-6)


def lr_factor(schedule: str, warmup_steps: int, total_steps: int):
    """LambdaLR factor per optimiser step: linear warm-up, then constant or cosine decay to 0."""

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


class CPCAD(Detector):
    """Contrastive Predictive Coding for anomaly detection and segmentation.

    Every size is an argument; the defaults are the paper's setting, and where the paper lost a
    number the source of the default is given. "GIM" is Greedy InfoMax (loeweX/Greedy_InfoMax),
    the paper's lineage code; "lineage notes" is ``shared/papers/lineage-notes.md``.

    Distributed training (``torchrun``, see :mod:`pyanomaly.distributed`): ``batch_size`` is the
    global batch, split evenly over the ranks (the ragged last batch is dropped); every InfoNCE
    query draws its in-batch negatives from the W_k-transformed targets of the whole global batch
    (gathered with their gradients), so N ranks train as one process with the same global batch.

    Args:
        image_size: side the (grayscale) images are resized to (paper: 768).
        aspect: how a non-square image becomes the square input: ``"squash"`` (resize both sides to
            ``image_size``; the paper's MVTec AD images are square, so it is silent) or ``"pad"``
            (centre it on a square of its longer side, the margin filled by reflecting the image,
            then resize: aspect ratio kept; sub-patches lying wholly in the margin are left out of
            the image score and the maps are cut back to the image). Default squash.
        patch_size, patch_stride: patches (paper: 256 at stride 128). ``patch_stride`` must divide
            ``image_size - patch_size``.
        sub_size, sub_stride: sub-patches inside each patch (paper: 64 at stride 32, a 7x7 window);
            ``sub_stride`` must divide ``patch_stride`` and ``patch_size - sub_size``.
        layout: ``"grid"`` encodes each distinct sub-patch once (529 per 768 image) and forms the
            windows on the feature grid; ``"nested"`` encodes every patch's sub-patches (1225 per 768
            image), paper-exact. The encoder has no normalisation, so both compute the same losses
            (identical scores for the same weights); grid is 2.3x cheaper. Default grid (measured:
            ``results/cpcad.md``).
        stem: encoder stem, ``"gim"`` (5x5 stride 1, GIM) or ``"fast"`` (7x7 stride 2 + max-pool,
            15x fewer multiply-adds; lineage notes). Default gim.
        widths, blocks: encoder stages (ResNet-18 v2 up to stage 3: 64/128/256, 2/2/2 blocks, GIM).
        shared_encoder: one encoder for all directions (each keeps its own W_k) instead of the
            paper's four separate models. Default False (paper).
        directions: context sides modelled (paper: all four).
        prediction_steps: rows predicted ahead, K (lost in the paper; GIM: 5).
        num_negatives: negatives per InfoNCE term (paper: 16).
        epochs, batch_size: paper: 150, 16.
        lr: Adam learning rate (lost in the paper; GIM: 2e-4; lineage notes measured 1e-3 learning
            much faster and stably on CPU, where 2e-4 stayed at chance after 21 epochs). Default 1e-3.
        crop_fraction: side fraction of the random training crop taken before resizing (lost in
            the paper; GIM crops 64 of 96 px = 2/3). Default 2/3. 1.0 disables cropping.
        hflip: random horizontal flip (p = 0.5) during training (paper).
        mean, std: grayscale normalisation (GIM: 0.4120, 0.2570).
        top_k: image score = mean of the k highest sub-patch scores (k lost in the paper). An int is
            a count, a float in (0, 1) a fraction of the sub-patches (at least one). Default 0.02
            (about 10 of the 529 sub-patches of a 768 image; lineage notes: pooling moves AUROC by
            ~0.1, not tuned on test data here).
        test_draws: independent negative draws averaged when scoring (lineage notes: 8 added up to
            0.035 image AUROC at almost no cost).
        test_negatives: negatives per InfoNCE term when scoring; None = ``num_negatives`` (the paper
            scores with the training loss). More negatives give a less noisy score.
        bank_size: training-set sub-patch embeddings kept (per encoder) for scoring negatives.
        direction_reduce: how the four directions combine: ``"mean"`` of all (direction, step)
            terms credited to a sub-patch (lost in the paper; our choice).
        credit: which sub-patch of an InfoNCE term gets its loss in the maps: ``"target"`` (the
            predicted one: the paper keeps anomalies out of the negatives so that they show up in
            the positive), ``"context"`` (the one predicting) or ``"both"``. Default target (paper).
        lr_schedule: ``"constant"`` (GIM: Adam, no scheduler) or ``"cosine"`` (cosine decay to 0
            over the whole fit). Default constant.
        warmup_epochs: linear lr warm-up over the first epochs (0 = none, GIM).
        score_norm: ``"none"`` (the paper: the raw InfoNCE loss is the score) or ``"position"``:
            each grid position's score is standardised by the mean and std of that position's scores
            over the training images (fitted after training; a departure from the paper that removes
            the fixed per-position offsets, e.g. at image borders).
        anomaly_score: ``"infonce"`` (the paper: the sub-patch's InfoNCE loss), ``"knn"`` (the
            distance of the sub-patch's embedding to its nearest training sub-patch embedding in the
            bank, mean over encoders; PatchCore's score on CPC features) or ``"combined"`` (the sum of
            the two, each after ``score_norm``). A departure from the paper, measured in
            results/cpcad.md: InfoNCE is *low* on anomalies that are easy to tell apart from normal
            texture (flat, blurred or large-area defects), where the nearest-neighbour distance is
            high. Default infonce.
        infonce_sides: which deviations of a sub-patch's InfoNCE loss are anomalous: ``"upper"``
            (the paper: a high loss) or ``"both"``: also a loss far *below* that position's training
            range (a sub-patch more predictable than normal texture, e.g. a flat or blurred region);
            the position-standardised loss's absolute value, standardised again over the training
            images. Needs ``score_norm="position"``. A departure from the paper (results/cpcad.md).
            Default upper.
        score_batch_size: images per scoring batch.
        checkpoint_every: write the training state every this many epochs (and after the last) to
            ``checkpoint_dir`` (0 = never); ``fit(..., resume=...)`` continues from it and ends with
            the same parameters as an uninterrupted fit (seeded, CPU).
        checkpoint_dir: folder for ``cpcad-checkpoint.pt`` (written atomically).
        num_workers: DataLoader worker processes that read, crop, flip and resize the training
            images (0 = in the training process). Each image's crop and flip come from its own
            generator seeded by (seed, epoch, image), so a seeded fit is the same with any number.
        cache_images: training images given as files: True keeps them decoded (uint8) in memory,
            False reads them from disk every epoch, "auto" (default) caches up to 1 GiB of pixels.
        activation_checkpointing: recompute each residual block's activations in the backward
            (``torch.utils.checkpoint``) instead of storing them: much less training memory at the
            paper's size for one extra encoder forward (bench/bench_memory.py). Exact (no
            normalisation or randomness in the encoder). Default False.
        contamination: fraction of training scores above ``threshold_`` (PyOD).
        seed: seeds initialisation, crops, flips, shuffling and negative draws (reproducible on CPU);
            scoring draws are seeded too, the same for every image, so an image's scores are
            deterministic and do not depend on the images scored with it.
        device: ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        precision: ``"auto"`` (bf16 autocast for the encoders on CUDA with bf16; fp32 on CPUs, where
            the ``cpu`` preset measured slower in bf16 with and without AMX; 32 px sub-patches train
            1.2-1.4x faster in bf16 on AMX: ``pyanomaly.models._precision``), ``"bf16"`` or
            ``"fp32"``. The predictors, InfoNCE and the scores are always fp32. The encoders run
            channels_last.
        verbose: progress bars (tqdm, stderr) while training and scoring; per-epoch losses go to the
            ``"pyanomaly"`` logger at INFO either way.

    Attributes:
        history_: mean training objective per epoch.
        model_: the :class:`CPCADModel`.
        banks_: one (M, D) bank of training embeddings per encoder.
        threshold_, decision_scores_, labels_: PyOD's.
    """

    method = "cpcad"
    grayscale = True
    #: ``CPCAD.preset(name, **overrides)``, ``pyanomaly fit --preset name``.
    #:
    #: - ``"paper"``: de Haan & Loewe's setting (768 px, 256/128 patches, 64/32 sub-patches, GIM stem,
    #:   ResNet-18 v2 to stage 3, four encoders, K = 5 from GIM, 150 epochs, batch 16); lr 1e-3, the
    #:   lineage-notes measurement (the paper lost it). Meant for a GPU: at 768 px every image is 529
    #:   sub-patches of 64 px through four full-resolution encoders (bench/device_check.py measures a
    #:   training step); on 2 CPU cores it would take days.
    #: - ``"cpu"``: the best found within 20 minutes of fit on 2 cores for 100-300 images
    #:   (results/cpcad.md, the study on magnetic_tile and glass): 128 px with the paper's 7x7 windows
    #:   at 1/6 scale (64/32 patches, 16/8 sub-patches), fast stem, widths 32/64/128 with one block,
    #:   one shared encoder, K = 3, 150 epochs of Adam at lr 3e-3 with 5 warm-up epochs and cosine
    #:   decay (study: longer training mostly sharpens the maps; on glass it turned 0.30 into 0.95
    #:   image AUROC), aspect-keeping padding (magnetic-tile images are 1:1 to 1:2.5; study: +0.05
    #:   image AUROC over squashing) and per-position score standardisation (study: +0.03 to 0.09
    #:   image AUROC on the same models), and ``anomaly_score="combined"`` (InfoNCE plus the
    #:   nearest-neighbour distance of the CPC embeddings, both standardised; a departure from the
    #:   paper, "infonce" restores it): on magnetic_tile (3 seeds) image AUROC 0.79 -> 0.81, pixel
    #:   0.70 -> 0.72, AUPRO 0.44 -> 0.53; on glass (3 seeds) pixel 0.69 -> 0.76 but AUPRO
    #:   0.50 -> 0.34; on the synthetic brick texture (seed 0) pixel 0.38 -> 0.61, where "knn"
    #:   alone reaches 0.82 (results/cpcad.md); and ``infonce_sides="both"`` (a loss far below its
    #:   position's training range counts too: InfoNCE is inverted on predictable defects; a
    #:   departure, "upper" restores the paper): on magnetic_tile (3 seeds, same models) pixel AUROC
    #:   0.729 -> 0.772, "uneven" 0.48 -> 0.60, image AUROC 0.822 -> 0.817, AUPRO 0.538 -> 0.543; on
    #:   glass unchanged (0.754 pixel, 0.37 AUPRO); on the synthetic brick (3 seeds) / gravel (seed 0)
    #:   textures pixel 0.60 -> 0.84 / 0.28 -> 0.78, the blurred "smudge" defects 0.49 -> 0.81 /
    #:   0.16 -> 0.81, image AUROC -0.03 / +0.03. The shared encoder and fast stem: four encoders
    #:   gave magnetic_tile pixel AUROC +0.014 but image AUROC -0.054 for 2.6x the fit (3 seeds); the
    #:   GIM stem 7x the fit and no gain (seed 0). About 2-2.5 s an epoch per 100 images on 2 idle
    #:   cores: ~5-7 minutes for 100 images (395 s on magnetic_tile, AVX2 EPYC), ~15-20 for 300.
    PRESETS = {
        "paper": dict(
            image_size=768, patch_size=256, patch_stride=128, sub_size=64, sub_stride=32, stem="gim",
            widths=(64, 128, 256), blocks=(2, 2, 2), shared_encoder=False, prediction_steps=5,
            num_negatives=16, epochs=150, batch_size=16, lr=1e-3,
        ),
        "cpu": dict(
            image_size=128, patch_size=64, patch_stride=32, sub_size=16, sub_stride=8, stem="fast",
            widths=(32, 64, 128), blocks=(1, 1, 1), shared_encoder=True, prediction_steps=3,
            num_negatives=16, epochs=150, batch_size=16, lr=3e-3, lr_schedule="cosine", warmup_epochs=5,
            aspect="pad", score_norm="position", anomaly_score="combined", infonce_sides="both",
        ),
    }

    def __init__(
        self,
        *,
        image_size: int = 768,
        aspect: str = "squash",
        patch_size: int = 256,
        patch_stride: int = 128,
        sub_size: int = 64,
        sub_stride: int = 32,
        layout: str = "grid",
        stem: str = "gim",
        widths: Sequence[int] = (64, 128, 256),
        blocks: Sequence[int] = (2, 2, 2),
        shared_encoder: bool = False,
        directions: Sequence[str] = DIRECTIONS,
        prediction_steps: int = 5,
        num_negatives: int = 16,
        epochs: int = 150,
        batch_size: int = 16,
        lr: float = 1e-3,
        crop_fraction: float = 2 / 3,
        hflip: bool = True,
        mean: float = GIM_MEAN,
        std: float = GIM_STD,
        top_k: int | float = 0.02,
        test_draws: int = 8,
        test_negatives: int | None = None,
        bank_size: int = 16384,
        direction_reduce: str = "mean",
        credit: str = "target",
        lr_schedule: str = "constant",
        warmup_epochs: int = 0,
        score_norm: str = "none",
        anomaly_score: str = "infonce",
        infonce_sides: str = "upper",
        score_batch_size: int = 4,
        checkpoint_every: int = 0,
        checkpoint_dir: str | None = None,
        num_workers: int = 0,
        cache_images: bool | str = "auto",
        activation_checkpointing: bool = False,
        contamination: float = 0.1,
        seed: int | None = 0,
        device: str | torch.device = "auto",
        precision: str = "auto",
        verbose: bool = True,
    ) -> None:
        super().__init__(contamination=contamination)
        for name, value in (
            ("image_size", image_size), ("patch_size", patch_size), ("patch_stride", patch_stride),
            ("sub_size", sub_size), ("sub_stride", sub_stride), ("prediction_steps", prediction_steps),
            ("num_negatives", num_negatives), ("epochs", epochs), ("batch_size", batch_size),
            ("test_draws", test_draws), ("bank_size", bank_size), ("score_batch_size", score_batch_size),
        ):
            minimum = 0 if name == "epochs" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if patch_size > image_size:
            raise ValueError(f"patch_size ({patch_size}) must not exceed image_size ({image_size})")
        if sub_size > patch_size:
            raise ValueError(f"sub_size ({sub_size}) must not exceed patch_size ({patch_size})")
        if (image_size - patch_size) % patch_stride:
            raise ValueError(
                f"patch_stride ({patch_stride}) must divide image_size - patch_size "
                f"({image_size - patch_size}) so that the patches cover the image"
            )
        if patch_stride % sub_stride or (patch_size - sub_size) % sub_stride:
            raise ValueError(
                f"sub_stride ({sub_stride}) must divide patch_stride ({patch_stride}) and "
                f"patch_size - sub_size ({patch_size - sub_size}) so that all sub-patches lie on one grid"
            )
        self.window = (patch_size - sub_size) // sub_stride + 1
        if self.window < 3:
            raise ValueError(
                f"a patch must hold at least 3 sub-patches per side to predict one step ahead; "
                f"patch_size={patch_size}, sub_size={sub_size}, sub_stride={sub_stride} give {self.window}"
            )
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        if stem not in STEMS:
            raise ValueError(f"stem must be one of {STEMS}, got {stem!r}")
        if not isinstance(crop_fraction, (int, float)) or not 0.0 < crop_fraction <= 1.0:
            raise ValueError(f"crop_fraction must be in (0, 1], got {crop_fraction}")
        if not isinstance(lr, (int, float)) or not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if isinstance(top_k, bool) or not (
            (isinstance(top_k, int) and top_k >= 1) or (isinstance(top_k, float) and 0.0 < top_k <= 1.0)
        ):
            raise ValueError(
                f"top_k must be an int >= 1 (a count) or a float in (0, 1] (a fraction), got {top_k!r}"
            )
        if direction_reduce not in ("mean",):
            raise ValueError(f"direction_reduce must be 'mean', got {direction_reduce!r}")
        if not isinstance(std, (int, float)) or std <= 0:
            raise ValueError(f"std must be > 0, got {std}")
        if test_negatives is not None and (
            isinstance(test_negatives, bool) or not isinstance(test_negatives, int) or test_negatives < 1
        ):
            raise ValueError(f"test_negatives must be None or a positive int, got {test_negatives!r}")
        if aspect not in ASPECTS:
            raise ValueError(f"aspect must be one of {ASPECTS}, got {aspect!r}")
        if credit not in CREDITS:
            raise ValueError(f"credit must be one of {CREDITS}, got {credit!r}")
        if lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {lr_schedule!r}")
        if isinstance(warmup_epochs, bool) or not isinstance(warmup_epochs, int) or warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be an int >= 0, got {warmup_epochs!r}")
        if score_norm not in SCORE_NORMS:
            raise ValueError(f"score_norm must be one of {SCORE_NORMS}, got {score_norm!r}")
        if anomaly_score not in ANOMALY_SCORES:
            raise ValueError(f"anomaly_score must be one of {ANOMALY_SCORES}, got {anomaly_score!r}")
        if infonce_sides not in INFONCE_SIDES:
            raise ValueError(f"infonce_sides must be one of {INFONCE_SIDES}, got {infonce_sides!r}")
        if infonce_sides == "both" and score_norm != "position":
            raise ValueError("infonce_sides='both' needs score_norm='position' (a loss is only 'too low' "
                             f"against its position's training range), got score_norm={score_norm!r}")
        self.image_size, self.patch_size, self.patch_stride = image_size, patch_size, patch_stride
        self.aspect = aspect
        self.sub_size, self.sub_stride, self.layout, self.stem = sub_size, sub_stride, layout, stem
        for name, value in (("widths", widths), ("blocks", blocks)):
            if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value or any(
                isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1 for v in value
            ):
                raise ValueError(f"{name} must be a non-empty list of positive ints (one per stage), got {value!r}")
        if len(widths) != len(blocks):
            raise ValueError(f"widths and blocks must have one entry per stage each, got {list(widths)} and {list(blocks)}")
        if isinstance(directions, (str, bytes)) or not isinstance(directions, Sequence) or not directions:
            raise ValueError(f"directions must be a non-empty list among {DIRECTIONS}, got {directions!r}")
        self.widths, self.blocks = tuple(int(w) for w in widths), tuple(int(b) for b in blocks)
        self.shared_encoder, self.directions = bool(shared_encoder), tuple(directions)
        self.prediction_steps, self.num_negatives = prediction_steps, num_negatives
        self.epochs, self.batch_size, self.lr = epochs, batch_size, float(lr)
        self.crop_fraction, self.hflip = float(crop_fraction), bool(hflip)
        self.mean, self.std = float(mean), float(std)
        self.top_k, self.test_draws, self.bank_size = top_k, test_draws, bank_size
        self.test_negatives = test_negatives
        self.direction_reduce, self.score_batch_size = direction_reduce, score_batch_size
        self.credit, self.lr_schedule, self.warmup_epochs = credit, lr_schedule, warmup_epochs
        self.score_norm, self.anomaly_score, self.infonce_sides = score_norm, anomaly_score, infonce_sides
        self._set_checkpointing(checkpoint_every, checkpoint_dir)
        self._set_data_loading(num_workers, cache_images)
        self.activation_checkpointing = bool(activation_checkpointing)
        for name, value in (("lr", lr), ("mean", mean), ("std", std), ("crop_fraction", crop_fraction)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))):
            raise TypeError(f"seed must be an int or None, got {seed!r}")
        self.seed = None if seed is None else int(seed)
        self.device = resolve_device(device)
        self.precision, self.verbose = check_precision(precision), bool(verbose)
        self.ratio = patch_stride // sub_stride
        self.patches_per_side = (image_size - patch_size) // patch_stride + 1
        self.grid_size = (self.patches_per_side - 1) * self.ratio + self.window
        with torch.device("meta"):  # validates widths/blocks/directions now, allocates nothing
            self._new_model()
        self.model_: CPCADModel | None = None
        self.banks_: list[torch.Tensor] | None = None
        self.score_stats_: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None  # component: (G, G) mean, std
        self.bank_owners_: list[torch.Tensor] | None = None  # per bank row, the training image it came from
        self.history_: list[float] = []

    # -- state --------------------------------------------------------------------------------
    def _get_state(self) -> dict:
        if self.banks_ is None:
            raise RuntimeError("this CPCAD is not fitted yet")
        stats = None if self.score_stats_ is None else {k: list(v) for k, v in self.score_stats_.items()}
        return {"model": self.model_.state_dict(), "banks": list(self.banks_), "history": list(self.history_),
                "score_stats": stats, "bank_owners": None if self.bank_owners_ is None else list(self.bank_owners_)}

    def _set_state(self, state: dict) -> None:
        self.model_ = self._build_model()
        self.model_.load_state_dict(state["model"])
        self.model_.to(self.device).eval()
        self.banks_ = [bank.to(self.device) for bank in state["banks"]]
        self.history_ = [float(v) for v in state.get("history", [])]
        stats = state.get("score_stats")
        if isinstance(stats, (list, tuple)):  # files from before anomaly_score: the InfoNCE statistics
            stats = {"infonce": stats}
        self.score_stats_ = None if stats is None else {k: (v[0].float(), v[1].float()) for k, v in stats.items()}
        owners = state.get("bank_owners")
        self.bank_owners_ = None if owners is None else list(owners)

    def _new_model(self) -> CPCADModel:
        return CPCADModel(
            in_channels=1, directions=self.directions, shared_encoder=self.shared_encoder,
            prediction_steps=self.prediction_steps, widths=self.widths, blocks=self.blocks,
            strides=(1,) + (2,) * (len(self.widths) - 1), stem=self.stem,
        )

    def _build_model(self) -> CPCADModel:
        with torch.random.fork_rng(devices=[], enabled=self.seed is not None):
            if self.seed is not None:
                torch.manual_seed(self.seed)
            model = self._new_model()
        for encoder in model.encoders:
            encoder.checkpoint_activations = self.activation_checkpointing
        return model.to(self.device, memory_format=encoder_memory_format())

    def _images(self, data: Any, name: str) -> list[torch.Tensor]:
        """Any accepted input (``pyanomaly.data.as_images``) -> gray uint8 (1, H, W) images."""
        return as_images(data, name, mode="gray", min_size=self.sub_size)

    def _autocast(self):
        return encoder_autocast(self.precision, self.device)

    # -- embedding ------------------------------------------------------------------------------
    def _subpatch_grid(self, batch: torch.Tensor, hflip: torch.Tensor | None) -> list[torch.Tensor]:
        """uint8 (B, C, S, S) -> per encoder the (B, G, G, D) embedding of every distinct sub-patch."""
        sub = extract_patches(
            batch, self.sub_size, self.sub_stride, grayscale=True, mean=self.mean, std=self.std, hflip=hflip
        )  # B G G 1 s s
        g = sub.shape[1]
        flat = sub.reshape(-1, 1, self.sub_size, self.sub_size).contiguous(memory_format=encoder_memory_format())
        with self._autocast():  # (-1: a traced graph keeps the batch axis dynamic)
            return [e.reshape(-1, g, g, self.model_.dim) for e in self.model_.encode(flat)]

    def _windows(self, batch: torch.Tensor, hflip: torch.Tensor | None) -> list[torch.Tensor]:
        """uint8 (B, C, S, S) -> per encoder the (B * nh * nw, m, m, D) window embeddings."""
        m = self.window
        if self.layout == "grid":
            grids = self._subpatch_grid(batch, hflip)
            return [windows_from_grid(g, m, self.ratio).reshape(-1, m, m, g.shape[-1]) for g in grids]
        sub = extract_patches(
            batch, self.patch_size, self.patch_stride, sub_size=self.sub_size, sub_stride=self.sub_stride,
            grayscale=True, mean=self.mean, std=self.std, hflip=hflip,
        )  # B nh nw m m 1 s s
        flat = sub.reshape(-1, 1, self.sub_size, self.sub_size).contiguous(memory_format=encoder_memory_format())
        with self._autocast():
            return [e.reshape(-1, m, m, e.shape[-1]) for e in self.model_.encode(flat)]

    def _resize(self, images: list[torch.Tensor]) -> torch.Tensor:
        """uint8 (C, H_i, W_i) images -> uint8 (B, C, S, S) on the device, per ``aspect``."""
        if self.aspect == "pad":
            images = [_pad_square(image) for image in images]
        return stack_resized(images, self.image_size).to(self.device)

    def _content_box(self, size: tuple[int, int]) -> tuple[int, int, int, int]:
        """(top, left, height, width) of an (h, w) image inside its square of side max(h, w)."""
        h, w = size
        if self.aspect == "squash":
            return 0, 0, h, w
        side = max(h, w)
        return (side - h) // 2, (side - w) // 2, h, w

    def _valid_cells(self, sizes: Sequence[tuple[int, int]]) -> torch.Tensor | None:
        """(N, G, G) bool: sub-patches that overlap their image (None: all do, as with squash)."""
        if self.aspect == "squash":
            return None
        g, starts = self.grid_size, torch.arange(self.grid_size) * self.sub_stride
        masks = []
        for size in sizes:
            top, left, h, w = self._content_box(size)
            scale = self.image_size / max(size)
            rows = (starts + self.sub_size > top * scale) & (starts < (top + h) * scale)
            cols = (starts + self.sub_size > left * scale) & (starts < (left + w) * scale)
            masks.append(rows[:, None] & cols[None, :])
        return torch.stack(masks) if masks else torch.ones(0, g, g, dtype=torch.bool)

    # -- training -------------------------------------------------------------------------------
    def fit(self, data: Any, y: Any = None, *, on_epoch_end=None, resume=None) -> CPCAD:
        """Train on normal images, build the negative bank and fit the thresholds.

        Args:
            data: normal images, any form :func:`pyanomaly.data.as_images` takes (paths, a folder,
                PIL images, arrays, tensors, ``MVTecDataset`` ...); colour is converted to luma.
            y: optional (N,) labels, 1 = anomalous: those images are left out (CPC-AD is one-class).
            on_epoch_end: optional ``fn(detector, {"epoch": e, "loss": l})`` after every epoch
                (learning curves: it may call :meth:`scores_now`); training resumes afterwards.
            resume: a checkpoint (file, or the ``checkpoint_dir`` holding one) of a fit with the same
                settings and data to continue from.
        """
        images = _normal_only(self._training_source(data, "data", mode="gray", min_size=self.sub_size), y)
        _, ranks = self._global_batch()
        self.device = distributed.rank_device(self.device)
        gen = torch.Generator().manual_seed(
            self.seed if self.seed is not None else int(torch.randint(2**62, (1,)))
        )
        neg_seed = int(torch.randint(2**62, (1,), generator=gen))
        neg_gen = torch.Generator(device=self.device).manual_seed(neg_seed)
        view_seed = int(torch.randint(2**62, (1,), generator=gen))
        self.model_ = self._build_model()
        self.model_.train()
        optimizer = torch.optim.Adam(self.model_.parameters(), lr=self.lr)
        n = len(images)
        steps = math.ceil(n / self.batch_size) if ranks == 1 else n // self.batch_size  # every rank steps together
        if steps == 0:
            raise ValueError(f"{n} training images do not fill one global batch of {self.batch_size} over {ranks} ranks")
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_factor(self.lr_schedule, steps * self.warmup_epochs, steps * self.epochs)
        )
        view = _TrainingView(self.crop_fraction, self.aspect, self.image_size, self.hflip)
        views = images
        if self.crop_fraction == 1.0 and images.cached:  # the same square image every epoch: resize once
            views = ImageSource(list(self._resize(list(images)).cpu()))
        loader = self._epoch_loader(views, view, seed=view_seed, batch_size=self.batch_size, drop_last=ranks > 1,
                                    collate=_collate_views, split_over_ranks=True)
        objective_of = self._data_parallel(self.model_, self._training_objective)
        self.history_, first = [], 0
        if resume is not None:
            state = self._read_checkpoint(resume)
            if state["images"] != n:
                raise ValueError(f"the checkpoint was trained on {state['images']} images, not {n}: resume with the same data")
            self.model_.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            schedule.load_state_dict(state["schedule"])
            gen.set_state(state["gen"])
            neg_gen.set_state(state["neg_gen"].to(neg_gen.get_state().device))
            self.history_, first = list(state["history"]), state["epoch"]
        start = time.perf_counter()
        bar = progress(self.epochs * steps, "cpcad fit", self.verbose)
        bar.update(first * steps)
        for epoch in range(first, self.epochs):
            order = torch.randperm(n, generator=gen).tolist()
            total, seen = 0.0, 0
            for batch, flip in loader.epoch(epoch, order):
                batch = batch.to(self.device, non_blocking=True)
                flip = flip.to(self.device, non_blocking=True) if self.hflip else None
                objective = objective_of(batch, flip, neg_gen)
                if not torch.isfinite(objective):
                    raise FloatingPointError(
                        f"training loss became {float(objective)} at epoch {epoch + 1}; lower lr (now {self.lr})"
                        + (" or use precision='fp32'" if resolve_precision(self.precision, self.device) == "bf16" else "")
                    )
                optimizer.zero_grad(set_to_none=True)
                objective.backward()
                optimizer.step()
                schedule.step()
                total += distributed.mean_over_ranks(float(objective.detach())) * len(batch)
                seen += len(batch)
                bar.update(1)
                bar.set_postfix(epoch=f"{epoch + 1}/{self.epochs}", loss=f"{total / seen:.4f}", refresh=False)
            self.history_.append(total / seen)
            logger.info("cpcad epoch %d/%d loss %.4f %.0fs", epoch + 1, self.epochs, total / seen,
                        time.perf_counter() - start)
            self._maybe_checkpoint(epoch + 1, {
                "model": self.model_.state_dict(), "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                "gen": gen.get_state(), "neg_gen": neg_gen.get_state(), "history": list(self.history_), "images": n,
            })
            if on_epoch_end is not None:
                on_epoch_end(self, {"epoch": epoch + 1, "loss": total / seen})
                self.model_.train()
        bar.close()
        self.model_.eval()
        self.banks_, self.bank_owners_ = self._build_banks(images, gen)
        components = self._fit_score_stats(images)
        train_grid = self._normalized(components)
        sizes = images.sizes
        scale = [self.image_size / max(size) for size in sizes]  # maps at the working size, not full size
        small = [(max(1, round(h * f)), max(1, round(w * f))) for (h, w), f in zip(sizes, scale)]
        self._fit_thresholds(self.image_scores_from(train_grid, sizes), self.maps_from(train_grid, small))
        return self

    @torch.no_grad()
    def _fit_score_stats(self, images: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Fit ``score_stats_`` (``score_norm="position"``) on the training images in bank order and
        return their raw component grids (each image's nearest neighbour among the others)."""
        self.score_stats_ = None
        components = self._component_grids(images, own_rows=True)
        if self.score_norm == "position":
            self.score_stats_ = {name: position_stats(grid) for name, grid in components.items()}
            if "infonce" in components:  # also for "upper", so that infonce_sides can change after the fit
                mean, std = self.score_stats_["infonce"]
                self.score_stats_["infonce_abs"] = position_stats(((components["infonce"] - mean) / std).abs())
        return components

    def _training_objective(self, batch: torch.Tensor, flip: torch.Tensor | None, generator: torch.Generator) -> torch.Tensor:
        """uint8 (B, 1, S, S) training crops (and which to mirror) -> the InfoNCE objective (), with
        negatives drawn by ``generator`` from the batch's targets (the global batch's when distributed)."""
        windows = self._windows(batch, flip)
        return self.model_(windows, num_negatives=self.num_negatives, generator=generator)[2]

    @torch.no_grad()
    def scores_now(self, train_images: Any, images: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw (N, G, G) sub-patch losses of ``train_images`` and ``images`` with the model as it is,
        also mid-training: a temporary negative bank is built from ``train_images`` (seeded)."""
        train_list = self._images(train_images, "train_images")
        image_list = self._images(images, "images")
        kept = self.banks_, self.bank_owners_
        self.model_.eval()
        self.banks_, self.bank_owners_ = self._build_banks(train_list, torch.Generator().manual_seed(self.seed or 0))
        try:
            return self._subpatch_scores(train_list), self._subpatch_scores(image_list)
        finally:
            self.banks_, self.bank_owners_ = kept

    @torch.no_grad()
    def _build_banks(self, images: list[torch.Tensor], gen: torch.Generator) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Embeddings of the training sub-patches (unaugmented), a random ``bank_size`` subset per
        encoder, and each row's training image index (so a training image's nearest-neighbour score
        can leave its own sub-patches out)."""
        parts: list[list[torch.Tensor]] = [[] for _ in self.model_.encoders]
        for i in range(0, len(images), self.score_batch_size):
            grids = self._subpatch_grid(self._resize(images[i : i + self.score_batch_size]), None)
            for store, grid in zip(parts, grids):
                store.append(grid.reshape(-1, grid.shape[-1]).float())
        banks, owners = [], []
        for store in parts:
            bank = torch.cat(store)
            owner = torch.arange(len(images), dtype=torch.int32, device=bank.device).repeat_interleave(self.grid_size**2)
            if bank.shape[0] > self.bank_size:
                keep = torch.randperm(bank.shape[0], generator=gen)[: self.bank_size].to(bank.device)
                bank, owner = bank[keep], owner[keep]
            banks.append(bank.contiguous())
            owners.append(owner)
        return banks, owners

    # -- scoring --------------------------------------------------------------------------------
    def _check_ready(self) -> None:
        self._check_fitted()
        if self.banks_ is None:
            raise RuntimeError("this CPCAD has no negative bank: call fit(...) or load(...) first")

    @torch.no_grad()
    def subpatch_scores(self, images: Any) -> torch.Tensor:
        """Per-sub-patch anomaly scores (N, G, G) on the ``image_size`` grid (CPU float32), after
        ``score_norm``."""
        if self.banks_ is None:
            raise RuntimeError("this CPCAD is not fitted yet: call fit(...) or load(...) first")
        return self._scores(self._images(images, "images"))

    def _scores(self, images: list[torch.Tensor]) -> torch.Tensor:
        """(N, G, G) sub-patch scores (``anomaly_score`` after ``score_norm``): what every scoring
        entry point returns."""
        return self._normalized(self._component_grids(images))

    def _components(self) -> tuple[str, ...]:
        return ("infonce", "knn") if self.anomaly_score == "combined" else (self.anomaly_score,)

    def _normalized(self, components: dict[str, torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """Raw (N, G, G) component grids (a tensor: InfoNCE alone) -> the score: each component
        standardised with its fit-time statistics (``score_norm="position"``; InfoNCE's absolute
        deviation standardised again with ``infonce_sides="both"``), then summed."""
        if isinstance(components, torch.Tensor):
            components = {"infonce": components}
        total = None
        for name, grid in components.items():
            if self.score_stats_ is not None:
                mean, std = self.score_stats_[name]
                grid = (grid - mean) / std
                if name == "infonce" and self.infonce_sides == "both":
                    if "infonce_abs" not in self.score_stats_:
                        raise RuntimeError("this model was fitted before infonce_sides existed: refit it to "
                                           "score with infonce_sides='both'")
                    mean, std = self.score_stats_["infonce_abs"]
                    grid = (grid.abs() - mean) / std
            total = grid if total is None else total + grid
        return total

    @torch.no_grad()
    def _component_grids(self, images: list[torch.Tensor], own_rows: bool = False) -> dict[str, torch.Tensor]:
        """Raw (N, G, G) grids of the components ``anomaly_score`` needs; ``own_rows``: ``images`` are
        the training images in bank order, and each one's nearest neighbour is taken among the
        other images' sub-patches."""
        if self.anomaly_score == "infonce":
            return {"infonce": self._subpatch_scores(images)}
        self.model_.eval()
        negatives = self._scoring_negatives() if self.anomaly_score == "combined" else None
        parts: dict[str, list[torch.Tensor]] = {name: [] for name in self._components()}
        bar = progress(len(images), "cpcad score", self.verbose and len(images) > self.score_batch_size, "image")
        for i in range(0, len(images), self.score_batch_size):
            batch = self._resize(images[i : i + self.score_batch_size])
            owners = torch.arange(i, i + batch.shape[0], device=self.device) if own_rows else None
            for name, grid in self._grid_components(batch, negatives, owners).items():
                parts[name].append(grid.cpu())
            bar.update(batch.shape[0])
        bar.close()
        return {name: torch.cat(grids) for name, grids in parts.items()}

    def _grid_components(self, batch: torch.Tensor, negatives, owners: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """uint8 (B, C, S, S) -> the raw (B, G, G) component grids of one batch (one encoder pass)."""
        out, grids = {}, None
        if "knn" in self._components():
            grids = self._subpatch_grid(batch, None)
            out["knn"] = self._knn(grids, owners)
        if "infonce" in self._components():
            out["infonce"] = self._grid_losses(batch, negatives, grids)
        return out

    def _knn(self, grids: list[torch.Tensor], owners: torch.Tensor | None) -> torch.Tensor:
        """(B, G, G): mean over encoders of each sub-patch embedding's L2 distance to its nearest bank
        row (rows of image ``owners[b]`` left out for image b when given)."""
        total = None
        for grid, bank, bank_owner in zip(grids, self.banks_, self.bank_owners_ or [None] * len(grids)):
            flat = grid.float().reshape(grid.shape[0], -1, grid.shape[-1])  # B, G*G, D
            d2 = (flat * flat).sum(-1, keepdim=True) - 2 * flat @ bank.T + (bank * bank).sum(-1)
            if owners is not None:
                d2 = d2.masked_fill(bank_owner[None, None, :] == owners[:, None, None], float("inf"))
            dist = d2.min(dim=-1).values.clamp(min=0).sqrt().reshape(grid.shape[:3])
            total = dist if total is None else total + dist
        return total / len(grids)

    def _subpatch_scores(self, images: list[torch.Tensor]) -> torch.Tensor:
        """(N, G, G) raw per-sub-patch losses (before ``score_norm``)."""
        self.model_.eval()
        negatives = self._scoring_negatives()
        out = []
        bar = progress(len(images), "cpcad score", self.verbose and len(images) > self.score_batch_size, "image")
        for i in range(0, len(images), self.score_batch_size):
            batch = self._resize(images[i : i + self.score_batch_size])
            out.append(self._grid_losses(batch, negatives).cpu())
            bar.update(batch.shape[0])
        bar.close()
        return torch.cat(out)

    def _scoring_negatives(self) -> list[list[list[torch.Tensor]]]:
        """The seeded negatives every image is scored with: ``[direction][step][draw]`` (Q, K) rows
        of that direction's bank for one image's Q queries. The same for every image, so an image's
        score does not depend on the images scored with it; an exported graph bakes them in."""
        gen = torch.Generator(device=self.device).manual_seed(self.seed if self.seed is not None else 0)
        k_neg, m, windows = self.test_negatives or self.num_negatives, self.window, self.patches_per_side**2
        out = []
        for index in range(len(self.directions)):
            rows = self.banks_[self.model_.encoder_of(index)].shape[0]
            steps = [m - k - 1 for k in range(1, self.model_.prediction_steps + 1) if m - k - 1 > 0]
            out.append([[sample_negatives(windows * r * m, k_neg, rows, generator=gen, device=self.device)
                         for _ in range(self.test_draws)] for r in steps])
        return out

    def _grid_losses(self, batch: torch.Tensor, negatives, grids: list[torch.Tensor] | None = None) -> torch.Tensor:
        """uint8 (B, C, S, S) -> (B, G, G) raw per-sub-patch losses with the given fixed negatives
        (``grids``: the batch's sub-patch embeddings when already computed, grid layout)."""
        m, r, g, nh = self.window, self.ratio, self.grid_size, self.patches_per_side
        if grids is not None and self.layout == "grid":
            windows = [windows_from_grid(e, m, r).reshape(-1, m, m, e.shape[-1]) for e in grids]
        else:
            windows = self._windows(batch, None)
        loss_sum, count, _ = self.model_(
            windows, banks=self.banks_, num_negatives=self.test_negatives or self.num_negatives,
            draws=self.test_draws, credit=self.credit, negatives=negatives,
        )
        sums = windows_to_grid(loss_sum.reshape(-1, nh, nh, m, m), m, r, (g, g))
        counts = windows_to_grid(count.expand(1, nh, nh, m, m).contiguous(), m, r, (g, g))
        return sums / counts.clamp(min=1)

    def _top_k(self) -> int:
        cells = self.grid_size**2
        if isinstance(self.top_k, float):
            return max(1, min(cells, round(self.top_k * cells)))
        return min(cells, self.top_k)

    def image_scores_from(self, grid_scores: torch.Tensor, sizes: Sequence[tuple[int, int]] | None = None) -> np.ndarray:
        """Image scores (N,) = mean of the top-k of (N, G, G) sub-patch scores.

        ``sizes`` (the images' (H, W)) matter with ``aspect="pad"``: cells wholly in the margin are
        left out (the count k stays that of the full grid, capped by the cells left)."""
        flat = grid_scores.reshape(grid_scores.shape[0], -1)
        valid = self._valid_cells(sizes) if sizes is not None else None
        if valid is None:
            return flat.topk(self._top_k(), dim=1).values.mean(1).double().numpy()
        valid = valid.reshape(flat.shape)
        flat = flat.masked_fill(~valid, float("-inf"))
        k = min(self._top_k(), int(valid.sum(1).min()))
        return flat.topk(k, dim=1).values.mean(1).double().numpy()

    def maps_from(self, grid_scores: torch.Tensor, sizes: Sequence[tuple[int, int]]) -> list[np.ndarray]:
        """Pixel maps: overlap-averaged sub-patch scores (``fold_patches``), resized to each size."""
        folded = fold_patches(grid_scores, self.sub_size, self.sub_stride, (self.image_size, self.image_size))
        maps = []
        for index, (h, w) in enumerate(sizes):
            m = folded[index][None, None]
            top, left, _, _ = self._content_box((h, w))
            square = (h, w) if self.aspect == "squash" else (max(h, w),) * 2
            if square != (self.image_size, self.image_size):
                m = F.interpolate(m, size=square, mode="bilinear", align_corners=False)
            maps.append(m[0, 0, top : top + h, left : left + w].numpy().astype(np.float32))
        return maps

    @torch.no_grad()
    def score(self, images: Any) -> tuple[np.ndarray, list[np.ndarray]]:
        """Image scores (N,) and pixel maps (one (H_i, W_i) array per image) in one pass."""
        self._check_ready()
        image_list = self._images(images, "images")
        grid = self._scores(image_list)
        sizes = [tuple(x.shape[1:]) for x in image_list]
        return self.image_scores_from(grid, sizes), self.maps_from(grid, sizes)

    def decision_function(self, images: Any) -> np.ndarray:
        """Anomaly score per image (N,), higher = more anomalous: mean of the top-k sub-patch losses."""
        if self.banks_ is None:
            raise RuntimeError("this CPCAD is not fitted yet: call fit(...) or load(...) first")
        image_list = self._images(images, "images")
        with torch.no_grad():
            grid = self._scores(image_list)
        return self.image_scores_from(grid, [tuple(x.shape[1:]) for x in image_list])


def _normal_only(images: ImageSource, y: Any) -> ImageSource:
    """The images whose label in ``y`` is 0 (all of them when ``y`` is None)."""
    if y is None:
        return images
    labels = np.asarray(y).ravel()
    if labels.shape != (len(images),) or not np.isin(labels, (0, 1)).all():
        raise ValueError(f"y must be {len(images)} labels of 0 (normal) or 1 (anomalous), got shape {np.shape(y)}")
    if not (labels == 0).any():
        raise ValueError("y marks every image anomalous; CPC-AD trains on normal images (label 0)")
    return images.subset(np.flatnonzero(labels == 0).tolist())


class _TrainingView:
    """One training image -> (uint8 (1, S, S): a random ``crop_fraction`` crop, padded square with
    ``aspect="pad"``, resized to S; whether to mirror it), every draw from ``generator``. Runs in
    the DataLoader workers."""

    def __init__(self, crop_fraction: float, aspect: str, image_size: int, hflip: bool) -> None:
        self.crop_fraction, self.aspect, self.image_size, self.hflip = crop_fraction, aspect, image_size, hflip

    def __call__(self, image: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, bool]:
        if self.crop_fraction < 1.0:
            h, w = image.shape[1:]
            ch, cw = max(1, round(h * self.crop_fraction)), max(1, round(w * self.crop_fraction))
            top = int(torch.randint(h - ch + 1, (1,), generator=generator))
            left = int(torch.randint(w - cw + 1, (1,), generator=generator))
            image = image[:, top : top + ch, left : left + cw]
        if self.aspect == "pad":
            image = _pad_square(image)
        flip = self.hflip and bool(torch.rand((), generator=generator) < 0.5)
        return stack_resized([image], self.image_size)[0], flip


def _collate_views(samples: list[tuple[torch.Tensor, bool]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 (B, 1, S, S), bool (B,)) from :class:`_TrainingView` samples."""
    return torch.stack([image for image, _ in samples]), torch.tensor([flip for _, flip in samples], dtype=torch.bool)
