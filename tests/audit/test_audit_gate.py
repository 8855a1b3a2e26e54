"""The `[audit]` gate stage: before a train reply leaves, the gate attacks that very reply with
the hospital's own images and records the scores; `refuse_if = "reidentifiable"` stops a
reply that gives a patient back.

The ClientApp here is the attacker's: its "update" is one patient's gradient at the weights the
server sent (the zoo's SmallCNN at 16x16), which the gate clips to C = 1 and, in the raw
setting, does not noise (z = 0). Inverting Gradients then rebuilds that patient (rank 1 among
the hospital's 64 images, ahead of every null run)."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

import fedgate.gate.audit
from audit_fixtures import one_thread, shapes  # noqa: F401  (one_thread: an autouse fixture)
from conftest import gate_for, instruction, through_gate
from fedgate.audit.policy import AuditPolicy
from fedgate.audit.scoring import NOT_DISTINGUISHABLE, REIDENTIFIED
from fedgate.audit.sources import to_model_space
from fedgate.errors import PolicyError
from fedgate.gate.audit import UNKNOWN_ARCHITECTURE, match_zoo
from fedgate.gate.manifest import Manifest
from fedgate.ledger.store import Ledger
from fedgate.policy.model import parse_policy
from fedgate.report.facts import read_facts
from fedgate.report.render import render_facts
from fedgate.training import zoo
from malicious_apps import honest

SIZE = 16
IMAGES = shapes(64, SIZE)
LABELS = np.arange(64, dtype=np.int64) % 2
PATIENT = 3
# Tiny and quick, and with no time budget in play (no wall-clock threshold in a test).
FAST = AuditPolicy(every_rounds=1, steps=300, null_runs=3, budget_s=1e6, candidates=0, image_size=SIZE)


def images(size: int) -> tuple[np.ndarray, np.ndarray]:
    assert size == SIZE
    return IMAGES, LABELS


def global_model() -> dict[str, np.ndarray]:
    torch.manual_seed(0)
    network = zoo.build_model("small-cnn", 2, SIZE)
    return {k: v.detach().numpy().copy() for k, v in network.state_dict().items()}


def leak_one_patient(ins: Message) -> Message:
    """The attacker's ClientApp: its update is patient PATIENT's gradient, scaled to the clip ball."""
    received = ins.content.array_records["arrays"].to_numpy_ndarrays()
    network = zoo.build_model("small-cnn", 2, SIZE)
    names = list(network.state_dict())
    network.load_state_dict({n: torch.from_numpy(a.copy()) for n, a in zip(names, received, strict=True)})
    network.eval()
    loss = torch.nn.functional.cross_entropy(network(to_model_space(IMAGES[PATIENT][None])), torch.tensor([1]))
    loss.backward()
    grads = {n: p.grad.numpy() for n, p in network.named_parameters()}
    norm = float(np.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) for g in grads.values())))
    arrays = {n: Array((a - grads[n] / norm).astype(a.dtype)) if n in grads else Array(a)
              for n, a in zip(names, received, strict=True)}  # fmt: skip
    content = RecordDict({"arrays": ArrayRecord(arrays), "metrics": MetricRecord({"num-examples": 1})})
    return Message(content, reply_to=ins)


def gate(tmp_path: Path, audit: AuditPolicy, noise: float = 0.0, with_images: bool = True):  # type: ignore[no-untyped-def]
    g = gate_for(tmp_path, audit=audit, noise_multiplier=noise)
    if with_images:
        g.images = images
    return g


def audit_stage(outcome) -> dict:  # type: ignore[no-untyped-def]
    stages = [s for s in outcome.decision.stages if s.stage.startswith("audit")]
    assert len(stages) == 1
    return stages[0].detail


@pytest.fixture(scope="module")
def refused(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """One attacker's reply through a gate that audits and refuses (shared: the attack runs once)."""
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("refused")
    g = gate(folder, FAST)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fedgate.gate.audit, "new_seed", lambda: 1)
        out = through_gate(g, instruction(tensors=global_model()), leak_one_patient)
    g.close()
    return folder, out


@pytest.fixture
def seeded(monkeypatch: pytest.MonkeyPatch) -> None:
    """A repeatable attack (in production the seed is OS entropy, recorded with the scores)."""
    monkeypatch.setattr(fedgate.gate.audit, "new_seed", lambda: 1)


def test_a_reidentifiable_reply_is_refused_and_its_scores_recorded(refused) -> None:  # type: ignore[no-untyped-def]
    folder, out = refused
    assert not out.decision.sent and out.decision.rule == "audit-reidentifiable"
    assert out.message is not None and out.message.has_error() and not out.message.has_content()
    with Ledger(folder / "hospital-0" / "ledger", create=False) as ledger:
        entry = ledger.entries()[out.seq]
    assert entry["kind"] == "reply-refused" and entry["decision"]["rule"] == "audit-reidentifiable"
    detail = entry["decision"]["detail"]
    assert detail["verdict"] == REIDENTIFIED and detail["rank"] == 1 and detail["null_rank"] > 1
    assert detail["candidates"] == 64 and detail["model"] == "small-cnn" and detail["image_size"] == SIZE
    assert {"psnr", "ssim", "seconds", "null_ranks", "target_cosine"} <= set(detail)
    kept = folder / "hospital-0" / "audit" / detail["images"]["file"]
    assert kept.is_file() and (kept.stat().st_mode & 0o077) == 0  # pictures stay, private, at the hospital
    assert kept.name not in str(out.message)


