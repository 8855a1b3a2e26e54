"""Which images a hospital's gate audits against (the `[audit]` stage): the hospital's own,
chosen by the hospital's policy and never by the research team.

- `[audit] dataset`, else `[training] dataset`: a real hospital's folder (`folder:DIR`,
  `dicom:DIR`, `npz:PATH`, `br35h`) — what `fedgate node` uses.
- In a simulation with neither set: the simulated hospital's own share, derived from the run
  config exactly as the reference app derives it (`fedgate.data.hospital_dataset`, which
  `tests/apps` holds equal to the app's split), so each gate audits against the images its
  ClientApp trained on."""

from __future__ import annotations

from collections.abc import Mapping

from fedgate.data.hospital import HospitalData, ShareSpec
from fedgate.policy import Policy


def configured_data(policy: Policy) -> HospitalData | None:
    """The hospital's images as its policy names them, or None (the audit off, or no dataset)."""
    chosen = policy.audit.dataset or policy.training.dataset
    return HospitalData(chosen) if policy.audit.enabled and chosen else None


def share_of(run_config: Mapping[str, object]) -> ShareSpec:
    """The reference app's data keys (kebab-case, `fedgate_medical.task.AppConfig`) as a ShareSpec."""
    default, config = ShareSpec(), run_config
    return ShareSpec(
        dataset=str(config.get("dataset", default.dataset)),
        image_size=int(str(config.get("image-size", default.image_size))),
        subset=int(str(config.get("subset", default.subset))),
        partition=str(config.get("partition", default.partition)),
        alpha=float(str(config.get("alpha", default.alpha))),
        test_fraction=float(str(config.get("test-fraction", default.test_fraction))),
        seed=int(str(config.get("seed", default.seed))),
    )


def simulated_data(policy: Policy, run_config: Mapping[str, object], index: int, hospitals: int) -> HospitalData | None:
    """The images simulated hospital `index` of `hospitals` audits against (None: the audit is off)."""
    if not policy.audit.enabled:
        return None
    configured = configured_data(policy)
    if configured is not None:
        return configured
    share = share_of(run_config)
    return HospitalData(share.dataset, share, index, hospitals)
