"""The DG harness's ascent-schedule hyperparameters reach the optimizer, and a step skips the pass."""

from __future__ import annotations

import pytest
import torch

from torchsage.dg.algorithms import get_algorithm
from torchsage.dg.hparams import default_hparams
from torchsage.optim import EveryK, EveryStep, Triggered


def build(algorithm: str, **overrides):
    hp = {**default_hparams(algorithm, "RotatedDigits"), "cnn_width": 8, **overrides}
    return get_algorithm(algorithm)((1, 28, 28), 10, 2, hp)


def test_defaults_take_the_ascent_at_every_step():
    for algorithm in ("SAM", "SAGE"):
        hp = default_hparams(algorithm, "RotatedDigits")
        assert (hp["ascent_every"], hp["ascent_trigger"], hp["ascent_threshold"]) == (1, "none", 0.0)
        assert isinstance(build(algorithm).optimizer.schedule, EveryStep)
    assert "ascent_every" not in default_hparams("GSAM", "RotatedDigits")


def test_every_k_and_the_trigger_reach_the_optimizer_and_skip_the_second_pass():
    torch.manual_seed(0)
    algorithm = build("SAGE", ascent_every=2)
    assert isinstance(algorithm.optimizer.schedule, EveryK) and algorithm.optimizer.schedule.k == 2
    batches = [(torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))) for _ in range(2)]
    logged = [algorithm.update(batches, step) for step in range(3)]
    assert ["perturbed_loss" in x for x in logged] == [True, False, True]
    trigger = build("SAGE", ascent_trigger="disagreement", ascent_threshold=0.5).optimizer.schedule
    assert isinstance(trigger, Triggered) and (trigger.statistic, trigger.threshold) == ("disagreement", 0.5)


def test_every_k_and_a_trigger_together_are_refused():
    with pytest.raises(
        ValueError, match="ascent_every=3 and ascent_trigger='disagreement' exclude each other"
    ):
        build("SAGE", ascent_every=3, ascent_trigger="disagreement")


@pytest.mark.parametrize("direction", ["gradient", "none"])
def test_classifier_ascent_is_the_classifiers_parameter_group(direction):
    torch.manual_seed(0)
    algorithm = build("SAGE", classifier_ascent=direction)
    featurizer, classifier = algorithm.optimizer.param_groups
    assert [id(p) for p in classifier["params"]] == [id(p) for p in algorithm.classifier.parameters()]
    assert classifier["ascent"] == direction and featurizer["ascent"] == "polar"
    # the harness's step is that of SAGE built by hand on the same groups, from the same weights
    state = {k: v.clone() for k, v in algorithm.network.state_dict().items()}
    batches = [(torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))) for _ in range(2)]
    logged = algorithm.update(batches, 0)
    twin = build("SAGE")
    twin.network.load_state_dict(state)
    hp = twin.hparams
    by_hand = torch.optim.Adam  # the harness's base optimizer for the digit sets
    opt = type(algorithm.optimizer)(
        [
            {"params": list(twin.featurizer.parameters())},
            {"params": list(twin.classifier.parameters()), "ascent": direction},
        ],
        by_hand,
        lr=hp["lr"],
        weight_decay=hp["weight_decay"],
        rho=hp["rho"],
        gamma=hp["gamma"],
        disagreement=hp["disagreement"],
        seed=algorithm.optimizer.seed,
        model=twin.network,
    )
    info = opt.step(lambda: [torch.nn.functional.cross_entropy(twin.network(x), y) for x, y in batches])
    assert logged["perturbed_loss"] == info.perturbed_loss
    for p, q in zip(algorithm.network.parameters(), twin.network.parameters()):
        assert torch.equal(p, q)
    # and it is not the default's step
    plain = build("SAGE")
    plain.network.load_state_dict(state)
    assert plain.update(batches, 0)["perturbed_loss"] != logged["perturbed_loss"]
