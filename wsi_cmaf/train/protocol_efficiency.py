"""Table 8: parameters, FLOPs, peak memory and throughput of CMAF-Net and the timm baselines.

No training: each model is built with random weights and timed on random input. Peak memory is
``torch.cuda.max_memory_allocated`` on a GPU; on CPU it is the rise of the process's resident set
size (RSS) over its value before the model was built, sampled every 10 ms with psutil up to the end
of the warm-up passes (weights + one forward's activations), each model in a fresh process so the
baseline is clean — the column ``memory_method`` says which one a row used. Throughput is timed after the warm-up, without the sampler running.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from wsi_cmaf.errors import ConfigError
from wsi_cmaf.infer.runner import resolve_device

logger = logging.getLogger(__name__)


@dataclass
class EfficiencyConfig:
    """What to measure: models (registry names) at ``input_size`` with ``batch_size`` images per pass."""

    models: list[str] = field(default_factory=list)  # empty: CMAF-Net + the Table 1 timm baselines
    model_kwargs: dict[str, dict[str, Any]] = field(default_factory=dict)  # per model name
    input_size: int = 224
    batch_size: int = 32
    warmup: int = 2
    iters: int = 5
    device: str = "auto"
    num_classes: int = 2
    #: CPU only: measure each model in a fresh process. In one process, heap freed by the
    #: previous model is reused and the RSS rise of the next one reads near zero.
    isolate: bool = True

    def resolved_models(self) -> list[str]:
        """The models to measure (defaults filled in)."""
        from wsi_cmaf.train.protocols import TIMM_BASELINES

        return list(self.models) or ["cmaf_net", *(f"timm:{a}" for a in TIMM_BASELINES)]

    def validate(self) -> EfficiencyConfig:
        """Raise :class:`ConfigError` on impossible values."""
        if self.input_size < 32 or self.batch_size < 1 or self.iters < 1 or self.warmup < 0:
            raise ConfigError("efficiency: need input_size >= 32, batch_size >= 1, iters >= 1, warmup >= 0")
        return self


class _RssSampler:
    """Background thread recording the peak RSS of this process (CPU peak-memory estimate)."""

    def __init__(self, interval: float = 0.01) -> None:
        import psutil

        self._proc = psutil.Process()
        self.baseline = self._proc.memory_info().rss
        self.peak = self.baseline
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(self._interval)

    def __enter__(self) -> _RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


def measure_model(name: str, cfg: EfficiencyConfig, kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """One Table 8 row: params, FLOPs/MACs per image, peak memory (MiB), images/s (inference)."""
    from wsi_cmaf.models import create_model
    from wsi_cmaf.models.profile import count_flops, count_parameters

    device = resolve_device(cfg.device)
    kwargs = dict(kwargs or {})
    kwargs.setdefault("input_size", cfg.input_size)
    cuda = device.type == "cuda"
    sampler = None if cuda else _RssSampler()  # baseline RSS taken before the model exists
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        start_mem = torch.cuda.memory_allocated(device)
    model = create_model(name, num_classes=cfg.num_classes, **kwargs).eval()
    params = count_parameters(model)["total"]
    model.to(device)
    x = torch.randn(cfg.batch_size, 3, cfg.input_size, cfg.input_size, device=device)
    with torch.inference_mode():
        # Peak memory over the warm-up passes (weights + one forward's activations). The RSS
        # sampler is stopped before timing: its wake-ups would stall the intra-op threads.
        if sampler is not None:
            sampler.__enter__()
        try:
            for _ in range(max(cfg.warmup, 1)):
                model(x)
        finally:
            if sampler is not None:
                sampler.__exit__()
        if cuda:
            torch.cuda.synchronize(device)
            peak = (torch.cuda.max_memory_allocated(device) - start_mem) / 2**20
        t0 = time.perf_counter()
        for _ in range(cfg.iters):
            model(x)
        if cuda:
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
    if sampler is not None:
        peak = (sampler.peak - sampler.baseline) / 2**20
    method = "cuda_max_memory_allocated" if cuda else "cpu_rss_peak_delta"
    flops = count_flops(model.cpu(), cfg.input_size)["total"]  # FlopCounterMode, batch 1, on CPU
    del model, x
    return {"model": name, "params_M": params / 1e6, "gflops": flops / 1e9, "gmacs": flops / 2e9,
            "peak_memory_MiB": peak, "memory_method": method,
            "images_per_s": cfg.batch_size * cfg.iters / max(seconds, 1e-9),
            "batch_size": cfg.batch_size, "input_size": cfg.input_size, "device": str(device)}


def _measure_in_fresh_process(name: str, cfg: EfficiencyConfig) -> dict[str, Any]:
    """:func:`measure_model` in a spawned single-use process (clean RSS baseline)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        return pool.submit(measure_model, name, cfg, cfg.model_kwargs.get(name)).result()


