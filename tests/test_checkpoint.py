import errno
import json
import math
import os
import pickle

import numpy as np
import pytest
import torch
from conftest import state
from safetensors.torch import load_file, save_file

from medmerge.errors import CheckpointError, MergeError
from medmerge.io.checkpoint import Checkpoint
from medmerge.io.folders import atomic_folder
from medmerge.io.shards import (
    ALIGN,
    STAGE_BYTES,
    SequentialFile,
    ShardWriter,
    parse_size,
    staging_buffer,
)


def test_reader_matches_safetensors_loader(family):
    base = family[0]
    expected = state(base)
    ckpt = Checkpoint(base)
    assert len(list(base.glob("model-*.safetensors"))) > 1, "fixture should be sharded"
    assert set(ckpt.names()) == set(expected)
    for name, tensor in expected.items():
        got = ckpt.read(name)
        assert got.dtype == torch.bfloat16 and got.shape == tensor.shape
        assert torch.equal(got, tensor), name


def test_read_tensors_are_private_and_outlive_the_reader(tmp_path):
    """A read tensor maps the file copy-on-write: writing to it changes neither the file nor
    a second read, and it stays valid after the checkpoint is closed."""
    save_file(
        {"w": torch.arange(6.0).reshape(2, 3), "e": torch.ones(0)}, tmp_path / "model.safetensors"
    )
    (tmp_path / "config.json").write_text("{}")
    before = (tmp_path / "model.safetensors").read_bytes()
    ckpt = Checkpoint(tmp_path)
    w = ckpt.read("w")
    w.fill_(7.0)
    assert torch.equal(ckpt.read("w"), torch.arange(6.0).reshape(2, 3))
    assert ckpt.read("e").shape == (0,)
    ckpt.close()
    assert w.sum() == 42 and (tmp_path / "model.safetensors").read_bytes() == before


def test_read_tensor_at_an_odd_offset(tmp_path):
    """safetensors does not require aligned offsets: a float32 tensor after a 3-byte one cannot
    be a typed view of a map, and is copied instead."""
    header = {
        "b": {"dtype": "U8", "shape": [3], "data_offsets": [0, 3]},
        "w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [3, 19]},
    }
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    data = bytes([1, 2, 3]) + torch.tensor([[1.5, -2.0], [0.25, 4.0]]).numpy().tobytes()
    (tmp_path / "model.safetensors").write_bytes(len(text).to_bytes(8, "little") + text + data)
    (tmp_path / "config.json").write_text("{}")
    ckpt = Checkpoint(tmp_path)
    assert torch.equal(ckpt.read("w"), torch.tensor([[1.5, -2.0], [0.25, 4.0]]))
    assert ckpt.read("b").tolist() == [1, 2, 3]


def test_tied_head_reads_the_embeddings(tmp_path):
    from medmerge.synthetic import tiny_config, write_model

    folder = write_model(tmp_path / "llama", tiny_config("llama"))
    ckpt = Checkpoint(folder)
    assert ckpt.tied_embeddings and "lm_head.weight" not in ckpt.names()
    assert torch.equal(ckpt.read("lm_head.weight"), ckpt.read("model.embed_tokens.weight"))


def test_legacy_bin_is_read_with_weights_only(tmp_path, family):
    tensors = {k: v.clone() for k, v in state(family[0]).items()}
    folder = tmp_path / "legacy"
    folder.mkdir()
    (folder / "config.json").write_text((family[0] / "config.json").read_text())
    torch.save(tensors, folder / "pytorch_model.bin")
    ckpt = Checkpoint(folder)
    for name, t in tensors.items():
        assert torch.equal(ckpt.read(name), t)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/medmerge-pwned",))


def test_pickle_with_code_is_refused(tmp_path, family):
    folder = tmp_path / "evil"
    folder.mkdir()
    (folder / "config.json").write_text((family[0] / "config.json").read_text())
    with open(folder / "pytorch_model.bin", "wb") as f:
        pickle.dump({"x": _Evil()}, f)
    with pytest.raises(CheckpointError, match="weights_only"):
        Checkpoint(folder)
    assert not os.path.exists("/tmp/medmerge-pwned")


