"""The hospital's own DP-SGD trainer: trusted mode runs this, and no research-team code.

Opacus does the three things the per-patient guarantee rests on: Poisson sampling (each
image joins each step independently with probability q), per-sample gradient clipping to
`max_grad_norm`, and Gaussian noise of standard deviation `noise_multiplier`·`max_grad_norm`
on the sum, divided by the recipe's expected batch. The number of steps and q come from
`planned_event(recipe, n)`; the hospital's accountant uses the same function, so what is
accounted is what ran (see tests/training). For a zoo model with a fixed first stage
(`FixedFeatureNetwork`, e.g. the scattering network) only the head is trained, on features
computed once per dataset; the guarantee is the same, since the features of one image depend
on that image alone.

Randomness: with `seed=None` (production) the sampling, augmentation, dropout and noise
generators are seeded from the OS (`secrets`); a seed is for tests and benchmarks only.
`secure_mode=True` makes Opacus draw each noise coordinate as the normalised sum of four
Gaussian draws (Holohan & Braghin 2021), which defeats attacks on the floating-point
representation of a single Gaussian sample (Jin et al. 2022) at 4x the cost of the noise;
the generator stays torch's (Mersenne Twister, seeded from the OS), since Opacus' own secure
mode needs `torchcsprng`, which is not installed here."""

from __future__ import annotations

import hashlib
import secrets
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from opacus.validators import ModuleValidator
from torch import nn

from fedgate.data.loaders import ImageSet
from fedgate.privacy.events import DpSgdEvent
from fedgate.training.errors import RecipeError
from fedgate.training.networks import FixedFeatureNetwork
from fedgate.training.plan import planned_event
from fedgate.training.recipe import Recipe
from fedgate.training.zoo import build_model, check_arrays


@dataclass(frozen=True)
class TrainResult:
    """What one local training produced. `steps`/`sample_rate`/`noise_multiplier` describe
    what ran; the hospital accounts from `planned_event` instead of trusting these."""

    arrays: dict[str, np.ndarray]
    steps: int
    sample_rate: float
    noise_multiplier: float
    num_examples: int
    train_loss: float

    @property
    def event(self) -> DpSgdEvent:
        return DpSgdEvent(self.sample_rate, self.noise_multiplier, self.steps)


class FiniteDPOptimizer(DPOptimizer):  # type: ignore[misc]
    """Opacus' DP optimizer, with one more rule before per-sample clipping: a sample whose
    gradient holds a NaN or an infinity contributes zero. Clipping alone does not cover it
    (C / NaN is NaN, and 0 x inf is NaN), and a server that chooses the weights can make one
    patient's gradient overflow while everyone else's stays finite: the reply would then be
    non-finite, and refused, exactly when that patient is in the data. A zero contribution is
    within the sensitivity every sample has, so the guarantee stays as accounted."""

    def clip_and_accumulate(self) -> None:
        samples = self.grad_samples
        if samples and len(samples[0]):
            finite = torch.ones(len(samples[0]), dtype=torch.bool, device=samples[0].device)
            for grad in samples:
                finite &= torch.isfinite(grad.reshape(len(grad), -1)).all(dim=1)
            if not bool(finite.all()):
                for grad in samples:  # the flat per-sample gradients are the parameters' own tensors
                    grad[~finite] = 0
        super().clip_and_accumulate()


def model_input(images: np.ndarray) -> torch.Tensor:
    """uint8 (n, h, w) to the zoo models' input: float32 (n, 1, h, w), (x/255 - 0.5)/0.25
    (the reference app's scaling, so a model moves between gated and trusted mode unchanged)."""
    return torch.from_numpy(images).float().div_(255.0).sub_(0.5).div_(0.25).unsqueeze(1)


_FEATURES: OrderedDict[tuple[str, int, bool, str], torch.Tensor] = OrderedDict()
_FEATURES_KEPT = 16


