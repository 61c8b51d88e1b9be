"""Files that a kill at any moment leaves whole: written beside their place, flushed to disk, then renamed over it.

Whoever reads such a file, even after the writer was killed mid-write, finds the old content or the new, never a
part. Every record, summary, cache index and page that this package or its benchmarks write goes through here.
Append-only logs (one JSON record per line) go through `append_json_line`: a kill can cut only the last line.
"""

import json
import os
from pathlib import Path


def write_text_atomically(path: str | Path, text: str) -> None:
    """Write `text` at `path` (creating its directory) so that `path` holds the old content or the new, never part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    with partial.open("w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, path)


def write_json_atomically(path: str | Path, data, *, indent: int = 1) -> None:
    """`data` as JSON at `path`, replaced atomically. Values JSON cannot hold (paths, dtypes) are written as their
    `str`; NaN and infinities as JSON's `NaN` and `Infinity`, which Python's `json` reads back."""
    write_text_atomically(path, json.dumps(data, indent=indent, default=str))


def append_json_line(path: str | Path, record) -> None:
    """Append `record` as one JSON line, in a single write, flushed to disk. A kill mid-write can cut only this line
    short; a reader drops a last line without its newline (see `trl_thr.cli.evaluation.GenerationCache`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("ab") as handle:
        handle.write((json.dumps(record) + "\n").encode())
        handle.flush()
        os.fsync(handle.fileno())
