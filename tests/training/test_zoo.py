"""The zoo's manifests, the app's names for the same networks, and arrays held to them exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord
from torch import nn

from fedgate.gate.manifest import Manifest
from fedgate.training import RecipeError, build_model, check_arrays, manifest, zoo_names
from fedgate.training.trainer import refuse_unsafe_layers
from fedgate_medical.models import build_model as app_build_model

# The manifest hashes of the reference app's networks before they moved into the zoo: a
# renamed tensor would silently invalidate every hospital's approved manifest.
PINNED = {
    "small-cnn": "dc6fc4d7f3cde3289c522c5219c7228914cd6d62abcd447deef405e90afc6073",
    "resnet18-gn": "1374d8909961ce4c9febb2b9d340a5afb8587655ac53a59acbacab235d46ac18",
}


def arrays_of(model: nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def test_zoo_names() -> None:
    assert zoo_names() == ("small-cnn", "resnet18-gn", "densenet121-gn", "scatternet-linear")


@pytest.mark.parametrize(("app_name", "zoo_name"), [("cnn", "small-cnn"), ("resnet18", "resnet18-gn")])
def test_app_names_build_the_zoo_networks_with_unchanged_manifests(app_name: str, zoo_name: str) -> None:
    declared = manifest(zoo_name, 2, 64)
    assert declared.hash == PINNED[zoo_name]
    sent = ArrayRecord(app_build_model(app_name, 2, 64).state_dict())  # as a Flower instruction carries it
    assert Manifest.of_arrays({k: a.numpy() for k, a in sent.items()}) == declared
    assert app_build_model(zoo_name, 2, 64).state_dict().keys() == app_build_model(app_name, 2, 64).state_dict().keys()
    with pytest.raises(ValueError, match="unknown model"):
        app_build_model("vgg", 2, 64)


@pytest.mark.slow  # imports MONAI (~10 s on this machine)
def test_densenet121_gn_manifest_and_layers() -> None:
    network = build_model("densenet121-gn", 2, 64)
    assert len(manifest("densenet121-gn", 2, 64).tensors) == 364
    refuse_unsafe_layers(network)
    assert not any(isinstance(m, nn.ReLU) and m.inplace for m in network.modules())


@pytest.mark.parametrize("name", ["small-cnn", "resnet18-gn"])
def test_zoo_networks_have_no_batchnorm_and_no_buffers(name: str) -> None:
    refuse_unsafe_layers(build_model(name, 2, 64))


def test_batchnorm_and_buffers_are_refused() -> None:
    with pytest.raises(RecipeError) as refused:
        refuse_unsafe_layers(nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)))
    assert refused.value.rule == "trainer.no-batchnorm"
    with_buffer = nn.Linear(2, 2)
    with_buffer.register_buffer("running", torch.zeros(2))
    with pytest.raises(RecipeError) as refused:
        refuse_unsafe_layers(with_buffer)
    assert refused.value.rule == "trainer.no-buffers"


def _tamper(arrays: dict[str, np.ndarray], how: str) -> dict[str, np.ndarray]:
    items = list(arrays.items())
    if how == "missing":
        return dict(items[:-1])
    if how == "extra":
        return {**arrays, "smuggled": np.zeros(8, np.float32)}
    if how == "renamed":
        return {("x" + k if i == 0 else k): v for i, (k, v) in enumerate(items)}
    if how == "reordered":
        return dict(reversed(items))
    if how == "dtype":
        return {k: (v.astype(np.float64) if i == 0 else v) for i, (k, v) in enumerate(items)}
    if how == "shape":
        return {
            k: (np.zeros((*v.shape[:-1], v.shape[-1] + 1), v.dtype) if i == 0 else v) for i, (k, v) in enumerate(items)
        }
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["missing", "extra", "renamed", "reordered", "dtype", "shape"])
def test_arrays_that_are_not_exactly_the_zoo_model_are_refused(how: str) -> None:
    arrays = arrays_of(build_model("small-cnn", 2, 64))
    check_arrays("small-cnn", 2, 64, arrays)
    with pytest.raises(RecipeError) as refused:
        check_arrays("small-cnn", 2, 64, _tamper(arrays, how))
    assert refused.value.rule == "manifest"


def test_another_models_arrays_or_a_nan_are_refused() -> None:
    with pytest.raises(RecipeError, match="manifest"):
        check_arrays("small-cnn", 2, 64, arrays_of(build_model("small-cnn", 3, 64)))  # 3 classes
    with pytest.raises(RecipeError, match="manifest"):
        check_arrays("small-cnn", 2, 64, arrays_of(build_model("small-cnn", 2, 32)))  # other input size
    arrays = arrays_of(build_model("small-cnn", 2, 64))
    next(iter(arrays.values()))[0] = np.nan
    with pytest.raises(RecipeError) as refused:
        check_arrays("small-cnn", 2, 64, arrays)
    assert refused.value.rule == "manifest.finite"


def test_scattering_network_has_81_fixed_channels_and_only_a_linear_head_to_train() -> None:
    from fedgate.training.networks import ScatterNetLinear

    network = build_model("scatternet-linear", 2, 32)
    assert isinstance(network, ScatterNetLinear)
    refuse_unsafe_layers(network)
    assert [t.name for t in manifest("scatternet-linear", 2, 32).tensors] == ["head.2.weight", "head.2.bias"]
    features = network.features(torch.randn(3, 1, 32, 32))
    assert features.shape == (3, 81, 8, 8) and torch.isfinite(features).all()
    again = build_model("scatternet-linear", 2, 32).features(torch.ones(1, 1, 32, 32))
    assert torch.equal(again, network.features(torch.ones(1, 1, 32, 32)))  # fixed: no randomness, no training
    with pytest.raises(RecipeError, match="image-size"):
        build_model("scatternet-linear", 2, 30)


def test_the_small_cnn_pools_before_its_relu_and_computes_the_same_function() -> None:
    """Pooling first (a quarter of the values through the ReLU) is the network with ReLU first:
    same outputs and same gradients, so the swap changed the time, not the model."""
    torch.manual_seed(0)
    network = build_model("small-cnn", 2, 64)
    blocks = list(network.features)
    assert [type(m) for m in blocks[:4]] == [nn.Conv2d, nn.GroupNorm, nn.MaxPool2d, nn.ReLU]
    relu_first = [m for i in range(0, len(blocks), 4) for m in (*blocks[i : i + 2], blocks[i + 3], blocks[i + 2])]
    reference = nn.Sequential(nn.Sequential(*relu_first), network.classifier).eval()
    network.eval()
    images = torch.randn(8, 1, 64, 64)
    assert torch.equal(network(images), reference(images))
    network(images).square().sum().backward()
    ours = [p.grad.clone() for p in network.parameters()]  # type: ignore[union-attr]
    network.zero_grad()
    reference(images).square().sum().backward()
    for mine, theirs in zip(ours, [p.grad for p in network.parameters()], strict=True):
        assert theirs is not None and torch.allclose(mine, theirs, rtol=1e-5, atol=1e-6)
