"""AnoMem: anomaly detection via multi-scale contrasted memory (Jezequel et al.).

Stage 1 learns an encoder and per-scale modern-Hopfield memories of the normal class with a
memory-augmented SimCLR loss; stage 2 scores the deviation between the features and their memory
recollection: its norm (one-class) or per-scale classifiers trained with the double-hinge loss when a
few labelled anomalies are given (semi-supervised). ``fit(normal)``, ``fit(images, y)`` (y = 1 marks
the labelled anomalies) or ``fit(normal, anomalies=...)``.
"""

from __future__ import annotations

import functools
import math
import time
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import ConcatDataset, Dataset

from pyanomaly import distributed
from pyanomaly._progress import logger, progress
from pyanomaly.distributed import use_global_batchnorm, use_plain_batchnorm
from pyanomaly.data import as_images, stack_resized
from pyanomaly.models.anomem.augment import AugmentConfig, all_quarter_turns, random_quarter_turns, simclr_view
from pyanomaly.models.anomem.torch_model import AnoMemModel, double_hinge_loss
from pyanomaly.models._precision import check_precision, encoder_autocast, encoder_memory_format, training_precision
from pyanomaly.models.base import Detector, resolve_device

__all__ = ["AnoMem"]

_BACKBONES = ("resnet18", "resnet50")
_NEGATIVES = ("other_images", "all")
_DISTRIBUTION_AUGMENTATIONS = (None, "rot90")
_PRETEXTS = (None, "rotation")
_MEMORY_INITS = ("random", "features", "final_features")
#: The rotation pretext's view: cropped and flipped only (RotNet's augmentation). Colour jitter, blur
#: and noise carry no cue to the turn, and a small crop can hide it.
_PRETEXT_AUGMENT = AugmentConfig(crop_scale=(0.6, 1.0), jitter_p=0.0, blur_p=0.0, noise_p=0.0)


