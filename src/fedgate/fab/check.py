"""The FAB check: pure, over the FAB's bytes, before anything of it is written or run.

Order: archive (size, zip structure, member names and types, declared and actual sizes) ->
CONTENT (every member listed with its hash and size, nothing else listed) -> pyproject.toml
(publisher, name, version, entry points inside the package, run-config defaults) -> approval.
The first failing rule refuses; `report.RULES` lists them all. Approval comes last here so that
`fedgate fab check` shows a hospital everything in a FAB it has not approved yet; the installer
asks for approval first, before the archive is parsed at all."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from fedgate.fab.archive import Member, read_members
from fedgate.fab.manifest import match_content
from fedgate.fab.members import CONTENT_PATH, PYPROJECT_PATH
from fedgate.fab.policy import FabPolicy
from fedgate.fab.project import AppProject, read_project
from fedgate.fab.report import FabFile, FabRefused, FabReport


@dataclass(frozen=True)
class VerifiedFab:
    """A FAB that passed every rule, with the exact bytes that were checked (CONTENT excluded)."""

    report: FabReport
    contents: tuple[Member, ...]


def inspect_fab(fab_bytes: bytes, policy: FabPolicy | None = None) -> FabReport:
    """The report on any FAB, accepted or refused; never raises for what is in the FAB."""
    try:
        return verify_fab(fab_bytes, policy).report
    except FabRefused as err:
        assert err.report is not None  # verify_fab attaches one to every refusal
        return err.report


def check_fab(fab_bytes: bytes, policy: FabPolicy | None = None) -> FabReport:
    """The report on an accepted FAB; raises FabRefused (with `.report`) otherwise."""
    return verify_fab(fab_bytes, policy).report


def refuse_unapproved(fab_bytes: bytes, policy: FabPolicy) -> None:
    """Raise FabRefused('fab-not-approved') when the policy lists approved FABs and this is not
    one; cheap, and safe to call before the archive is parsed."""
    sha256 = hashlib.sha256(fab_bytes).hexdigest()
    if policy.approval(sha256) != "not-approved":
        return
    err = FabRefused(
        "fab-not-approved",
        "this FAB's hash is not in the policy's [fab] approved list; after reviewing it with "
        f'`fedgate fab check`, add "sha256:{sha256}" there to approve it',
        sha256=f"sha256:{sha256}",
    )
    err.report = _report(fab_bytes, sha256, policy, (), None, err)
    raise err


def verify_fab(fab_bytes: bytes, policy: FabPolicy | None = None) -> VerifiedFab:
    """The check, keeping the verified bytes for the installer (so it writes exactly what was
    checked, inflated once); raises FabRefused with `.report` on the first failing rule."""
    policy = policy or FabPolicy()
    sha256 = hashlib.sha256(fab_bytes).hexdigest()
    files: tuple[FabFile, ...] = ()
    project: AppProject | None = None
    try:
        members = read_members(fab_bytes, policy)
        files = match_content(members)
        by_name = {m.name: m for m in members}
        if PYPROJECT_PATH not in by_name:
            raise FabRefused("pyproject", "the FAB has no pyproject.toml at its root")
        project = read_project(by_name[PYPROJECT_PATH].data, by_name.keys())
        refuse_unapproved(fab_bytes, policy)
    except FabRefused as err:
        err.report = _report(fab_bytes, sha256, policy, files, project, err)  # with all the check found
        raise
    report = _report(fab_bytes, sha256, policy, files, project, None)
    return VerifiedFab(report, tuple(m for m in members if m.name != CONTENT_PATH))


def _report(
    fab_bytes: bytes,
    sha256: str,
    policy: FabPolicy,
    files: tuple[FabFile, ...],
    project: AppProject | None,
    err: FabRefused | None,
) -> FabReport:
    return FabReport(
        sha256=sha256,
        fab_bytes=len(fab_bytes),
        verdict="accepted" if err is None else "refused",
        rule=None if err is None else err.rule,
        reason=None if err is None else err.reason,
        detail=() if err is None else tuple(sorted(err.detail.items())),
        approval=policy.approval(sha256),
        publisher=project.publisher if project else None,
        name=project.name if project else None,
        version=project.version if project else None,
        client_app=project.client_app if project else None,
        server_app=project.server_app if project else None,
        files=files,
        run_config=project.run_config if project else (),
    )
