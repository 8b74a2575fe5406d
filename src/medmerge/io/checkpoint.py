"""Read Hugging Face checkpoint folders one tensor at a time.

Guarantees:
- Reading never runs code that comes with a checkpoint. Safetensors shards are data (validated
  by `safetensors.safe_open` when opened); legacy `pytorch_model*.bin` shards are read only with
  `torch.load(weights_only=True, mmap=True)`.
- Reading is lazy and bounded: a tensor is mapped from its shard when it is asked for, and only
  its own bytes (a private, copy-on-write map, unmapped when the tensor is freed). So resident
  memory holds the tensors being merged, never the model, and nothing is copied: a map of the
  whole shard would count every page read in the process's RSS, a read into a buffer copies.
- Every shard an index names must lie inside the model folder, exist, and be complete; every
  other file it reads must lie inside the folder (`metadata.check_metadata`).

Writing: `shards` (safetensors streamed tensor by tensor), `folders` (atomic output folders).
"""

from __future__ import annotations

import json
import math
import mmap
import os
import resource
import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from medmerge.errors import CheckpointError
from medmerge.io import buffers
from medmerge.io.metadata import BIN_INDEX, SAFE_INDEX, check_metadata
from medmerge.models.architectures import EMBEDDING_PATTERN, LM_HEAD_NAMES

SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in `file`; -1 for tensors of a legacy .bin shard
    end: int

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


