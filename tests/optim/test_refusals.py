"""The optimizers refuse what they cannot do right, with a message saying what to do."""

import inspect

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchsage
from torchsage.optim import GSAM, SAGM, SAGEAlign, SAGEAlignmentOnly, SAGECurvatureOnly

CLASSES = {
    "SAM": torchsage.SAM,
    "ASAM": torchsage.ASAM,
    "GSAM": GSAM,
    "SAGM": SAGM,
    "SAGE": torchsage.SAGE,
    "SAGECurvatureOnly": SAGECurvatureOnly,
    "SAGEAlignmentOnly": SAGEAlignmentOnly,
    "SAGEAlign": SAGEAlign,
}


def problem(K=2):
    model = nn.Linear(3, 2)
    data = [(torch.randn(6, 3), torch.randint(0, 2, (6,))) for _ in range(K)]
    return model, data


EXPORTED = sorted(
    name
    for name in torchsage.optim.__all__
    if isinstance(getattr(torchsage.optim, name), type)
    and issubclass(getattr(torchsage.optim, name), torchsage.optim.SharpnessAware)
    and name != "SharpnessAware"
)


def test_every_exported_optimizer_is_checked_here():
    assert set(CLASSES) <= set(EXPORTED) and len(EXPORTED) >= 8


@pytest.mark.parametrize("name", EXPORTED)
def test_options_after_rho_are_keyword_only(name):
    cls = getattr(torchsage.optim, name)
    parameters = list(inspect.signature(cls.__init__).parameters.values())
    positional = [p.name for p in parameters if p.kind == p.POSITIONAL_OR_KEYWORD]
    # self, params, base_optimizer and at most the radius: anything else by name only
    assert positional[:3] == ["self", "params", "base_optimizer"]
    assert positional[3:] in ([], ["rho"])


@pytest.mark.parametrize("name", ["SAM", "SAGE"])
def test_the_shared_options_show_in_the_signature_keyword_only(name):
    # declared once, on SharpnessAware; SAM and SAGE pass them on and still list them for help()
    shared = inspect.signature(torchsage.optim.SharpnessAware.__init__).parameters.values()
    names = [p.name for p in shared if p.kind == p.KEYWORD_ONLY]
    assert {"model", "max_grad_norm", "on_nonfinite", "solver", "process_group", "layout"} <= set(names)
    parameters = inspect.signature(CLASSES[name]).parameters
    assert all(parameters[n].kind == inspect.Parameter.KEYWORD_ONLY for n in names)
    assert list(parameters)[-1] == "base_kwargs"


def test_sam_refuses_gamma_by_position():
    # Before: the fourth positional argument was SAM's `adaptive`, so 0.001 silently made it ASAM.
    model, _ = problem()
    with pytest.raises(TypeError):
        torchsage.SAM(model.parameters(), torch.optim.SGD, 0.05, 0.001)


def test_sage_refuses_gamma_by_position():
    model, _ = problem()
    with pytest.raises(TypeError):
        torchsage.SAGE(model.parameters(), torch.optim.SGD, 0.05, 0.001)


FOUR = ("SAM", "SAGE", "GSAM", "SAGEAlign")
PAIRS = [(a, b) for a in FOUR for b in FOUR if a != b]


