import pytest
import torch

from medmerge.io import buffers
from medmerge.io.buffers import HUGE, empty, release


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.int64, torch.bool])
@pytest.mark.parametrize("shape", [(), (0,), 7, (3, 0, 2), (HUGE // 4 + 3,), (1024, HUGE // 1024)])
def test_empty_is_a_torch_empty(dtype, shape):
    t = empty(shape, dtype)
    expected = torch.empty(shape, dtype=dtype)
    assert (t.shape, t.dtype, t.device) == (expected.shape, dtype, expected.device)
    assert t.is_contiguous()
    t.fill_(1)  # writable, every byte of it
    assert bool((t == 1).all())


def test_empty_on_other_devices_is_torch_empty():
    t = empty((HUGE,), torch.float32, "meta")
    assert t.device.type == "meta" and t.shape == (HUGE,)


def test_a_freed_buffer_is_reused_only_when_no_tensor_uses_it():
    release()
    first = empty((HUGE // 4,), torch.float32)
    view = first[1:]  # keeps the buffer in use after `first` goes
    address = first.data_ptr()
    del first
    second = empty((HUGE // 4,), torch.float32)
    assert second.data_ptr() != address
    del view
    third = empty((HUGE // 2,), torch.bfloat16)  # the same size in bytes: the freed buffer
    assert third.data_ptr() == address
    del second, third
    assert buffers._pooled == 2 * HUGE
    release()
    assert buffers._pooled == 0


def test_the_pool_keeps_at_most_pool_bytes(monkeypatch):
    release()
    monkeypatch.setattr(buffers, "POOL_BYTES", 3 * HUGE)
    held = [empty((HUGE,), torch.uint8) for _ in range(5)]
    del held
    assert buffers._pooled == 3 * HUGE
    release()