def fixed_features(model: FixedFeatureNetwork, images: np.ndarray, *, flip: bool = False) -> torch.Tensor:
    """The fixed first stage of `model` on uint8 `images` (horizontally flipped if asked),
    computed once per image set and kept in memory (it stays in this process): each round
    trains on the same hospital data, and a scattering transform costs far more than the head."""
    digest = hashlib.sha256(images.tobytes() + repr(images.shape).encode()).hexdigest()
    key = (type(model).__name__, int(images.shape[-1]), flip, digest)
    if key in _FEATURES:
        _FEATURES.move_to_end(key)
        return _FEATURES[key]
    pixels = model_input(images)
    if flip:
        pixels = pixels.flip(-1)
    features = torch.cat([model.features(pixels[i : i + 64]) for i in range(0, len(pixels), 64)])
    _FEATURES[key] = features
    while len(_FEATURES) > _FEATURES_KEPT:
        _FEATURES.popitem(last=False)
    return features


def refuse_unsafe_layers(model: nn.Module) -> None:
    """No BatchNorm (it mixes the samples of a batch: no per-sample gradient exists) and no
    buffers (state that would change in training yet never pass through clipping and noise)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm | nn.modules.instancenorm._InstanceNorm):
            raise RecipeError(
                "trainer.no-batchnorm", f"layer {name!r} is {type(module).__name__}; DP-SGD needs GroupNorm"
            )
    buffers = [name for name, _ in model.named_buffers()]
    if buffers:
        raise RecipeError("trainer.no-buffers", f"the model has buffers outside DP-SGD: {', '.join(buffers[:5])}")
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise RecipeError("trainer.opacus", f"Opacus cannot train this model privately: {errors[0]}")


def _check_data(recipe: Recipe, dataset: ImageSet) -> None:
    if len(dataset) < 1:
        raise RecipeError("data.size", "the hospital's training set is empty")
    if dataset.images.shape[1:] != (recipe.image_size, recipe.image_size):
        raise RecipeError(
            "data.image-size",
            f"the hospital's images are {dataset.images.shape[1:]}, the recipe wants {recipe.image_size}px: "
            "load the data at the recipe's size",
        )
    if int(dataset.labels.min()) < 0 or int(dataset.labels.max()) >= recipe.classes:
        raise RecipeError("data.classes", f"labels outside 0..{recipe.classes - 1} for a {recipe.classes}-class recipe")


def _seeds(seed: int | None) -> tuple[int, int]:
    """(data/dropout seed, noise seed): independent, and from the OS unless a seed is given."""
    if seed is None:
        return secrets.randbits(63), secrets.randbits(63)
    first, second = np.random.SeedSequence(seed).generate_state(2, dtype=np.uint64)
    return int(first) >> 1, int(second) >> 1


def train_dp(
    recipe: Recipe,
    dataset: ImageSet,
    initial_state: Mapping[str, np.ndarray],
    seed: int | None = None,
    *,
    secure_mode: bool = False,
) -> TrainResult:
    """Train the recipe's zoo model from `initial_state` on `dataset` with DP-SGD.

    Refuses (RecipeError) arrays that do not match the model's manifest exactly, data of the
    wrong size or labels, and models Opacus cannot make private. Validate the recipe against
    the hospital's policy (`validate_recipe`) before calling this."""
    return _train(recipe, dataset, initial_state, seed, secure_mode=secure_mode, add_noise=True)


