"""Read and write Hugging Face checkpoint folders one tensor at a time.

Guarantees:
- Reading never runs code that comes with a checkpoint. Safetensors shards are data (validated
  by `safetensors.safe_open` when opened); legacy `pytorch_model*.bin` shards are read only with
  `torch.load(weights_only=True, mmap=True)`.
- Reading is lazy and bounded: a tensor is mapped from its shard when it is asked for, and only
  its own bytes (a private, copy-on-write map, unmapped when the tensor is freed). So resident
  memory holds the tensors being merged, never the model, and nothing is copied: a map of the
  whole shard would count every page read in the process's RSS, a read into a buffer copies.
- Every shard an index names must lie inside the model folder, exist, and be complete.
- Writing is atomic: `atomic_folder` hands out a temporary folder beside the destination and
  renames it into place only when everything inside is written.
- Written shards are standard safetensors files streamed tensor by tensor: `ShardWriter` plans all
  headers from the tensors' shapes first, because `safetensors.torch.save_file` needs every tensor
  of a shard in memory at once. They bypass the page cache where the filesystem allows
  (`SequentialFile`).
"""

from __future__ import annotations

import errno
import fcntl
import json
import math
import mmap
import os
import re
import resource
import shutil
import tempfile
import threading
import uuid
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from medmerge.errors import CheckpointError, MergeError
from medmerge.io import buffers

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

SAFE_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
)
# every file besides the weights that medmerge reads from a model folder, or copies out of it
METADATA_FILES = (
    "config.json",
    "generation_config.json",
    "adapter_config.json",
    SAFE_INDEX,
    BIN_INDEX,
    "chat_template.json",
    *TOKENIZER_FILES,
)
# Names under which an untied output head would be stored, and the embeddings it is tied to.
LM_HEAD_NAMES = ("lm_head.weight", "embed_out.weight")
EMBEDDING_PATTERN = re.compile(r"(embed_tokens|embed_in|wte|word_embeddings)\.weight$")


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


def metadata_file(folder: str | os.PathLike, name: str) -> Path | None:
    """`folder/name`, a file besides the weights, where it exists; None where it does not.

    Such files are copied into merged models, so one that links out of its folder (a
    `tokenizer.model` linked to a private key) would be published with the merge: a link may
    point only inside the folder, or, for a Hub cache snapshot, into its repository's blobs."""
    path = Path(folder) / name
    if not path.is_file():
        return None
    real = path.resolve()
    if not any(real.is_relative_to(place) for place in _own_places(Path(folder))):
        raise CheckpointError(
            f"{path} links to {real}, outside its model folder; medmerge copies such files into "
            "merged models, so it reads them only from inside the folder: copy the file in "
            "place of the link"
        )
    return path


def _own_places(folder: Path) -> list[Path]:
    """Where a model folder's files may lie: the folder, and for a Hub cache snapshot
    (`repo/snapshots/<commit>/`) its repository's `blobs` folder, itself no link."""
    places = [folder.resolve()]
    for f in {Path(os.path.abspath(folder)), folder.resolve()}:
        repo = f.parent.parent
        blobs = repo / "blobs"
        if f.parent.name == "snapshots" and blobs.is_dir() and not blobs.is_symlink():
            places.append(blobs.resolve())
    return places


def drop_code_references(folder: Path) -> None:
    """Remove `auto_map` (the Python classes a model or tokenizer would load with
    `trust_remote_code`) from an output's config and tokenizer settings: medmerge never
    copies that code, so an output must not point at it."""
    for name in ("config.json", "tokenizer_config.json"):
        file = folder / name
        if not file.is_file():
            continue
        data = json.loads(file.read_text(encoding="utf-8"))
        if isinstance(data, dict) and data.pop("auto_map", None) is not None:
            file.write_text(json.dumps(data, indent=2) + "\n")


def check_metadata(folder: str | os.PathLike) -> None:
    """Refuse a model or adapter folder any of whose known non-weight files links outside it."""
    for name in METADATA_FILES:
        metadata_file(folder, name)


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


