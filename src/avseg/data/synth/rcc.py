"""A reader for Qt binary resource bundles (`.rcc`), as shipped by gcompris-qt-data.

Format (written from Qt's description of the resource compiler's binary output; all integers are
big-endian):

- header: the magic `qres`, then uint32 format version (1, 2 or 3), uint32 offset of the tree
  table, uint32 offset of the data table, uint32 offset of the names table (version 3 adds a uint32
  of global flags);
- tree table: fixed-size nodes (14 bytes in version 1, 22 from version 2 on, which append a uint64
  modification time). Node 0 is the root directory. A node is uint32 name offset, uint16 flags
  (1: zlib-compressed, 2: directory, 4: zstd-compressed), then either uint32 child count and uint32
  index of the first child (directories; children are consecutive nodes) or uint16 territory,
  uint16 language and uint32 data offset (files);
- names table: uint16 length in UTF-16 code units, uint32 hash, the name in UTF-16BE;
- data table: uint32 size, then the bytes. A zlib-compressed entry starts with the uncompressed
  size as uint32, followed by a zlib stream (Qt's qCompress format).
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

from avseg.errors import DataError

_FLAG_ZLIB = 0x01
_FLAG_DIRECTORY = 0x02
_FLAG_ZSTD = 0x04


class RccArchive:
    """The files of one `.rcc` bundle: `names()` lists their paths, `read(path)` their bytes."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self._blob = self.path.read_bytes()
        except OSError as err:
            raise DataError(self.path, f"cannot read the Qt resource bundle: {err}") from err
        blob = self._blob
        if len(blob) < 20 or blob[:4] != b"qres":
            raise DataError(self.path, "is not a Qt resource bundle (no 'qres' header)")
        self.version, self._tree, self._data, self._names = struct.unpack_from(">IIII", blob, 4)
        if self.version not in (1, 2, 3):
            raise DataError(self.path, f"Qt resource format version {self.version} is not supported (1-3)")
        self._node_size = 14 if self.version == 1 else 22
        self._entries: dict[str, tuple[int, int]] = {}  # path -> (flags, data offset)
        self._walk(0, "", depth=0)

    def _unpack(self, fmt: str, offset: int) -> tuple[int, ...]:
        if offset < 0 or offset + struct.calcsize(fmt) > len(self._blob):
            raise DataError(self.path, f"truncated Qt resource bundle (offset {offset} is past the end)")
        return struct.unpack_from(fmt, self._blob, offset)

    def _name(self, offset: int) -> str:
        (length,) = self._unpack(">H", self._names + offset)
        start = self._names + offset + 6
        raw = self._blob[start : start + 2 * length]
        if len(raw) != 2 * length:
            raise DataError(self.path, f"truncated name at names-table offset {offset}")
        return raw.decode("utf-16-be")

    def _walk(self, index: int, prefix: str, depth: int) -> None:
        if depth > 64:
            raise DataError(self.path, "directory tree deeper than 64 levels (corrupt bundle?)")
        node = self._tree + index * self._node_size
        name_offset, flags = self._unpack(">IH", node)
        name = self._name(name_offset) if index else ""
        if flags & _FLAG_DIRECTORY:
            count, first = self._unpack(">II", node + 6)
            child_prefix = f"{prefix}{name}/" if index else ""
            for child in range(first, first + count):
                self._walk(child, child_prefix, depth + 1)
        else:
            (data_offset,) = self._unpack(">I", node + 10)
            self._entries[prefix + name] = (flags, data_offset)

    def names(self) -> list[str]:
        """Every file's path inside the bundle (e.g. `gcompris/src/activities/.../violin.svg`)."""
        return sorted(self._entries)

    def read(self, name: str) -> bytes:
        """The (decompressed) bytes of the file `name`."""
        if name not in self._entries:
            raise DataError(self.path, f"has no resource {name!r}")
        flags, data_offset = self._entries[name]
        (size,) = self._unpack(">I", self._data + data_offset)
        start = self._data + data_offset + 4
        payload = self._blob[start : start + size]
        if len(payload) != size:
            raise DataError(self.path, f"resource {name!r} is truncated")
        if flags & _FLAG_ZSTD:
            raise DataError(self.path, f"resource {name!r} is zstd-compressed (not supported; zlib only)")
        if flags & _FLAG_ZLIB:
            if size < 4:
                raise DataError(self.path, f"resource {name!r}: compressed entry shorter than its header")
            (expected,) = struct.unpack_from(">I", payload, 0)
            try:
                payload = zlib.decompress(payload[4:])
            except zlib.error as err:
                raise DataError(self.path, f"resource {name!r}: bad zlib data: {err}") from err
            if len(payload) != expected:
                raise DataError(self.path, f"resource {name!r}: {len(payload)} bytes, header says {expected}")
        return payload
