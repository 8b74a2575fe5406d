"""Sharded safetensors written tensor by tensor.

Written shards are standard safetensors files streamed tensor by tensor: `ShardWriter` plans
all headers from the tensors' shapes first, because `safetensors.torch.save_file` needs every
tensor of a shard in memory at once. They bypass the page cache where the filesystem allows
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
from pathlib import Path

import numpy as np
import torch

from medmerge.errors import MergeError
from medmerge.io.checkpoint import DTYPE_NAMES
from medmerge.io.metadata import SAFE_INDEX


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
