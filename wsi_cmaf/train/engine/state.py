"""What the trainer writes besides logs: epoch checkpoints, best-model snapshots, the exported model.

Run folder layout::

    train_config.json       the resolved TrainConfig as run
    checkpoints/            epoch-NNNN/ (weights + optimiser/scheduler/scaler/RNG state), last.json,
                            best-epoch-NNNN.safetensors (model weights of the best validation AUPRC)
    logs/                   log.jsonl, step.csv, epoch.csv
    test_confusion.png      confusion matrix of the test split
    metrics.json            full test report (bootstrap 95 % CIs, BreakHis breakdowns)
    model/                  exported model: model.safetensors + config.json (wsi_cmaf.models.load_model)
    result.json             written last: the run finished
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from wsi_cmaf import __version__
from wsi_cmaf.errors import ConfigError, OutputExistsError
from wsi_cmaf.models import ModelConfig, save_model
from wsi_cmaf.train.config import TrainConfig
from wsi_cmaf.train.engine.checkpoint import atomic_write_text, latest_checkpoint, load_checkpoint, replace_dir
from wsi_cmaf.train.engine.loop import RunContext

logger = logging.getLogger(__name__)

HEADS_PREFIX = "_stage_heads."
RESULT = "result.json"
CONFIG_COPY = "train_config.json"
#: Config keys that may change between an interrupted run and its resumption.
#: ``compile`` changes how fast, not what is trained (a GPU run may be resumed on a CPU).
RESUME_FREE_KEYS = {"output_dir", "progress_bar", "device", "log_every", "bootstrap", "name", "weights_note",
                    "compile"}
#: Entries that may be present in a fresh output_dir: generated data (cached) and derived manifests.
REUSABLE_ENTRIES = {"synthetic_data", "manifest_subtype.csv"}


def json_safe(value: Any) -> Any:
    """Recursively replace NaN/inf by None and tuples/paths by JSON types (strict JSON out)."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return json_safe(value.item())
    return value


def write_json(path: Path, payload: Any) -> Path:
    """Write strict JSON atomically."""
    atomic_write_text(path, json.dumps(json_safe(payload), indent=2) + "\n")
    return path


# ----------------------------------------------------------------------------- output folder
def check_output_dir(out: Path, config: TrainConfig, resume: bool) -> bool:
    """Refuse to overwrite; on resume check the config matches. Returns whether the run finished."""
    finished = (out / RESULT).is_file()
    entries = sorted(p.name for p in out.iterdir() if p.name not in REUSABLE_ENTRIES) if out.is_dir() else []
    if not resume:
        if entries:
            if finished:
                raise OutputExistsError(
                    f"output_dir {out} already holds a finished training run ({', '.join(entries[:6])}); "
                    "finished runs are never overwritten: choose another output_dir")
            raise OutputExistsError(
                f"output_dir {out} is not empty ({', '.join(entries[:6])}); pass --resume (resume=True) to "
                "continue the interrupted run there, or choose another output_dir")
        return False
    saved = out / CONFIG_COPY
    if saved.is_file() and (out / "checkpoints" / "last.json").is_file():
        diff = config_differences(json.loads(saved.read_text(encoding="utf-8")), config.to_dict())
        if diff:
            raise ConfigError(f"cannot resume {out}: the config differs from the one it was started with "
                              f"in {diff}; resume with the original config ({saved})")
    return finished


def config_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ (ignoring keys that may change on resume)."""
    out = []
    for key in sorted(set(old) | set(new)):
        if key in RESUME_FREE_KEYS:
            continue
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{key}.{k}" for k in sorted(set(a) | set(b))
                    if json.dumps(json_safe(a.get(k))) != json.dumps(json_safe(b.get(k)))
                    and k not in ("num_workers", "eval_batch_size")]
        elif json.dumps(json_safe(a)) != json.dumps(json_safe(b)):
            out.append(key)
    return out


# ----------------------------------------------------------------------------- RNG
def numpy_rng_state() -> dict[str, Any]:
    """NumPy's global RNG state as tensors and numbers (loadable with ``weights_only=True``)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"name": str(name), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached": float(cached)}


