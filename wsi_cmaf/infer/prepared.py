"""Per-process state shared by the slides of one worker: one lock per device and one prepared
copy of each model (folded, moved and compiled once, however many slides start together)."""

from __future__ import annotations

import threading
import weakref

import torch
from torch import nn

_DEVICE_LOCKS: dict[str, threading.Lock] = {}
_PREPARED: dict[tuple, tuple[weakref.ref, nn.Module, bool]] = {}
_PREPARING: dict[tuple, threading.Lock] = {}
#: device -> the thread that first ran a CUDA-graph (``reduce-overhead``) model there
_GRAPH_THREADS: dict[str, int] = {}
_GLOBAL_LOCK = threading.Lock()
_PREPARED_MAX = 4


def device_key(device: torch.device | str) -> str:
    """One name per physical device: ``"cuda"`` is the current CUDA device, so it and
    ``"cuda:0"`` (when 0 is current) name the same GPU; ``"cpu:0"`` is ``"cpu"``."""
    device = torch.device(device)
    if device.type == "cpu":
        return "cpu"
    if device.index is None and device.type == "cuda":
        index = torch.cuda.current_device() if torch.cuda.is_available() else 0
        return f"cuda:{index}"
    return str(device)


def device_lock(device: torch.device) -> threading.Lock:
    """One lock per device of this process.

    Slides in flight on one worker share its device and model: their batches are enqueued one
    block at a time under this lock, so a compiled (or CUDA-graph) module is never entered by two
    threads at once and CPU slides do not oversubscribe torch's thread pool. Reads, stain fits and
    writes of the other slides go on meanwhile.
    """
    with _GLOBAL_LOCK:
        return _DEVICE_LOCKS.setdefault(device_key(device), threading.Lock())


def _claim_graph_thread(device: torch.device, compile: str, cuda_graph_batch: int | None) -> None:
    """Refuse CUDA graphs on a second thread of one process.

    CUDA-graph trees keep per-thread state, so a ``reduce-overhead`` model first run on one dask
    worker thread is not safe to replay from another; slides sharing a worker run on several.
    """
    from wsi_cmaf.models.optimize import resolve_compile_mode

    if device.type != "cuda" or resolve_compile_mode(compile, device, cuda_graph_batch) != "reduce-overhead":
        return
    me = threading.get_ident()
    with _GLOBAL_LOCK:
        owner = _GRAPH_THREADS.setdefault(device_key(device), me)
    if owner != me:
        from wsi_cmaf.errors import CudaGraphThreadError

        raise CudaGraphThreadError(
            f"compile='reduce-overhead' (CUDA graphs) on {device_key(device)} is used from a second thread "
            "of this process, as when several slides share a worker; CUDA-graph trees are per thread. "
            "Use compile 'on' (or 'auto'), or run one slide per worker (slides_per_gpu=1)")


def prepared_model(model: nn.Module, device: torch.device, compile: str = "auto",
                   cuda_graph_batch: int | None = None) -> tuple[nn.Module, bool]:
    """``model`` prepared for inference on ``device`` (cached per process), and whether it is compiled.

    Uses :func:`wsi_cmaf.models.optimize.prepare_for_inference` (BN folding, channels_last,
    ``torch.compile`` on CUDA for ``compile="auto"``). Cached by module identity, so a batch
    worker that runs many slides with one model folds and compiles it once; slides that start
    together wait for the first one's preparation rather than each making a copy. A model whose
    weights are changed in place after its first use is not re-prepared. ``reduce-overhead`` on
    CUDA is refused (:class:`~wsi_cmaf.errors.CudaGraphThreadError`) from a second thread.
    """
    key = (id(model), device_key(device), compile, cuda_graph_batch)
    _claim_graph_thread(torch.device(device), compile, cuda_graph_batch)
    with _GLOBAL_LOCK:
        preparing = _PREPARING.setdefault(key, threading.Lock())
    with preparing:
        with _GLOBAL_LOCK:
            hit = _PREPARED.get(key)
            if hit is not None and hit[0]() is model:
                return hit[1], hit[2]
        from wsi_cmaf.models import optimize  # looked up per call: the models package loads on first use

        prepared = optimize.prepare_for_inference(model, device, compile=compile, cuda_graph_batch=cuda_graph_batch)
        compiled = (optimize.resolve_compile_mode(compile, device, cuda_graph_batch) is not None
                    and not isinstance(model, torch.jit.ScriptModule))
        with _GLOBAL_LOCK:
            if len(_PREPARED) >= _PREPARED_MAX:
                evicted = next(iter(_PREPARED))
                _PREPARED.pop(evicted)
                lock = _PREPARING.get(evicted)
                if evicted != key and lock is not None and not lock.locked():
                    _PREPARING.pop(evicted)
            _PREPARED[key] = (weakref.ref(model), prepared, compiled)
    return prepared, compiled