class AnoMem(Detector):
    """Anomaly detection via multi-scale contrasted memory, one-class or semi-supervised.

    The paper's text lost most of its numbers; every default below says where it comes from.
    Choices the paper leaves open, made here: positive pairs at the lower scales are the same
    image patch seen by both views (points drawn where the two random crops overlap, feature
    vectors read bilinearly there); memory queries and stored patterns are LayerNorm-ed as in
    hopfield-layers, and the deviation D = LN(f) - M(LN(f)) is taken in that normalised space;
    the semi-supervised classifiers train on frozen stage-1 features without augmentation, with
    the normal and anomalous halves of the double-hinge loss averaged separately.

    Distributed training (``torchrun``, see :mod:`pyanomaly.distributed`): ``batch_size`` is the
    global batch, split evenly over the ranks; NT-Xent contrasts each rank's anchors against the
    sampled vectors of the whole global batch and the variance loss spans every rank's
    recollections (both gathered with their gradients), BatchNorm uses the global batch's
    statistics and the augmentations are drawn for the global batch, so N ranks train as one
    process with the same global batch. Stage 2 and the fit-time scoring run on every rank.

    Args:
        backbone: "resnet50" (the paper) or "resnet18" (a lighter option for small images).
        width: encoder base width; 64 is the standard network, smaller values give tiny encoders.
        small_input: use the CIFAR stem (3x3 stride 1, no max pool); None = when the images are at
            most 64 px a side (otherwise a 32 px image would leave a 1x1 stage-4 map).
        scales: encoder stages with a memory layer. Paper: after stage 3 and after stage 4.
        memory_sizes: stored patterns per scale. Paper Sec. 4.5: 256 at the last scale is the knee
            of the memory-size ablation and lower scales profit from larger memories; we take twice
            as many at stage 3: (512, 256).
        beta: Hopfield inverse temperature; None = 1 / sqrt(channels), hopfield-layers' default
            (the paper's value is lost). Queries and patterns are LayerNorm-ed as in hopfield-layers.
        hopfield_iters: retrieval steps at most. The paper iterates "until convergence"; 3 unrolled
            steps with hopfield-layers' tolerance (1e-4) is our choice (its default is 1 step).
        hopfield_tol: per-query convergence tolerance (hopfield-layers' ``update_steps_eps``).
        sampling_ratios: fraction of each scale's positions used in the stage-1 loss. Paper Sec.
            4.6: very low ratios hurt, doubling past the default gains ~2%, and the small last map
            is used whole; we take (0.25, 1.0).
        scale_weights: lambda_s of the loss and of the score (Eq. 7, 13); None = 2 ** (s - last
            scale), i.e. (0.5, 1.0): "increase exponentially" with depth (paper Sec. 4.2).
        temperature: NT-Xent tau; 0.5, SimCLR's best on CIFAR-10 ("as suggested in [9]").
        variance_weight: mu, weight of the variance loss (value lost); 1.0 is our choice.
        projection_dim: None (default) contrasts the normalised features and recollections directly,
            as the paper's Eq. 3-5 write it (f^1, f^2 are encoder features), so the memory has to
            recall vectors close to the features and ||f - M(f)|| (Eq. 9) is meaningful; an int adds
            a per-scale SimCLR projection head (Linear-ReLU-Linear) with that output size.
        negatives: which sampled vectors are an anchor's negatives in NT-Xent. "all" (default):
            every other vector of the two-view batch, the other positions of the same image too,
            as Eq. 5 reads ("any representation inside the multi-view batch"); "other_images":
            vectors of other images only (no better in a small CIFAR-10 check, results/anomem.md).
        epochs: stage-1 epochs (value lost; SimCLR-style runs use hundreds).
        batch_size: stage-1 batch (value lost); 256, SimCLR's CIFAR setting without LARS.
        lr, momentum, weight_decay: SGD with Nesterov momentum and a cosine schedule (paper Sec.
            4.2); 0.1 / 0.9 / 5e-4, common CIFAR SGD values (ours).
        classifier_pool: the semi-supervised classifiers average-pool each deviation map to this
            side (Eq. 10; value lost, ours).
        classifier_hidden: hidden units of their two-layer MLP (ours).
        margin: double-hinge margin around the unit sphere (Eq. 11; value lost); 0.5, ours.
        classifier_epochs, classifier_lr: stage-2 training (SGD Nesterov + cosine, as stage 1).
        image_size: side (or (h, w)) images are resized to; None = the training images' size.
        augment: overrides of :class:`~pyanomaly.models.anomem.augment.AugmentConfig` fields.
        distribution_augmentation: None (default, the paper) or ``"rot90"``: every stage-1 training
            image is first turned by a random multiple of 90 degrees, shared by its two views, so
            turned images are further instances (Sohn et al., 2021; a departure from the paper,
            for one-class training where contrastive features otherwise spread the normal class
            over the whole sphere and unfamiliar images land inside it, results/anomem.md).
            Scoring sees the images upright. Needs square images.
        pretext: None (default, the paper) or ``"rotation"``: stage 1 adds a self-supervised
            pretext loss, ``pretext_weight`` times the cross-entropy of a linear 4-way head that
            tells, from the last scale's pooled features, which quarter turn an image was given: a
            third view of each image (cropped to 60-100% of its area and flipped, nothing else), in
            all four turns (RotNet, Gidaris et al. 2018; the one-class detector of Golan & El-Yaniv
            2018; CSI's shift classification, Tack et al. 2020). The memories still hold upright
            features only and the score is the paper's. A departure from the paper: on CIFAR-10
            one-vs-all, instance-contrastive training on one class alone makes the features *worse*
            than an untrained encoder's, while the turn task makes them encode the class's canonical
            orientation and appearance (results/anomem.md). Four more encoder passes of the batch
            per step. Needs square images.
        pretext_weight: weight of the pretext loss against the contrastive loss (ours).
        memory_init: how the memory patterns start: "random" (default; small Gaussian values, as
            hopfield-layers' learned patterns) or "features": each scale's patterns are the
            untrained encoder's feature vectors at random positions of random training images
            (ours: with random patterns, a 3-epoch CIFAR-10 fit left them far from the features
            they recall and the memory score at chance, results/anomem.md; this start did not close
            that gap: with the pretext training the encoder the features moved away from the
            patterns and the score fell further, 50.3 -> 40.0, one seed); or "final_features": the
            patterns train as with "random", then after stage 1 each scale's patterns are replaced by
            the *trained* encoder's feature vectors at random training positions and its pattern
            LayerNorm by a copy of its state LayerNorm, so the memory stores those positions' states
            (ours, the nearest of the options to the paper's k-means ablation, Sec. 4.4: a memory
            built from the final features). Stage 2 and the thresholds see it. With
            ``pretext="rotation", contrastive_trains_encoder=False`` on CIFAR-10 one-vs-all (width 32,
            3 epochs, 3 seeds) it lifted the memory score from 57.9 to 76.9 (three-class mean), at
            or above kNN on the same features in 8 of 9 runs (results/anomem.md).
        contrastive_trains_encoder: True (default, the paper): the contrastive loss trains the
            encoder. False (needs ``pretext``): the encoder learns from the pretext loss alone and
            the contrastive loss trains the memories (and projections) on its features, which it
            sees without gradient; cheaper, and on one-class CIFAR-10 the contrastive gradient
            undoes what the pretext teaches (results/anomem.md). A departure from the paper.
        contamination: fraction of training scores above ``threshold_``.
        seed: seeds the weights, the batch order and every augmentation draw.
        device: where to train and score: "auto" (CUDA when available, else CPU), "cpu", "cuda", "cuda:1".
        precision: ``"auto"`` (bf16 autocast for the encoder on CUDA with bf16; on CPUs fp32, except
            that stage-1 training runs bf16 on CPUs with AMX; "auto"'s bf16 training is guarded: a
            step with a non-finite gradient is skipped and the fit goes on in fp32; see
            ``pyanomaly.models._precision``),
            ``"bf16"`` or ``"fp32"``. Memories, projections, NT-Xent and scores always run in fp32;
            the encoder runs channels_last. ``train_precision_`` records what stage 1 used.
        eval_batch_size: images per scoring batch.
        checkpoint_every: write the stage-1 training state every this many epochs (and after the
            last) to ``checkpoint_dir`` (0 = never); ``fit(..., resume=...)`` continues from it and
            ends with the same parameters as an uninterrupted fit (seeded, CPU).
        checkpoint_dir: folder for ``anomem-checkpoint.pt`` (written atomically).
        num_workers: DataLoader worker processes that read and resize the training images (0 = in
            the training process). The SimCLR augmentations run batch-wise on the device, drawn
            from the detector's generator, so a seeded fit is the same with any number.
        cache_images: training images given as files: True keeps them decoded (uint8, at their own
            size) in memory, False reads them from disk every epoch, "auto" (default) caches up to
            1 GiB of pixels.
        activation_checkpointing: recompute each residual block's activations in the backward
            (``torch.utils.checkpoint``) instead of storing them: less training memory for one
            extra encoder forward. BatchNorm's running statistics are updated once per step, as
            without it (the recompute leaves them alone), so training is unchanged. Default False.
        verbose: progress bars (tqdm, stderr) while training and scoring; per-epoch losses go to the
            ``"pyanomaly"`` logger at INFO either way.

    Attributes:
        model_: the trained :class:`AnoMemModel`.
        history_: one dict per epoch: stage, epoch, loss (and its parts), lr, seconds.
        semi_supervised_: whether stage 2 trained the classifiers.
    """

    method = "anomem"
    #: ``AnoMem.preset(name, **overrides)``, ``pyanomaly fit --method anomem --preset name``.
    #:
    #: - ``"paper"``: the paper's encoder and optimiser (ResNet-50, batch 256, SGD Nesterov + cosine);
    #:   the values the paper lost are this class's defaults (see above). A GPU setting: on 2 CPU
    #:   cores one epoch of 5000 CIFAR-10 images takes tens of minutes.
    #: - ``"cpu"``: ResNet-18 at width 16, 64 px, 15 epochs, batch 64, lr 0.1, memories (512, 256):
    #:   measured in issue 20 on solar-cell EL images (392 normal training cells; not shared here) at
    #:   0.927 image AUROC after a 295 s fit on 2 cores (per-pixel Gaussian: 0.747); on the shared
    #:   glass set 1.000 (3 seeds, ~10 s). It fails on magnetic-tile defects (0.47 +- 0.01, 3 seeds,
    #:   below chance and below a per-pixel Gaussian's 0.63; no budget, size or augmentation change
    #:   helped), where ``CPCAD.preset("cpu")`` reaches 0.82; and on CIFAR-10's semantic one-vs-all it
    #:   is far weaker (results/anomem.md).
    PRESETS = {
        "paper": dict(backbone="resnet50", width=64, batch_size=256, lr=0.1, momentum=0.9),
        "cpu": dict(backbone="resnet18", width=16, image_size=64, epochs=15, batch_size=64, lr=0.1,
                    memory_sizes=(512, 256)),
    }

    def __init__(
        self,
        *,
        backbone: str = "resnet50",
        width: int = 64,
        small_input: bool | None = None,
        scales: Sequence[int] = (3, 4),
        memory_sizes: Sequence[int] = (512, 256),
        beta: float | None = None,
        hopfield_iters: int = 3,
        hopfield_tol: float = 1e-4,
        sampling_ratios: Sequence[float] = (0.25, 1.0),
        scale_weights: Sequence[float] | None = None,
        temperature: float = 0.5,
        variance_weight: float = 1.0,
        projection_dim: int | None = None,
        negatives: str = "all",
        epochs: int = 100,
        batch_size: int = 256,
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        classifier_pool: int = 2,
        classifier_hidden: int = 256,
        margin: float = 0.5,
        classifier_epochs: int = 100,
        classifier_lr: float = 0.01,
        image_size: int | Sequence[int] | None = None,
        augment: dict | None = None,
        distribution_augmentation: str | None = None,
        pretext: str | None = None,
        pretext_weight: float = 1.0,
        memory_init: str = "random",
        contrastive_trains_encoder: bool = True,
        contamination: float = 0.1,
        seed: int = 0,
        device: str | torch.device = "auto",
        precision: str = "auto",
        eval_batch_size: int = 256,
        checkpoint_every: int = 0,
        checkpoint_dir: str | None = None,
        num_workers: int = 0,
        cache_images: bool | str = "auto",
        activation_checkpointing: bool = False,
        verbose: bool = False,
    ) -> None:
        super().__init__(contamination=contamination)
        if backbone not in _BACKBONES:
            raise ValueError(f"backbone must be one of {_BACKBONES}, got {backbone!r}")
        self.backbone = backbone
        self.width = _positive_int(width, "width")
        if small_input is not None and not isinstance(small_input, bool):
            raise TypeError(f"small_input must be True, False or None, got {small_input!r}")
        self.small_input = small_input
        self.scales = _int_tuple(scales, "scales")
        if any(s not in (1, 2, 3, 4) for s in self.scales) or list(self.scales) != sorted(set(self.scales)):
            raise ValueError(f"scales must be increasing distinct stages among 1..4, got {tuple(scales)}")
        n = len(self.scales)
        self.memory_sizes = _int_tuple(memory_sizes, "memory_sizes", length=n)
        if min(self.memory_sizes) < 1:
            raise ValueError(f"memory_sizes must be positive, got {self.memory_sizes}")
        self.beta = None if beta is None else _positive_float(beta, "beta")
        self.hopfield_iters = _positive_int(hopfield_iters, "hopfield_iters")
        self.hopfield_tol = float(hopfield_tol)
        self.sampling_ratios = _float_tuple(sampling_ratios, "sampling_ratios", length=n)
        if any(not 0 < r <= 1 for r in self.sampling_ratios):
            raise ValueError(f"sampling_ratios must be in (0, 1], got {self.sampling_ratios}")
        if scale_weights is None:
            self.scale_weights = None
        else:
            self.scale_weights = _float_tuple(scale_weights, "scale_weights", length=n)
            if any(w < 0 for w in self.scale_weights) or sum(self.scale_weights) <= 0:
                raise ValueError(f"scale_weights must be >= 0 and not all 0, got {self.scale_weights}")
        self.temperature = _positive_float(temperature, "temperature")
        self.variance_weight = float(variance_weight)
        if self.variance_weight < 0:
            raise ValueError(f"variance_weight must be >= 0, got {variance_weight}")
        self.projection_dim = (
            None if projection_dim is None else _positive_int(projection_dim, "projection_dim")
        )
        if negatives not in _NEGATIVES:
            raise ValueError(f"negatives must be one of {_NEGATIVES}, got {negatives!r}")
        self.negatives = negatives
        self.epochs = _positive_int(epochs, "epochs")
        self.batch_size = _positive_int(batch_size, "batch_size")
        if self.batch_size < 2:
            raise ValueError(
                f"batch_size must be >= 2 (contrastive learning needs negatives), got {batch_size}"
            )
        self.lr = _positive_float(lr, "lr")
        self.momentum = float(momentum)
        if not 0 < self.momentum < 1:
            raise ValueError(f"momentum must be in (0, 1) (Nesterov needs momentum), got {momentum}")
        self.weight_decay = float(weight_decay)
        self.classifier_pool = _positive_int(classifier_pool, "classifier_pool")
        self.classifier_hidden = _positive_int(classifier_hidden, "classifier_hidden")
        self.margin = float(margin)
        if not 0 <= self.margin < 1:
            raise ValueError(f"margin must be in [0, 1), got {margin}")
        self.classifier_epochs = _positive_int(classifier_epochs, "classifier_epochs")
        self.classifier_lr = _positive_float(classifier_lr, "classifier_lr")
        if image_size is None:
            self.image_size = None
        elif isinstance(image_size, int) and not isinstance(image_size, bool):
            self.image_size = (_positive_int(image_size, "image_size"),) * 2
        else:
            self.image_size = _int_tuple(image_size, "image_size", length=2)
        self.augment = dict(augment or {})
        try:
            AugmentConfig(**self.augment)
        except TypeError as exc:
            raise ValueError(f"augment has an unknown field: {exc}") from None
        if distribution_augmentation not in _DISTRIBUTION_AUGMENTATIONS:
            raise ValueError(
                f"distribution_augmentation must be one of {_DISTRIBUTION_AUGMENTATIONS}, got {distribution_augmentation!r}"
            )
        self.distribution_augmentation = distribution_augmentation
        if pretext not in _PRETEXTS:
            raise ValueError(f"pretext must be one of {_PRETEXTS}, got {pretext!r}")
        self.pretext = pretext
        self.pretext_weight = _positive_float(pretext_weight, "pretext_weight")
        if memory_init not in _MEMORY_INITS:
            raise ValueError(f"memory_init must be one of {_MEMORY_INITS}, got {memory_init!r}")
        self.memory_init = memory_init
        if not isinstance(contrastive_trains_encoder, bool):
            raise TypeError(f"contrastive_trains_encoder must be True or False, got {contrastive_trains_encoder!r}")
        if not contrastive_trains_encoder and pretext is None:
            raise ValueError("contrastive_trains_encoder=False needs a pretext (the encoder would not train): set pretext")
        self.contrastive_trains_encoder = contrastive_trains_encoder
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise TypeError(f"seed must be an int, got {seed!r}")
        self.seed = seed
        self.device = resolve_device(device)
        self.precision = check_precision(precision)
        self.eval_batch_size = _positive_int(eval_batch_size, "eval_batch_size")
        self._set_checkpointing(checkpoint_every, checkpoint_dir)
        self._set_data_loading(num_workers, cache_images)
        self.activation_checkpointing = bool(activation_checkpointing)
        self.verbose = bool(verbose)
        self.model_: AnoMemModel | None = None
        self.history_: list[dict[str, Any]] = []
        self.semi_supervised_ = False
        self.in_channels_: int | None = None
        self.fit_size_: tuple[int, int] | None = None

    # -- helpers --------------------------------------------------------------------------------
    @property
    def weights_(self) -> tuple[float, ...]:
        """The scale weights in use (``scale_weights`` or the exponential default)."""
        if self.scale_weights is not None:
            return self.scale_weights
        last = self.scales[-1]
        return tuple(2.0 ** (s - last) for s in self.scales)

    def _autocast(self):
        return encoder_autocast(self.precision, self.device)

    def _log(self, text: str) -> None:
        logger.info("anomem %s", text)

    def _images(self, data, name: str) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """Images to score, any accepted input (``pyanomaly.data.as_images``) -> (float (N, C, H, W)
        in [0, 1] at the training size on CPU, each image's own (H, W)); gray or colour follows the model."""
        mode = "gray" if self.in_channels_ == 1 else "rgb"
        images = as_images(data, name, mode=mode, min_size=8, allow_float=True)
        return _stack_float(images, self.fit_size_), [tuple(x.shape[1:]) for x in images]

    def _build_model(self, channels: int, size: tuple[int, int], mean=None, std=None) -> AnoMemModel:
        small = self.small_input if self.small_input is not None else max(size) <= 64
        model = AnoMemModel(
            backbone=self.backbone,
            in_channels=channels,
            width=self.width,
            small_input=small,
            scales=self.scales,
            memory_sizes=self.memory_sizes,
            beta=self.beta,
            hopfield_iters=self.hopfield_iters,
            hopfield_tol=self.hopfield_tol,
            projection_dim=self.projection_dim,
            classifier_pool=self.classifier_pool,
            classifier_hidden=self.classifier_hidden,
            mean=mean,
            std=std,
            rotation_head=self.pretext == "rotation",
        ).to(memory_format=encoder_memory_format())
        model.encoder.checkpoint_activations = self.activation_checkpointing
        return model

    # -- training -------------------------------------------------------------------------------
    def fit(self, data, y=None, *, anomalies=None, on_epoch_end=None, resume=None) -> AnoMem:
        """Train on normal images, plus labelled anomalies for the semi-supervised detector.

        Args:
            data: training images, any form :func:`pyanomaly.data.as_images` takes (paths, a
                folder, PIL images, arrays HWC/CHW, tensors, ``MVTecDataset`` ...), uint8 or float
                in [0, 1]; resized to ``image_size`` (default: the first image's size).
            y: optional (N,) labels for ``data``, 1 = a labelled anomaly (PyOD's convention).
            anomalies: optional further labelled anomalous images. With any labelled anomaly,
                stage 2 trains the per-scale classifiers; otherwise the detector is one-class.
            on_epoch_end: optional ``fn(detector, record)`` called after every stage-1 epoch with
                that epoch's ``history_`` record (learning curves: it may score with
                :meth:`scores_now`; training resumes in train mode afterwards).

        Returns:
            self.
        """
        start = time.perf_counter()
        source = self._training_source(data, "data", mode=None, min_size=8, allow_float=True)
        normal, anomalous = source, source.subset([])
        if y is not None:
            labels = np.asarray(y).ravel()
            if labels.shape != (len(source),) or not np.isin(labels, (0, 1)).all():
                raise ValueError(f"y must be {len(source)} labels of 0 (normal) or 1 (anomalous), got shape {np.shape(y)}")
            normal = source.subset(np.flatnonzero(labels == 0).tolist())
            anomalous = source.subset(np.flatnonzero(labels == 1).tolist())
        if len(normal) < 2:
            raise ValueError(f"data must hold at least 2 normal images, got {len(normal)}")
        size = self.image_size or tuple(source.sizes[0])
        for option, value in (("distribution_augmentation", "rot90"), ("pretext", "rotation")):
            if getattr(self, option) == value and size[0] != size[1]:
                raise ValueError(
                    f'{option}="{value}" needs square images, got {size[0]}x{size[1]}: set image_size to one side'
                )
        if anomalies is not None:
            mode = "gray" if source.channels == 1 else "rgb"
            extra = self._training_source(anomalies, "anomalies", mode=mode, min_size=8, allow_float=True)
            anomalous = ConcatDataset([anomalous, extra])
        self.in_channels_, self.fit_size_ = source.channels, size
        self.semi_supervised_ = len(anomalous) > 0
        training = ConcatDataset([normal, anomalous])  # normal images first
        mean, std = self._pixel_statistics(normal)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.model_ = self._build_model(self.in_channels_, size, mean.tolist(), std.tolist())
        self.model_.to(self.device)
        if self.memory_init == "features" and resume is None:
            self._patterns_from_features(normal)
        self.history_ = []
        self._train_stage1(training, len(normal), on_epoch_end, resume)
        if self.memory_init == "final_features":
            self._patterns_from_features(normal)
        if self.semi_supervised_:
            self._train_classifiers(training, len(normal))
        train_scores, train_maps = self._scores_and_maps(training)
        self._fit_thresholds(train_scores, train_maps)
        self._log(f"fitted in {time.perf_counter() - start:.1f} s")
        return self

    def _working_loader(self, images: Dataset, batch_size: int, *, drop_last: bool = False,
                        split_over_ranks: bool = False):
        """An :class:`~pyanomaly.data._sources.EpochLoader` of ``images`` resized to the working size
        by the DataLoader workers (``split_over_ranks``: this rank's slice of each batch)."""
        return self._epoch_loader(images, _WorkingSize(self.fit_size_), seed=0, batch_size=batch_size,
                                  drop_last=drop_last, collate=_stack_pixels, split_over_ranks=split_over_ranks)

    def _on_device(self, batches):
        """The loader's uint8 or float batches as float (B, C, H, W) in [0, 1] on the device."""
        for batch in batches:
            batch = batch.to(self.device, non_blocking=True)
            yield batch.float().div_(255.0) if batch.dtype == torch.uint8 else batch

    def _working_batches(self, images: Dataset, batch_size: int):
        """Every image of ``images`` in turn, as float batches at the working size on the device."""
        return self._on_device(self._working_loader(images, batch_size).epoch(0, range(len(images))))

    def _pixel_statistics(self, images: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel mean and (unbiased) std of the images' pixels at the working size, std >= 1e-3."""
        total = squares = None
        count = 0
        for batch in self._working_batches(images, self.eval_batch_size):
            x = batch.double().transpose(0, 1).reshape(batch.shape[1], -1)
            total = x.sum(1) if total is None else total + x.sum(1)
            squares = (x * x).sum(1) if squares is None else squares + (x * x).sum(1)
            count += x.shape[1]
        mean = total / count
        var = ((squares - count * mean * mean) / max(1, count - 1)).clamp(min=0)
        return mean.float().cpu(), var.sqrt().float().clamp(min=1e-3).cpu()

    @torch.no_grad()
    def _patterns_from_features(self, images) -> None:
        """``memory_init="features"`` / ``"final_features"``: each memory's patterns <- the encoder's
        feature vectors at random positions of up to 1024 random images of ``images`` (a training
        source), in eval mode (BatchNorm's statistics untouched), and its pattern LayerNorm <- its
        state LayerNorm, so that the stored patterns are those positions' states."""
        model = self.model_.eval()
        gen = torch.Generator().manual_seed(self.seed + 3)
        chosen = torch.randperm(len(images), generator=gen)[:1024].sort().values.tolist()
        batches = self._working_batches(images.subset(chosen), self.eval_batch_size)
        maps = [torch.cat(parts) for parts in zip(*([m.cpu() for m in model.features(x)] for x in batches))]
        for memory, fmap in zip(model.memories, maps):
            vectors = fmap.flatten(2).transpose(1, 2).reshape(-1, fmap.shape[1])
            count = memory.patterns.shape[0]
            rows = (torch.randperm(len(vectors), generator=gen)[:count] if len(vectors) >= count
                    else torch.randint(len(vectors), (count,), generator=gen))
            memory.patterns.copy_(vectors[rows].to(memory.patterns.device))
            if memory.normalize:
                memory.pattern_norm.load_state_dict(memory.state_norm.state_dict())
        model.train()

    def _train_stage1(self, images: Dataset, n_normal: int, on_epoch_end=None, resume=None) -> None:
        """Stage 1 on ``images`` (the first ``n_normal`` normal, the rest labelled anomalies)."""
        model = self.model_
        n = len(images)
        is_normal = torch.arange(n) < n_normal
        rank, ranks = self._global_batch()
        if ranks > 1 and n < self.batch_size:
            raise ValueError(f"{n} training images do not fill one global batch of {self.batch_size} over {ranks} ranks")
        batch_size = min(self.batch_size, n)
        steps_per_epoch = max(1, n // batch_size)  # drop the ragged last batch (BatchNorm, negatives)
        local = batch_size // ranks
        part = (rank * local, batch_size) if ranks > 1 else None  # this rank's rows of each global batch
        total_steps = steps_per_epoch * self.epochs
        params = [
            p
            for name, p in model.named_parameters()
            if not name.startswith("classifiers.")
        ]
        optimizer = torch.optim.SGD(
            params, lr=self.lr, momentum=self.momentum, nesterov=True, weight_decay=self.weight_decay
        )
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
        cpu_gen = torch.Generator().manual_seed(self.seed)
        gen = torch.Generator(device=self.device).manual_seed(self.seed + 1)
        config = AugmentConfig(**self.augment)
        model.train()
        if ranks > 1:
            use_global_batchnorm(model)
        self.train_precision_ = training_precision(self.precision, self.device)
        loss_of = self._data_parallel(model, functools.partial(self._stage1_loss, config=config, generator=gen, part=part))
        loader = self._working_loader(images, batch_size, drop_last=True, split_over_ranks=True)
        bar = progress(self.epochs * steps_per_epoch, "anomem fit", self.verbose)
        first = 0
        if resume is not None:
            state = self._read_checkpoint(resume)
            if state["images"] != n:
                raise ValueError(f"the checkpoint was trained on {state['images']} images, not {n}: resume with the same data")
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            schedule.load_state_dict(state["schedule"])
            cpu_gen.set_state(state["cpu_gen"])
            gen.set_state(state["gen"].to(gen.get_state().device))
            self.history_, first = [dict(r) for r in state["history"]], state["epoch"]
            self.train_precision_ = state.get("train_precision", self.train_precision_)  # a fallback stays fp32
        guarded = self.precision == "auto" and self.train_precision_ == "bf16"  # "auto" never steps on a NaN gradient
        bar.update(first * steps_per_epoch)
        for epoch in range(first + 1, self.epochs + 1):
            tick = time.perf_counter()
            order = torch.randperm(n, generator=cpu_gen)
            sums = dict.fromkeys(["loss", "contrastive", "variance"] + (["pretext"] if self.pretext else []), 0.0)
            lr = optimizer.param_groups[0]["lr"]
            for step, x in enumerate(self._on_device(loader.epoch(epoch, order.tolist()))):
                start = step * batch_size + rank * local
                loss, parts = loss_of(x, is_normal[order[start : start + local]].to(self.device))
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"stage-1 loss became {float(loss)} at epoch {epoch}; lower lr (now {self.lr})"
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if guarded and not _gradients_finite(params):
                    # After DDP's all-reduce every rank sees the same gradients, so all take this branch.
                    optimizer.zero_grad(set_to_none=True)
                    guarded = False
                    self.train_precision_ = f"bf16, fp32 from epoch {epoch} step {step + 1}"
                    warnings.warn(f"AnoMem: a non-finite bf16 gradient at epoch {epoch} step {step + 1}: "
                                  "step skipped, the fit goes on in fp32", RuntimeWarning, stacklevel=2)
                else:
                    optimizer.step()
                schedule.step()
                means = distributed.mean_over_ranks({"loss": float(loss.detach()), **parts})
                for key, value in means.items():
                    sums[key] += value
                bar.update(1)
                bar.set_postfix(epoch=f"{epoch}/{self.epochs}", loss=f"{float(loss.detach()):.4f}", refresh=False)
            record = {"stage": 1, "epoch": epoch, "lr": lr, "seconds": time.perf_counter() - tick}
            record.update({k: v / steps_per_epoch for k, v in sums.items()})
            self.history_.append(record)
            self._log(
                f"stage 1 epoch {epoch}/{self.epochs} loss {record['loss']:.4f} "
                f"(contrastive {record['contrastive']:.4f}, variance {record['variance']:.4f}) "
                f"lr {lr:.4g} {record['seconds']:.1f} s"
            )
            self._maybe_checkpoint(epoch, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                "cpu_gen": cpu_gen.get_state(), "gen": gen.get_state(), "history": [dict(r) for r in self.history_],
                "images": n, "train_precision": self.train_precision_,
            })
            if on_epoch_end is not None:
                on_epoch_end(self, record)
                model.train()
        bar.close()
        if ranks > 1:
            use_plain_batchnorm(model)

    def _stage1_loss(self, x: torch.Tensor, normal_mask: torch.Tensor, *, config: AugmentConfig,
                     generator: torch.Generator, part: tuple[int, int] | None) -> tuple[torch.Tensor, dict[str, float]]:
        """float (B, C, H, W) training images (this rank's ``part`` of the global batch) -> the
        multi-scale contrasted memory loss of two augmented views (Eq. 7) and its parts."""
        if self.distribution_augmentation == "rot90":
            x = random_quarter_turns(x, generator, part)
        view1, crop1 = simclr_view(x, config, generator, part)
        view2, crop2 = simclr_view(x, config, generator, part)
        if self.pretext == "rotation":
            turned, turns = all_quarter_turns(simclr_view(x, _PRETEXT_AUGMENT, generator, part)[0])
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.train_precision_ == "bf16"):
            loss, parts = self.model_.contrastive_loss(
                view1, crop1, view2, crop2, normal_mask, sampling_ratios=self.sampling_ratios,
                scale_weights=self.weights_, temperature=self.temperature, variance_weight=self.variance_weight,
                generator=generator, negatives=self.negatives, part=part,
                train_encoder=self.contrastive_trains_encoder,
            )
            if self.pretext == "rotation":
                pretext = self.model_.rotation_loss(turned, turns)
                loss = loss + self.pretext_weight * pretext
                parts["pretext"] = float(pretext.detach())
        return loss, parts

    @torch.no_grad()
    def _pooled_deviations(self, images: torch.Tensor | Dataset) -> list[torch.Tensor]:
        """Per scale, the deviation maps average-pooled to ``classifier_pool`` (N, C_s, p, p), on device."""
        chunks: list[list[torch.Tensor]] = [[] for _ in self.scales]
        for _, deviations in self._deviation_batches(images):
            for s, d in enumerate(deviations):
                chunks[s].append(F.adaptive_avg_pool2d(d.float(), self.classifier_pool))
        return [torch.cat(c) for c in chunks]

    def _train_classifiers(self, images: Dataset, n_normal: int) -> None:
        """Stage 2, semi-supervised: the scale classifiers on frozen deviation maps (Eq. 10-12).

        The encoder and memories are frozen, so the pooled deviation maps are computed once (pooling
        is the classifiers' first layer). Normal and anomalous terms of the double-hinge loss are
        averaged separately and added (the anomalies are a small minority).
        """
        model = self.model_
        inputs = self._pooled_deviations(images)
        labels = (torch.arange(len(images)) >= n_normal).to(self.device)
        n = labels.shape[0]
        batch_size = min(self.batch_size, n)
        steps_per_epoch = max(1, math.ceil(n / batch_size))
        params = list(model.classifiers.parameters())
        optimizer = torch.optim.SGD(
            params,
            lr=self.classifier_lr,
            momentum=self.momentum,
            nesterov=True,
            weight_decay=self.weight_decay,
        )
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=steps_per_epoch * self.classifier_epochs
        )
        cpu_gen = torch.Generator().manual_seed(self.seed + 2)
        model.classifiers.train()
        heads = [clf.mlp for clf in model.classifiers]  # the pooling is already applied
        for epoch in range(1, self.classifier_epochs + 1):
            tick = time.perf_counter()
            order = torch.randperm(n, generator=cpu_gen).to(self.device)
            total, lr = 0.0, optimizer.param_groups[0]["lr"]
            for step in range(steps_per_epoch):
                index = order[step * batch_size : (step + 1) * batch_size]
                y = labels[index]
                loss = inputs[0].new_zeros(())
                for s, head in enumerate(heads):
                    distance = head(inputs[s][index]).squeeze(1)
                    per_sample = double_hinge_loss(distance, y, self.margin)
                    term = per_sample[~y].mean() if bool((~y).any()) else per_sample.new_zeros(())
                    if bool(y.any()):
                        term = term + per_sample[y].mean()
                    loss = loss + self.weights_[s] * term
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                total += float(loss.detach())
            record = {
                "stage": 2,
                "epoch": epoch,
                "loss": total / steps_per_epoch,
                "lr": lr,
                "seconds": time.perf_counter() - tick,
            }
            self.history_.append(record)
            if epoch == self.classifier_epochs or epoch % max(1, self.classifier_epochs // 5) == 0:
                self._log(f"stage 2 epoch {epoch}/{self.classifier_epochs} loss {record['loss']:.4f}")
        model.eval()

    # -- scoring --------------------------------------------------------------------------------
    @torch.no_grad()
    def _deviation_batches(self, images: torch.Tensor | Dataset):
        """Yields (batch on the device, its per-scale deviation maps), ``eval_batch_size`` at a time,
        of float (N, C, H, W) images at the working size or a dataset of training images."""
        model = self.model_
        model.eval()
        if isinstance(images, torch.Tensor):
            batches = (images[i : i + self.eval_batch_size].to(self.device)
                       for i in range(0, images.shape[0], self.eval_batch_size))
        else:
            batches = self._working_batches(images, self.eval_batch_size)
        many = len(images) > self.eval_batch_size
        with progress(len(images), "anomem score", self.verbose and many, "image") as bar:
            for batch in batches:
                with self._autocast():
                    yield batch, model.deviations(batch)
                bar.update(batch.shape[0])

    @torch.no_grad()
    def _scores_of(self, deviations: list[torch.Tensor]) -> torch.Tensor:
        """Per-scale scores (B, S) of one batch's deviation maps, one-class or classifier."""
        with self._autocast():
            if self.semi_supervised_:
                return self.model_.classifier_scores(deviations).float()
            return self.model_.one_class_scores(deviations).float()

    def _scale_scores(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat([self._scores_of(d).cpu() for _, d in self._deviation_batches(images)])

    def _weighted_sum(self, scale_scores: torch.Tensor) -> np.ndarray:
        """(N, S) per-scale scores -> (N,) float64 anomaly scores (Eq. 13)."""
        weights = torch.tensor(self.weights_, dtype=torch.float32)
        return (scale_scores * weights).sum(dim=1).double().numpy()

    def _score(self, images: torch.Tensor) -> np.ndarray:
        return self._weighted_sum(self._scale_scores(images))

    def scores_now(self, images) -> np.ndarray:
        """Scores (N,) with the model as it is, also mid-training (no threshold needed; a semi-supervised
        fit scores with its classifiers, untrained until stage 2)."""
        if self.model_ is None:
            raise RuntimeError("this AnoMem has no model yet: call fit(...) first")
        return self._score(self._images(images, "images")[0])

    def scale_scores(self, images) -> np.ndarray:
        """Per-scale anomaly scores (N, S) before the weighted sum (Eq. 9 or 10)."""
        self._check_model()
        return self._scale_scores(self._images(images, "images")[0]).double().numpy()

    @torch.no_grad()
    def score(self, images) -> tuple[np.ndarray, list[np.ndarray]]:
        """Anomaly scores and anomaly maps.

        The map is the paper's suggested extension (Sec. 5): each scale's per-position deviation
        norm ||D_s(p)||, upsampled (bilinear) to the image and summed with the scale weights. It is
        the one-class deviation map also for a semi-supervised detector (its classifiers pool the
        maps away); the scores are :meth:`decision_function`'s.

        Args:
            images: as :meth:`decision_function`.

        Returns:
            (scores (N,) float64, maps: N float32 arrays (H_i, W_i) at each input image's own size).
        """
        self._check_model()
        x, sizes = self._images(images, "images")
        scores, maps = self._scores_and_maps(x)
        out = []
        for amap, target in zip(maps, sizes):
            if tuple(amap.shape) != tuple(target):
                amap = F.interpolate(amap[None, None], size=target, mode="bilinear", align_corners=False)[0, 0]
            out.append(amap.numpy().astype(np.float32))
        return scores, out

    @torch.no_grad()
    def _scores_and_maps(self, x: torch.Tensor | Dataset) -> tuple[np.ndarray, list[torch.Tensor]]:
        """Scores (N,) and the (H, W) maps at the working size of float (N, C, H, W) images (or a
        dataset of training images), one pass."""
        scale_scores, maps = [], []
        for batch, deviations in self._deviation_batches(x):
            scale_scores.append(self._scores_of(deviations).cpu())
            maps.extend(self._maps_of(deviations, batch.shape[-2:]).cpu())
        return self._weighted_sum(torch.cat(scale_scores)), maps

    def _maps_of(self, deviations: list[torch.Tensor], size) -> torch.Tensor:
        """(B, H, W) anomaly maps of one batch: the scale-weighted sum of each scale's deviation norm
        upsampled (bilinear) to ``size``."""
        total = None
        for weight, d in zip(self.weights_, deviations):
            norm = d.float().norm(dim=1, keepdim=True)
            up = weight * F.interpolate(norm, size=tuple(size), mode="bilinear", align_corners=False)
            total = up if total is None else total + up
        return total[:, 0]

    def decision_function(self, images) -> np.ndarray:
        """Anomaly scores (N,), higher = more anomalous (Eq. 13: the scale-weighted sum).

        Args:
            images: uint8 or float in [0, 1]; a tensor or array (N, C, H, W), a sequence of
                (C, H, W) tensors or a dataset (as in :meth:`fit`); resized to the training size.
        """
        self._check_model()
        return self._score(self._images(images, "images")[0])

    def _check_model(self) -> None:
        if self.model_ is None:
            raise RuntimeError("this AnoMem is not fitted yet: call fit(...) or load(...) first")

    # -- state --------------------------------------------------------------------------------
    def _get_state(self) -> dict:
        self._check_model()
        return {
            "model": self.model_.state_dict(),
            "in_channels": self.in_channels_,
            "fit_size": list(self.fit_size_),
            "semi_supervised": self.semi_supervised_,
            "history": [dict(r) for r in self.history_],
            "train_precision": getattr(self, "train_precision_", None),
        }

    def _set_state(self, state: dict) -> None:
        self.in_channels_ = int(state["in_channels"])
        self.fit_size_ = tuple(int(v) for v in state["fit_size"])
        self.semi_supervised_ = bool(state["semi_supervised"])
        self.model_ = self._build_model(self.in_channels_, self.fit_size_)
        self.model_.load_state_dict(state["model"])
        self.model_.to(self.device).eval()
        self.history_ = [dict(r) for r in state.get("history", [])]
        if state.get("train_precision") is not None:
            self.train_precision_ = str(state["train_precision"])


def _gradients_finite(params: list[torch.Tensor]) -> bool:
    """Whether every gradient of ``params`` is finite (one host sync)."""
    grads = [p.grad for p in params if p.grad is not None]
    return not grads or bool(torch.isfinite(torch.stack(torch._foreach_norm(grads))).all())


# -- argument checks ---------------------------------------------------------------------------
def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _positive_float(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    if not math.isfinite(float(value)):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return float(value)


def _int_tuple(value, name: str, *, length: int | None = None) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) == 0:
        raise ValueError(f"{name} must be a non-empty sequence of ints, got {value!r}")
    if any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) for v in value):
        raise ValueError(f"{name} must hold ints, got {value!r}")
    if length is not None and len(value) != length:
        raise ValueError(
            f"{name} must have {length} entries (one per scale), got {len(value)}: {tuple(value)}"
        )
    return tuple(int(v) for v in value)


