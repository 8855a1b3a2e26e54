"""The gate's `[audit]` stage: before a train reply leaves, on audited rounds, attack that very
reply with the hospital's own images (`fedgate.audit.reply`) and record the scores.

- Which model: only a network of fedgate's zoo can be rebuilt here from the hospital's own
  code; the instruction's manifest must be exactly a zoo entry's (names, order, dtypes,
  shapes) for some class count and input size. Any other model is recorded as
  "not auditable: unknown architecture" and is not refused for it.
- Which images: `ImageSource`, handed to the gate by the executor (`images_of(HospitalData)`):
  the hospital's own images, never the research team's choice.
- What is recorded: the scores (`AuditResult.to_json`: verdict, PSNR, SSIM, rank, null
  ranks, candidates, seconds, ...) in the reply's ledger entry, never a picture. With
  `keep_images`, the pictures (true | reconstruction | null) go to HOSPITAL_DIR/audit/ and the
  entry records their file name and SHA-256, so a report can show them and check them.
- Refusal: with `refuse_if = "reidentifiable"`, a re-identifiable verdict is a refusal
  (rule `audit-reidentifiable`), and so is an audit that could not run (rule `audit-error`):
  fail closed. Nothing of the audit reaches the server either way.

Torch is imported only when a reply is audited: a gate with the audit off never loads it."""

from __future__ import annotations

import hashlib
import io
import logging
import os
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedgate.errors import GateRefusal
from fedgate.gate.evidence import StageEvidence
from fedgate.gate.manifest import Manifest
from fedgate.policy import Policy

log = logging.getLogger("fedgate.gate")

