"""An incremental tar reader: feed it bytes in any slices, it reports each member.

Python's `tarfile` stream mode pulls from a file object and is slow; this reader is pushed
to by the upload pipeline instead, so one pass over the bytes serves hashing, storing and
inspecting. It understands ustar, pax (`x`/`g`) and GNU long names (`L`/`K`), verifies
every header checksum, and refuses what an archive of model files has no business holding:
absolute paths, `..`, links, devices, FIFOs, sparse files, two members of the same name (the
second would silently replace the first), and anything but zero padding after the
end-of-archive marker (a second archive hidden behind the first).

Budgets: every byte that passes through, extended headers and trailing padding included,
is reported to `on_unpacked_bytes`; extended headers have a count and a size budget; a
member path has a length limit. Per member, only a 16-byte digest of its path is kept.
"""

from __future__ import annotations

import enum
import hashlib
import posixpath
import re
from collections.abc import Callable
from dataclasses import dataclass

from server.errors import InvalidArchive

BLOCK = 512
_EXTENDED_HEADER_LIMIT = 1024 * 1024
"""Largest single pax or GNU long-name header."""
_EXTENDED_HEADERS_TOTAL_LIMIT = 16 * 1024 * 1024
"""Most bytes of extended headers in one archive (hundreds of thousands of global headers)."""
MAX_TRAILING_PADDING = 1024 * 1024
"""Zero bytes accepted after the end-of-archive marker (tar pads to its record size)."""
MAX_PATH_LENGTH = 1024
_PAX_SIZE = re.compile(r"[0-9]{1,20}")
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
        self._extended_count = 0
        self._extended_bytes = 0
        self._trailing_bytes = 0
        # Digests of the paths seen (files and directories apart): duplicates and
        # file/directory clashes are refused without keeping every name.
        self._file_digests: set[bytes] = set()
        self._directory_digests: set[bytes] = set()

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
            else:  # END: only zero padding may follow the end-of-archive marker.
                self._trailing(view[position:])
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

    def _trailing(self, data: memoryview) -> None:
        self._on_unpacked_bytes(len(data))
        # Only the allowed padding is looked at, whatever was fed (a mapped archive comes
        # in one piece): junk within it is named as junk, anything longer as too long.
        allowed = max(0, MAX_TRAILING_PADDING - self._trailing_bytes)
        self._trailing_bytes += len(data)
        if data[:allowed].tobytes().strip(b"\0"):
            raise InvalidArchive(
                "data follows the end of the tar archive (a second archive, or junk); only zero padding may",
                check="trailing_data",
            )
        if self._trailing_bytes > MAX_TRAILING_PADDING:
            raise InvalidArchive(
                f"more than {MAX_TRAILING_PADDING} bytes of padding follow the end of the tar archive",
                check="trailing_data", limit=MAX_TRAILING_PADDING,
            )

    def _on_header(self, header: bytes) -> None:
        if header == bytes(BLOCK):
            self._state = _State.END
            self._on_unpacked_bytes(BLOCK)
            return
        _verify_checksum(header)
        self._on_unpacked_bytes(BLOCK)
        typeflag = header[156:157]
        size = _parse_number(header[124:136], "size")
        if typeflag in _PAX_HEADERS or typeflag in (_GNU_LONG_NAME, _GNU_LONG_LINK):
            self._extended_count += 1
            self._extended_bytes += size
            if size > _EXTENDED_HEADER_LIMIT:
                raise InvalidArchive("an extended tar header is larger than 1 MiB", check="extended_header")
            if self._extended_bytes > _EXTENDED_HEADERS_TOTAL_LIMIT or self._extended_count > self._max_members:
                raise InvalidArchive(
                    f"the archive holds more than {self._max_members} extended headers or "
                    f"{_EXTENDED_HEADERS_TOTAL_LIMIT} bytes of them",
                    check="extended_header", limit=self._max_members,
                )
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
        self._check_unique(path, is_directory)
        if size > self._max_member_bytes:
            raise InvalidArchive(
                f"member {path!r} is larger than the limit of {self._max_member_bytes} bytes",
                check="member_size", member=path, limit=self._max_member_bytes,
            )
        self._handler.on_member_start(TarMember(path=path, size=size, is_directory=is_directory))
        self._in_member = True
        self._start_data(size)

    def _check_unique(self, path: str, is_directory: bool) -> None:
        """Refuses a second member of a name, and a file where a directory is (or under a file)."""
        digest = _digest(path)
        if is_directory:
            if digest in self._file_digests:
                raise InvalidArchive(
                    f"member {path!r} is both a file and a directory", check="duplicate_member", member=path
                )
            self._directory_digests.add(digest)
        else:
            if digest in self._file_digests or digest in self._directory_digests:
                raise InvalidArchive(
                    f"the archive holds {path!r} twice; member names must be unique",
                    check="duplicate_member", member=path,
                )
            self._file_digests.add(digest)
        parent = posixpath.dirname(path)
        while parent:
            parent_digest = _digest(parent)
            if parent_digest in self._file_digests:
                raise InvalidArchive(
                    f"member {path!r} lies under {parent!r}, which is a file", check="duplicate_member", member=path
                )
            if parent_digest in self._directory_digests:
                break  # its own parents were checked when it was added
            self._directory_digests.add(parent_digest)
            parent = posixpath.dirname(parent)

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
            if any(key.startswith("GNU.sparse.") for key in records):
                raise InvalidArchive("the archive holds a sparse file; only regular files are allowed", check="member_type")
            if "path" in records:
                self._pending_path = records["path"]
            if "size" in records:
                if not _PAX_SIZE.fullmatch(records["size"]):
                    raise InvalidArchive("a pax header has a negative or malformed size", check="extended_header")
                self._pending_size = int(records["size"])
        elif kind == b"g":
            _parse_pax(payload)  # checked for form; global headers carry nothing we use
        # GNU long link names carry nothing we use (links are refused).


def _digest(path: str) -> bytes:
    return hashlib.blake2b(path.encode("utf-8", "surrogatepass"), digest_size=16).digest()


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
        if field[0] == 0xFF:  # base-256 negative numbers
            raise InvalidArchive(f"a tar header has a negative {what} field", check="tar")
        return int.from_bytes(field[1:], "big")
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
        if length <= space - position or position + length > len(payload):
            raise InvalidArchive("a pax header is malformed", check="extended_header")
        record = payload[space + 1 : position + length].rstrip(b"\n")
        key, _, value = record.partition(b"=")
        records[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
        position += length
    return records


def _safe_path(raw: str) -> str:
    """Normalises a member path, refusing any that could escape the extraction root."""
    if len(raw) > MAX_PATH_LENGTH:
        raise InvalidArchive(
            f"a member path is longer than {MAX_PATH_LENGTH} characters", check="member_path", limit=MAX_PATH_LENGTH
        )
    if any(ord(character) < 32 or ord(character) == 127 for character in raw):
        raise InvalidArchive(
            f"member {raw!r} has a control character in its path", check="member_path", member=raw
        )
    if raw.startswith("/") or raw.startswith("\\") or (len(raw) > 1 and raw[1] == ":"):
        raise InvalidArchive(
            f"member {raw!r} has an absolute path", check="member_path", member=raw
        )
    parts = raw.replace("\\", "/").split("/")
    if ".." in parts:
        raise InvalidArchive(
            f"member {raw!r} climbs out of the archive with '..'", check="member_path", member=raw
        )
    normalized = posixpath.normpath("/".join(part for part in parts if part not in ("", ".")) or ".")
    return normalized
