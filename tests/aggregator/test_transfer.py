"""DeviceTransfer: a no-op on the CPU; pinned, overlapped copies on CUDA (skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch

from services.aggregator.transfer import DeviceTransfer


def state(seed: int) -> dict[str, torch.Tensor]:
    """A small state dict with several dtypes, a 0-d tensor, an empty and a non-contiguous one."""
    gen = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(33, 7, generator=gen),
        "h": torch.randn(5, generator=gen).to(torch.bfloat16),
        "d": torch.randn(3, generator=gen, dtype=torch.float64),
        "n": torch.tensor(seed),
        "m": torch.rand(9, generator=gen) > 0.5,
        "empty": torch.empty(0, 4),
        "t": torch.randn(4, 6, generator=gen).t(),
    }


def test_cpu_returns_the_same_tensors() -> None:
    """On the CPU nothing is copied: the very same tensor objects, in the same order."""
    transfer = DeviceTransfer(torch.device("cpu"))
    update = state(1)
    moved = transfer.to_device(update)
    assert list(moved) == list(update)
    for name, tensor in update.items():
        assert moved[name] is tensor
    transfer.synchronize()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_copies_through_reused_pinned_buffers() -> None:
    """Three updates in a row arrive intact (the first pinned buffer is reused for the third)."""
    device = torch.device("cuda")
    transfer = DeviceTransfer(device)
    updates = [state(seed) for seed in range(3)]
    moved = [transfer.to_device(u) for u in updates]
    first_buffer = transfer._buffers[0].data_ptr()
    again = transfer.to_device(state(0))
    assert transfer._buffers[0].data_ptr() == first_buffer, "a buffer large enough is reused"
    torch.cuda.synchronize()
    for update, out in zip([*updates, state(0)], [*moved, again], strict=True):
        assert list(out) == list(update)
        for name, tensor in update.items():
            assert out[name].device.type == "cuda"
            assert out[name].dtype == tensor.dtype
            assert torch.equal(out[name].cpu(), tensor), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_copies_are_ordered_before_compute_on_the_current_stream() -> None:
    """A sum taken on the current stream right after the transfer sees the copied values."""
    device = torch.device("cuda")
    transfer = DeviceTransfer(device)
    big = {"x": torch.ones(1 << 24)}
    total = transfer.to_device(big)["x"].sum()
    assert float(total) == float(1 << 24)
