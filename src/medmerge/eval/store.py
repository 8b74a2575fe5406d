"""The result store: one SQLite file of evaluation results keyed by model and protocol.

The key is a hash of the model's weight fingerprint and the evaluation protocol (suite content,
tasks, few-shot count, dtype, limit, seed, lm-eval version), so an unchanged model evaluated the
same way is answered from the store, and any change to weights, data or protocol runs again.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path

from medmerge.hashing import cache_dir, sha256_file

SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    key TEXT PRIMARY KEY,
    fingerprint TEXT NOT NULL,
    protocol TEXT NOT NULL,
    result TEXT NOT NULL,
    created TEXT DEFAULT CURRENT_TIMESTAMP
)
"""


def default_store() -> Path:
    return cache_dir() / "results.sqlite"


def model_fingerprint(folder: str | Path) -> str:
    """Hash of config.json, the safetensors index and every weight file's SHA-256 (cached)."""
    from medmerge.checkpoint import Checkpoint

    ckpt = Checkpoint(folder)
    h = hashlib.sha256()
    for name in ("config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (ckpt.path / name).is_file():
            h.update(name.encode() + b"\0" + (ckpt.path / name).read_bytes())
    for f in ckpt.files:
        h.update(f"{f.name}\0{sha256_file(f)}\n".encode())
    ckpt.close()
    return h.hexdigest()


def result_key(fingerprint: str, protocol: dict) -> str:
    canonical = json.dumps(protocol, sort_keys=True)
    return hashlib.sha256(f"{fingerprint}\n{canonical}".encode()).hexdigest()


class ResultStore:
    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path else default_store()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.execute(SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=60)

    def get(self, fingerprint: str, protocol: dict) -> dict | None:
        with self._connect() as db:
            row = db.execute(
                "SELECT result FROM results WHERE key = ?", (result_key(fingerprint, protocol),)
            ).fetchone()
        return json.loads(row[0]) if row else None

    def put(self, fingerprint: str, protocol: dict, result: dict) -> None:
        with self._connect() as db:
            db.execute(
                "INSERT OR REPLACE INTO results (key, fingerprint, protocol, result) "
                "VALUES (?, ?, ?, ?)",
                (
                    result_key(fingerprint, protocol),
                    fingerprint,
                    json.dumps(protocol, sort_keys=True),
                    json.dumps(result),
                ),
            )
