"""SHA-256 of checkpoint files, computed once per file version and cached.

The cache (a JSON file under the medmerge cache folder, `$MEDMERGE_CACHE` or
`~/.cache/medmerge`) is keyed by absolute path, size and modification time, so a rewritten file is
hashed again while an unchanged 5 GB shard costs nothing the second time.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
from pathlib import Path

_CHUNK = 16 * 1024 * 1024
_lock = threading.Lock()


def cache_dir() -> Path:
    return Path(os.environ.get("MEDMERGE_CACHE", Path.home() / ".cache" / "medmerge"))


def _cache_file() -> Path:
    return cache_dir() / "sha256.json"


def _load_cache() -> dict[str, str]:
    try:
        return json.loads(_cache_file().read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _store(key: str, digest: str) -> None:
    with _lock:
        cache = _load_cache()
        cache[key] = digest
        path = _cache_file()
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".sha256-")
        with os.fdopen(fd, "w") as f:
            json.dump(cache, f)
        os.replace(tmp, path)  # atomic, so concurrent processes never read half a file


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
