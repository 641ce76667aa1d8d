"""Do CUDA graphs (``torch.compile(mode="reduce-overhead")``) replay from a second thread?

    python benchmarks/gpu_probe_graphs.py

A model compiled and run on the main thread is then called from another thread, as a second
slide on a dask worker would call it. Prints one JSON line (``second_thread``: "ok" or the
error). Until a GPU says "ok", the inference runner refuses ``reduce-overhead`` from a second
thread (``CudaGraphThreadError``). Needs CUDA; elsewhere it prints why it did not run.
"""

from __future__ import annotations

import json
import threading

import torch


def main() -> int:
    if not torch.cuda.is_available():
        print(json.dumps({"bench": "graph_threads", "skipped": "no CUDA"}), flush=True)
        return 0
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 2)).cuda().eval()
    fn = torch.compile(model, mode="reduce-overhead", dynamic=False)
    x = torch.randn(8, 64, device="cuda")
    with torch.inference_mode():
        ref = [fn(x).clone() for _ in range(3)][-1]  # recorded and replayed on this thread
    result: dict[str, str] = {}

    def other() -> None:
        try:
            with torch.inference_mode():
                out = fn(x).clone()
            torch.cuda.synchronize()
            result["second_thread"] = "ok" if torch.allclose(out, ref) else "wrong values"
        except Exception as exc:  # the answer wanted: which error, if any
            result["second_thread"] = f"{type(exc).__name__}: {exc}"[:400]

    t = threading.Thread(target=other)
    t.start()
    t.join()
    print(json.dumps({"bench": "graph_threads", "torch": torch.__version__, **result}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