class Checkpoint:
    """A Hugging Face model folder: `config.json` plus safetensors (or legacy .bin) shards."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(
                f"model folder {self.path} does not exist (medmerge reads local Hugging Face "
                "folders; download a hub model first, e.g. `hf download ORG/NAME --local-dir DIR`)"
            )
        if (self.path / "adapter_config.json").exists():
            raise CheckpointError(
                f"{self.path} is a PEFT/LoRA adapter (it has adapter_config.json), not a full "
                "checkpoint; merging an adapter as if it were a model degrades the result. Fold "
                "it into its base first (`medmerge materialize ADAPTER_DIR OUT_DIR`) and merge "
                "that, or set `materialize_adapters: true` in the merge config."
            )
        check_metadata(self.path)
        config_file = self.path / "config.json"
        if not config_file.is_file():
            raise CheckpointError(f"{config_file} is missing: a model folder needs its config.json")
        self.config: dict = _read_config(config_file)
        self.tensors: dict[str, TensorInfo] = {}
        self._bin_shards: dict[Path, dict[str, torch.Tensor]] = {}
        for file in self._weight_files():
            if file.suffix == ".safetensors":
                found = _safetensors_header(file)
            else:
                self._bin_shards[file] = _load_bin(file)
                found = {
                    name: TensorInfo(file, t.dtype, tuple(t.shape), -1, -1)
                    for name, t in self._bin_shards[file].items()
                }
            twice = next((n for n in found if n in self.tensors), None)
            if twice is not None:
                raise CheckpointError(
                    f"tensor {twice!r} is stored twice, in {self.tensors[twice].file.name} and "
                    f"{file.name} of {self.path}; the checkpoint is damaged (re-download it)"
                )
            self.tensors.update(found)

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r})"

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def files(self) -> list[Path]:
        """The weight files, in a stable order (what provenance hashes)."""
        return sorted({info.file for info in self.tensors.values()})

    @property
    def tied_embeddings(self) -> bool:
        cfg = self.config.get("text_config", self.config)
        return bool(cfg.get("tie_word_embeddings", self.config.get("tie_word_embeddings", False)))

    def names(self) -> list[str]:
        return list(self.tensors)

    def resolve(self, name: str) -> str | None:
        """The stored name that holds `name`: itself, or the embeddings for a tied output head."""
        if name in self.tensors:
            return name
        if name in LM_HEAD_NAMES and self.tied_embeddings:
            return next((n for n in self.tensors if EMBEDDING_PATTERN.search(n)), None)
        return None

    def info(self, name: str) -> TensorInfo:
        stored = self.resolve(name)
        if stored is None:
            raise CheckpointError(f"tensor {name!r} is not in {self.path}")
        return self.tensors[stored]

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Read one tensor, or its rows `rows` = (start, stop): a CPU tensor in its stored dtype
        that nothing else shares. From a safetensors shard it is a private (copy-on-write)
        memory map of just those bytes (rows are contiguous), unmapped when it is freed."""
        info = self.info(name)
        start, shape = (rows[0], (rows[1] - rows[0], *info.shape[1:])) if rows else (0, info.shape)
        if info.start < 0:
            whole = self._bin_shards[info.file][self.resolve(name)]
            return (whole[slice(*rows)] if rows else whole).clone()
        row_bytes = math.prod(info.shape[1:]) * info.dtype.itemsize
        first = info.start + start * row_bytes
        nbytes = math.prod(shape) * info.dtype.itemsize
        with _FILES.open(info.file) as fd:
            if os.fstat(fd).st_size < info.end:  # a map past the end would kill the process
                raise CheckpointError(
                    f"{info.file} was truncated while it was read (tensor {name!r} ends at byte "
                    f"{info.end}); do not change a model's files during a merge"
                )
            if nbytes >= MAP_BYTES and first % info.dtype.itemsize == 0:
                data = _mapped(fd, first, nbytes)
            else:  # a small tensor (a map holds a file descriptor), or an unaligned one
                data = _copied(fd, first, nbytes, f"{info.file} tensor {name!r}")
        return data.view(info.dtype).reshape(shape)

    def advise(self, name: str) -> None:
        """Have the kernel read tensor `name`'s bytes into the page cache now (for reads that
        will come in an order its readahead cannot guess); nothing is mapped or held here."""
        info = self.info(name)
        if info.start >= 0 and hasattr(os, "posix_fadvise"):
            with _FILES.open(info.file) as fd:
                os.posix_fadvise(fd, info.start, info.end - info.start, os.POSIX_FADV_WILLNEED)

    def close(self) -> None:
        """Close this checkpoint's shard files that no read is using."""
        _FILES.close(self.files)

    def _weight_files(self) -> list[Path]:
        for index_name in (SAFE_INDEX, BIN_INDEX):
            index = self.path / index_name
            if index.is_file():
                return self._shards_from_index(index)
        for single in ("model.safetensors", "pytorch_model.bin"):
            if (self.path / single).is_file():
                return [self.path / single]
        raise CheckpointError(
            f"no weights in {self.path}: expected model.safetensors, {SAFE_INDEX} with its shards, "
            f"or pytorch_model.bin"
        )

    def _shards_from_index(self, index: Path) -> list[Path]:
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(
                f"{index} is not a valid index (needs a 'weight_map'): {e}"
            ) from e
        if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
        ):
            raise CheckpointError(
                f"{index}: 'weight_map' must map tensor names to shard file names; the index is "
                "damaged (re-download it)"
            )
        root = Path(os.path.abspath(self.path))
        files = []
        for shard in sorted(set(weight_map.values())):
            # the name must lie inside the folder; the file may be a link out of it (the Hub
            # cache links every snapshot file to a blob)
            file = Path(os.path.abspath(root / shard))
            if not file.is_relative_to(root):
                raise CheckpointError(
                    f"{index} points outside the model folder ({shard!r}); refusing to read it. "
                    "Every shard must be a file inside the folder."
                )
            if not file.is_file():
                raise CheckpointError(f"{index} names shard {shard!r}, which is missing")
            files.append(file)
        return files


# tensors of at least this many bytes are mapped, smaller ones copied: a map saves a copy of a
# large tensor, but holds a file descriptor of its own while the tensor lives (60 models' norm
# vectors would hold 60 each)
MAP_BYTES = 1 << 20


