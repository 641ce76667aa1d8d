"""Batch blocking for the high-resolution stages of CMAF-Net on CPUs.

At batch 32 and 224 px an inverted residual's expansion is a 77-205 MB tensor, and every op
allocates its output afresh. glibc serves allocations above its mmap threshold (at most 32 MB)
with new pages that fault and are zeroed on first touch: a one-pass forward took ~295k minor
faults (1.15 GB) per batch. Running the convolution-only stages before the first transformer,
and the ResNet-18 stem with its first stage, in chunks of about two images per thread keeps each
tensor under the threshold, so it reuses heap memory (8-42k faults), and those stages then run
about twice as fast. MODEL.md ("Speed") has the measurements, including an allocator that keeps
its memory, under which blocking gains nothing.

Only in eval mode, where BatchNorm uses its running statistics, is each image's output
independent of the chunking (oneDNN gives bit-identical results); in training the batch
statistics would change. GPUs want the whole batch in one launch and compiled graphs plan their
own buffers, so both take a single pass.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

#: Images per thread in one chunk at 224 px (scaled by area for other input sizes). Measured on
#: the local stages of a 2-core Xeon, chunks of 1, 2, 4 and 32 images: 2 was fastest with one
#: thread, 4 with two.
IMAGES_PER_THREAD_224 = 2


def cpu_chunk_size(module: nn.Module, x: torch.Tensor) -> int:
    """Images per chunk for ``module``'s blocked stages on ``x``; 0 means one pass.

    ``module.cpu_chunk`` overrides the choice: None picks from the thread count and input area,
    0 turns blocking off, a positive number is used as is.
    """
    override = getattr(module, "cpu_chunk", None)
    if module.training or x.device.type != "cpu" or torch.compiler.is_compiling() or override == 0:
        return 0
    if override:
        k = int(override)
    else:
        pixels = int(x.shape[-2]) * int(x.shape[-1])
        k = max(1, round(IMAGES_PER_THREAD_224 * torch.get_num_threads() * 224 * 224 / pixels))
    return k if k < x.shape[0] else 0


def run_blocked(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, k: int) -> torch.Tensor:
    """``fn(x)``, computed on chunks of ``k`` images and concatenated (one pass when k is 0)."""
    if not k:
        return fn(x)
    return torch.cat([fn(chunk) for chunk in x.split(k)])
