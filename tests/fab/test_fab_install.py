"""Installing a FAB: by hash, read-only, and nothing written anywhere when it is refused.

Every attempt lists the whole temporary tree before and after. Flower's own installer is run on
the version attack too, to show the attack is real: it writes outside its folder; ours does not."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from fab_builders import (
    SYMLINK,
    content_for,
    lying_bomb,
    make_fab,
    reference_fab,
    reference_files,
    reference_with,
)
from flwr.cli.install import install_from_fab

from fedgate.fab import FabInstallError, FabPolicy, FabRefused, install_fab
from fedgate.fab.archive import Member
from fedgate.fab.install import _write_file, _write_new

VERSION_ATTACK = {"project.version": "0.1.0/../../../../ESCAPED"}


def tree(root: Path) -> dict[str, tuple[str, int, int]]:
    """Every path under root: (kind, mode, size), links not followed."""
    listing = {}
    for folder, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            path = Path(folder, name)
            info = path.lstat()
            kind = "link" if stat.S_ISLNK(info.st_mode) else "dir" if stat.S_ISDIR(info.st_mode) else "file"
            listing[str(path.relative_to(root))] = (kind, stat.S_IMODE(info.st_mode), info.st_size)
    return listing


@pytest.fixture
def hospital(tmp_path: Path) -> Iterator[Path]:
    """A hospital folder inside a tree the test lists whole; yields where its FABs go."""
    (tmp_path / "hospital").mkdir()
    (tmp_path / "hospital" / "ledger.txt").write_text("the hospital's own files\n")
    (tmp_path / "elsewhere").mkdir()
    yield tmp_path / "hospital" / "fabs"
    for folder, dirs, _ in os.walk(tmp_path):  # read-only folders: let pytest clean up
        for name in dirs:
            os.chmod(Path(folder, name), 0o755)


def _attack_fabs() -> list[tuple[str, bytes, str]]:
    files = reference_files()

    def with_member(name: str, data: bytes = b"x = 1\n", **kwargs: object) -> bytes:
        return make_fab({**files, name: data}, **kwargs)  # type: ignore[arg-type]

    ghost_content = content_for({**files, "fedgate_medical/ghost.py": b"x"})
    tampered = dict(files)
    tampered["fedgate_medical/client_app.py"] = b"import os\n"
    return [
        ("version-traversal", reference_with(VERSION_ATTACK), "metadata-version"),
        ("version-slash", reference_with({"project.version": "1.0.0/x"}), "metadata-version"),
        ("name-traversal", reference_with({"project.name": "x/../../y"}), "metadata-name"),
        ("publisher-traversal", reference_with({"tool.flwr.app.publisher": "../../.."}), "metadata-publisher"),
        ("member-dotdot", with_member("../../elsewhere/evil.py"), "member-path"),
        ("member-nested-dotdot", with_member("fedgate_medical/../../../elsewhere/evil.py"), "member-path"),
        ("member-absolute", with_member("/tmp/fedgate-evil.py"), "member-path"),
        (
            "member-symlink",
            with_member("fedgate_medical/link.py", b"../../../elsewhere", attrs={"fedgate_medical/link.py": SYMLINK}),
            "member-type",
        ),
        ("content-mismatch", make_fab(tampered, content=content_for(files)), "content-mismatch"),
        (
            "content-unlisted",
            make_fab(files, extra={"fedgate_medical/hidden.py": b"import socket\n"}),
            "content-unlisted",
        ),
        ("content-absent", make_fab(files, content=ghost_content), "content-absent"),
        ("zip-bomb", lying_bomb(), "zip-bomb"),
        ("zip-bomb-honest", with_member("w.json", b"\0" * (50 << 20), compress=zipfile.ZIP_DEFLATED), "file-too-large"),
        ("too-many-files", make_fab({**files, **{f"m{i}.py": b"" for i in range(1000)}}), "too-many-files"),
        ("clientapp-outside", reference_with({"tool.flwr.app.components.clientapp": "os:system"}), "entry-point"),
    ]


ATTACKS = _attack_fabs()


@pytest.mark.parametrize(("fab", "rule"), [(fab, rule) for _, fab, rule in ATTACKS], ids=[a[0] for a in ATTACKS])
def test_refused_fab_writes_nothing_anywhere(hospital: Path, fab: bytes, rule: str) -> None:
    root = hospital.parents[1]
    before = tree(root)
    with pytest.raises(FabRefused) as caught:
        install_fab(fab, hospital, FabPolicy())
    assert caught.value.rule == rule
    assert caught.value.report is not None and caught.value.report.verdict == "refused"
    assert tree(root) == before  # not even the FAB folder was created
    assert not Path("/tmp/fedgate-evil.py").exists()


def test_unapproved_fab_is_refused_before_it_is_parsed(hospital: Path) -> None:
    root = hospital.parents[1]
    before = tree(root)
    policy = FabPolicy(approved=("sha256:" + "0" * 64,))
    for fab in (reference_fab(), b"not even a zip", lying_bomb()):
        with pytest.raises(FabRefused) as caught:
            install_fab(fab, hospital, policy)
        assert caught.value.rule == "fab-not-approved"
        report = caught.value.report
        assert report is not None and report.files == () and report.sha256 == hashlib.sha256(fab).hexdigest()
    assert tree(root) == before


def test_reference_fab_installs_read_only_under_its_hash(hospital: Path) -> None:
    root = hospital.parents[1]
    before = tree(root)
    fab = reference_fab()
    sha = hashlib.sha256(fab).hexdigest()
    installed = install_fab(fab, hospital, FabPolicy(approved=(f"sha256:{sha}",)))
    assert installed.path == hospital / sha and installed.sha256 == sha
    assert installed.client_app_ref == "fedgate_medical.client_app:app"
    assert installed.server_app_ref == "fedgate_medical.server_app:app"
    assert installed.report.accepted and installed.report.approval == "approved"

    after = tree(root)
    new = {path: entry for path, entry in after.items() if path not in before}
    assert all(path == "hospital/fabs" or path.startswith(f"hospital/fabs/{sha}") for path in new)
    assert {path: entry for path, entry in after.items() if path in before} == before
    assert after["hospital/fabs"][:2] == ("dir", 0o700)
    files = {p.removeprefix(f"hospital/fabs/{sha}/"): e for p, e in new.items() if e[0] == "file"}
    assert files.keys() == set(reference_files())  # CONTENT itself is not installed
    assert {mode for _, mode, _ in files.values()} == {0o444}
    assert all(mode == 0o555 for path, (kind, mode, _) in new.items() if kind == "dir" and path != "hospital/fabs")
    for name, data in reference_files().items():
        assert (installed.path / name).read_bytes() == data


def test_installed_client_app_imports_from_its_folder(hospital: Path) -> None:
    installed = install_fab(reference_fab(), hospital, FabPolicy())
    before = tree(installed.path)
    code = (
        "import sys, importlib; sys.path.insert(0, sys.argv[1]);"
        "module = importlib.import_module('fedgate_medical.client_app');"
        "assert module.__file__.startswith(sys.argv[1]), module.__file__;"
        "from flwr.clientapp import ClientApp; assert isinstance(module.app, ClientApp); print('ok')"
    )
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "FLWR_TELEMETRY_ENABLED": "0"}
    result = subprocess.run([sys.executable, "-c", code, str(installed.path)], capture_output=True, text=True, env=env)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]
    assert tree(installed.path) == before


def test_second_install_verifies_and_rewrites_nothing(hospital: Path) -> None:
    fab = reference_fab()
    first = install_fab(fab, hospital, FabPolicy())
    before = {
        path: (entry, Path(hospital.parents[1], path).lstat().st_mtime_ns)
        for path, entry in tree(hospital.parents[1]).items()
    }
    second = install_fab(fab, hospital, FabPolicy())
    assert second == first
    after = {
        path: (entry, Path(hospital.parents[1], path).lstat().st_mtime_ns)
        for path, entry in tree(hospital.parents[1]).items()
    }
    assert after == before


def _tamper_modify(path: Path) -> None:
    target = path / "fedgate_medical" / "client_app.py"
    os.chmod(target.parent, 0o755)
    os.chmod(target, 0o644)
    target.write_bytes(target.read_bytes() + b"\nimport os\n")
    os.chmod(target, 0o444)
    os.chmod(target.parent, 0o555)


def _tamper_extra(path: Path) -> None:
    os.chmod(path / "fedgate_medical", 0o755)
    (path / "fedgate_medical" / "__pycache__").mkdir()
    (path / "fedgate_medical" / "__pycache__" / "client_app.cpython-311.pyc").write_bytes(b"\0")
    os.chmod(path / "fedgate_medical", 0o555)


def _tamper_symlink(path: Path) -> None:
    target = path / "fedgate_medical" / "task.py"
    os.chmod(target.parent, 0o755)
    target.unlink()
    target.symlink_to("/etc/hostname")
    os.chmod(target.parent, 0o555)


def _tamper_writable(path: Path) -> None:
    os.chmod(path / "fedgate_medical" / "task.py", 0o666)


def _tamper_missing(path: Path) -> None:
    os.chmod(path / "fedgate_medical", 0o755)
    (path / "fedgate_medical" / "models.py").unlink()
    os.chmod(path / "fedgate_medical", 0o555)


@pytest.mark.parametrize("tamper", [_tamper_modify, _tamper_extra, _tamper_symlink, _tamper_writable, _tamper_missing])
def test_installed_copy_that_differs_is_refused(hospital: Path, tamper: object) -> None:
    fab = reference_fab()
    installed = install_fab(fab, hospital, FabPolicy())
    tamper(installed.path)  # type: ignore[operator]
    before = tree(hospital.parents[1])
    with pytest.raises(FabRefused) as caught:
        install_fab(fab, hospital, FabPolicy())
    assert caught.value.rule == "installed-copy-differs"
    assert caught.value.report is not None and caught.value.report.rule == "installed-copy-differs"
    assert tree(hospital.parents[1]) == before  # refused, not repaired behind the hospital's back


def test_a_symlink_in_place_of_the_folder_is_refused(hospital: Path, tmp_path: Path) -> None:
    fab = reference_fab()
    hospital.mkdir()
    (hospital / hashlib.sha256(fab).hexdigest()).symlink_to(tmp_path / "elsewhere")
    with pytest.raises(FabRefused) as caught:
        install_fab(fab, hospital, FabPolicy())
    assert caught.value.rule == "installed-copy-differs"
    assert list((tmp_path / "elsewhere").iterdir()) == []


def test_writer_refuses_traversal_even_without_the_check(hospital: Path) -> None:
    """Defence in depth: the writer's own guard, were a path ever to slip past the check."""
    root = hospital.parents[1]
    hospital.mkdir()
    before = tree(root)
    fd = os.open(hospital, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(FabInstallError):
            _write_new(fd, "0" * 64, [Member("ok.py", b""), Member("../../elsewhere/evil.py", b"x")])
    finally:
        os.close(fd)
    assert tree(root) == before  # the temporary folder is gone too


def test_writer_never_follows_or_reuses_an_existing_name(tmp_path: Path) -> None:
    """Files are created with O_EXCL|O_NOFOLLOW: a link planted where a member goes is not followed."""
    (tmp_path / "target.py").write_bytes(b"original\n")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "client_app.py").symlink_to(tmp_path / "target.py")
    (tmp_path / "folder" / "task.py").symlink_to(tmp_path / "dangling.py")
    fd = os.open(tmp_path / "folder", os.O_RDONLY | os.O_DIRECTORY)
    try:
        for name in ("client_app.py", "task.py"):
            with pytest.raises(FileExistsError):
                _write_file(fd, name, b"payload\n")
    finally:
        os.close(fd)
    assert (tmp_path / "target.py").read_bytes() == b"original\n"
    assert not (tmp_path / "dangling.py").exists()


