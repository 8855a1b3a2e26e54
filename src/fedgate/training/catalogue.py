"""The zoo's entries as plain data (no torch): what a recipe and a policy may name.

The hospital's policy and the recipe parser check names and input sizes against this
catalogue without importing torch (2-3 s); `zoo` adds each entry's network builder and
holds the two in step."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from fedgate.training.errors import RecipeError


@dataclass(frozen=True)
class ModelSpec:
    """One zoo entry. `image_size_multiple` / `min_image_size`: input sizes the network accepts."""

    name: str
    summary: str
    min_image_size: int
    image_size_multiple: int

    def check_image_size(self, image_size: int) -> None:
        if image_size < self.min_image_size or image_size % self.image_size_multiple:
            raise RecipeError(
                "recipe.image-size",
                f"{self.name} takes images of at least {self.min_image_size} pixels, a multiple of "
                f"{self.image_size_multiple}; got {image_size}",
                key="recipe.image-size",
                value=image_size,
            )


CATALOGUE: Mapping[str, ModelSpec] = MappingProxyType(
    {
        spec.name: spec
        for spec in (
            ModelSpec("small-cnn", "4 conv blocks with GroupNorm, flat linear head (63k parameters at 64x64)", 16, 16),
            ModelSpec("resnet18-gn", "ResNet-18 layout with GroupNorm (11M parameters)", 8, 8),
            ModelSpec(
                "densenet121-gn", "MONAI DenseNet121, 2-D, GroupNorm(8), out-of-place ReLU (7M parameters)", 32, 32
            ),
            ModelSpec(
                "scatternet-linear",
                "fixed wavelet scattering (J=2, L=8), GroupNorm, one linear layer (41k parameters at 64x64)",
                16,
                4,
            ),
        )
    }
)


def model_spec(name: str) -> ModelSpec:
    spec = CATALOGUE.get(name)
    if spec is None:
        raise RecipeError(
            "recipe.model", f"{name!r} is not in fedgate's zoo ({', '.join(CATALOGUE)})", key="recipe.model", value=name
        )
    return spec
