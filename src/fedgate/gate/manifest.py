"""The declared shape of a model: ordered tensor names, dtypes and shapes, and its hash."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedgate.canonical import canonical_json


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple[int, ...]

    def to_json(self) -> list[Any]:
        return [self.name, self.dtype, list(self.shape)]


@dataclass(frozen=True)
class Manifest:
    tensors: tuple[TensorSpec, ...]

    @classmethod
    def of_arrays(cls, arrays: Mapping[str, np.ndarray]) -> Manifest:
        return cls(tuple(TensorSpec(name, str(a.dtype), tuple(int(d) for d in a.shape)) for name, a in arrays.items()))

    def to_json(self) -> list[Any]:
        return [t.to_json() for t in self.tensors]

    @property
    def hash(self) -> str:
        return hashlib.sha256(canonical_json(self.to_json())).hexdigest()

    @property
    def parameters(self) -> int:
        total = 0
        for tensor in self.tensors:
            count = 1
            for dim in tensor.shape:
                count *= dim
            total += count
        return total

    @property
    def float_coordinates(self) -> int:
        """How many coordinates the gate clips and noises: those of the float tensors."""
        return sum(math.prod(t.shape) for t in self.tensors if t.dtype.startswith("float"))

    def diff(self, other: Manifest) -> dict[str, Any]:
        """What `other` has that differs from self: missing, added and changed tensors."""
        mine = {t.name: t for t in self.tensors}
        theirs = {t.name: t for t in other.tensors}
        return {
            "missing": sorted(set(mine) - set(theirs)),
            "added": sorted(set(theirs) - set(mine)),
            "changed": {
                name: {"declared": mine[name].to_json()[1:], "got": theirs[name].to_json()[1:]}
                for name in sorted(set(mine) & set(theirs))
                if mine[name] != theirs[name]
            },
            "order_differs": [t.name for t in self.tensors] != [t.name for t in other.tensors]
            and set(mine) == set(theirs),
        }