def _float_tuple(value, name: str, *, length: int) -> tuple[float, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ValueError(f"{name} must be a sequence of numbers, got {value!r}")
    if any(isinstance(v, bool) or not isinstance(v, (int, float, np.number)) for v in value):
        raise ValueError(f"{name} must hold numbers, got {value!r}")
    if len(value) != length:
        raise ValueError(
            f"{name} must have {length} entries (one per scale), got {len(value)}: {tuple(value)}"
        )
    return tuple(float(v) for v in value)


def _stack_float(images: list[torch.Tensor], size: tuple[int, int] | None) -> torch.Tensor:
    """(C, H_i, W_i) uint8 or float [0, 1] images -> float32 (N, C, H, W) in [0, 1] at ``size``
    (default: the first image's), resized with antialiasing (uint8 through ``stack_resized``)."""
    target = tuple(size) if size is not None else tuple(images[0].shape[-2:])
    if all(image.dtype == torch.uint8 for image in images):
        return (stack_resized(images, target).float() / 255.0).contiguous()
    out = []
    for image in images:
        image = image.float()
        if tuple(image.shape[-2:]) != target:
            image = F.interpolate(image[None], size=target, mode="bilinear", align_corners=False, antialias=True)[0]
            image = image.clamp_(0, 1)
        out.append(image)
    return torch.stack(out).contiguous()


class _WorkingSize:
    """A (C, H, W) uint8 or float image -> the same dtype at ``size`` (:func:`_stack_float`'s
    resize); runs in the DataLoader workers."""

    def __init__(self, size: tuple[int, int]) -> None:
        self.size = tuple(size)

    def __call__(self, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if image.dtype == torch.uint8:
            return stack_resized([image], self.size)[0]
        return _stack_float([image], self.size)[0]


def _stack_pixels(images: list[torch.Tensor]) -> torch.Tensor:
    """Stack :class:`_WorkingSize` outputs: uint8 when all are, else float in [0, 1]."""
    if all(image.dtype == torch.uint8 for image in images):
        return torch.stack(images)
    return torch.stack([image.float() / 255.0 if image.dtype == torch.uint8 else image for image in images])
