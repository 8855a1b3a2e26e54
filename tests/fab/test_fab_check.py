"""The FAB check: the reference app passes; each crafted FAB is refused by the rule meant for it."""

from __future__ import annotations

import io
import json
import posixpath
import re
import stat
import zipfile

import pytest
from fab_builders import (
    SYMLINK,
    content_for,
    lying_bomb,
    make_fab,
    patch_member,
    reference_fab,
    reference_files,
    reference_with,
    unix_attr,
)
from flwr.common.constant import FAB_INCLUDE_PATTERNS, FAB_MAX_SIZE
from flwr.supercore.constant import MAX_FILE_BYTES, MAX_FILE_COUNT, MAX_TOTAL_BYTES
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedgate.errors import PolicyError
from fedgate.fab import RULES, FabPolicy, FabRefused, check_fab, flower_rules, inspect_fab, parse_fab_policy
from fedgate.fab.members import ALLOWED_SUFFIXES, check_path


def refused(fab: bytes, rule: str, policy: FabPolicy | None = None) -> FabRefused:
    with pytest.raises(FabRefused) as caught:
        check_fab(fab, policy)
    assert caught.value.rule == rule, caught.value
    assert caught.value.report is not None and caught.value.report.rule == rule
    assert caught.value.report.verdict == "refused"
    assert inspect_fab(fab, policy) == caught.value.report
    return caught.value


def test_reference_fab_passes_with_everything_a_hospital_needs() -> None:
    report = check_fab(reference_fab())
    assert report.accepted and report.rule is None
    assert (report.publisher, report.name, report.version) == ("fedgate", "fedgate-medical", "0.1.0")
    assert report.client_app == "fedgate_medical.client_app:app"
    assert report.server_app == "fedgate_medical.server_app:app"
    paths = [f.path for f in report.files]
    assert "fedgate_medical/client_app.py" in paths and "pyproject.toml" in paths and ".info/CONTENT" not in paths
    assert paths == sorted(paths)
    defaults = {c.key: (c.kind, c.value) for c in report.run_config}
    assert defaults["lr"] == ("float", "0.001") and defaults["dataset"] == ("str", "br35h")
    assert report.fab_ref == f"sha256:{report.sha256}" and re.fullmatch(r"[0-9a-f]{64}", report.sha256)


def test_report_is_canonical_json_without_floats() -> None:
    report = check_fab(reference_fab())
    decoded = json.loads(report.canonical())
    assert decoded == report.to_json() and decoded["schema"] == "fedgate.fab-report/1"
    assert report.canonical() == check_fab(reference_fab()).canonical()
    assert re.fullmatch(r"[0-9a-f]{64}", report.digest)


def test_defaults_are_flowers_publishing_limits() -> None:
    policy = FabPolicy()
    assert (policy.max_files, policy.max_total_bytes, policy.max_file_bytes, policy.max_fab_bytes) == (
        MAX_FILE_COUNT,
        MAX_TOTAL_BYTES,
        MAX_FILE_BYTES,
        FAB_MAX_SIZE,
    )


def test_allowed_kinds_are_flowers_fab_include_patterns() -> None:
    """Contract test: if a Flower upgrade changes what `flwr build` packs, this fails loudly."""
    suffixes = sorted(p.removeprefix("**/*") for p in FAB_INCLUDE_PATTERNS if p.startswith("**/*."))
    assert suffixes == sorted(ALLOWED_SUFFIXES)
    assert sorted(p for p in FAB_INCLUDE_PATTERNS if not p.startswith("**/*.")) == ["/LICENSE"]


def test_flower_rules_are_the_ones_fedgate_was_written_against() -> None:
    """Contract test for fab/flower_rules.py: an upgrade that changes Flower's rules fails here."""
    assert flower_rules.APP_VERSION_PATTERN == r"^\d+\.\d+\.\d+$"
    assert flower_rules.APP_ID_PATTERN == r"^@[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+$"
    assert (flower_rules.MAX_NAME_LENGTH, flower_rules.MAX_DIR_DEPTH) == (32, 10)
    assert flower_rules.is_valid_name("fedgate-medical") == (True, "")
    assert not flower_rules.is_valid_name("a/b")[0] and not flower_rules.is_valid_name("..")[0]
    valid, errors, _ = flower_rules.validate_config({"project": {}}, check_module=False)
    assert not valid and errors