def _train(
    recipe: Recipe,
    dataset: ImageSet,
    initial_state: Mapping[str, np.ndarray],
    seed: int | None,
    *,
    secure_mode: bool,
    add_noise: bool,
) -> TrainResult:
    """`add_noise=False` exists for the clipping test only (the bound holds before noise)."""
    _check_data(recipe, dataset)
    check_arrays(recipe.model, recipe.classes, recipe.image_size, initial_state)
    n = len(dataset)
    event = planned_event(recipe, n)
    data_seed, noise_seed = _seeds(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a shared 2-core host, 2 threads slow training 10-40x
    try:
        with torch.random.fork_rng(devices=[]):  # dropout draws from the global RNG: isolate it
            torch.manual_seed(data_seed)
            model = build_model(recipe.model, recipe.classes, recipe.image_size)
            model.load_state_dict({k: torch.from_numpy(np.array(v, copy=True)) for k, v in initial_state.items()})
            refuse_unsafe_layers(model)
            loss = _run(recipe, dataset, model, event, data_seed, noise_seed, secure_mode, add_noise)
    finally:
        torch.set_num_threads(threads)
    arrays = {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}
    return TrainResult(arrays, event.steps, event.sample_rate, event.noise_multiplier, n, loss)


def _run(
    recipe: Recipe,
    dataset: ImageSet,
    model: nn.Module,
    event: DpSgdEvent,
    data_seed: int,
    noise_seed: int,
    secure_mode: bool,
    add_noise: bool,
) -> float:
    labels = torch.from_numpy(dataset.labels)
    trained: nn.Module
    if isinstance(model, FixedFeatureNetwork):  # only the head trains: DP-SGD on precomputed features
        trained = model.head
        inputs = fixed_features(model, dataset.images)
        flipped = fixed_features(model, dataset.images, flip=True) if recipe.augment == "hflip" else inputs
    else:
        trained = model
        inputs = model_input(dataset.images)
        flipped = inputs.flip(-1) if recipe.augment == "hflip" else inputs
    sampling = torch.Generator().manual_seed(data_seed)
    noise = torch.Generator().manual_seed(noise_seed)
    private = GradSampleModule(trained, batch_first=True, loss_reduction="sum")
    base: torch.optim.Optimizer
    if recipe.optimizer == "sgd":
        base = torch.optim.SGD(private.parameters(), lr=recipe.lr)
    else:
        base = torch.optim.Adam(private.parameters(), lr=recipe.lr)
    optimizer = FiniteDPOptimizer(
        base,
        noise_multiplier=recipe.noise_multiplier if add_noise else 0.0,
        max_grad_norm=recipe.max_grad_norm,
        # The clipped, noised sum is divided by the recipe's expected batch B, a constant: q·n when
        # q < 1; when B >= n (q = 1, every image in every step) the step is scaled by n/B.
        expected_batch_size=recipe.batch_size,
        loss_reduction="mean",
        generator=noise,
        secure_mode=secure_mode,
    )
    sampler = UniformWithReplacementSampler(
        num_samples=len(dataset), sample_rate=event.sample_rate, generator=sampling, steps=event.steps
    )
    private.train()
    with warnings.catch_warnings():
        # Opacus' hooks fire on module outputs when the input needs no gradient; expected here.
        warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
        total, seen = _steps(recipe, private, optimizer, sampler, inputs, flipped, labels, sampling)
    private._close()  # remove Opacus' hooks and per-sample buffers from the network
    return total / max(seen, 1)


def _steps(
    recipe: Recipe,
    private: GradSampleModule,
    optimizer: FiniteDPOptimizer,
    sampler: UniformWithReplacementSampler,
    inputs: torch.Tensor,
    flipped: torch.Tensor,
    labels: torch.Tensor,
    sampling: torch.Generator,
) -> tuple[float, int]:
    total, seen = 0.0, 0
    for batch in sampler:  # exactly event.steps batches, possibly empty: the noise step still happens
        index = torch.as_tensor(batch, dtype=torch.long)
        x = inputs[index]
        if recipe.augment == "hflip" and len(index):
            flip = torch.rand(len(index), generator=sampling) < 0.5
            x[flip] = flipped[index][flip]
        optimizer.zero_grad(set_to_none=True)
        logits: torch.Tensor = private(x)
        loss = nn.functional.cross_entropy(logits, labels[index], reduction="sum")
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        total += float(loss.detach())
        seen += len(index)
    return total, seen