STAGE = "audit"
AUDIT_DIR = "audit"
UNKNOWN_ARCHITECTURE = "not auditable: unknown architecture"
MAX_IMAGE_SIZE = 512
# (image_size) -> (uint8 images (n, image_size, image_size), int labels (n,)): the hospital's own
ImageSource = Callable[[int], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class ZooMatch:
    name: str
    n_classes: int
    image_size: int

    def to_json(self) -> dict[str, Any]:
        return {"model": self.name, "classes": self.n_classes, "image_size": self.image_size}


def images_of(data: Any) -> ImageSource:
    """The images of a `fedgate.data.HospitalData` (train and local validation together: the
    hospital holds both, and a ClientApp can read both)."""

    def load(image_size: int) -> tuple[np.ndarray, np.ndarray]:
        train, validation = data.load(image_size)
        return (
            np.concatenate([train.images, validation.images]),
            np.concatenate([train.labels, validation.labels]).astype(np.int64),
        )

    return load


def match_zoo(manifest: Manifest, image_size_hint: int) -> ZooMatch | None:
    """The zoo entry (name, class count, input size) whose manifest is exactly `manifest`, or
    None. Sizes are tried from `image_size_hint`, then every size the entry takes up to 512."""
    from fedgate.training import zoo

    names = [t.name for t in manifest.tensors]
    for name in zoo.zoo_names():
        entry = zoo.zoo_entry(name)
        base = _valid_size(entry, image_size_hint)
        if [t.name for t in zoo.manifest(name, 2, base).tensors] != names:
            continue
        n_classes = _classes(name, base, manifest)
        if n_classes is None:
            continue
        sizes = [base, *range(entry.min_image_size, MAX_IMAGE_SIZE + 1, entry.image_size_multiple)]
        for size in dict.fromkeys(sizes):
            if size >= entry.min_image_size and zoo.manifest(name, n_classes, size) == manifest:
                return ZooMatch(name, n_classes, size)
    return None


def _valid_size(entry: Any, hint: int) -> int:
    size = max(hint, entry.min_image_size)
    return int(-(-size // entry.image_size_multiple) * entry.image_size_multiple)


def _classes(name: str, size: int, manifest: Manifest) -> int | None:
    """The class count, read from the first tensor whose shape depends on it."""
    from fedgate.training import zoo

    two, three = zoo.manifest(name, 2, size).tensors, zoo.manifest(name, 3, size).tensors
    for a, b, got in zip(two, three, manifest.tensors, strict=True):
        if a.shape != b.shape:
            axis = next(i for i, (x, y) in enumerate(zip(a.shape, b.shape, strict=True)) if x != y)
            classes = got.shape[axis] if len(got.shape) == len(a.shape) else 0
            return int(classes) if classes >= 2 else None
    return None


def audit_stage(
    policy: Policy,
    manifest: Manifest,
    received: Mapping[str, np.ndarray],
    sent: Mapping[str, np.ndarray],
    update_evidence: Any,
    images: ImageSource | None,
    keep_dir: Path | None,
    name: str,
) -> StageEvidence:
    """Audit one outgoing train reply (see the module's doc). `received`: the weights the
    server sent; `sent`: the outgoing tensors (after the clip and the noise); `update_evidence`:
    the update stage's `UpdateEvidence`; `name`: a file name stem for the kept pictures."""
    audit = policy.audit
    try:
        match = match_zoo(manifest, audit.image_size)
        if match is None:
            return StageEvidence(STAGE, True, {"auditable": False, "reason": UNKNOWN_ARCHITECTURE})
        result = _run(policy, match, received, sent, update_evidence, images)
        record: dict[str, Any] = {"auditable": True, **match.to_json(), **result.to_json()}
        if keep_dir is not None and audit.keep_images:
            record["images"] = _keep(keep_dir, name, result.images)
    except Exception as err:  # fail closed when the policy refuses on the audit's word
        detail = f"{type(err).__name__}: {err}"[:500]
        if audit.refuses:
            raise GateRefusal("audit-error", f"the leakage audit could not run: {detail}", error=detail) from err
        log.warning("the leakage audit could not run (recorded; refuse_if = never): %s", detail)
        return StageEvidence(STAGE, True, {"auditable": False, "reason": "audit failed", "error": detail})
    if result.verdict == "re-identifiable" and audit.refuses:
        raise GateRefusal(
            "audit-reidentifiable",
            f"the leakage audit rebuilt a patient from this reply (rank {result.rank} of {result.candidates}, "
            f"blind guess {result.null_rank})",
            **record,
        )
    return StageEvidence(STAGE, True, record)


def _run(
    policy: Policy,
    match: ZooMatch,
    received: Mapping[str, np.ndarray],
    sent: Mapping[str, np.ndarray],
    update_evidence: Any,
    images: ImageSource | None,
) -> Any:
    import torch

    from fedgate.audit.protection import Protection
    from fedgate.audit.reply import audit_reply
    from fedgate.training import zoo

    if images is None:
        raise ValueError("no images of this hospital are configured for the audit (set [audit] dataset)")
    pixels, labels = images(match.image_size)
    audit = policy.audit
    seed = new_seed()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = zoo.build_model(match.name, match.n_classes, match.image_size)
    state = model.state_dict()
    model.load_state_dict({k: torch.as_tensor(np.array(received[k])).to(v.dtype) for k, v in state.items()})
    update = {
        k: np.asarray(sent[k], dtype=np.float64) - np.asarray(received[k], dtype=np.float64)
        for k, v in received.items()
        if np.asarray(v).dtype.kind == "f"
    }
    protection = Protection.gate(policy.clip_norm, policy.noise_multiplier, policy.noise_mode, policy.hospitals)
    return audit_reply(
        model, update, pixels, labels, protection,
        sigma=float(update_evidence.sigma), signal_norm=float(update_evidence.norm * update_evidence.scale),
        n_classes=match.n_classes, candidates=audit.candidates, budget_s=audit.budget_s, steps=audit.steps,
        null_runs=audit.null_runs, seed=seed,
    )  # fmt: skip


def new_seed() -> int:
    """The audit's seed (its model's initial weights, null directions, attack starts): OS entropy;
    recorded with the scores. Tests replace this function to make an attack repeatable."""
    return secrets.randbits(63)


def _keep(folder: Path, name: str, images: Any) -> dict[str, str]:
    """true | reconstruction | null side by side as one PNG, readable by the hospital's user only."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    true, reconstruction, null = images.true, images.reconstruction, images.null
    gap = np.full((true.shape[0], 2), 255, dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(np.concatenate([true, gap, reconstruction, gap, null], axis=1)).save(buffer, format="PNG")
    data = buffer.getvalue()
    path = folder / f"{name}.png"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    return {"file": path.name, "sha256": hashlib.sha256(data).hexdigest()}
