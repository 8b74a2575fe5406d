import pytest
import torch

from medmerge.buffers import HUGE, empty


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
