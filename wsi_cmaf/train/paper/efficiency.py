"""Table 8: parameters, FLOPs, peak memory and throughput of CMAF-Net and the timm baselines.

No training: each model is built with random weights and timed on random input. Every model is
prepared the same generic way (:func:`wsi_cmaf.models.optimize.prepare_for_inference`: BatchNorm
folded, channels_last, optionally ``torch.compile``), so the comparison is fair. Each model runs
in a fresh process. One *setting* is (precision, compile, batch); the table reports images/s for
every setting measured, batch-1 latency included, and :func:`floor_checks` compares CMAF-Net with
ResNet-50 where both were measured at the same setting.

Peak memory is ``torch.cuda.max_memory_allocated`` on a GPU; on CPU it is the rise of the process's
resident set size (RSS) over its value before the model was built, sampled every 10 ms with psutil
up to the end of the first setting's warm-up (weights + one forward's activations) — the column
``memory_method`` says which. Throughput is timed after the warm-up, without the sampler running.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from wsi_cmaf.device import resolve_device
from wsi_cmaf.errors import ConfigError
from wsi_cmaf.train.paper.efficiency_report import markdown_efficiency, plot_efficiency

logger = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
#: (name, measured model, reference model, precision, compile, batch, minimum) of the efficiency floors.
FLOORS = (
    ("cpu_fp32_eager_ratio", "cmaf_net", "timm:resnet50", "cpu", "fp32", "off", 32, 1.5),
    ("gpu_bf16_compiled_b256_ratio", "cmaf_net", "timm:resnet50", "cuda", "bf16", "on", 256, 1.2),
    ("gpu_b1_fps", "cmaf_net", None, "cuda", None, None, 1, 134.0),
)


@dataclass
class EfficiencyConfig:
    """What to measure: models (registry names) at ``input_size``, at each precision x compile x batch.

    ``None`` fields get per-device defaults: throughput batch 256 on CUDA and 32 on CPU;
    precisions fp32 + bf16 on CUDA, fp32 on CPU; compile "off" + "auto" on CUDA ("auto" = CUDA
    graphs at the latency batch), "off" on CPU. ``quick`` measures only what the floors need.
    """

    models: list[str] = field(default_factory=list)  # empty: CMAF-Net + the Table 1 timm baselines
    model_kwargs: dict[str, dict[str, Any]] = field(default_factory=dict)  # per model name
    input_size: int = 224
    batch_size: int | None = None  # throughput batch
    latency_batch: int | None = 1  # None: no latency measurement
    precisions: list[str] | None = None
    compile: list[str] | None = None  # prepare_for_inference compile settings ("off" = eager)
    channels_last: bool = True
    warmup: int = 2
    iters: int = 5
    latency_iters: int = 20
    device: str = "auto"
    num_classes: int = 2
    quick: bool = False
    #: measure each model in a fresh process: in one process, heap freed by the previous model is
    #: reused (the RSS rise of the next one reads near zero) and compile caches carry over.
    isolate: bool = True

    def resolved_models(self) -> list[str]:
        """The models to measure (defaults filled in)."""
        from wsi_cmaf.train.paper.protocols import TIMM_BASELINES

        if self.models:
            return list(self.models)
        if self.quick:
            return ["cmaf_net", "timm:resnet50"]
        return ["cmaf_net", *(f"timm:{a}" for a in TIMM_BASELINES)]

    def settings(self, device: torch.device) -> list[tuple[str, str, int]]:
        """(precision, compile, batch) to measure, eager fp32 at the throughput batch first."""
        cuda = device.type == "cuda"
        big = self.batch_size or (256 if cuda else 32)
        batches = [big] + ([self.latency_batch] if self.latency_batch and self.latency_batch != big else [])
        if self.quick and self.precisions is None and self.compile is None:
            if not cuda:
                return [("fp32", "off", b) for b in batches]
            plan = [("fp32", "off", big), ("bf16", "off", big), ("bf16", "on", big)]
            return plan + [(p, c, b) for b in batches[1:] for p, c in (("fp32", "off"), ("bf16", "auto"))]
        precisions = self.precisions or (["fp32", "bf16"] if cuda else ["fp32"])
        modes = self.compile or (["off", "auto"] if cuda else ["off"])
        out = [(p, c, b) for c in modes for p in precisions for b in batches]
        return sorted(out, key=lambda s: (s != ("fp32", "off", big), modes.index(s[1])))

    def validate(self) -> EfficiencyConfig:
        """Raise :class:`ConfigError` on impossible values."""
        from wsi_cmaf.models.optimize import COMPILE_MODES

        if self.input_size < 32 or self.iters < 1 or self.warmup < 0 or self.latency_iters < 1:
            raise ConfigError("efficiency: need input_size >= 32, iters >= 1, latency_iters >= 1, warmup >= 0")
        if (self.batch_size is not None and self.batch_size < 1) or (
                self.latency_batch is not None and self.latency_batch < 1):
            raise ConfigError("efficiency: batch sizes must be >= 1")
        bad = [p for p in self.precisions or () if p not in PRECISIONS]
        bad += [c for c in self.compile or () if c not in COMPILE_MODES]
        if bad:
            raise ConfigError(f"efficiency: unknown precision/compile {bad}; precisions {PRECISIONS}, "
                              f"compile {COMPILE_MODES}")
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


def _time_setting(model_fn: Any, x: torch.Tensor, precision: str, warmup: int, iters: int,
                  device: torch.device, sampler: _RssSampler | None) -> tuple[float, float]:
    """(seconds of the first warm-up call, compile included; seconds per timed call)."""
    cuda = device.type == "cuda"
    amp = (torch.autocast(device.type, dtype=_DTYPES[precision]) if precision in _DTYPES
           else contextlib.nullcontext())
    with torch.inference_mode(), amp:
        t0 = time.perf_counter()
        if sampler is not None:
            sampler.__enter__()
        try:
            for _ in range(max(warmup, 1)):
                model_fn(x)
                if cuda:
                    torch.cuda.synchronize(device)
        finally:
            if sampler is not None:
                sampler.__exit__()
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(iters):
            model_fn(x)
        if cuda:
            torch.cuda.synchronize(device)
        return first, (time.perf_counter() - t0) / iters


def measure_model(name: str, cfg: EfficiencyConfig, kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """One model: params, FLOPs/MACs per image, peak memory (MiB) and one result per setting."""
    from wsi_cmaf.models import create_model
    from wsi_cmaf.models.optimize import prepare_for_inference, resolve_compile_mode
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
    flops = count_flops(model, cfg.input_size)["total"]  # FlopCounterMode, batch 1, on CPU
    attention = getattr(getattr(model, "config", None), "attention", "")
    # Eager model prepared in place (no second copy of the weights in the memory figure).
    eager = prepare_for_inference(model, device, compile="off", channels_last=cfg.channels_last, inplace=True)
    results, peak = [], 0.0
    for i, (precision, comp, batch) in enumerate(cfg.settings(device)):
        mode = resolve_compile_mode(comp, device, cuda_graph_batch=batch)
        if mode is None:
            fn = eager
        else:
            torch._dynamo.reset()  # a fresh compile per setting: no cache limit, no stale graphs
            fn = prepare_for_inference(eager, device, compile=comp, channels_last=cfg.channels_last,
                                       cuda_graph_batch=batch)
        x = torch.randn(batch, 3, cfg.input_size, cfg.input_size, device=device)
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        iters = cfg.latency_iters if batch == cfg.latency_batch else cfg.iters
        first, per_call = _time_setting(fn, x, precision, cfg.warmup, iters, device,
                                        sampler if i == 0 else None)
        if i == 0:
            if cuda:
                peak = (torch.cuda.max_memory_allocated(device) - start_mem) / 2**20
            elif sampler is not None:
                peak = (sampler.peak - sampler.baseline) / 2**20
        results.append({"precision": precision, "compile": comp, "compile_mode": mode or "eager",
                        "batch": batch, "images_per_s": batch / max(per_call, 1e-9),
                        "latency_ms": per_call * 1e3, "warmup_s": first})
        logger.info("%s %s %s b%d: %.1f images/s (warm-up %.1f s)", name, precision, mode or "eager",
                    batch, results[-1]["images_per_s"], first)
        del fn, x
    return {"model": name, "params_M": params / 1e6, "gflops": flops / 1e9, "gmacs": flops / 2e9,
            "peak_memory_MiB": peak, "memory_method": "cuda_max_memory_allocated" if cuda else "cpu_rss_peak_delta",
            "attention": attention, "input_size": cfg.input_size, "device": str(device),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "settings": results}


def _measure_in_fresh_process(name: str, cfg: EfficiencyConfig) -> dict[str, Any]:
    """:func:`measure_model` in a spawned single-use process."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        return pool.submit(measure_model, name, cfg, cfg.model_kwargs.get(name)).result()


