"""Read a FAB's members from its bytes, in memory, with our own bounded decompression.

Python's zipfile parses the central directory; everything after that is ours. Names and entry
types are checked (members.py) and declared sizes bounded before any byte is inflated. Then each
member's local header is checked against the central directory, the members must tile the
archive from offset 0 to the central directory (no gaps, no overlaps, nothing prepended: the
overlapping-member bombs and polyglots need one of those), and each member is inflated with
zlib under a byte budget that ignores what the headers claim: a member that inflates past its
declared size is a bomb and is stopped there, not after."""

from __future__ import annotations

import io
import struct
import zipfile
import zlib
from dataclasses import dataclass

from fedgate.fab.members import check_kind, check_path, check_type, check_unique
from fedgate.fab.policy import RATIO_FLOOR_BYTES, FabPolicy
from fedgate.fab.report import FabRefused

LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")  # signature .. extra length: 30 bytes
LOCAL_SIGNATURE = b"PK\x03\x04"
DESCRIPTOR_SIGNATURE = b"PK\x07\x08"
FLAG_ENCRYPTED, FLAG_DESCRIPTOR, FLAG_UTF8 = 0x1, 0x8, 0x800
ZIP64_LIMIT = 0xFFFFFFFF
CHUNK = 64 * 1024


@dataclass(frozen=True)
class Member:
    name: str
    data: bytes


def read_members(fab: bytes, policy: FabPolicy) -> tuple[Member, ...]:
    """Every member of the FAB, checked and inflated; raises FabRefused on the first problem."""
    if len(fab) > policy.max_fab_bytes:
        raise FabRefused(
            "fab-size", f"the FAB is larger than fab.max_fab_bytes = {policy.max_fab_bytes:,}", size=len(fab)
        )
    try:
        archive = zipfile.ZipFile(io.BytesIO(fab))
    except Exception as err:  # any parser failure on untrusted bytes is "not a zip we accept"
        raise FabRefused("zip-malformed", f"not a readable zip archive: {type(err).__name__}: {err}") from None
    with archive:
        infos = archive.infolist()
        start_dir = int(archive.start_dir)
    if len(infos) > policy.max_files:
        raise FabRefused(
            "too-many-files", f"{len(infos)} members; fab.max_files = {policy.max_files}", count=len(infos)
        )
    for info in infos:
        check_path(info.orig_filename)
        if info.filename != info.orig_filename:  # zipfile rewrote the name: it had a NUL
            raise FabRefused("member-path", "member name changes when read", member=repr(info.orig_filename))
        check_type(info)
        check_kind(info.filename)
    check_unique([info.filename for info in infos])
    _check_declared_sizes(infos, policy)
    spans = _check_layout(fab, infos, start_dir)
    members = []
    budget = policy.max_total_bytes
    for info in infos:
        data = _inflate(fab, info, spans[info.filename], min(info.file_size, policy.max_file_bytes, budget), policy)
        budget -= len(data)
        members.append(Member(info.filename, data))
    return tuple(members)


def _check_declared_sizes(infos: list[zipfile.ZipInfo], policy: FabPolicy) -> None:
    total = 0
    for info in infos:
        if info.flag_bits & FLAG_ENCRYPTED:
            raise FabRefused("zip-unsupported", "member is encrypted", member=info.filename)
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise FabRefused(
                "zip-unsupported",
                f"member uses compression method {info.compress_type}; only stored (0) and deflate (8)",
                member=info.filename,
            )
        if max(info.file_size, info.compress_size, info.header_offset) >= ZIP64_LIMIT:
            raise FabRefused("zip-unsupported", "member needs zip64 (FABs are small)", member=info.filename)
        if info.file_size > policy.max_file_bytes:
            raise FabRefused(
                "file-too-large",
                f"member declares {info.file_size:,} bytes; fab.max_file_bytes = {policy.max_file_bytes:,}",
                member=info.filename,
                size=info.file_size,
            )
        total += info.file_size
        if total > policy.max_total_bytes:
            raise FabRefused(
                "total-too-large",
                f"members declare more than fab.max_total_bytes = {policy.max_total_bytes:,} together",
                member=info.filename,
            )
        _check_ratio(info, info.file_size, policy)


def _check_ratio(info: zipfile.ZipInfo, inflated: int, policy: FabPolicy) -> None:
    if inflated > RATIO_FLOOR_BYTES and inflated > policy.max_ratio * max(info.compress_size, 1):
        raise FabRefused(
            "zip-ratio",
            f"member inflates more than fab.max_ratio = {policy.max_ratio} times its compressed size",
            member=info.filename,
            compressed=info.compress_size,
            inflated=inflated,
        )


