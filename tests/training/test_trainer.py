"""The hospital's DP-SGD trainer: per-sample clipping bounds one image's influence, it runs
exactly the planned steps, it refuses arrays and data that do not fit, and it learns."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from typing import Any

import numpy as np
import pytest
import torch
from opacus.optimizers import DPOptimizer
from torch import nn

from fedgate.data import ImageSet
from fedgate.training import Recipe, RecipeError, build_model
from fedgate.training import trainer as trainer_module
from fedgate.training.plan import planned_event
from fedgate.training.trainer import _train, model_input, train_dp

SIZE = 16  # the small CNN's smallest input: fast


def images(n: int, seed: int = 0) -> ImageSet:
    """Two separable classes: dark and bright noisy squares."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    pixels = rng.normal(70 + 110 * labels[:, None, None], 30, size=(n, SIZE, SIZE))
    return ImageSet(np.clip(pixels, 0, 255).astype(np.uint8), labels.astype(np.int64), ("dark", "bright"))


def initial_state(seed: int = 0, classes: int = 2, size: int = SIZE, name: str = "small-cnn") -> dict[str, np.ndarray]:
    torch.manual_seed(seed)
    return {k: v.detach().numpy().copy() for k, v in build_model(name, classes, size).state_dict().items()}


def recipe(**changes: Any) -> Recipe:
    base = Recipe("small-cnn", SIZE, 2, "sgd", 0.1, 1, 8, 1.0, 1.0)
    return dataclasses.replace(base, **changes)


