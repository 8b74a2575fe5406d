"""SHA-256 of checkpoint files, computed once per file version and cached.

The cache (a JSON file under the medmerge cache folder, `$MEDMERGE_CACHE` or
`~/.cache/medmerge`) is keyed by absolute path, size and modification time, so a rewritten file is
hashed again while an unchanged 5 GB shard costs nothing the second time. It is optional: a
cache that cannot be read is empty, one that cannot be written is skipped (one warning).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
from pathlib import Path

log = logging.getLogger("medmerge")

_CHUNK = 16 * 1024 * 1024
_lock = threading.Lock()


def cache_dir() -> Path:
    """`$MEDMERGE_CACHE` (an empty value counts as unset), else `~/.cache/medmerge`."""
    return Path(os.environ.get("MEDMERGE_CACHE") or Path.home() / ".cache" / "medmerge")


def _cache_file() -> Path:
    return cache_dir() / "sha256.json"


def _load_cache() -> dict[str, str]:
    try:
        cache = json.loads(_cache_file().read_text(encoding="utf-8"))
    except (OSError, ValueError):  # missing, unreadable, not UTF-8 or not JSON: empty
        return {}
    return cache if isinstance(cache, dict) else {}


_unwritable: set[Path] = set()  # caches already warned about


def _store(key: str, digest: str) -> None:
    with _lock:
        cache = _load_cache()
        cache[key] = digest
        path = _cache_file()
        tmp = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".sha256-")
            with os.fdopen(fd, "w") as f:
                json.dump(cache, f)
            os.replace(tmp, path)  # atomic, so concurrent processes never read half a file
        except OSError as e:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
            if path not in _unwritable:
                _unwritable.add(path)
                log.warning("the hash cache %s cannot be written (%s); hashing without it",
                            path, e.strerror or e)  # fmt: skip


def sha256_file(path: str | os.PathLike) -> str:
    path = Path(path).resolve()
    st = path.stat()
    key = f"{path}|{st.st_size}|{st.st_mtime_ns}"
    cached = _load_cache().get(key)
    if cached:
        return cached
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    digest = h.hexdigest()
    _store(key, digest)
    return digest


def input_records(checkpoints, sources, base: int | None) -> list[dict]:
    """Provenance of a merge's inputs, base first: each checkpoint's reference (and Hub commit,
    folded adapter), folder and weight files with their sizes and SHA-256."""
    records = []
    for i in sorted(range(len(checkpoints)), key=lambda i: i != base):
        ckpt = checkpoints[i]
        files = [
            {"file": f.name, "bytes": f.stat().st_size, "sha256": sha256_file(f)}
            for f in ckpt.files
        ]
        source = sources[i].record() if sources else {}
        records.append({"role": "base" if i == base else "model", **source,
                        "path": str(ckpt.path.resolve()), "files": files})  # fmt: skip
    return records