def _check_layout(fab: bytes, infos: list[zipfile.ZipInfo], start_dir: int) -> dict[str, tuple[int, int]]:
    """The (start, end) of each member's compressed data, after checking that local headers agree
    with the central directory and that members tile [0, start_dir) exactly."""
    spans: dict[str, tuple[int, int]] = {}
    position = 0
    for info in sorted(infos, key=lambda i: i.header_offset):
        if info.header_offset != position:
            raise FabRefused(
                "zip-malformed",
                "members do not follow each other from the start of the archive (gap, overlap or prepended data)",
                member=info.filename,
                offset=info.header_offset,
                expected=position,
            )
        header = fab[position : position + LOCAL_HEADER.size]
        if len(header) < LOCAL_HEADER.size:
            raise FabRefused("zip-malformed", "local header is truncated", member=info.filename)
        signature, _, flags, method, _, _, crc, csize, usize, name_len, extra_len = LOCAL_HEADER.unpack(header)
        name_start = position + LOCAL_HEADER.size
        raw_name = fab[name_start : name_start + name_len]
        central_name = info.orig_filename.encode("utf-8" if info.flag_bits & FLAG_UTF8 else "cp437")
        if signature != LOCAL_SIGNATURE or raw_name != central_name:
            raise FabRefused("zip-malformed", "local header does not match the central directory", member=info.filename)
        if method != info.compress_type or (flags & FLAG_ENCRYPTED):
            raise FabRefused(
                "zip-malformed", "local header method or flags differ from the central directory", member=info.filename
            )
        if not flags & FLAG_DESCRIPTOR and (crc, csize, usize) != (info.CRC, info.compress_size, info.file_size):
            raise FabRefused(
                "zip-malformed", "local header sizes or CRC differ from the central directory", member=info.filename
            )
        start = name_start + name_len + extra_len
        end = start + info.compress_size
        if end > start_dir:
            raise FabRefused("zip-malformed", "member data runs into the central directory", member=info.filename)
        spans[info.filename] = (start, end)
        position = end
        if flags & FLAG_DESCRIPTOR:
            position += 16 if fab[end : end + 4] == DESCRIPTOR_SIGNATURE else 12
    if position != start_dir:
        raise FabRefused("zip-malformed", "bytes between the last member and the central directory", offset=position)
    return spans


def _inflate(fab: bytes, info: zipfile.ZipInfo, span: tuple[int, int], limit: int, policy: FabPolicy) -> bytes:
    """The member's bytes, never more than `limit` of them, whatever its headers say."""
    raw = memoryview(fab)[span[0] : span[1]]
    if info.compress_type == zipfile.ZIP_STORED:
        data = bytes(raw[: limit + 1])
        if len(data) > limit:
            raise FabRefused(
                "zip-bomb", f"stored member is longer than its declared {info.file_size:,} bytes", member=info.filename
            )
    else:
        data = _inflate_deflate(raw, info, limit, policy)
    if len(data) != info.file_size:
        raise FabRefused(
            "zip-malformed",
            f"member holds {len(data):,} bytes, its headers declare {info.file_size:,}",
            member=info.filename,
        )
    if zlib.crc32(data) != info.CRC:
        raise FabRefused("zip-malformed", "member CRC-32 does not match", member=info.filename)
    return data


def _inflate_deflate(raw: memoryview, info: zipfile.ZipInfo, limit: int, policy: FabPolicy) -> bytes:
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    out = bytearray()
    fed = 0
    try:
        while not inflater.eof:
            if inflater.unconsumed_tail:
                chunk: bytes | memoryview = inflater.unconsumed_tail
            elif fed < len(raw):
                chunk = raw[fed : fed + CHUNK]
                fed += len(chunk)
            else:
                raise FabRefused("zip-malformed", "deflate stream is truncated", member=info.filename)
            out += inflater.decompress(chunk, limit + 1 - len(out))
            if len(out) > limit:
                raise FabRefused(
                    "zip-bomb",
                    f"member inflates past {limit:,} bytes (declared {info.file_size:,}); stopped there",
                    member=info.filename,
                )
            _check_ratio(info, len(out), policy)
    except zlib.error as err:
        raise FabRefused("zip-malformed", f"deflate stream is broken: {err}", member=info.filename) from None
    if inflater.unused_data or fed < len(raw):
        raise FabRefused("zip-malformed", "bytes after the end of the deflate stream", member=info.filename)
    return bytes(out)
