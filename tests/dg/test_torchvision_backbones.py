"""The ResNet backbones against the real torchvision (``make test-vision``; skipped where torchvision
does not import): built as the harness builds them, their weights read from a file the test writes
in the layout of torchvision's ImageNet file (through ``pretrained_path`` and through torch's cache,
as a user's run reads them), BatchNorm frozen as DomainBed freezes it, and one SAGE step of the
authors' DG recipe on ResNet-50 equal to the reference step of tests/optim/test_fidelity.py.

Inputs are tiny (32 px, a few images) so that ResNet-50 stays cheap on a shared CPU.
"""

from __future__ import annotations

import urllib.error
from pathlib import Path

import pytest
import torch
from torch import nn

from authors_reference import authors_dg_step
from torchsage.dg.algorithms import get_algorithm
from torchsage.dg.hparams import default_hparams
from torchsage.dg.recipe import algorithm_class, preset_hparams
from torchvision_support import IMAGENET_FILES, imagenet_like_state, require_torchvision

torchvision = require_torchvision()
pytestmark = pytest.mark.torchvision

ARCHS = ("resnet18", "resnet50")
SHAPE = (3, 32, 32)


@pytest.fixture(scope="module")
def torch_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A torch home whose hub cache holds both files (written once per module: ResNet-50's is 100 MB)."""
    home = tmp_path_factory.mktemp("torch_home")
    checkpoints = home / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    for arch, name in IMAGENET_FILES.items():
        torch.save(imagenet_like_state(torchvision, arch), checkpoints / name)
    return home


@pytest.fixture
def offline(torch_home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """torch's cache is ``torch_home``; a download attempt fails as on a machine without network."""
    monkeypatch.setenv("TORCH_HOME", str(torch_home))

    def no_network(url: str, *args: object, **kwargs: object) -> None:
        raise urllib.error.URLError(f"no network in the tests ({url})")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    return torch_home / "hub" / "checkpoints"


def harness_algorithm(name: str, arch: str, preset: str | None = None, **hparams: object) -> nn.Module:
    """The DG algorithm as ``dg train`` builds it for PACS (7 classes, 3 training domains)."""
    values = default_hparams(name, "PACS")
    if preset is not None:
        values.update(preset_hparams(preset, "PACS"))
    values.update(backbone=arch, image_size=SHAPE[1], **hparams)
    return algorithm_class(get_algorithm(name), preset)(SHAPE, 7, 3, values)


def torchvision_features(arch: str, path: Path) -> nn.Module:
    """torchvision's own network with ``path``'s weights, ``fc`` removed, in evaluation mode."""
    network = getattr(torchvision.models, arch)(weights=None)
    network.load_state_dict(torch.load(path, weights_only=True))  # torch fills the missing counters
    network.fc = nn.Identity()
    return network.eval()


@pytest.mark.parametrize("arch", ARCHS)
def test_pretrained_path_loads_the_file_as_torchvision_does(arch, offline):
    path = offline / IMAGENET_FILES[arch]
    algorithm = harness_algorithm("ERM", arch, pretrained_path=str(path))
    featurizer = algorithm.featurizer
    assert featurizer.n_outputs == {"resnet18": 512, "resnet50": 2048}[arch]
    assert isinstance(featurizer.network, torchvision.models.ResNet)
    reference = torchvision_features(arch, path)
    for key, value in reference.state_dict().items():
        assert torch.equal(featurizer.network.state_dict()[key], value), key
    x = torch.randn(2, *SHAPE)
    algorithm.eval()
    with torch.no_grad():  # the same network and weights: the same kernels, the same numbers
        assert torch.equal(featurizer(x), reference(x))


@pytest.mark.parametrize("arch", ARCHS)
def test_imagenet_weights_are_read_from_torchs_cache_where_torchvision_reads_them(arch, offline):
    algorithm = harness_algorithm("ERM", arch)  # the image sets' default: "pretrained": "imagenet"
    assert algorithm.hparams["pretrained"] == "imagenet"
    assert algorithm.featurizer.weights_path == str(offline / IMAGENET_FILES[arch])
    # torchvision's own loader finds the same file in the same cache (no download: it is there)
    reference = getattr(torchvision.models, arch)(weights="IMAGENET1K_V1")
    reference.fc = nn.Identity()
    for key, value in reference.state_dict().items():
        assert torch.equal(algorithm.featurizer.network.state_dict()[key], value), key


def test_without_the_file_or_network_one_line_names_torchvisions_url(offline, monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty cache
    with pytest.raises(FileNotFoundError) as info:
        harness_algorithm("ERM", "resnet50")
    url = torchvision.models.ResNet50_Weights.IMAGENET1K_V1.url
    message = str(info.value)
    assert "\n" not in message and f"download {url} to {tmp_path}/hub/checkpoints/" in message
    assert "pretrained_path" in message and not any((tmp_path / "hub" / "checkpoints").iterdir())


def batchnorms(module: nn.Module) -> list[nn.BatchNorm2d]:
    return [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)]


@pytest.mark.parametrize("arch", ARCHS)
def test_batchnorm_is_frozen_as_in_domainbed_through_sage_steps(arch, offline):
    path = offline / IMAGENET_FILES[arch]
    algorithm = harness_algorithm("SAGE", arch, pretrained_path=str(path), batch_size=2)
    algorithm.train()
    assert algorithm.training and batchnorms(algorithm) and not any(m.training for m in batchnorms(algorithm))
    # DomainBed's featurizer: train() on the network, then eval() on every BatchNorm2d
    reference = torchvision_features(arch, path)
    x = torch.randn(2, *SHAPE)
    with torch.no_grad():
        torch.testing.assert_close(algorithm.featurizer(x), reference(x), rtol=0, atol=0)
    frozen = {k: v.clone() for k, v in algorithm.state_dict().items() if "running" in k or "batches" in k}
    assert all(int(m.num_batches_tracked) == 0 for m in batchnorms(algorithm))  # absent from the file
    affine = batchnorms(algorithm)[0].weight.detach().clone()
    minibatches = [(torch.randn(2, *SHAPE), torch.randint(0, 7, (2,))) for _ in range(3)]
    algorithm.update(minibatches, 0)  # SAGE: a clean and a perturbed pass, both in train()
    for key, value in frozen.items():  # running statistics and counters: never touched
        assert torch.equal(algorithm.state_dict()[key], value), key
    assert not torch.equal(batchnorms(algorithm)[0].weight, affine)  # the affine parameters train
    # freeze_bn false (the authors' recipe): BatchNorm trains and counts its batches
    free = harness_algorithm("SAGE", arch, pretrained_path=str(path), batch_size=2, freeze_bn=False)
    free.train()
    assert all(m.training for m in batchnorms(free))
    free.update(minibatches, 0)
    assert int(batchnorms(free)[0].num_batches_tracked) == len(minibatches)  # clean pass only


def test_one_sage_step_on_resnet50_is_the_reference_step():
    """The authors' recipe (``--preset authors``: merged batch, BatchNorm in training mode on both
    passes, SGD, rho scaled by ||W||_F, cosine disagreement, gamma 1.0) on a ResNet-50 built by the
    harness, against tests/optim/test_fidelity.py's implementation of their equations.

    Both sides run in float64, the Newton-Schulz iteration included (the preset's float32 only
    rounds the same iteration), and both draw the noise from a generator seeded alike. What may
    differ is rounding: sums over 25M coordinates (the cosines) and over the batch (BatchNorm's
    backward, through 50 layers) taken in other orders, each term rounding at 1e-16, the result
    amplified at most ~500-fold by the five quintic steps. Each parameter's distance between the
    two sides is therefore bounded relative to the step it took (rtol 1e-9; measured: about 1e-11),
    and each buffer's relative to its norm: an elementwise relative tolerance does not fit
    parameters that moved across zero.
    """
    seed, sizes = 3, [1, 2, 1]  # the merged batch of 4 as drawn: unequal shares of 3 domains
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # the network, its buffers and the inputs in float64
    try:
        torch.manual_seed(seed)  # SAGE's noise seed defaults to torch.initial_seed(), as in dg train
        library = harness_algorithm("SAGE", "resnet50", preset="authors", pretrained=None, batch_size=4)
        reference = harness_algorithm("SAGE", "resnet50", preset="authors", pretrained=None, batch_size=4)
        reference.load_state_dict(library.state_dict())
        initial = [p.detach().clone() for p in library.network.parameters()]
        gen = torch.Generator().manual_seed(0)
        xs = [torch.randn(n, *SHAPE, generator=gen) for n in sizes]
        ys = [torch.randint(0, 7, (n,), generator=gen) for n in sizes]
    finally:
        torch.set_default_dtype(previous)
    optimizer = library.optimizer
    optimizer.ascent.polar_kwargs["dtype"] = torch.float64
    assert optimizer.seed == seed and not library.featurizer.freeze_bn
    library.train()
    library.update(list(zip(xs, ys)), 0)

    reference.train()
    params = list(reference.network.parameters())
    authors_dg_step(
        reference.network,
        torch.cat(xs),
        torch.cat(ys),
        sizes,
        torch.Generator().manual_seed(seed),
        [None] * len(params),
        ns_eps=0.0,
        gamma=1.0,
    )
    after = {name: p.detach() for name, p in reference.network.named_parameters()}
    for (name, p), p0 in zip(library.network.named_parameters(), initial):
        p = p.detach()
        step = float((after[name] - p0).norm())
        assert step > 0, name  # the comparison is not between two untouched networks
        assert float((p - after[name]).norm()) <= 1e-9 * step, name
    buffers = dict(reference.network.named_buffers())
    for name, b in library.network.named_buffers():
        if b.is_floating_point():
            assert float((b - buffers[name]).norm()) <= 1e-9 * float(buffers[name].norm()), name
        else:  # BatchNorm's counter: updated on both passes
            assert int(b) == int(buffers[name]) == 2, name