def test_missing_hospital_folder_is_an_install_error(tmp_path: Path) -> None:
    with pytest.raises(FabInstallError):
        install_fab(reference_fab(), tmp_path / "no-such-hospital" / "fabs", FabPolicy())


def test_flowers_installer_writes_outside_its_folder_and_ours_does_not(hospital: Path, tmp_path: Path) -> None:
    """The attack is real: Flower 1.42 joins the FAB's version into its install path."""
    fab = reference_with(VERSION_ATTACK)
    flower_home = tmp_path / "hospital" / "flwr-home"
    with tempfile.TemporaryDirectory(dir=tmp_path / "elsewhere") as scratch:
        tempfile.tempdir, saved = scratch, tempfile.tempdir  # keep Flower's own temporary folder in the tree
        try:
            installed = install_from_fab(fab, install_dir=flower_home, skip_prompt=True)
        finally:
            tempfile.tempdir = saved
    escaped = [p for p in tmp_path.iterdir() if p.name.startswith("ESCAPED.")]
    assert escaped, "Flower no longer writes outside its folder: the attack test needs updating"
    assert installed.resolve() == escaped[0].resolve()
    assert not escaped[0].resolve().is_relative_to(flower_home)
    assert (escaped[0] / "fedgate_medical" / "client_app.py").is_file()  # all the FAB's files, outside

    before = tree(tmp_path)
    with pytest.raises(FabRefused) as caught:
        install_fab(fab, hospital, FabPolicy())
    assert caught.value.rule == "metadata-version"
    assert tree(tmp_path) == before
