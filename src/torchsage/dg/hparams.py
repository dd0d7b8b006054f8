"""Hyperparameters of the domain-generalization harness: a default and a seeded random sampler each.

``hparams_seed = 0`` gives the defaults; any other seed draws every hyperparameter from its search
space, each from its own generator seeded by ``(hparams_seed, name)``, so adding a hyperparameter
does not change the others' draws. The spaces follow DomainBed's hyperparameter registry
(Gulrajani and Lopez-Paz, 2021) for the shared ones; the sharpness-aware ones search their radius
and their own coefficient.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import numpy as np

from torchsage.dg.datasets import seed_hash

__all__ = [
    "SMALL_IMAGE_DATASETS",
    "STEP_AT",
    "STEP_FACTOR",
    "default_hparams",
    "parse_hparams",
    "random_hparams",
]

SMALL_IMAGE_DATASETS = ("RotatedDigits", "ColoredDigits")

Sampler = Callable[[np.random.RandomState], Any]

#: the ``"step"`` learning-rate schedule: the learning rate times ``STEP_FACTOR`` from ``STEP_AT`` of
#: the steps on (the SAGE authors' DG code: StepLR at 80% of training, gamma 0.1)
STEP_AT, STEP_FACTOR = 0.8, 0.1


def _choice(values: list[Any]) -> Sampler:
    return lambda r: values[r.choice(len(values))]


def _log_uniform(low: float, high: float) -> Sampler:
    return lambda r: float(10 ** r.uniform(low, high))


def _space(algorithm: str, dataset: str) -> dict[str, tuple[Any, Sampler]]:
    small = dataset in SMALL_IMAGE_DATASETS
    emoji = dataset.startswith("EmojiStyles")
    h: dict[str, tuple[Any, Sampler]] = {}

    def add(name: str, default: Any, sampler: Sampler | None = None) -> None:
        h[name] = (default, sampler if sampler is not None else (lambda r, d=default: d))

    # -- shared --------------------------------------------------------------------------------
    add("backbone", "mnist_cnn" if small else "efficientnet_lite0" if emoji else "resnet50")
    add("cnn_width", 64)  # MNIST CNN channels: (w, 2w, 2w, 2w); DomainBed uses 64
    add("pretrained_path", None)  # a local ResNet state_dict (takes precedence over "pretrained")
    add("freeze_bn", True)
    add("data_augmentation", not (small or emoji))
    if not small:
        add("image_size", 96 if emoji else 224)  # DomainBed's 224; smaller sizes for quick experiments
    if emoji or dataset in ("PACS", "VLCS", "OfficeHome", "TerraIncognita", "DomainNet"):
        add("train_from_block", 0)  # EfficientNet-Lite0: 0 fine-tunes all, k only blocks k.. and the head
        add("cache_trunk", False)  # with train_from_block > 0: the frozen trunk's output computed once
    if emoji:
        add("novel_emoji", 0.0)  # a fraction of the emoji kept out of training, the only ones tested
    add("nonlinear_classifier", False)
    add("optimizer", "adam")  # or "sgd" (momentum 0.9), the SAGE authors' choice for DG
    add("dropout", 0.0, None if small else _choice([0.0, 0.1, 0.5]))
    # SWAD's dense weight averaging (torchsage.dg.swad) and its LossValley rule: the authors' defaults
    add("swad", False)
    add("swad_n_converge", 3)
    add("swad_n_tolerance", 6)
    add("swad_tolerance_ratio", 0.3)
    if small:
        add("lr", 1e-3, _log_uniform(-4.5, -2.5))
        add("batch_size", 64, lambda r: int(2 ** r.uniform(3, 9)))
        add("weight_decay", 0.0)
    else:
        add("lr", 5e-5, _log_uniform(-5, -3.5))
        add("batch_size", 32, lambda r: int(2 ** r.uniform(3, 5.5)))
        add("weight_decay", 0.0, _log_uniform(-6, -2))

    # -- algorithm specific --------------------------------------------------------------------
    rhos = [0.01, 0.02, 0.05, 0.1, 0.2]
    if algorithm in ("SAM", "SAGM"):
        add("rho", 0.05, _choice(rhos))
    if algorithm == "ASAM":  # the defaults of the ASAM authors' code (SamsungLabs/ASAM)
        add("rho", 0.5, _choice([0.1, 0.2, 0.5, 1.0, 2.0]))
        add("eta", 0.01)
        add("scaled", "weights")  # their rule: T = |w| + eta on names containing "weight"; or "all"
    if algorithm == "GSAM":  # named as in the GSAM authors' code; their ResNet values (paper, Table 4)
        add("rho_max", 0.04, _choice(rhos))
        add("rho_min", 0.02, _choice([0.0, 0.005, 0.01]))  # never above the smallest rho_max drawn
        add("alpha", 0.01, _choice([0.01, 0.02, 0.05, 0.1, 0.2, 0.3]))
        add("adaptive", False)
    if algorithm == "SAGM":
        add("alpha", 0.001, _choice([0.0001, 0.0005, 0.001, 0.005, 0.01]))
    if algorithm == "CORAL":
        add("mmd_gamma", 1.0, _log_uniform(-1, 1))
    if algorithm == "Fishr":
        add("lambda", 1000.0, _log_uniform(1, 4))
        add(
            "penalty_anneal_iters",
            300 if small else 1500,
            lambda r: int(r.uniform(0, 500 if small else 5000)),
        )
        add("ema", 0.95, lambda r: float(r.uniform(0.90, 0.99)))
    if algorithm in ("SAM", "SAGE"):
        # ascent schedules (beyond the paper, off by default): every k-th step, or a trigger
        add("ascent_every", 1)
        add("ascent_trigger", "none")
        add("ascent_threshold", 0.0)
    if algorithm.startswith("SAGE"):
        # the library's SAGE defaults; kept by the evidence study (docs/study.md, "The defaults")
        if algorithm == "SAGE_AlignmentOnly":
            add("rho", 0.0)
        else:
            add("rho", 0.05, _choice(rhos))
        add("rho_scaling", "global")
        add("ns_steps", 5)
        add("polar_method", "auto")  # the library's; the authors' preset: plain Newton-Schulz
        if algorithm != "SAGE_AlignmentOnly":
            # the classifier's ascent direction (a parameter group's "ascent" key): "polar" (the
            # paper's, every matrix), "gradient" (SAM's) or "none"
            add("classifier_ascent", "polar")
        add("disagreement", "normalized_std", _choice(["normalized_std", "cosine"]))
        if algorithm in ("SAGE", "SAGE_AlignmentOnly"):
            add("gamma", 1e-3, _log_uniform(-4, -2))
        if algorithm == "SAGE_Align":
            add("lambda_max", 0.8, _choice([0.4, 0.6, 0.8]))

    # -- DomainBed's baselines: defaults and ranges of its hparams_registry.py ------------------
    if algorithm == "IRM":
        add("irm_lambda", 1e2, _log_uniform(-1, 5))
        add("irm_penalty_anneal_iters", 500, lambda r: int(10 ** r.uniform(0, 4)))
    if algorithm == "VREx":
        add("vrex_lambda", 1e1, _log_uniform(-1, 5))
        add("vrex_penalty_anneal_iters", 500, lambda r: int(10 ** r.uniform(0, 4)))
    if algorithm == "GroupDRO":
        add("groupdro_eta", 1e-2, _log_uniform(-3, -1))
    if algorithm == "Mixup":
        add("mixup_alpha", 0.2, _log_uniform(-1, 1))
    if algorithm == "MMD":
        add("mmd_gamma", 1.0, _log_uniform(-1, 1))
    if algorithm == "Fish":
        add("meta_lr", 0.5, _choice([0.05, 0.1, 0.5]))
    if algorithm == "ANDMask":
        add("tau", 1.0, lambda r: float(r.uniform(0.5, 1.0)))
    if algorithm == "SANDMask":
        add("tau", 1.0, lambda r: float(r.uniform(0.0, 1.0)))
        add("k", 10.0, _log_uniform(-3, 5))
    if algorithm == "IGA":
        add("penalty", 1000.0, _log_uniform(1, 5))
    if algorithm == "GGA":  # the defaults of its authors' code (train_all.py); they define no search space
        add("gga_start_step", 100)
        add("gga_end_step", 150)
        add("gga_search_steps", 250)
        add("gga_neighborhood", 1e-6)
        add("gga_loss_tolerance", 0.1)

    # -- backbone weights and learning-rate schedule, every algorithm --------------------------
    if not small:
        add("pretrained", "imagenet")  # ResNet backbones: torchvision's ImageNet weights; null: random
    add("lr_schedule", "none")  # or "step" (x0.1 at 80% of the steps) or "cosine" (to 0 at the end)
    if algorithm == "SAGE":  # set by --preset authors (torchsage.dg.recipe): one batch from all domains
        add("merged_batch", False)
    return h


def default_hparams(algorithm: str, dataset: str) -> dict[str, Any]:
    """The default hyperparameters (``hparams_seed = 0``)."""
    return {name: default for name, (default, _) in _space(algorithm, dataset).items()}


def random_hparams(algorithm: str, dataset: str, seed: int) -> dict[str, Any]:
    """A seeded draw from the search space; ``seed = 0`` returns the defaults."""
    if seed == 0:
        return default_hparams(algorithm, dataset)
    return {
        name: sampler(np.random.RandomState(seed_hash(seed, name)))
        for name, (_, sampler) in _space(algorithm, dataset).items()
    }


def parse_hparams(text: str | None, algorithm: str, dataset: str) -> dict[str, Any]:
    """User overrides from a JSON object; unknown names are an error naming them."""
    if not text:
        return {}
    try:
        overrides = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(
            f"--hparams is not valid JSON ({error.msg} at position {error.pos}): {text!r}"
        ) from None
    if not isinstance(overrides, dict):
        raise ValueError(f"--hparams must be a JSON object, got {type(overrides).__name__}")
    known = _space(algorithm, dataset)
    unknown = sorted(set(overrides) - set(known))
    if unknown:
        raise ValueError(
            f"unknown hyperparameter(s) {', '.join(unknown)} for {algorithm} on {dataset}; "
            f"known: {', '.join(sorted(known))}"
        )
    return overrides
