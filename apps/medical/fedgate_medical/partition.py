"""The reference app's partitioning: re-exported from `fedgate.data.partition`, shared with the
hospital's own trainer so that both see exactly the same shares."""

from __future__ import annotations

from fedgate.data.partition import Split, dirichlet, held_out_split, iid, partition

__all__ = ["Split", "dirichlet", "held_out_split", "iid", "partition"]