# ---- metadata: Flower joins these into its install path ----------------------------------------


@pytest.mark.parametrize(
    ("edit", "rule"),
    [
        ({"project.version": "0.1.0/../../../../ESCAPED"}, "metadata-version"),
        ({"project.version": "../../x"}, "metadata-version"),
        ({"project.version": "0.1.0\n"}, "metadata-version"),
        ({"project.version": "\u0660.\u0661.\u0660"}, "metadata-version"),  # Arabic-Indic digits match \d
        ({"project.version": "1.0"}, "metadata-version"),
        ({"project.version": None}, "metadata-version"),
        ({"project.name": "x/../../../y"}, "metadata-name"),
        ({"project.name": ".."}, "metadata-name"),
        ({"project.name": "f\u0435dgate"}, "metadata-name"),  # Cyrillic e: Flower's isalpha() accepts it
        ({"tool.flwr.app.publisher": "../../.."}, "metadata-publisher"),
        ({"tool.flwr.app.publisher": "a/b"}, "metadata-publisher"),
        ({"tool.flwr.app.publisher": "fed.gate"}, "metadata-publisher"),
        ({"tool.flwr.app.publisher": 7}, "metadata-publisher"),
    ],
)
def test_metadata_outside_strict_patterns_is_refused(edit: dict[str, object], rule: str) -> None:
    error = refused(reference_with(edit), rule)
    assert error.report is not None and error.report.files  # CONTENT matched: only the metadata is wrong


# ---- member paths and types --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "rule"),
    [
        ("../evil.py", "member-path"),
        ("fedgate_medical/../../evil.py", "member-path"),
        ("/tmp/evil.py", "member-path"),
        ("..\\..\\evil.py", "member-path"),
        ("fedgate_medical\\evil.py", "member-path"),
        ("fedgate_medical//evil.py", "member-path"),
        ("./evil.py", "member-path"),
        ("C:/evil.py", "member-path"),
        ("fedgate_medical/evil .py", "member-path"),
        ("fedgate_medical/\u0435vil.py", "member-path"),
        ("a/b/c/d/e/f/g/h/i/j/k.py", "member-path"),
        ("fedgate_medical/", "member-type"),
        ("fedgate_medical/__pycache__/client_app.cpython-311.pyc", "member-kind"),
        ("fedgate_medical/evil.so", "member-kind"),
        ("fedgate_medical/evil.pth", "member-kind"),
        (".info/EXTRA", "member-kind"),
    ],
)
def test_member_names_are_plain_relative_paths(name: str, rule: str) -> None:
    files = {**reference_files(), name: b"print('hello')\n"}
    refused(make_fab(files), rule)


def test_nul_in_a_member_name_is_refused() -> None:
    files = {**reference_files(), "fedgate_medical/evilXpy.py": b"x = 1\n"}
    fab = patch_member(make_fab(files), "fedgate_medical/evilXpy.py", name=b"fedgate_medical/evil\0py.py")
    refused(fab, "member-path")


@pytest.mark.parametrize(
    "attr",
    [
        SYMLINK,
        unix_attr(stat.S_IFDIR, 0o755),
        unix_attr(stat.S_IFCHR),
        unix_attr(stat.S_IFBLK),
        unix_attr(stat.S_IFIFO),
        unix_attr(stat.S_IFSOCK),
        0x10,  # MS-DOS directory bit
    ],
)
def test_links_devices_and_folders_are_refused(attr: int) -> None:
    files = {**reference_files(), "fedgate_medical/link.py": b"/etc/passwd"}
    refused(make_fab(files, attrs={"fedgate_medical/link.py": attr}), "member-type")


def test_regular_file_attributes_pass() -> None:
    files = {**reference_files(), "fedgate_medical/extra.py": b"x = 1\n"}
    check_fab(make_fab(files, attrs={"fedgate_medical/extra.py": unix_attr(stat.S_IFREG, 0o755)}))


