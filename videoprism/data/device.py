"""Host batches onto the GPU without making the host wait for it (the loader's and the trainer's copies)."""
from __future__ import annotations

import torch


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host batch tensor onto the device without making the host wait for the GPU: a 'non-blocking'
    copy from pageable memory first waits for everything queued on the stream (the previous step),
    from page-locked memory it does not. (The copy into page-locked memory runs on the host while
    the GPU works.) Device tensors, such as DALI's, pass through."""
    if device.type == "cuda" and x.device.type == "cpu" and not x.is_pinned():
        x = x.pin_memory()
    return x.to(device, non_blocking=True)