def set_numpy_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`numpy_rng_state`."""
    np.random.set_state((state["name"], state["keys"].numpy().astype(np.uint32), state["pos"],
                         state["has_gauss"], state["cached"]))


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every global RNG state, as plain tensors and numbers."""
    version, internal, gauss = random.getstate()
    state = {"torch": torch.get_rng_state(), "numpy": numpy_rng_state(),
             "python": {"version": int(version), "state": [int(v) for v in internal], "gauss": gauss}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    set_numpy_rng_state(state["numpy"])
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- checkpoints
def fresh_counters() -> dict[str, Any]:
    """Counters of a run that has not trained yet."""
    return {"epoch": 0, "stage_index": 0, "stage_epoch": 0, "stage_done": False, "global_step": 0,
            "stage_step": 0, "stage_best_bacc": -math.inf, "bad_epochs": 0, "best_epoch": 0,
            "best_auprc": -math.inf, "best_val": {}}


def checkpoint_tensors(ctx: RunContext) -> dict[str, torch.Tensor]:
    """Model weights plus the stage-1 heads (prefixed)."""
    tensors = dict(ctx.model.state_dict())
    if ctx.heads is not None:
        tensors.update({HEADS_PREFIX + k: v for k, v in ctx.heads.state_dict().items()})
    return tensors


def checkpoint_state(ctx: RunContext, rt: Any) -> dict[str, Any]:
    """Optimiser/scheduler/scaler/RNG state and counters (torch.load(weights_only=True)-safe)."""
    return {
        "optimizer": rt.optimizer.state_dict(),
        "scheduler": rt.scheduler.state_dict(),
        "scaler": ctx.amp.scaler.state_dict() if ctx.amp.scaler is not None else {},
        # history clipping's norm history (stateless AGC has none)
        "clipper": rt.clipper.state_dict() if hasattr(getattr(rt, "clipper", None), "state_dict") else {},
        "rng": rng_state(),
        "counters": dict(ctx.counters),
        "history": [dict(r) for r in ctx.history],
        "version": __version__,
    }


def restore_checkpoint(ctx: RunContext, ckpt_dir: Path) -> dict[str, Any] | None:
    """Load the newest checkpoint into ``ctx`` (weights, counters, history, RNG); return its state."""
    record = latest_checkpoint(ckpt_dir)
    if record is None:
        return None
    tensors, state = load_checkpoint(record["path"])
    model_t = {k: v for k, v in tensors.items() if not k.startswith(HEADS_PREFIX)}
    try:
        ctx.model.load_state_dict(model_t, strict=True)
        if ctx.heads is not None:
            ctx.heads.load_state_dict({k[len(HEADS_PREFIX):]: v for k, v in tensors.items()
                                       if k.startswith(HEADS_PREFIX)}, strict=True)
    except RuntimeError as exc:
        raise ConfigError(f"checkpoint {record['path']} does not fit the configured model: {exc}") from exc
    ctx.counters.update(state["counters"])
    ctx.history[:] = list(state["history"])
    set_rng_state(state["rng"])
    for stale in ckpt_dir.glob(".epoch-*.tmp-*"):  # left by a killed process
        shutil.rmtree(stale, ignore_errors=True)
    logger.info("resuming after epoch %d (stage %d, step %d) from %s", ctx.counters["epoch"],
                ctx.counters["stage_index"], ctx.counters["global_step"], record["path"])
    return state


def best_path(ckpt_dir: Path, epoch: int) -> Path:
    """File of the best-model snapshot taken at ``epoch``."""
    return ckpt_dir / f"best-epoch-{epoch:04d}.safetensors"


def save_best(ctx: RunContext, ckpt_dir: Path, epoch: int) -> Path:
    """Snapshot the model weights as the best so far (atomic)."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    path = best_path(ckpt_dir, epoch)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({k: v.detach().cpu().contiguous() for k, v in ctx.model.state_dict().items()}, str(tmp))
    os.replace(tmp, path)
    return path


def prune_best(ckpt_dir: Path, keep_epoch: int) -> None:
    """Delete best snapshots other than the one the counters reference."""
    for path in ckpt_dir.glob("best-epoch-*.safetensors"):
        if path != best_path(ckpt_dir, keep_epoch):
            path.unlink(missing_ok=True)


def load_best(ctx: RunContext, ckpt_dir: Path) -> int:
    """Load the best snapshot into the model; returns its epoch (0 = none: final weights kept)."""
    epoch = int(ctx.counters.get("best_epoch", 0))
    path = best_path(ckpt_dir, epoch)
    if epoch <= 0 or not path.is_file():
        logger.warning("no best-model snapshot (no epoch of a select_best stage had a finite val AUPRC); "
                       "using the final weights")
        return 0
    ctx.model.load_state_dict(load_file(str(path), device=str(ctx.device)), strict=True)
    return epoch


# ----------------------------------------------------------------------------- export
def default_weights_note(config: TrainConfig, source: str, best_epoch: int, test_bacc: float | None) -> str:
    """Provenance for ``config.json``: the data, the stages, the selection and the test result."""
    stages = "/".join(f"{s.name}:{s.epochs}" for s in config.stages or [])
    if config.data.synthetic is not None:
        data = f"synthetic patches generated by wsi-cmaf ({json.dumps(config.data.synthetic, sort_keys=True)})"
    else:
        data = Path(source).name
    note = f"trained by wsi-cmaf {__version__} on {data}; stages {stages}; best epoch {best_epoch} by val AUPRC"
    if test_bacc is not None and math.isfinite(test_bacc):
        note += f"; test balanced accuracy {test_bacc:.3f}"
    if config.data.synthetic is not None:
        note += "; synthetic data only: not for diagnostic use"
    return note


def export_model(model: nn.Module, config: TrainConfig, directory: Path, note: str) -> Path:
    """Write the trained model as ``model.safetensors`` + ``config.json`` (atomically replaced)."""
    m = config.model
    own_config = getattr(model, "config", None)  # CMAF-Net's and the task models' own config dataclass
    kwargs = own_config.to_dict() if (m.is_cmaf or m.is_task_model) and own_config is not None else dict(m.kwargs)
    model_config = ModelConfig(
        architecture=m.name, num_classes=m.num_classes, class_names=list(m.class_names),
        positive_class=m.positive_class, spacing_um_px=float(m.spacing_um_px),
        patch_size_pixels=int(m.patch_size_pixels), input_size=int(m.input_size), mean=(*m.mean,),
        std=(*m.std,), stain_normalization=m.stain_normalization, model_kwargs=kwargs, weights_note=note,
    )
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(model, model_config, tmp)
    replace_dir(tmp, directory)
    return directory