@pytest.mark.parametrize(
    "names",
    [
        ["fedgate_medical/a.py", "fedgate_medical/A.py"],
        ["fedgate_medical/x.py", "fedgate_medical/x.py/y.py"],
        ["fedgate_medical/Sub.py", "fedgate_medical/sub.py/y.py"],
    ],
)
def test_duplicates_and_file_folder_clashes_are_refused(names: list[str]) -> None:
    files = {**reference_files(), **{name: b"x = 1\n" for name in names}}
    refused(make_fab(files), "member-duplicate")


def test_exact_duplicate_members_are_refused() -> None:
    buffer = io.BytesIO(reference_fab())
    with pytest.warns(UserWarning, match="Duplicate name"), zipfile.ZipFile(buffer, "a") as archive:
        archive.writestr("fedgate_medical/client_app.py", b"import os\n")
    refused(buffer.getvalue(), "member-duplicate")


# ---- CONTENT -----------------------------------------------------------------------------------


def test_content_hash_mismatch_is_refused() -> None:
    files = reference_files()
    content = content_for(files)
    files["fedgate_medical/client_app.py"] += b"\nimport os; os.system('id')\n"
    error = refused(make_fab(files, content=content), "content-mismatch")
    assert error.detail["member"] == "fedgate_medical/client_app.py"


def test_content_size_mismatch_is_refused() -> None:
    files = reference_files()
    lines = content_for(files).split("\n")
    path, digest, bits = lines[1].split(",")
    lines[1] = f"{path},{digest},{int(bits) + 8}"
    refused(make_fab(files, content="\n".join(lines)), "content-mismatch")


def test_member_not_in_content_is_refused() -> None:
    fab = make_fab(reference_files(), extra={"fedgate_medical/hidden.py": b"import socket\n"})
    refused(fab, "content-unlisted")


def test_content_entry_without_member_is_refused() -> None:
    files = reference_files()
    content = content_for({**files, "fedgate_medical/ghost.py": b"x"})
    refused(make_fab(files, content=content), "content-absent")


ZEROS = "0" * 64


@pytest.mark.parametrize(
    "content",
    [
        "not,a,line",
        "pyproject.toml,abc,8",
        f"pyproject.toml,{ZEROS},7",
        "",
        f"pyproject.toml,{ZEROS},8\npyproject.toml,{ZEROS},8",
        f"pyproject.toml,{ZEROS},8\r",
    ],
)
def test_malformed_content_is_refused(content: str) -> None:
    refused(make_fab(reference_files(), content=content), "content-format")


def test_missing_content_is_refused() -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in reference_files().items():
            archive.writestr(name, data)
    refused(buffer.getvalue(), "content-missing")


# ---- sizes and bombs ---------------------------------------------------------------------------


def test_zip_bomb_declared_honestly_is_refused_before_inflating() -> None:
    files = {**reference_files(), "fedgate_medical/weights.json": b"\0" * (50 * 1024 * 1024)}
    fab = make_fab(files, compress=zipfile.ZIP_DEFLATED)
    assert len(fab) < 200_000
    refused(fab, "file-too-large")
    roomy = FabPolicy(max_file_bytes=100 * 1024 * 1024, max_total_bytes=100 * 1024 * 1024)
    refused(fab, "zip-ratio", roomy)


def test_zip_bomb_with_lying_headers_is_stopped_while_inflating() -> None:
    fab = lying_bomb(declared=1000)
    with zipfile.ZipFile(io.BytesIO(fab)) as archive:  # what a header-trusting reader sees: a small valid file
        assert archive.read("fedgate_medical/weights.json") == b"\0" * 1000
    error = refused(fab, "zip-bomb")
    assert error.detail["member"] == "fedgate_medical/weights.json"


def test_lying_bomb_under_the_ratio_floor_is_still_a_bomb() -> None:
    refused(lying_bomb(declared=10, inflated=60_000), "zip-bomb")


def test_too_many_files_is_refused() -> None:
    files = {**reference_files(), **{f"fedgate_medical/m{i}.py": b"" for i in range(20)}}
    refused(make_fab(files), "too-many-files", FabPolicy(max_files=20))


def test_total_size_is_bounded() -> None:
    files = {**reference_files(), **{f"fedgate_medical/m{i}.json": b"1" * 60_000 for i in range(3)}}
    refused(make_fab(files), "total-too-large", FabPolicy(max_total_bytes=150_000))


