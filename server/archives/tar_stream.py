"""An incremental tar reader: feed it bytes in any slices, it reports each member.

Python's `tarfile` stream mode pulls from a file object and is slow; this reader is pushed
to by the upload pipeline instead, so one pass over the bytes serves hashing, storing and
inspecting. It understands ustar, pax (`x`/`g`) and GNU long names (`L`/`K`), verifies
every header checksum, and refuses what an archive of model files has no business holding:
absolute paths, `..`, links, devices, FIFOs, sparse files.
"""

from __future__ import annotations

import enum
import posixpath
from collections.abc import Callable
from dataclasses import dataclass

from server.errors import InvalidArchive

BLOCK = 512
_EXTENDED_HEADER_LIMIT = 1024 * 1024
_REGULAR = {b"0", b"\0", b"7"}
_DIRECTORY = b"5"
_PAX_HEADERS = {b"x", b"g"}
_GNU_LONG_NAME, _GNU_LONG_LINK = b"L", b"K"
_REFUSED_TYPES = {
    b"1": "hard link",
    b"2": "symbolic link",
    b"3": "character device",
    b"4": "block device",
    b"6": "FIFO",
    b"S": "sparse file",
}


@dataclass(frozen=True)
class TarMember:
    """A file or directory of the archive, as its header declares it."""

    path: str
    size: int
    is_directory: bool


class MemberHandler:
    """Receives the members of the archive as they stream by."""

    def on_member_start(self, member: TarMember) -> None: ...

    def on_member_data(self, data: memoryview) -> None: ...

    def on_member_end(self) -> None: ...


class _State(enum.Enum):
    HEADER = 1
    DATA = 2
    PADDING = 3
    END = 4


