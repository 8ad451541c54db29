"""Ingest's input: a local path or an `s3://` URI, plain or gzip JSONL, read as bounded lines.

    flywheel ingest logs.jsonl.gz s3://bucket/logs/day1.jsonl.gz

- Where: a path without a scheme is opened locally; a URI (`s3://...`) through fsspec (s3fs), with
  `$FLYWHEEL_S3_ENDPOINT` for a non-AWS server as for the home (`flywheel.storage`). Nothing is unpacked to disk.
- gzip is recognised by its first two bytes (1f 8b), whatever the file is called, and decompressed as a stream;
  files of several gzip members (`cat a.gz b.gz`) read as one.
- Lines are read with a bounded `readline`: a line longer than `max_bytes` is cut at `max_bytes + 1` bytes (enough
  for ingest to quarantine it as `oversized_record`) and the rest of it is skipped in 1 MiB reads, so memory never
  holds more than about one capped line, however long the line is.
- A stream that cannot be read on (a truncated or corrupt gzip member, trailing bytes that are not gzip, an I/O
  error) ends the lines there: every line before it has been yielded, and `LineReader.fault` says what went
  wrong and where (line number, decompressed and compressed byte). The caller raises `InputError` once it has
  stored what it read.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import zlib
from typing import BinaryIO, Iterator

GZIP_MAGIC = b"\x1f\x8b"
SKIP_BYTES = 1 << 20  # the read size while skipping the rest of an oversized line
REMOTE_BLOCK = 8 << 20  # fsspec block size for remote inputs (s3fs defaults to 50 MiB)


class InputError(ValueError):
    """An ingest input that could not be read to its end. `result` counts what was ingested before the fault."""

    def __init__(self, message: str, result: dict | None = None):
        super().__init__(message)
        self.result = result


@contextlib.contextmanager
def open_input(path: str) -> Iterator[io.BufferedReader]:
    """The raw (still compressed) bytes of a local file or an fsspec URI, buffered (`peek` and a bounded
    `readline` work on both)."""
    if "://" not in path or path.startswith("file://"):
        with open(path.removeprefix("file://"), "rb") as f:
            yield f
        return
    import fsspec

    from flywheel.storage import endpoint_options

    protocol = path.split("://", 1)[0]
    fs = fsspec.filesystem(protocol, **endpoint_options(path))
    with fs.open(path, "rb", block_size=REMOTE_BLOCK) as f:
        yield io.BufferedReader(f, buffer_size=1 << 20)


def input_digest(path: str) -> tuple[int, str]:
    """(size, sha256) of the input's bytes as stored (compressed, for a gzip), read in 1 MiB blocks."""
    sha, size = hashlib.sha256(), 0
    with open_input(path) as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
            size += len(block)
    return size, sha.hexdigest()


def _describe(e: BaseException, gzipped: bool) -> str:
    if isinstance(e, EOFError):
        return f"the gzip stream is truncated ({e})"
    if gzipped and isinstance(e, (zlib.error, gzip.BadGzipFile)):
        return f"the gzip stream is corrupt ({e})"
    return f"reading failed ({type(e).__name__}: {e})"


class LineReader:
    """Iterate a buffered binary input's lines (without their newline), bounded by `max_bytes` per line.

    After iteration, `fault` is None when the input was read to its end, else a sentence naming what stopped it
    and where; `lines` counts the lines read (blank ones included), `offset` the (decompressed) bytes read.
    """

    def __init__(self, raw: io.BufferedReader, max_bytes: int):
        self.raw, self.max_bytes = raw, max_bytes
        self.gzipped = raw.peek(2)[:2] == GZIP_MAGIC
        self.stream: BinaryIO = gzip.GzipFile(fileobj=raw, mode="rb") if self.gzipped else raw
        self.lines = self.offset = 0
        self.fault: str | None = None

    def __iter__(self) -> Iterator[bytes]:
        try:
            yield from self._read()
        except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError
            self.fault = f"{_describe(e, self.gzipped)} {self.position()}"

    def position(self) -> str:
        where = f"at line {self.lines + 1} (decompressed byte {self.offset}" if self.gzipped else \
            f"at line {self.lines + 1} (byte {self.offset}"
        if self.gzipped:
            with contextlib.suppress(OSError, ValueError):
                where += f"; compressed bytes read: {self.raw.tell()}"
        return where + ")"

    def _readline(self, size: int) -> bytes:
        raw = self.stream.readline(size)
        self.offset += len(raw)
        return raw

    def _read(self) -> Iterator[bytes]:
        cap = self.max_bytes
        while raw := self._readline(cap + 2):
            if raw.endswith(b"\n"):
                line = raw[:-1]
            elif len(raw) <= cap + 1:  # the last line, without a newline
                line = raw
            else:  # longer than the cap: keep cap + 1 bytes (it is quarantined as oversized), skip the rest
                line = raw[:cap + 1]
                while raw and not raw.endswith(b"\n"):
                    raw = self._readline(SKIP_BYTES)
            self.lines += 1
            yield line