def test_fab_size_is_bounded() -> None:
    refused(reference_fab(), "fab-size", FabPolicy(max_fab_bytes=1000))


# ---- zip structure -----------------------------------------------------------------------------


@pytest.mark.parametrize("fab", [b"", b"not a zip", b"PK\x03\x04" + b"\0" * 100])
def test_not_a_zip_is_refused(fab: bytes) -> None:
    refused(fab, "zip-malformed")


def test_empty_zip_has_no_content() -> None:
    refused(b"PK\x05\x06" + b"\0" * 18, "content-missing")


def test_truncated_fab_is_refused() -> None:
    refused(reference_fab()[:-100], "zip-malformed")


def test_prepended_bytes_are_refused() -> None:
    refused(b"#!/bin/sh\nrm -rf /\n" + reference_fab(), "zip-malformed")


def test_overlapping_members_are_refused() -> None:
    fab = reference_fab()
    with zipfile.ZipFile(io.BytesIO(fab)) as archive:
        first = archive.infolist()[0]
    refused(patch_member(fab, "fedgate_medical/__init__.py", header_offset=first.header_offset), "zip-malformed")


def test_corrupted_member_is_refused() -> None:
    fab = bytearray(reference_fab())
    with zipfile.ZipFile(io.BytesIO(bytes(fab))) as archive:
        info = archive.getinfo("fedgate_medical/client_app.py")
    data_start = info.header_offset + 30 + len(info.filename)
    fab[data_start + 10] ^= 0xFF
    refused(bytes(fab), "zip-malformed")


def test_unsupported_compression_is_refused() -> None:
    refused(make_fab(reference_files(), compress=zipfile.ZIP_BZIP2), "zip-unsupported")


def test_deflated_fab_passes() -> None:
    assert check_fab(make_fab(reference_files(), compress=zipfile.ZIP_DEFLATED)).accepted


# ---- pyproject: entry points and run config ----------------------------------------------------


@pytest.mark.parametrize(
    "clientapp",
    [
        "os:system",
        "fedgate:main",  # the hospital's own package: present in the node's environment, not in the FAB
        "fedgate_medical.nothere:app",
        "fedgate_medical.client_app",
        "fedgate_medical/client_app.py:app",
        "../fedgate_medical.client_app:app",
        7,
    ],
)
def test_clientapp_must_be_inside_the_package(clientapp: object) -> None:
    refused(reference_with({"tool.flwr.app.components.clientapp": clientapp}), "entry-point")


def test_serverapp_must_be_inside_the_package_too() -> None:
    refused(reference_with({"tool.flwr.app.components.serverapp": "subprocess:run"}), "entry-point")


def test_unknown_component_is_refused() -> None:
    refused(reference_with({"tool.flwr.app.components.agentapp": "fedgate_medical.task:app"}), "entry-point")


def test_package_module_entry_point_passes() -> None:
    report = check_fab(reference_with({"tool.flwr.app.components.clientapp": "fedgate_medical:app"}))
    assert report.client_app == "fedgate_medical:app"


@pytest.mark.parametrize(
    "edit",
    [
        {"tool.flwr.app.config.lists": [1, 2]},
        {"tool.flwr.app.config": "x"},
        {"tool.flwr.app.config.nested.when": __import__("datetime").date(2024, 1, 1)},
    ],
)
def test_run_config_must_hold_flowers_types(edit: dict[str, object]) -> None:
    refused(reference_with(edit), "run-config")


def test_nested_run_config_is_flattened() -> None:
    report = check_fab(reference_with({"tool.flwr.app.config.optim.momentum": 0.9}))
    assert ("optim.momentum", "float", "0.9") in [(c.key, c.kind, c.value) for c in report.run_config]


@pytest.mark.parametrize("pyproject", [b"[project\n", b"\xff\xfe", b"a = " + b"[" * 5000])
def test_unreadable_pyproject_is_refused(pyproject: bytes) -> None:
    refused(make_fab({**reference_files(), "pyproject.toml": pyproject}), "pyproject")


def test_missing_pyproject_is_refused() -> None:
    files = reference_files()
    del files["pyproject.toml"]
    refused(make_fab(files), "pyproject")


