"""Step inputs to the device without waiting for the step in flight (engine/transfer.py)."""
import random

import numpy as np
import pytest
import torch

from prism.engine.transfer import (PINNED_STAGING_BYTES, HostResult, device_tensor, padded_block_tables,
                                   to_host_async)


def sizes():
    # Either side of the pinned-staging threshold, in int64 elements.
    n = PINNED_STAGING_BYTES // 8
    return [1, n - 1, n, 4 * n + 3]


def test_on_the_cpu_the_host_tensor_is_the_result():
    data = list(range(100))
    out = device_tensor(data, torch.long, "cpu")
    assert out.dtype == torch.long and out.tolist() == data
    assert to_host_async(out) is out


def test_block_tables_are_padded_with_block_zero_as_the_plain_lists_would_be():
    rng = random.Random(3)
    for num in (0, 1, 7, 300):
        tables = [[rng.randrange(1, 10**6) for _ in range(rng.randrange(0, 40))] for _ in range(num)]
        width = max(map(len, tables), default=0)
        expected = [t + [0] * (width - len(t)) for t in tables]
        got = padded_block_tables(tables)
        assert got.dtype == np.int32 and got.shape == (num, width) and got.tolist() == expected
        assert device_tensor(got, torch.int32, "cpu").tolist() == expected


@pytest.mark.gpu
@pytest.mark.parametrize("n", sizes())
def test_on_cuda_inputs_arrive_intact_and_no_copy_waits(n):
    """Queued behind a long kernel, every copy (pageable or pinned-staged) is only queued:
    torch's sync debug mode raises on any that synchronizes."""
    data = torch.randint(-2**40, 2**40, (n,)).tolist()
    big = torch.randn(4096, 4096, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(8):
            big = big @ big / 64  # keeps the stream busy while the inputs are copied
        out = device_tensor(data, torch.long, torch.device("cuda"))
        back = to_host_async(out)
        ready = HostResult(torch.device("cuda"))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    ready.wait()
    assert back.tolist() == data