def test_the_report_says_it_in_words_and_shows_pictures_only_when_asked(refused) -> None:  # type: ignore[no-untyped-def]
    folder, _ = refused
    facts = read_facts(folder / "hospital-0")
    plain = render_facts(facts)
    assert "re-identifiable: the attack rebuilt a patient from this reply (refused" in plain
    assert "ranked 1 of 64" in plain and 'class="audit-image"' not in plain
    assert "PATIENT IMAGES" not in plain
    pictured = render_facts(facts, with_images=True)
    body = pictured.split("<body>", 1)[1].lstrip()
    assert body.startswith('<p class="tampered" id="patient-images">THIS REPORT CARRIES PATIENT IMAGES')
    assert 'class="audit-image"' in pictured
    kept = next((folder / "hospital-0" / "audit").iterdir())
    kept.write_bytes(kept.read_bytes() + b"x")  # a picture altered after the fact is not shown
    assert 'class="audit-image"' not in render_facts(facts, with_images=True)
    assert "not the one the ledger recorded" in render_facts(facts, with_images=True)


@pytest.mark.usefixtures("seeded")
def test_without_the_refusal_the_same_reply_leaves_with_its_scores(tmp_path: Path) -> None:
    """The control for the test above: the attack re-identifies, and only `refuse_if` stops it."""
    g = gate(tmp_path, dataclasses.replace(FAST, refuse_if="never", keep_images=False))
    out = through_gate(g, instruction(tensors=global_model()), leak_one_patient)
    assert out.decision.sent
    detail = audit_stage(out)
    assert detail["verdict"] == REIDENTIFIED and detail["rank"] == 1 and "images" not in detail
    assert g.ledger.entries()[out.seq]["decision"]["stages"][-1]["detail"]["verdict"] == REIDENTIFIED


@pytest.mark.slow
@pytest.mark.usefixtures("seeded")
def test_heavy_gate_noise_makes_the_same_reply_a_blind_guess(tmp_path: Path) -> None:
    g = gate(tmp_path, FAST, noise=1.0)
    out = through_gate(g, instruction(tensors=global_model()), leak_one_patient)
    assert out.decision.sent
    assert audit_stage(out)["verdict"] == NOT_DISTINGUISHABLE


def test_an_unknown_architecture_is_recorded_as_not_auditable(tmp_path: Path) -> None:
    g = gate(tmp_path, FAST)
    out = through_gate(g, instruction(), honest)  # the tests' tiny model is no zoo model
    assert out.decision.sent
    assert audit_stage(out) == {"auditable": False, "reason": UNKNOWN_ARCHITECTURE}


def test_an_audit_that_cannot_run_is_a_refusal_when_the_policy_refuses(tmp_path: Path) -> None:
    g = gate(tmp_path, FAST, with_images=False)  # no images configured: the audit cannot run
    out = through_gate(g, instruction(tensors=global_model()), leak_one_patient)
    assert not out.decision.sent and out.decision.rule == "audit-error"
    recorded = gate(tmp_path / "b", dataclasses.replace(FAST, refuse_if="never"), with_images=False)
    out = through_gate(recorded, instruction(tensors=global_model()), leak_one_patient)
    assert out.decision.sent and audit_stage(out)["reason"] == "audit failed"


def test_only_the_policys_rounds_are_audited(tmp_path: Path) -> None:
    g = gate(tmp_path, dataclasses.replace(FAST, every_rounds=2), with_images=False)
    rules = []
    for _ in range(3):
        out = through_gate(g, instruction(tensors=global_model()), leak_one_patient)
        rules.append(out.decision.rule)
    assert rules == ["audit-error", "", "audit-error"]  # gate rounds 1 and 3 audited, 2 not
    assert [AuditPolicy(every_rounds=3).audits(r) for r in range(1, 8)] == [True, False, False, True, False, False,
                                                                            True]  # fmt: skip


def test_audit_off_leaves_the_gate_as_it_was(tmp_path: Path) -> None:
    g = gate(tmp_path, AuditPolicy(), with_images=False)
    out = through_gate(g, instruction(tensors=global_model()), leak_one_patient)
    assert out.decision.sent and not [s for s in out.decision.stages if s.stage.startswith("audit")]
    assert "audit" not in g.policy.to_json()  # and the policy's hash is the one it had before [audit]


def test_the_gate_imports_no_torch_with_the_audit_off() -> None:
    import subprocess

    code = "import sys, fedgate.gate.pipeline, fedgate.executor.hospital; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_zoo_manifests_are_recognised_with_their_classes_and_size() -> None:
    for classes, size in ((2, 16), (3, 64), (4, 48)):
        match = match_zoo(zoo.manifest("small-cnn", classes, size), 64)
        assert match is not None and (match.name, match.n_classes, match.image_size) == ("small-cnn", classes, size)
    assert match_zoo(Manifest.of_arrays({"w": np.zeros((2, 3), np.float32)}), 64) is None


def test_the_audit_table_is_checked() -> None:
    base = "[audit]\nevery_rounds = 2\n"
    assert parse_policy(base).audit.every_rounds == 2
    for bad in ("refuse_if = 'sometimes'", "budget_s = 0", "steps = 0", "candidates = 1", "every = 3"):
        with pytest.raises(PolicyError, match="audit"):
            parse_policy(base + bad + "\n")