class TarStreamReader:
    """Push-style tar parser. `feed` any number of times, then `finish`."""

    def __init__(
        self,
        handler: MemberHandler,
        *,
        max_members: int,
        max_member_bytes: int,
        on_unpacked_bytes: Callable[[int], None],
    ) -> None:
        self._handler = handler
        self._max_members = max_members
        self._max_member_bytes = max_member_bytes
        self._on_unpacked_bytes = on_unpacked_bytes
        self._state = _State.HEADER
        self._header = bytearray()
        self._remaining = 0
        self._padding = 0
        self._member_count = 0
        # Extended header being collected (pax or GNU long name) and what it set.
        self._extended_kind: bytes | None = None
        self._extended = bytearray()
        self._pending_path: str | None = None
        self._pending_size: int | None = None
        self._in_member = False

    @property
    def member_count(self) -> int:
        return self._member_count

    def feed(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        position = 0
        while position < len(view):
            if self._state is _State.HEADER:
                take = min(BLOCK - len(self._header), len(view) - position)
                self._header += view[position : position + take]
                position += take
                if len(self._header) == BLOCK:
                    header = bytes(self._header)
                    self._header.clear()
                    self._on_header(header)
            elif self._state is _State.DATA:
                take = min(self._remaining, len(view) - position)
                self._on_data(view[position : position + take])
                position += take
                self._remaining -= take
                if self._remaining == 0:
                    self._end_of_data()
            elif self._state is _State.PADDING:
                take = min(self._padding, len(view) - position)
                position += take
                self._padding -= take
                if self._padding == 0:
                    self._state = _State.HEADER
            else:  # END: what follows the end-of-archive marker is zero fill by convention.
                return

    def finish(self) -> None:
        """Raises InvalidArchive unless the archive ended cleanly after whole members."""
        if self._state is _State.END:
            return
        if self._state is _State.HEADER and not self._header and self._member_count > 0:
            # Some writers omit the end-of-archive blocks; every member is complete.
            return
        if self._member_count == 0 and self._state is _State.HEADER and not self._header:
            raise InvalidArchive("the archive is empty", check="tar")
        raise InvalidArchive(
            "the archive ends in the middle of a member (truncated upload?)", check="tar"
        )

    def _on_header(self, header: bytes) -> None:
        if header == bytes(BLOCK):
            self._state = _State.END
            return
        _verify_checksum(header)
        typeflag = header[156:157]
        size = _parse_number(header[124:136], "size")
        if typeflag in _PAX_HEADERS or typeflag in (_GNU_LONG_NAME, _GNU_LONG_LINK):
            if size > _EXTENDED_HEADER_LIMIT:
                raise InvalidArchive("an extended tar header is larger than 1 MiB", check="tar")
            self._extended_kind = typeflag
            self._extended.clear()
            self._start_data(size)
            return
        if typeflag in _REFUSED_TYPES:
            name = self._pending_path or _header_path(header)
            raise InvalidArchive(
                f"the archive holds a {_REFUSED_TYPES[typeflag]} ({name!r}); only regular files"
                " and directories are allowed",
                check="member_type", member=name,
            )
        if typeflag not in _REGULAR and typeflag != _DIRECTORY:
            raise InvalidArchive(
                f"unsupported tar member type {typeflag!r}", check="member_type"
            )
        path = _safe_path(self._pending_path or _header_path(header))
        if self._pending_size is not None:
            size = self._pending_size
        self._pending_path = None
        self._pending_size = None
        self._member_count += 1
        if self._member_count > self._max_members:
            raise InvalidArchive(
                f"the archive holds more than {self._max_members} members",
                check="member_count", limit=self._max_members,
            )
        is_directory = typeflag == _DIRECTORY
        if is_directory:
            size = 0
        if size > self._max_member_bytes:
            raise InvalidArchive(
                f"member {path!r} is larger than the limit of {self._max_member_bytes} bytes",
                check="member_size", member=path, limit=self._max_member_bytes,
            )
        self._handler.on_member_start(TarMember(path=path, size=size, is_directory=is_directory))
        self._in_member = True
        self._start_data(size)

    def _start_data(self, size: int) -> None:
        self._remaining = size
        self._padding = -size % BLOCK
        if size == 0:
            self._end_of_data()
        else:
            self._state = _State.DATA

    def _on_data(self, data: memoryview) -> None:
        self._on_unpacked_bytes(len(data))
        if self._in_member:
            self._handler.on_member_data(data)
        else:
            self._extended += data

    def _end_of_data(self) -> None:
        if self._in_member:
            self._handler.on_member_end()
            self._in_member = False
        elif self._extended_kind is not None:
            self._apply_extended_header()
        self._state = _State.PADDING if self._padding else _State.HEADER

    def _apply_extended_header(self) -> None:
        kind, payload = self._extended_kind, bytes(self._extended)
        self._extended_kind = None
        self._extended.clear()
        if kind == _GNU_LONG_NAME:
            self._pending_path = payload.rstrip(b"\0").decode("utf-8", "replace")
        elif kind == b"x":
            records = _parse_pax(payload)
            if "path" in records:
                self._pending_path = records["path"]
            if "size" in records:
                try:
                    self._pending_size = int(records["size"])
                except ValueError:
                    raise InvalidArchive("a pax header has a bad size", check="tar") from None
        # Global pax headers and GNU long link names carry nothing we use.


def _verify_checksum(header: bytes) -> None:
    try:
        recorded = _parse_number(header[148:156], "checksum")
    except InvalidArchive:
        raise InvalidArchive("the data is not a tar archive", check="tar") from None
    unsigned = sum(header[:148]) + 8 * 32 + sum(header[156:])
    if recorded != unsigned:
        raise InvalidArchive(
            "a tar header checksum is wrong: the data is not a tar archive or is corrupt",
            check="tar",
        )


def _parse_number(field: bytes, what: str) -> int:
    if field and field[0] & 0x80:  # GNU base-256 for sizes over 8 GiB
        value = int.from_bytes(field[1:], "big")
        return value
    text = field.replace(b"\0", b" ").strip()
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError:
        raise InvalidArchive(f"a tar header has a bad {what} field", check="tar") from None


def _header_path(header: bytes) -> str:
    name = header[0:100].split(b"\0", 1)[0]
    prefix = header[345:500].split(b"\0", 1)[0] if header[257:262] == b"ustar" else b""
    full = prefix + b"/" + name if prefix else name
    return full.decode("utf-8", "replace")


def _parse_pax(payload: bytes) -> dict[str, str]:
    records: dict[str, str] = {}
    position = 0
    while position < len(payload):
        space = payload.find(b" ", position)
        if space < 0:
            break
        try:
            length = int(payload[position:space])
        except ValueError:
            raise InvalidArchive("a pax header is malformed", check="tar") from None
        if length <= 0:
            raise InvalidArchive("a pax header is malformed", check="tar")
        record = payload[space + 1 : position + length].rstrip(b"\n")
        key, _, value = record.partition(b"=")
        records[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
        position += length
    return records


def _safe_path(raw: str) -> str:
    """Normalises a member path, refusing any that could escape the extraction root."""
    if raw.startswith("/") or raw.startswith("\\") or (len(raw) > 1 and raw[1] == ":"):
        raise InvalidArchive(
            f"member {raw!r} has an absolute path", check="member_path", member=raw
        )
    parts = raw.replace("\\", "/").split("/")
    if ".." in parts:
        raise InvalidArchive(
            f"member {raw!r} climbs out of the archive with '..'", check="member_path", member=raw
        )
    if "\0" in raw:
        raise InvalidArchive("a member path holds a NUL byte", check="member_path")
    normalized = posixpath.normpath("/".join(part for part in parts if part not in ("", ".")) or ".")
    return normalized