def update_norm(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    return float(np.sqrt(sum(np.sum((a[k].astype(np.float64) - b[k]) ** 2) for k in a)))


def adversarial(data: ImageSet, index: int) -> ImageSet:
    """The same set with image `index` replaced by a saturated image with the other label."""
    pixels, labels = data.images.copy(), data.labels.copy()
    pixels[index] = 255
    labels[index] = 1 - labels[index]
    return ImageSet(pixels, labels, data.class_names)


@pytest.fixture
def no_dropout(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dropout masks depend on the batch's shape; with one image more they would differ for the
    other images too. Clipping does not depend on dropout, so take it out of the comparison."""
    monkeypatch.setattr(nn.Dropout, "forward", lambda self, x: x)


@pytest.mark.usefixtures("no_dropout")
def test_adding_one_image_moves_a_step_by_at_most_lr_c_over_b() -> None:
    """Add/remove neighbours, one SGD step, every image in the batch (B >= n: q = 1), noise off:
    the update moves by at most lr·C/B, however extreme the added image. Without clipping the
    same image moves it by far more (the second half), so the test sees a missing clip."""
    data = images(8)
    extra = adversarial(images(9), 8)
    start = initial_state()
    c, lr, batch = 1e-3, 1.0, 16
    plan = recipe(lr=lr, batch_size=batch, max_grad_norm=c)
    without = _train(plan, data, start, 1, secure_mode=False, add_noise=False)
    with_extra = _train(plan, extra, start, 1, secure_mode=False, add_noise=False)
    assert without.steps == with_extra.steps == 1
    moved = update_norm(without.arrays, with_extra.arrays)
    assert 0 < moved <= lr * c / batch * (1 + 1e-4)

    loose = dataclasses.replace(plan, max_grad_norm=1e4)  # clipping out of the way
    moved_unclipped = update_norm(
        _train(loose, data, start, 1, secure_mode=False, add_noise=False).arrays,
        _train(loose, extra, start, 1, secure_mode=False, add_noise=False).arrays,
    )
    assert moved_unclipped > 100 * lr * c / batch


def test_replacing_one_image_moves_a_step_by_at_most_2_lr_c_over_b() -> None:
    """Replace-one neighbours (same batch shape, so dropout stays): at most 2·lr·C/B."""
    data = images(8)
    start = initial_state()
    c, lr, batch = 1e-3, 1.0, 8
    plan = recipe(lr=lr, batch_size=batch, max_grad_norm=c)
    original = _train(plan, data, start, 1, secure_mode=False, add_noise=False)
    replaced = _train(plan, adversarial(data, 0), start, 1, secure_mode=False, add_noise=False)
    moved = update_norm(original.arrays, replaced.arrays)
    assert 0 < moved <= 2 * lr * c / batch * (1 + 1e-4)


def test_noise_is_added_in_the_public_trainer() -> None:
    data = images(8)
    start = initial_state()
    plan = recipe(lr=1.0, batch_size=8, max_grad_norm=1e-3, noise_multiplier=1.0)
    noiseless = _train(plan, data, start, 1, secure_mode=False, add_noise=False)
    noised = train_dp(plan, data, start, 1)
    assert update_norm(noiseless.arrays, noised.arrays) > 10 * 1e-3 / 8


def test_trainer_runs_exactly_the_planned_steps_at_the_planned_rate(monkeypatch: pytest.MonkeyPatch) -> None:
    """q = 4/40 gives many empty Poisson batches; each is still a (noise-only) step."""
    plan = recipe(batch_size=4, local_epochs=2)
    data = images(40)
    event = planned_event(plan, len(data))
    assert (event.sample_rate, event.steps) == (0.1, 20)

    steps, rates = [], []
    original_step = DPOptimizer.step
    sampler = trainer_module.UniformWithReplacementSampler

    def counting_step(self: DPOptimizer, *args: Any, **kwargs: Any) -> Any:
        steps.append(self.noise_multiplier)
        return original_step(self, *args, **kwargs)

    def recording_sampler(**kwargs: Any) -> Any:
        rates.append(kwargs["sample_rate"])
        return sampler(**kwargs)

    monkeypatch.setattr(DPOptimizer, "step", counting_step)
    monkeypatch.setattr(trainer_module, "UniformWithReplacementSampler", recording_sampler)
    result = train_dp(plan, data, initial_state(), seed=3)
    assert len(steps) == event.steps == result.steps
    assert set(steps) == {plan.noise_multiplier} and rates == [event.sample_rate]
    assert result.event == event and result.num_examples == 40


def test_planned_event_edges() -> None:
    assert planned_event(recipe(batch_size=32), 480) == planned_event(recipe(batch_size=32), 480)
    small = planned_event(recipe(batch_size=64, local_epochs=3), 20)
    assert (small.sample_rate, small.steps) == (1.0, 3)
    with pytest.raises(RecipeError, match="at least one image"):
        planned_event(recipe(), 0)


def test_training_a_few_steps_reduces_the_loss() -> None:
    data = images(64, seed=1)
    start = initial_state(seed=1)
    plan = recipe(optimizer="adam", lr=0.01, local_epochs=4, batch_size=16, noise_multiplier=0.5)

    def loss(arrays: dict[str, np.ndarray]) -> float:
        model = build_model("small-cnn", 2, SIZE)
        model.load_state_dict({k: torch.from_numpy(v) for k, v in arrays.items()})
        model.eval()
        with torch.no_grad():
            return float(nn.functional.cross_entropy(model(model_input(data.images)), torch.from_numpy(data.labels)))

    result = train_dp(plan, data, start, seed=5)
    assert loss(result.arrays) < 0.7 * loss(start)
    assert np.isfinite(result.train_loss)
    assert {k: (v.dtype, v.shape) for k, v in result.arrays.items()} == {
        k: (v.dtype, v.shape) for k, v in start.items()
    }


def test_seeded_runs_repeat_and_unseeded_runs_do_not() -> None:
    data, start, plan = images(16), initial_state(), recipe()
    first, again = train_dp(plan, data, start, seed=7), train_dp(plan, data, start, seed=7)
    assert all(np.array_equal(first.arrays[k], again.arrays[k]) for k in first.arrays)
    one, two = train_dp(plan, data, start), train_dp(plan, data, start)
    assert not all(np.array_equal(one.arrays[k], two.arrays[k]) for k in one.arrays)


def test_arrays_of_another_model_are_refused_before_training() -> None:
    with pytest.raises(RecipeError) as refused:
        train_dp(recipe(), images(8), initial_state(classes=3), seed=0)
    assert refused.value.rule == "manifest"
    with pytest.raises(RecipeError) as refused:
        train_dp(recipe(model="resnet18-gn"), images(8), initial_state(), seed=0)
    assert refused.value.rule == "manifest"


def test_data_that_does_not_fit_the_recipe_is_refused() -> None:
    with pytest.raises(RecipeError) as refused:
        train_dp(recipe(image_size=32), images(8), initial_state(size=32), seed=0)
    assert refused.value.rule == "data.image-size"
    wrong = images(8)
    with pytest.raises(RecipeError) as refused:
        train_dp(recipe(), ImageSet(wrong.images, wrong.labels * 3, ("a", "b", "c", "d")), initial_state(), seed=0)
    assert refused.value.rule == "data.classes"


def test_the_trusted_path_imports_no_research_team_code() -> None:
    code = (
        "import sys; import fedgate.training.trainer, fedgate.training.plan, fedgate.data, fedgate.privacy; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('fedgate_medical',)); "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr


def test_trainer_leaves_torch_threads_as_it_found_them() -> None:
    threads = torch.get_num_threads()
    train_dp(recipe(), images(8), initial_state(), seed=0)
    assert torch.get_num_threads() == threads


@pytest.mark.slow  # MONAI import and a 7M-parameter network: ~30 s on this machine
def test_densenet121_gn_takes_dp_sgd_steps() -> None:
    size = 32
    rng = np.random.default_rng(0)
    data = ImageSet(rng.integers(0, 256, (6, size, size), dtype=np.uint8), np.arange(6) % 2, ("a", "b"))
    plan = Recipe("densenet121-gn", size, 2, "sgd", 0.01, 1, 3, 1.0, 1.0)
    start = initial_state(classes=2, size=size, name="densenet121-gn")
    result = train_dp(plan, data, start, seed=0)
    assert result.steps == planned_event(plan, 6).steps == 2
    assert update_norm(start, result.arrays) > 0


def test_a_fixed_feature_model_trains_only_its_head_and_clipping_holds() -> None:
    """scatternet-linear: DP-SGD runs on precomputed scattering features; the bound on one
    image's influence must hold on that path too (replace-one: 2·lr·C/B)."""
    data = images(8)
    plan = recipe(model="scatternet-linear", lr=1.0, batch_size=8, max_grad_norm=1e-3)
    start = initial_state(name="scatternet-linear")
    assert set(start) == {"head.2.weight", "head.2.bias"}  # the wavelet filters never cross the gate
    original = _train(plan, data, start, 1, secure_mode=False, add_noise=False)
    replaced = _train(plan, adversarial(data, 0), start, 1, secure_mode=False, add_noise=False)
    assert 0 < update_norm(original.arrays, replaced.arrays) <= 2 * 1.0 * 1e-3 / 8 * (1 + 1e-4)
    loose = dataclasses.replace(plan, max_grad_norm=1e4)
    unclipped = update_norm(
        _train(loose, data, start, 1, secure_mode=False, add_noise=False).arrays,
        _train(loose, adversarial(data, 0), start, 1, secure_mode=False, add_noise=False).arrays,
    )
    assert unclipped > 10 * 2 * 1e-3 / 8


def test_a_sample_whose_gradient_is_not_finite_contributes_nothing() -> None:
    """A server that picks the weights can make one chosen image's gradient overflow; clipping
    alone would turn it into NaN for the whole update (then refused: a membership bit outside ε).
    The step must equal the step without that sample (noise 0 here, to compare exactly)."""
    from opacus import GradSampleModule

    from fedgate.training.trainer import FiniteDPOptimizer

    def step(inputs: torch.Tensor, targets: torch.Tensor, optimizer_class: type[DPOptimizer]) -> torch.Tensor:
        torch.manual_seed(0)
        layer = nn.Linear(3, 2)
        model = GradSampleModule(layer, batch_first=True, loss_reduction="sum")
        base = torch.optim.SGD(model.parameters(), lr=0.1)
        optimizer = optimizer_class(base, noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=4,
                                    loss_reduction="mean")  # fmt: skip
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(inputs), targets, reduction="sum").backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        return layer.weight.detach().clone()

    honest = torch.tensor([[0.1, 0.2, 0.3], [1.0, -1.0, 0.5], [0.3, 0.3, -0.2]])
    labels = torch.tensor([0, 1, 1])
    overflowing = torch.cat([honest, torch.tensor([[float("inf"), 0.0, 1.0]])])
    with_target = torch.cat([labels, torch.tensor([1])])
    without = step(honest, labels, FiniteDPOptimizer)
    guarded = step(overflowing, with_target, FiniteDPOptimizer)
    assert torch.isfinite(guarded).all() and torch.allclose(guarded, without)
    assert not torch.isfinite(step(overflowing, with_target, DPOptimizer)).all()  # Opacus alone: NaN everywhere


def test_weights_too_large_to_be_honest_are_refused_before_training() -> None:
    recipe = Recipe("small-cnn", 16, 2, "sgd", 0.1, 1, 8, 1.0, 1.0)
    torch.manual_seed(0)
    arrays = {k: v.detach().numpy().copy() for k, v in build_model("small-cnn", 2, 16).state_dict().items()}
    first = next(iter(arrays))
    arrays[first] = arrays[first].copy()
    arrays[first].flat[0] = 1e38  # finite, and far beyond any trained network's weights
    data = ImageSet(np.zeros((4, 16, 16), np.uint8), np.array([0, 1, 0, 1]), ("no", "yes"))
    with pytest.raises(RecipeError, match="magnitude") as err:
        train_dp(recipe, data, arrays)
    assert err.value.rule == "manifest.range"
