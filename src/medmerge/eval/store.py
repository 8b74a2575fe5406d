"""The result store: one SQLite file of evaluation results keyed by model and protocol.

The key is a hash of the model's fingerprint (weights, config, tokenizer) and the evaluation
protocol (suite content, tasks, few-shot count, dtype, limit, seed, lm-eval version), so an
unchanged model evaluated the same way is answered from the store, and any change to weights,
tokenizer, data or protocol runs again.

The store is a cache, never a requirement: one that cannot be created, read or written is
skipped with one warning (the evaluation runs without it), and a damaged row is a miss, which
the new result replaces.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
from contextlib import closing
from pathlib import Path

from medmerge.io.hashing import cache_dir, sha256_file

log = logging.getLogger("medmerge")

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
    from medmerge.io.checkpoint import Checkpoint
    from medmerge.io.metadata import BIN_INDEX, SAFE_INDEX, TOKENIZER_FILES

    with Checkpoint(folder) as ckpt:
        h = hashlib.sha256()
        described = ("config.json", SAFE_INDEX, BIN_INDEX, *TOKENIZER_FILES,
                     "generation_config.json")  # fmt: skip
        for name in described:
            if (ckpt.path / name).is_file():
                h.update(name.encode() + b"\0" + (ckpt.path / name).read_bytes())
        for f in ckpt.files:
            h.update(f"{f.name}\0{sha256_file(f)}\n".encode())
    return h.hexdigest()


def result_key(fingerprint: str, protocol: dict) -> str:
    canonical = json.dumps(protocol, sort_keys=True)
    return hashlib.sha256(f"{fingerprint}\n{canonical}".encode()).hexdigest()


_SKIPPED: set[Path] = set()  # stores warned about in this process


class ResultStore:
    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path else default_store()
        self.usable = True
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            self._skip(e.strerror or e)
        self._execute(SCHEMA)

    def _execute(self, sql: str, args: tuple = ()) -> list[tuple]:
        """The rows of one statement, committed; a store that fails is skipped from then on
        (its rows read as none)."""
        if not self.usable:
            return []
        try:
            with closing(sqlite3.connect(self.path, timeout=60)) as db, db:
                return db.execute(sql, args).fetchall()
        except sqlite3.Error as e:
            self._skip(e)
            return []

    def _skip(self, reason) -> None:
        self.usable = False
        if self.path not in _SKIPPED:
            _SKIPPED.add(self.path)
            log.warning(
                "result store %s cannot be used (%s): evaluating without it; move it away or "
                "give another with --store",
                self.path,
                reason,
            )

    def get(self, fingerprint: str, protocol: dict) -> dict | None:
        """The stored result, or None: not stored, or a damaged row (evaluated again)."""
        key = result_key(fingerprint, protocol)
        rows = self._execute("SELECT result FROM results WHERE key = ?", (key,))
        if not rows:
            return None
        try:
            found = json.loads(rows[0][0])
        except (TypeError, ValueError):
            found = None
        if not isinstance(found, dict):
            self.damaged()
            return None
        return found

    def damaged(self) -> None:
        log.warning(
            "result store %s: the stored result for this model and protocol is damaged; "
            "evaluating again",
            self.path,
        )

    def put(self, fingerprint: str, protocol: dict, result: dict) -> None:
        self._execute(
            "INSERT OR REPLACE INTO results (key, fingerprint, protocol, result) "
            "VALUES (?, ?, ?, ?)",
            (
                result_key(fingerprint, protocol),
                fingerprint,
                json.dumps(protocol, sort_keys=True),
                json.dumps(result),
            ),
        )
