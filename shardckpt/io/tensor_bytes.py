"""A tensor's bytes as a buffer: what every writer encodes.

Its own module so that io/data_writer.py does not import torch: the async writer
process runs the data writer on bytes in a shared arena and never sees a tensor.
"""

from __future__ import annotations

import torch

# dtypes whose .numpy() is a plain C-contiguous view of the same bytes
_NUMPY_DTYPES = frozenset({torch.float32, torch.float64, torch.float16, torch.int64,
                           torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool})


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The row-major bytes of a tensor as a zero-copy view where possible."""
    # Checked before acting: a save calls this for every tensor of the state, and most are
    # detached CPU tensors already (state_dict() detaches).
    if t.requires_grad:
        t = t.detach()
    if not t.is_cpu:
        t = t.cpu()
    if not t.is_contiguous():
        t = t.contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    if t.dtype in _NUMPY_DTYPES:  # one call fewer per tensor than the byte view below
        return memoryview(t.numpy()).cast("B")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()).cast("B")