def parse_size(size: str | int) -> int:
    """'5GB', '500MB', '2GiB' or a number of bytes."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", size, re.IGNORECASE)
    if not m:
        raise ValueError(f"not a size: {size!r} (examples: 5GB, 500MB, 2GiB, 1000000)")
    unit = (m.group(2) or "B").upper()
    base = 1024 if "I" in unit else 1000
    power = "BKMGT".index(unit[0]) if unit[0] in "KMGT" else 0
    return int(float(m.group(1)) * base**power)


ALIGN = 4096  # direct writes: file offsets, lengths and buffer addresses are multiples of it
STAGE_BYTES = 16 << 20


def staging_buffer() -> np.ndarray:
    """An aligned buffer for `SequentialFile` (anonymous maps start on a page)."""
    return np.frombuffer(mmap.mmap(-1, STAGE_BYTES), np.uint8)


class SequentialFile:
    """A new file written front to back, bypassing the page cache (O_DIRECT) where the system
    allows: bytes are staged in `stage`, an aligned buffer reused from file to file, written in
    whole blocks, and the file is cut to its length when closed.

    Written through the page cache, every byte of a merged model is copied into newly allocated
    pages, CPU time the merge's arithmetic needs. Where the filesystem refuses direct I/O (tmpfs,
    some network filesystems), or with MEDMERGE_DIRECT_IO=0, the bytes go through the page
    cache unstaged."""

    def __init__(self, path: Path, stage: np.ndarray):
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        direct = getattr(os, "O_DIRECT", 0) if os.environ.get("MEDMERGE_DIRECT_IO") != "0" else 0
        try:
            fd = os.open(path, flags | direct, 0o666)
        except OSError as e:
            if not direct or e.errno != errno.EINVAL:
                raise
            fd, direct = os.open(path, flags, 0o666), 0
        self._raw = open(fd, "wb", buffering=0)  # noqa: SIM115 - closes the descriptor, also on gc
        self.direct = bool(direct)
        self._stage = stage
        self._fill = 0  # bytes staged
        self._length = 0  # bytes given

    def write(self, data: np.ndarray) -> None:
        """Append the bytes of a contiguous uint8 array."""
        self._length += len(data)
        done = 0
        while done < len(data):
            if not self.direct:
                self._write(data[done:])
                return
            n = min(len(self._stage) - self._fill, len(data) - done)
            self._stage[self._fill : self._fill + n] = data[done : done + n]  # releases the GIL
            self._fill += n
            done += n
            if self._fill == len(self._stage):
                self._flush()

    def close(self) -> None:
        if self._fill:
            self._flush()
        os.ftruncate(self._raw.fileno(), self._length)  # less the last block's padding
        self._raw.close()

    def _flush(self) -> None:
        """Write the staged bytes, the last block padded with zeros."""
        end = self._fill + (-self._fill % ALIGN)
        self._stage[self._fill : end] = 0
        self._fill = 0
        self._write(self._stage[:end])

    def _write(self, data: np.ndarray) -> None:
        done = 0
        while done < len(data):
            try:
                done += self._raw.write(data[done:])
            except OSError as e:
                if not self.direct or e.errno != errno.EINVAL:
                    raise
                # the device wants coarser alignment than ALIGN: go through the page cache
                fd = self._raw.fileno()
                fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)
                self.direct = False


class ShardWriter:
    """Streams tensors, in a fixed planned order, into size-limited safetensors shards."""

    def __init__(
        self,
        folder: Path,
        plan: list[tuple[str, tuple[int, ...], torch.dtype]],
        max_shard_bytes: int,
    ):
        self.folder = folder
        shards: list[list[tuple[str, tuple[int, ...], torch.dtype]]] = [[]]
        size = 0
        for entry in plan:
            nbytes = math.prod(entry[1]) * entry[2].itemsize
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(entry)
            size += nbytes
        n = len(shards)
        names = (
            ["model.safetensors"]
            if n == 1
            else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        )
        self.shards = list(zip(names, shards, strict=True))
        self.order = [name for _, entries in self.shards for name, _, _ in entries]
        self._next = 0
        self._shard = -1
        self._file: SequentialFile | None = None
        self._stage: np.ndarray | None = None
        self._left_in_shard = 0
        self._rows = 0  # rows written of a tensor written in row blocks
        self.total_size = sum(math.prod(s) * d.itemsize for _, s, d in plan)

    def write(self, name: str, tensor: torch.Tensor, rows: bool = False) -> None:
        """Write tensor `name` (the next planned one), or with `rows` its next rows: a tensor
        written in row blocks is done when all its rows are."""
        if self._next >= len(self.order) or self.order[self._next] != name:
            raise MergeError(f"internal error: tensor {name!r} written out of planned order")
        if self._left_in_shard == 0:
            self._open_next_shard()
        _, entries = self.shards[self._shard]
        _, shape, dtype = entries[len(entries) - self._left_in_shard]
        given = tuple(tensor.shape)
        done = self._rows + (given[0] if rows else 0)
        whole = done == shape[0] if rows else given == shape
        fits = given[1:] == shape[1:] and done <= shape[0] if rows else whole
        if not fits or tensor.dtype != dtype:
            raise MergeError(
                f"tensor {name!r}: method returned {given} {tensor.dtype}, expected {shape} {dtype}"
            )
        self._file.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
        self._rows = 0 if whole else done
        if not whole:
            return
        self._next += 1
        self._left_in_shard -= 1
        if self._left_in_shard == 0:
            self._file.close()
            self._file = None

    def _open_next_shard(self) -> None:
        self._shard += 1
        file_name, entries = self.shards[self._shard]
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, shape, dtype in entries:
            nbytes = math.prod(shape) * dtype.itemsize
            header[name] = {
                "dtype": DTYPE_NAMES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the format aligns the data section to 8 bytes
        if self._stage is None:
            self._stage = staging_buffer()
        self._file = SequentialFile(self.folder / file_name, self._stage)
        self._file.write(np.frombuffer(len(raw).to_bytes(8, "little") + raw, np.uint8))
        self._left_in_shard = len(entries)

    def finish(self) -> list[str]:
        """Check every planned tensor was written; write the index. Returns the shard names."""
        if self._next != len(self.order):
            raise MergeError(f"internal error: {len(self.order) - self._next} tensors not written")
        if len(self.shards) > 1:
            weight_map = {name: f for f, entries in self.shards for name, _, _ in entries}
            index = {"metadata": {"total_size": self.total_size}, "weight_map": weight_map}
            (self.folder / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return [f for f, _ in self.shards]


def write_state(
    folder: Path, state: dict[str, torch.Tensor], dtype: torch.dtype, max_shard_bytes: int
) -> list[str]:
    """Write an in-memory state dict as sharded safetensors, floating tensors cast to `dtype`."""
    layout = [
        (n, tuple(t.shape), dtype if t.is_floating_point() else t.dtype) for n, t in state.items()
    ]
    writer = ShardWriter(folder, layout, max_shard_bytes)
    for name, _, d in layout:
        writer.write(name, state[name].to(d))
    return writer.finish()


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


@contextmanager
def atomic_folder(out_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `out_dir`; on success its files are synced to disk and
    it replaces `out_dir` by renaming. One process at a time writes a destination (`locked`);
    what a killed writer left beside it is removed first (`sweep`). An `out_dir` that is a
    link to a folder is that folder."""
    out = _output_path(out_dir)
    if out.exists() and not out.is_dir():
        raise MergeError(f"output path {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise MergeError(f"output folder {out} is not empty; pass --overwrite to replace it")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as e:
        raise MergeError(f"output folder {out}: {out.parent} is not a folder") from e
    stages = holds(out)  # a multi-document merge's final stage: its stages' folder is live
    with locked(out):
        remove_leftovers(out, stages=not stages)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary folder
        try:
            yield tmp
            _sync(tmp)
            if out.is_dir() and any(out.iterdir()) and not overwrite:
                raise MergeError(
                    f"output folder {out} appeared while this merge ran; pass --overwrite to "
                    "replace it"
                )
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if out.exists():
            old = out.with_name(f".{out.name}.tmp-old-{uuid.uuid4().hex[:8]}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
        _sync_folder(out.parent)


def _output_path(out_dir: str | os.PathLike) -> Path:
    """The output folder as the system will write it: absolute, every link on the way followed
    (one that leads nowhere is refused)."""
    out = Path(os.path.abspath(out_dir))
    if out.is_symlink() and not out.exists():
        raise MergeError(f"output folder {out} is a link to {os.readlink(out)}, which does "
                         "not exist; give a folder, or a link to one")  # fmt: skip
    return Path(os.path.realpath(out))


def refuse_output_near(out_dir: str | os.PathLike, inputs, what: str = "output folder",
                       contains: bool = True) -> None:  # fmt: skip
    """Refuse an output (`what`) that is, lies inside or (with `contains`) contains one of the
    folders `inputs`, links followed: replacing it would delete them, writing into it would
    change them."""
    target = _output_path(out_dir)
    for folder in sorted({Path(f) for f in inputs}):
        real = Path(os.path.realpath(folder))
        where = (
            "is" if real == target
            else "contains" if contains and real.is_relative_to(target)
            else "lies inside" if target.is_relative_to(real)
            else None
        )  # fmt: skip
        if where:
            raise MergeError(
                f"{what} {out_dir} {where} the input {folder}; write to a folder apart from the "
                "inputs"
            )


LEFTOVER = re.compile(r"\.(?P<name>.+)\.(?:tmp-[^.]*|parts-[^.]*|lock)")


def remove_leftovers(target: Path, stages: bool = True) -> None:
    """Remove the temporary folders that writers of `target` killed before they finished left
    beside it (`.NAME.tmp-*`, and with `stages` a multi-document merge's `.NAME.parts-*`); the
    caller holds `target`'s lock."""
    target = Path(os.path.abspath(target))
    for pattern in [f".{target.name}.tmp-*"] + [f".{target.name}.parts-*"] * stages:
        for stale in target.parent.glob(pattern):
            shutil.rmtree(stale, ignore_errors=True)


def sweep(folder: Path) -> None:
    """Remove what killed writers left in `folder`: temporary folders of outputs no process
    is writing, and their lock files (a live writer's are kept)."""
    names = {m["name"] for p in folder.glob(".*") if (m := LEFTOVER.fullmatch(p.name))}
    for name in sorted(names):
        try:
            with locked(folder / name):  # released: the lock file is removed too
                remove_leftovers(folder / name)
        except MergeError:
            continue  # being written now


def _sync(folder: Path) -> None:
    """Flush every file under `folder`, then the folders, to disk: a folder renamed into place
    after a power loss then holds whole files."""
    for path in sorted(folder.rglob("*"), reverse=True):
        if path.is_file() and not path.is_symlink():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        elif path.is_dir():
            _sync_folder(path)
    _sync_folder(folder)


def _sync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_HELD: dict[Path, tuple[int, int]] = {}  # lock files held here: (thread, times taken)


def _lock_path(target: str | os.PathLike) -> Path:
    target = Path(os.path.abspath(target))
    return target.parent / f".{target.name}.lock"


def holds(target: str | os.PathLike) -> bool:
    """Whether this thread holds the lock of `target`."""
    return _HELD.get(_lock_path(target), (None,))[0] == threading.get_ident()


@contextmanager
def locked(target: Path, wait: bool = False) -> Iterator[None]:
    """Hold the lock of `target` (a file `.NAME.lock` beside it, holding the owner's pid): a
    second writer gets an error naming the first, or with `wait` waits for it. The kernel drops
    the lock of a process that dies, so a lock is never stale; the thread that holds a lock may
    take it again (a multi-document merge's final stage)."""
    target, path = Path(os.path.abspath(target)), _lock_path(target)
    me = threading.get_ident()
    if holds(target):
        _HELD[path] = (me, _HELD[path][1] + 1)
        try:
            yield
        finally:
            _HELD[path] = (me, _HELD[path][1] - 1)
        return
    fd = _lock_file(path, target, wait)
    _HELD[path] = (me, 1)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield
    finally:
        del _HELD[path]
        path.unlink(missing_ok=True)
        os.close(fd)


def _lock_file(path: Path, target: Path, wait: bool) -> int:
    """An open descriptor of lock file `path`, locked by this process."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            if not wait:
                os.close(fd)
                raise MergeError(
                    f"{target} is being written by another medmerge process (pid {owner}); wait "
                    "for it to finish, or write elsewhere"
                ) from None
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:  # the file may have been unlinked by its last owner between open and lock
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)