@pytest.mark.parametrize("limit", [1_000, 50_000, 10**9])
def test_writer_streams_valid_shards_within_the_limit(tmp_path, limit):
    g = torch.Generator().manual_seed(0)
    tensors = {f"t{i}": torch.randn(17, 31, generator=g).to(torch.bfloat16) for i in range(6)}
    tensors["scalar"] = torch.tensor(3.0)
    tensors["ints"] = torch.arange(5, dtype=torch.int64)
    plan = [(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]
    writer = ShardWriter(tmp_path, plan, limit)
    for n, t in tensors.items():
        writer.write(n, t)
    shards = writer.finish()
    read = {}
    for shard in shards:
        part = load_file(tmp_path / shard)
        sizes = sum(t.numel() * t.element_size() for t in part.values())
        assert sizes <= limit or len(part) == 1
        read.update(part)
    assert read.keys() == tensors.keys()
    for n, t in tensors.items():
        assert torch.equal(read[n], t)
    if len(shards) > 1:
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"].values()) == set(shards)
        assert index["metadata"]["total_size"] == sum(math.prod(s) * d.itemsize for _, s, d in plan)


@pytest.mark.parametrize("direct", ["1", "0"])
@pytest.mark.parametrize("sizes", [[], [1], [ALIGN - 1, 2], [ALIGN], [5, STAGE_BYTES, ALIGN + 3]])
def test_sequential_file_writes_every_byte_once(tmp_path, monkeypatch, direct, sizes):
    """Staged and written in whole blocks (direct), or straight through the page cache: the
    file holds exactly the bytes given, in order, across stage boundaries and after files that
    reused the stage."""
    monkeypatch.setenv("MEDMERGE_DIRECT_IO", direct)
    rng = np.random.default_rng(len(sizes))
    stage = staging_buffer()
    for name in ("first", "second"):
        pieces = [rng.integers(0, 256, n, dtype=np.uint8) for n in sizes]
        f = SequentialFile(tmp_path / name, stage)
        if direct == "0" or not hasattr(os, "O_DIRECT"):
            assert not f.direct
        for piece in pieces:
            f.write(piece)
        f.close()
        expected = np.concatenate(pieces) if pieces else np.zeros(0, np.uint8)
        assert np.array_equal(np.fromfile(tmp_path / name, np.uint8), expected)


def test_sequential_file_falls_back_when_a_direct_write_is_refused(tmp_path):
    """A device that wants coarser alignment refuses a direct write (EINVAL): the file goes on
    through the page cache, bytes intact."""
    f = SequentialFile(tmp_path / "f", staging_buffer())
    if not f.direct:
        pytest.skip("this filesystem takes no direct I/O")

    class Refusing:  # the file object, refusing the first write
        def __init__(self, raw):
            self.raw, self.refused = raw, False

        def write(self, data):
            if not self.refused:
                self.refused = True
                raise OSError(errno.EINVAL, "Invalid argument")
            return self.raw.write(data)

        def __getattr__(self, name):
            return getattr(self.raw, name)

    f._raw = Refusing(f._raw)
    data = np.random.default_rng(0).integers(0, 256, STAGE_BYTES + 10, dtype=np.uint8)
    f.write(data[:7])
    f.write(data[7:])
    f.close()
    assert f._raw.refused and not f.direct
    assert np.array_equal(np.fromfile(tmp_path / "f", np.uint8), data)


def test_writer_refuses_out_of_order_and_wrong_shape(tmp_path):
    writer = ShardWriter(tmp_path, [("a", (2,), torch.float32), ("b", (2,), torch.float32)], 100)
    with pytest.raises(MergeError, match="order"):
        writer.write("b", torch.zeros(2))
    with pytest.raises(MergeError, match="expected"):
        writer.write("a", torch.zeros(3))


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("500mb") == 500 * 10**6
    assert parse_size("1234") == 1234
    with pytest.raises(ValueError, match="not a size"):
        parse_size("five gigs")


def test_atomic_folder_leaves_nothing_on_failure(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError), atomic_folder(out) as tmp:
        (tmp / "half.safetensors").write_bytes(b"x")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_atomic_folder_replaces_only_with_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old").write_text("old")
    with pytest.raises(MergeError, match="--overwrite"), atomic_folder(out):
        pass
    with atomic_folder(out, overwrite=True) as tmp:
        (tmp / "new").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_truncated_and_corrupt_shards_are_named(tmp_path):
    save_file({"w": torch.ones(64, 64)}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text("{}")
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors.*truncated or corrupt"):
        Checkpoint(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\xff" * 100)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        Checkpoint(tmp_path)