def test_config_flower_rejects_is_refused() -> None:
    refused(reference_with({"tool.flwr.app.fab-format-version": 99}), "pyproject")


# ---- approval ----------------------------------------------------------------------------------


def test_unapproved_fab_is_refused_with_full_report() -> None:
    policy = FabPolicy(approved=("sha256:" + "0" * 64,))
    error = refused(reference_fab(), "fab-not-approved", policy)
    report = error.report
    assert report is not None and report.approval == "not-approved"
    assert report.client_app == "fedgate_medical.client_app:app" and report.files  # the hospital can still review it
    assert report.fab_ref in str(error)


def test_approved_fab_passes() -> None:
    fab = reference_fab()
    sha = check_fab(fab).sha256
    report = check_fab(fab, FabPolicy(approved=("sha256:" + "0" * 64, f"sha256:{sha}")))
    assert report.accepted and report.approval == "approved"


def test_every_rule_is_documented_once() -> None:
    assert len(RULES) == len(set(RULES))


# ---- properties --------------------------------------------------------------------------------

NAME_ALPHABET = st.sampled_from(
    ["a", "Z", "0", "_", "-", "+", ".", "..", "/", "\\", "\0", "\n", ":", " ", "é", "\u202e"]
)


@given(st.lists(NAME_ALPHABET, min_size=1, max_size=12).map("".join))
@settings(max_examples=400, deadline=None, derandomize=True)
def test_every_accepted_member_name_stays_inside_any_root(name: str) -> None:
    try:
        check_path(name)
    except FabRefused:
        return
    root = "/hospital/fabs/abc"
    assert posixpath.normpath(name) == name and not name.startswith("/")
    assert posixpath.normpath(posixpath.join(root, name)).startswith(root + "/")
    assert name.isascii() and name.isprintable() and "\\" not in name


@given(st.data())
@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
def test_damaged_fabs_are_refused_never_crash(data: st.DataObject) -> None:
    """Any damage to a good FAB ends in a report: no exception escapes the check but FabRefused."""
    fab = bytearray(make_fab(reference_files(), compress=data.draw(st.sampled_from([0, zipfile.ZIP_DEFLATED]))))
    for _ in range(data.draw(st.integers(1, 4))):
        position = data.draw(st.integers(0, len(fab) - 1))
        fab[position] = data.draw(st.integers(0, 255))
    report = inspect_fab(bytes(fab))
    assert report.verdict in ("accepted", "refused")
    if report.accepted:
        assert report.files  # a byte change that kept the FAB valid (e.g. in a timestamp)


# ---- the [fab] policy table --------------------------------------------------------------------


def test_policy_table_parses_and_defaults() -> None:
    sha = "sha256:" + "ab" * 32
    policy = parse_fab_policy({"approved": [sha, sha], "max_files": 10, "max_ratio": 20})
    assert policy.approved == (sha,) and policy.max_files == 10 and policy.max_ratio == 20
    assert policy.max_file_bytes == FabPolicy().max_file_bytes
    assert parse_fab_policy({}) == FabPolicy()
    assert policy.to_json()["approved"] == [sha]
    assert policy.approval("ab" * 32) == "approved" and policy.approval("cd" * 32) == "not-approved"
    assert FabPolicy().approval("cd" * 32) == "no-list"


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ({"approved": "sha256:" + "0" * 64}, "fab.approved:"),
        ({"approved": ["sha256:" + "0" * 64, "sha256:" + "0" * 64, "SHA256:" + "0" * 64]}, "fab.approved[2]:"),
        ({"approved": ["sha256:" + "A" * 64]}, "fab.approved[0]:"),
        ({"approved": [7]}, "fab.approved[0]:"),
        ({"max_total_bytes": -1}, "fab.max_total_bytes:"),
        ({"max_file_bytes": 1.5}, "fab.max_file_bytes:"),
        ({"max_fab_bytes": 2**40}, "fab.max_fab_bytes:"),
        ({"maxfiles": 3}, "unknown key(s) in [fab]: maxfiles"),
    ],
)
def test_policy_errors_name_the_key(table: dict[str, object], key: str) -> None:
    with pytest.raises(PolicyError, match=re.escape(key)):
        parse_fab_policy(table)