def _label(precision: str, comp: str, batch: int) -> str:
    return f"{precision}_{'eager' if comp == 'off' else 'compiled'}_b{batch}"


def long_table(measured: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per model and setting."""
    keep = ("model", "device", "input_size", "attention", "threads")
    return pd.DataFrame([{**{k: m[k] for k in keep}, **s} for m in measured for s in m["settings"]])


def wide_table(measured: list[dict[str, Any]], cfg: EfficiencyConfig) -> pd.DataFrame:
    """One row per model: size columns, ``images_per_s`` (first setting) and ``<setting>_img_s`` columns."""
    rows = []
    for m in measured:
        first = m["settings"][0]
        row = {k: v for k, v in m.items() if k != "settings"}
        row.update(images_per_s=first["images_per_s"], batch_size=first["batch"],
                   precision=first["precision"], compile=first["compile"])
        for s in m["settings"]:
            row[_label(s["precision"], s["compile"], s["batch"]) + "_img_s"] = s["images_per_s"]
        rows.append(row)
    return pd.DataFrame(rows)


def floor_checks(long: pd.DataFrame) -> list[dict[str, Any]]:
    """The efficiency floors that this run measured: value, minimum, pass/fail and the setting."""
    out = []
    for name, model, ref, dev, precision, comp, batch, minimum in FLOORS:
        rows = long[(long["model"] == model) & long["device"].str.startswith(dev) & (long["batch"] == batch)]
        if precision is not None:
            rows = rows[rows["precision"] == precision]
        if comp == "on":  # any compiled mode counts as "compiled"
            rows = rows[rows["compile"] != "off"]
        elif comp is not None:
            rows = rows[rows["compile"] == comp]
        if rows.empty:
            continue
        best = rows.loc[rows["images_per_s"].idxmax()]
        value, note = float(best["images_per_s"]), ""
        if ref is not None:
            r = long[(long["model"] == ref) & (long["device"] == best["device"]) & (long["batch"] == batch)
                     & (long["precision"] == best["precision"]) & (long["compile"] == best["compile"])]
            if r.empty:
                continue
            value = value / float(r["images_per_s"].max())
            note = f"{model} / {ref} images/s"
        out.append({"floor": name, "value": round(value, 3), "minimum": minimum, "ok": value >= minimum,
                    "setting": _label(best["precision"], best["compile"], batch), "device": best["device"],
                    "compile_mode": best["compile_mode"], "note": note or f"{model} images/s"})
    return out


def run_efficiency(cfg: EfficiencyConfig, out_dir: str | Path, progress: bool = True) -> tuple[pd.DataFrame, str]:
    """Measure every model; write ``results.csv`` (per model), ``results_long.csv`` (per setting),
    ``results.json`` (rows + floors), ``results.md`` and ``table8_efficiency.png``."""
    from tqdm.auto import tqdm

    cfg.validate()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    measured = []
    for name in tqdm(cfg.resolved_models(), desc="efficiency", disable=not progress):
        kwargs = cfg.model_kwargs.get(name)
        measured.append(_measure_in_fresh_process(name, cfg) if cfg.isolate else measure_model(name, cfg, kwargs))
        logger.info("%s: %.2f M params, %.2f GMACs, %.1f images/s", name, measured[-1]["params_M"],
                    measured[-1]["gmacs"], measured[-1]["settings"][0]["images_per_s"])
    table, long = wide_table(measured, cfg), long_table(measured)
    floors = floor_checks(long)
    table.to_csv(out / "results.csv", index=False, float_format="%.6g")
    long.to_csv(out / "results_long.csv", index=False, float_format="%.6g")
    from wsi_cmaf.train.paper.provenance import provenance

    payload = {"provenance": provenance(resolve_device(cfg.device)), "config": asdict(cfg),
               "rows": long.to_dict(orient="records"), "floors": floors}
    (out / "results.json").write_text(json.dumps(payload, indent=2, default=str) + "\n", encoding="utf-8")
    md = markdown_efficiency(table, long, floors)
    (out / "results.md").write_text(md, encoding="utf-8")
    plot_efficiency(table, out / "table8_efficiency.png")
    return table, md


def efficiency_from_base(base: dict[str, Any], models: Sequence[str] | None = None, **kw: Any) -> EfficiencyConfig:
    """An :class:`EfficiencyConfig` from a base training config's ``model`` section and ``efficiency`` keys.

    ``--set efficiency.batch_size=64`` etc. set fields; CMAF-Net gets the base's ``model.kwargs``.
    Keyword arguments that are ``None`` are ignored (unset command-line options).
    """
    eff = dict(base.get("efficiency") or {})
    model = base.get("model") or {}
    if model.get("kwargs") and (model.get("name", "cmaf_net") == "cmaf_net"):
        eff.setdefault("model_kwargs", {}).setdefault("cmaf_net", dict(model["kwargs"]))
    if models:
        eff["models"] = list(models)
    eff.update({k: v for k, v in kw.items() if v is not None})
    try:
        return EfficiencyConfig(**eff).validate()
    except TypeError as exc:
        raise ConfigError(f"efficiency: {exc}") from exc