@pytest.mark.parametrize("saved,loaded", PAIRS)
def test_state_dict_of_another_class_is_refused(saved, loaded):
    model, data = problem()
    source = CLASSES[saved](model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    source.step(lambda: [F.cross_entropy(model(x), y) for x, y in data])
    target = CLASSES[loaded](model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match=f"saved by {saved}, not {loaded}"):
        target.load_state_dict(source.state_dict())


def test_state_dict_around_another_base_optimizer_is_refused():
    model, data = problem()
    source = torchsage.SAGE(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    source.step(lambda: [F.cross_entropy(model(x), y) for x, y in data])
    target = torchsage.SAGE(model.parameters(), torch.optim.Adam, lr=0.1)
    with pytest.raises(ValueError, match="around SGD, not Adam"):
        target.load_state_dict(source.state_dict())


def test_state_dict_round_trip_in_the_same_class_still_loads():
    model, data = problem()
    opt = torchsage.SAGE(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, seed=3)
    opt.step(lambda: [F.cross_entropy(model(x), y) for x, y in data])
    other = torchsage.SAGE(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, seed=5)
    other.load_state_dict(opt.state_dict())
    assert other.seed == 3


def _changing_closure(model, data, second):
    calls = []

    def closure():
        calls.append(1)
        if len(calls) == 1:
            return {f"d{k}": F.cross_entropy(model(x), y) for k, (x, y) in enumerate(data)}
        return second(model, data)

    return closure


@pytest.mark.parametrize("name", ["SAM", "SAGE"])
@pytest.mark.parametrize(
    "second",
    [
        lambda m, d: {"d0": F.cross_entropy(m(d[0][0]), d[0][1])},  # fewer
        lambda m, d: {f"e{k}": F.cross_entropy(m(x), y) for k, (x, y) in enumerate(d)},  # renamed
    ],
    ids=["fewer", "renamed"],
)
def test_closure_changing_its_losses_between_the_passes_is_refused(name, second):
    model, data = problem()
    opt = CLASSES[name](model.parameters(), torch.optim.SGD, lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="same distributions on every call"):
        opt.step(_changing_closure(model, data, second))
    # the weights are back at the clean point, not left perturbed
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_loss_reaching_no_parameter_is_refused(name):
    model, data = problem()
    other = nn.Linear(3, 2)  # the closure uses a model the optimizer was not built on
    opt = CLASSES[name](model.parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="does not depend on any parameter"):
        opt.step(lambda: [F.cross_entropy(other(x), y) for x, y in data])


def test_one_distribution_reaching_no_parameter_is_named():
    model, data = problem()
    other = nn.Linear(3, 2)
    opt = torchsage.SAGE(model.parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="distribution b does not depend"):
        opt.step(lambda: {"a": F.cross_entropy(model(data[0][0]), data[0][1]), "b": other(data[1][0]).sum()})


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_torch_optim_style_closure_is_explained(name):
    model, data = problem()
    opt = CLASSES[name](model.parameters(), torch.optim.SGD, lr=0.1)

    def closure():
        opt.zero_grad()
        loss = sum(F.cross_entropy(model(x), y) for x, y in data)
        loss.backward()
        return loss

    with pytest.raises(ValueError, match="must only compute the forward pass"):
        opt.step(closure)


def test_closure_running_backward_in_a_generator_is_explained():
    model, data = problem()
    opt = torchsage.SAM(model.parameters(), torch.optim.SGD, lr=0.1)

    def closure():
        for x, y in data:
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            yield loss

    with pytest.raises(ValueError, match="must only compute the forward pass"):
        opt.step(closure)


def test_misspelt_option_names_sages_options():
    model, _ = problem()
    with pytest.raises(TypeError) as info:
        torchsage.SAGE(model.parameters(), torch.optim.SGD, gama=0.1, lr=0.1)
    message = str(info.value)
    assert "'gama'" in message and "did you mean 'gamma'" in message
    assert "SAGE's options are rho, gamma" in message and "SGD's are lr" in message


def test_misspelt_option_of_a_subclass_lists_the_inherited_options():
    model, _ = problem()
    with pytest.raises(TypeError, match="did you mean 'alpha'") as info:
        GSAM(model.parameters(), torch.optim.SGD, alhpa=0.1, lr=0.1)
    assert "max_grad_norm" in str(info.value)


def test_base_optimizer_instance_gives_one_line():
    model, _ = problem()
    base = torch.optim.Adam(model.parameters(), lr=0.1)
    with pytest.raises(ValueError) as info:
        torchsage.SAGE(model.parameters(), base)
    message = str(info.value)
    assert "\n" not in message
    assert "not an instance" in message and "torch.optim.Adam" in message


def test_losses_from_a_graph_built_outside_the_closure_are_explained():
    model, data = problem()
    opt = torchsage.SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    outside = [F.cross_entropy(model(x), y) for x, y in data]  # differentiated by the first step
    opt.step(lambda: [F.cross_entropy(model(x), y) for x, y in data])
    outside[0].backward()
    with pytest.raises(ValueError, match="graph built outside the closure"):
        opt.step(lambda: outside)
