"""`.info/CONTENT`, the FAB's own list of its files, matched against the members exactly.

`flwr build` writes one line per member, `path,sha256,size_in_bits` (bits: len(content) * 8),
joined by newlines, CONTENT itself not listed. Flower's installer checks only that each listed
file exists with that hash; we also refuse members CONTENT does not list and sizes that differ,
so the list a hospital reads is the whole package."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence

from fedgate.fab.archive import Member
from fedgate.fab.members import CONTENT_PATH
from fedgate.fab.report import FabFile, FabRefused

LINE = re.compile(r"(?P<path>[^,\n]+),(?P<sha256>[0-9a-f]{64}),(?P<bits>0|[1-9][0-9]{0,15})", re.ASCII)


def match_content(members: Sequence[Member]) -> tuple[FabFile, ...]:
    """The FAB's files (CONTENT excluded), sorted by path, once CONTENT matches them exactly."""
    by_name = {m.name: m for m in members}
    if CONTENT_PATH not in by_name:
        raise FabRefused("content-missing", f"the FAB has no {CONTENT_PATH} (not built by `flwr build`?)")
    try:
        text = by_name[CONTENT_PATH].data.decode("ascii")
    except UnicodeDecodeError:
        raise FabRefused("content-format", f"{CONTENT_PATH} is not ASCII") from None
    listed: dict[str, tuple[str, int]] = {}
    for number, line in enumerate(text.removesuffix("\n").split("\n"), start=1):
        match = LINE.fullmatch(line)
        if match is None:
            raise FabRefused(
                "content-format", "line is not `path,sha256,size_in_bits`", line=number, text=repr(line[:200])
            )
        path, bits = match["path"], int(match["bits"])
        if path in listed:
            raise FabRefused("content-format", "path listed twice", line=number, member=path)
        if bits % 8:
            raise FabRefused("content-format", "size in bits is not a whole number of bytes", line=number, member=path)
        listed[path] = (match["sha256"], bits // 8)

    files = []
    for member in members:
        if member.name == CONTENT_PATH:
            continue
        if member.name not in listed:
            raise FabRefused("content-unlisted", "member is not listed in CONTENT", member=member.name)
        sha256, size = listed.pop(member.name)
        actual = hashlib.sha256(member.data).hexdigest()
        if actual != sha256 or len(member.data) != size:
            raise FabRefused(
                "content-mismatch",
                "member's SHA-256 or size differs from CONTENT",
                member=member.name,
                listed_sha256=sha256,
                actual_sha256=actual,
                listed_size=size,
                actual_size=len(member.data),
            )
        files.append(FabFile(member.name, len(member.data), actual))
    if listed:
        raise FabRefused(
            "content-absent", "CONTENT lists a file that is not one of the FAB's files", member=sorted(listed)[0]
        )
    return tuple(sorted(files, key=lambda f: f.path))
