"""The result store: one SQLite file of evaluation results keyed by model and protocol.

The key is a hash of the model's fingerprint (weights, config, tokenizer) and the evaluation
protocol (suite content, tasks, few-shot count, dtype, limit, seed, lm-eval version), so an
unchanged model evaluated the same way is answered from the store, and any change to weights,
tokenizer, data or protocol runs again.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path

from medmerge.errors import EvalError
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
    """Hash of everything that can change a score: config.json, the weights' index and every
    weight file's SHA-256 (cached), the tokenizer and chat-template files, the generation
    config."""
    from medmerge.checkpoint import BIN_INDEX, SAFE_INDEX, TOKENIZER_FILES, Checkpoint

    ckpt = Checkpoint(folder)
    h = hashlib.sha256()
    described = ("config.json", SAFE_INDEX, BIN_INDEX, *TOKENIZER_FILES, "generation_config.json")
    for name in described:
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
            self._run(db, SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        try:
            return sqlite3.connect(self.path, timeout=60)
        except sqlite3.DatabaseError as e:
            raise EvalError(f"result store {self.path} cannot be opened ({e})") from e

    def _run(self, db: sqlite3.Connection, sql: str, args: tuple = ()) -> sqlite3.Cursor:
        try:
            return db.execute(sql, args)
        except sqlite3.DatabaseError as e:
            raise EvalError(
                f"result store {self.path} cannot be read ({e}); move it away (its results are "
                "lost) or give another with --store"
            ) from e

    def get(self, fingerprint: str, protocol: dict) -> dict | None:
        with self._connect() as db:
            row = self._run(
                db, "SELECT result FROM results WHERE key = ?", (result_key(fingerprint, protocol),)
            ).fetchone()
        return json.loads(row[0]) if row else None

    def put(self, fingerprint: str, protocol: dict, result: dict) -> None:
        with self._connect() as db:
            self._run(
                db,
                "INSERT OR REPLACE INTO results (key, fingerprint, protocol, result) "
                "VALUES (?, ?, ?, ?)",
                (
                    result_key(fingerprint, protocol),
                    fingerprint,
                    json.dumps(protocol, sort_keys=True),
                    json.dumps(result),
                ),
            )