def raise_open_files_limit() -> None:
    """Let this process open as many files as the system allows it (the soft limit raised to
    the hard one): every tensor mapped from a shard holds a descriptor while it is merged."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass  # kept as it is: the pool of open shards bounds itself by the soft limit


class _OpenFiles:
    """Shard files open for reading, shared by every checkpoint of the process: at most
    `limit` of them stay open when no read uses them (least recently used closed first), so a
    merge of 60 models of 6 shards each does not exhaust the process's file descriptors.
    A tensor mapped from a shard holds its own descriptor (mmap duplicates it) until freed."""

    def __init__(self):
        self._lock = threading.Lock()
        self._open: OrderedDict[Path, list[int]] = OrderedDict()  # file -> [fd, readers]

    @property
    def limit(self) -> int:
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        return max(4, min(64, soft // 8))

    @contextmanager
    def open(self, file: Path) -> Iterator[int]:
        with self._lock:
            entry = self._open.get(file)
            if entry is None:
                self._evict(self.limit - 1)
                entry = self._open[file] = [os.open(file, os.O_RDONLY), 0]
            self._open.move_to_end(file)
            entry[1] += 1
        try:
            yield entry[0]
        finally:
            with self._lock:
                entry[1] -= 1
                self._evict(self.limit)

    def close(self, files) -> None:
        with self._lock:
            for file in files:
                entry = self._open.get(file)
                if entry is not None and entry[1] == 0:
                    os.close(self._open.pop(file)[0])

    def _evict(self, keep: int) -> None:
        idle = [f for f, (_, readers) in self._open.items() if readers == 0]
        for file in idle[: max(0, len(self._open) - keep)]:
            os.close(self._open.pop(file)[0])


_FILES = _OpenFiles()


# config keys that must be whole numbers where present (the model's shape)
INTEGER_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "head_dim", "intermediate_size", "vocab_size")  # fmt: skip


def _read_config(file: Path) -> dict:
    """A model's config.json: a JSON object whose shape keys are whole numbers."""
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file} is not valid JSON: {e}") from e
    if not isinstance(config, dict):
        raise CheckpointError(f"{file} must be a JSON object (a model's config), not a list")
    for cfg in (config, config.get("text_config")):
        for key in INTEGER_KEYS if isinstance(cfg, dict) else ():
            value = cfg.get(key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise CheckpointError(f"{file}: {key} must be a whole number, not {value!r}")
    return config


def _safetensors_header(file: Path) -> dict[str, TensorInfo]:
    """Validate a shard with the safetensors library, then take each tensor's byte range."""
    try:
        with safe_open(file, framework="pt"):
            pass
    except (SafetensorError, OSError) as e:
        raise CheckpointError(
            f"{file} is not a readable safetensors file ({e}); it may be truncated or corrupt: "
            "download or save it again"
        ) from e
    with open(file, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
    data_start = 8 + header_len
    tensors = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        if meta["dtype"] not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{file}: tensor {name!r} has unsupported dtype {meta['dtype']}")
        begin, end = meta["data_offsets"]
        tensors[name] = TensorInfo(
            file,
            SAFETENSORS_DTYPES[meta["dtype"]],
            tuple(meta["shape"]),
            data_start + begin,
            data_start + end,
        )
    return tensors


def _load_bin(file: Path) -> dict[str, torch.Tensor]:
    try:
        try:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:  # the legacy (pre-zip) format cannot be mapped: read it whole
            if "mmap" not in str(e):
                raise
            state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for unsafe or damaged pickles
        raise CheckpointError(
            f"{file} could not be loaded safely with torch.load(weights_only=True) ({e}); convert "
            "it to safetensors with a trusted tool, or re-save it"
        ) from e
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise CheckpointError(f"{file} does not hold a flat state dict of tensors")
    return state


def _mapped(fd: int, start: int, nbytes: int) -> torch.Tensor:
    """Bytes start..start+nbytes of a file as a private memory map of just that range. Nothing
    is copied: pages come from the page cache as they are touched, and the map is unmapped
    when the tensor is freed: no copy into a buffer, and no first-touch page faults."""
    aligned = start - start % mmap.ALLOCATIONGRANULARITY
    mapped = mmap.mmap(fd, start + nbytes - aligned, offset=aligned, access=mmap.ACCESS_COPY)
    return torch.frombuffer(mapped, dtype=torch.uint8, count=nbytes, offset=start - aligned)


def _copied(fd: int, start: int, nbytes: int, what: str) -> torch.Tensor:
    """Bytes start..start+nbytes of a file read into a new buffer."""
    # not a bytearray: no zero-fill pass before the read overwrites it
    data = buffers.empty(nbytes, torch.uint8)
    view = memoryview(data.numpy()) if nbytes else memoryview(b"")
    done = 0
    while done < nbytes:
        n = os.preadv(fd, [view[done:]], start + done)
        if n == 0:
            raise CheckpointError(f"{what}: the file ended while reading it")
        done += n
    return data