def markdown_efficiency(table: pd.DataFrame) -> str:
    """Markdown of the Table 8 frame."""
    cols = ["model", "params_M", "gmacs", "gflops", "peak_memory_MiB", "images_per_s"]
    head = ["Model", "Params (M)", "GMACs", "GFLOPs (2/MAC)", "Peak memory (MiB)", "Images/s"]
    lines = ["### Table 8: efficiency", "", "| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for _, r in table.iterrows():
        lines.append("| " + " | ".join([str(r["model"])] + [f"{r[c]:.3g}" if c != "images_per_s" else f"{r[c]:.1f}"
                                                             for c in cols[1:]]) + " |")
    first = table.iloc[0]
    lines += ["", f"Input {int(first['input_size'])}², batch {int(first['batch_size'])}, device {first['device']}, "
              f"inference mode; peak memory = {first['memory_method']} (memory above the level before the "
              "model was built)."]
    return "\n".join(lines) + "\n"


def run_efficiency(cfg: EfficiencyConfig, out_dir: str | Path, progress: bool = True) -> tuple[pd.DataFrame, str]:
    """Measure every model, write ``results.csv``, ``results.md`` and ``table8_efficiency.png``."""
    from tqdm.auto import tqdm

    cfg.validate()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    isolate = cfg.isolate and resolve_device(cfg.device).type != "cuda"
    for name in tqdm(cfg.resolved_models(), desc="efficiency", disable=not progress):
        if isolate:
            rows.append(_measure_in_fresh_process(name, cfg))
        else:
            rows.append(measure_model(name, cfg, cfg.model_kwargs.get(name)))
        logger.info("%s: %.2f M params, %.2f GMACs, %.1f images/s", name, rows[-1]["params_M"],
                    rows[-1]["gmacs"], rows[-1]["images_per_s"])
    table = pd.DataFrame(rows)
    table.to_csv(out / "results.csv", index=False, float_format="%.6g")
    md = markdown_efficiency(table)
    (out / "results.md").write_text(md, encoding="utf-8")
    _plot(table, out / "table8_efficiency.png")
    return table, md


def _plot(table: pd.DataFrame, path: Path) -> None:
    """Throughput against compute, marker size ~ parameters."""
    from wsi_cmaf.train.protocol_report import _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter(table["gmacs"], table["images_per_s"], s=20 + 8 * table["params_M"], alpha=0.6)
    for _, r in table.iterrows():
        ax.annotate(str(r["model"]).removeprefix("timm:"), (r["gmacs"], r["images_per_s"]), fontsize=7)
    ax.set_xlabel("GMACs per image")
    ax.set_ylabel("images / s")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def efficiency_from_base(base: dict[str, Any], models: Sequence[str] | None = None, **kw: Any) -> EfficiencyConfig:
    """An :class:`EfficiencyConfig` from a base training config's ``model`` section and ``efficiency`` keys.

    ``--set efficiency.batch_size=64`` etc. set fields; CMAF-Net gets the base's ``model.kwargs``.
    """
    eff = dict(base.get("efficiency") or {})
    model = base.get("model") or {}
    if model.get("kwargs") and (model.get("name", "cmaf_net") == "cmaf_net"):
        eff.setdefault("model_kwargs", {}).setdefault("cmaf_net", dict(model["kwargs"]))
    if models:
        eff["models"] = list(models)
    eff.update(kw)
    try:
        return EfficiencyConfig(**eff).validate()
    except TypeError as exc:
        raise ConfigError(f"efficiency: {exc}") from exc
