"""Training runs: the paper's three stages (Sec. 4.5), checkpoints, resume, test report and export.

>>> from wsi_cmaf.train.config import TrainConfig
>>> from wsi_cmaf.train.engine.trainer import train
>>> result = train(TrainConfig.from_file("examples/train_synthetic.yaml"))   # doctest: +SKIP
>>> result.model_dir            # model.safetensors + config.json, for `wsi-cmaf analyze --model`

Per stage (:class:`~wsi_cmaf.train.config.StageConfig`): which parameters train, the loss
(cross-entropy or the IB objective with its β ramp and the A-CBFL progress), AdamW (+ SAM), the
learning-rate schedule; each epoch ends with validation, early stopping on balanced accuracy
(patience per stage), a best-model snapshot when validation AUPRC improves (stages with
``select_best``) and an atomic checkpoint. ``resume=True`` continues after the last checkpoint.
At the end the best weights are evaluated on the test split and exported.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from wsi_cmaf.device import resolve_device
from wsi_cmaf.errors import ConfigError
from wsi_cmaf.losses import IBObjective, LossConfig
from wsi_cmaf.models import ABLATIONS, create_model
from wsi_cmaf.train.config import StageConfig, TrainConfig
from wsi_cmaf.train.data.setup import build_data, build_pipeline, split_frame
from wsi_cmaf.train.engine.checkpoint import save_checkpoint
from wsi_cmaf.train.engine.clipping import build_clipper, classifier_parameters
from wsi_cmaf.train.engine.logging_utils import RunLogger
from wsi_cmaf.train.engine.loop import (
    Amp,
    RunContext,
    StageRuntime,
    finite_or,
    steps_per_epoch,
    train_epoch,
    validate,
)
from wsi_cmaf.train.engine.stages import (
    BranchHeads,
    build_optimizer,
    build_stage_scheduler,
    compile_for_training,
    compile_mode,
    configure_trainable,
    enable_grad_checkpointing,
    ramp_steps,
)
from wsi_cmaf.train.engine.state import (
    CONFIG_COPY,
    RESULT,
    check_output_dir,
    checkpoint_state,
    checkpoint_tensors,
    default_weights_note,
    export_model,
    fresh_counters,
    load_best,
    prune_best,
    restore_checkpoint,
    save_best,
    seed_everything,
    write_json,
)
from wsi_cmaf.train.engine.tasks import is_multitask, predict_tasks, primary_view, secondary_metrics
from wsi_cmaf.train.evaluate.checkpoint import split_report

logger = logging.getLogger(__name__)

__all__ = ["TrainResult", "train"]


@dataclass
class TrainResult:
    """What a finished run produced (also stored as ``result.json`` in the run folder)."""

    output_dir: Path
    model_dir: Path  # exported best model: model.safetensors + config.json (load_model / resolve_model)
    best_epoch: int
    best_val: dict[str, float]
    test_metrics: dict  # full_report of the test split (metrics with *_ci / bootstrap CIs, figures)
    history: list[dict]  # one row per epoch (the "epoch" log rows)
    seconds: float
    val_history_path: Path  # the log folder (log.jsonl, epoch.csv, step.csv)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {f.name: (str(v) if isinstance(v, Path) else v)
                for f in dataclasses.fields(self) for v in [getattr(self, f.name)]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainResult:
        """Inverse of :meth:`to_dict`."""
        paths = {"output_dir", "model_dir", "val_history_path"}
        fields: dict[str, Any] = {k: Path(v) if k in paths else v for k, v in data.items()}
        return cls(**fields)


# ----------------------------------------------------------------------------- building blocks
def check_training_views(m: Any, views: list[dict]) -> list[dict]:
    """The store's views, checked against the model section (view 0 = the model's own tile)."""
    given = m.kwargs.get("views")
    norm = [{"mpp": float(v["mpp"]), "size": int(v["size"])} for v in views]
    if given is not None and [{"mpp": float(v["mpp"]), "size": int(v["size"])} for v in given] != norm:
        raise ConfigError(f"model.kwargs.views {given} differ from the training store's views {norm}; "
                          "drop model.kwargs.views (the store's are recorded) or rebuild the store")
    tile = norm[0]
    if abs(tile["mpp"] - float(m.spacing_um_px)) > 1e-6 * tile["mpp"] or tile["size"] != int(m.patch_size_pixels):
        raise ConfigError(f"the store's view 0 is {tile['size']} px at {tile['mpp']} µm/px but the model is "
                          f"configured for {m.patch_size_pixels} px at {m.spacing_um_px} µm/px "
                          "(model.patch_size_pixels / model.spacing_um_px); make them agree")
    return norm


def build_model(config: TrainConfig, views: list[dict] | None = None) -> nn.Module:
    """The configured network: CMAF-Net (with ablation row and overrides) or ``timm:<name>``, or a
    multi-task wrapper around one of them (``model.tasks``; the geometry and ablation go to its backbone).

    ``views``: the training store's view specs; a multi-view model records them (what inference
    cuts around each tile), and views declared in ``model.kwargs.views`` must equal them.
    """
    m = config.model
    kwargs = dict(m.kwargs)
    if views is not None and m.num_views > 1:
        kwargs["views"] = check_training_views(m, views)
    if m.is_task_model:
        backbone_kwargs = dict(kwargs.get("backbone_kwargs") or {})
        if m.is_cmaf:
            backbone_kwargs.setdefault("input_size", m.input_size)
            if m.ablation:
                backbone_kwargs["ablation"] = m.ablation
        kwargs["backbone_kwargs"] = backbone_kwargs
        if m.tasks:  # the class names travel in the model's config, so the exported config.json names them
            kwargs.update(tasks=dict(m.tasks), task_class_names=m.all_task_class_names())
        return create_model(m.name, num_classes=m.num_classes, **kwargs)
    if m.is_cmaf:
        kwargs.setdefault("input_size", m.input_size)
        if m.ablation:
            kwargs["ablation"] = m.ablation
    elif m.ablation:
        raise ConfigError("model.ablation applies to cmaf_net only")
    return create_model(m.name, num_classes=m.num_classes, **kwargs)


def effective_loss_config(config: TrainConfig) -> LossConfig:
    """The loss config with the loss-side switches of a CMAF-Net ablation row / overrides applied.

    Table 6 rows such as "β2 = 0" and "fixed β" live in :class:`~wsi_cmaf.models.CMAFConfig`; only
    values the ablation or ``model.kwargs`` set explicitly override the ``loss`` section.
    """
    m = config.model
    if not m.is_cmaf:
        return config.loss
    own = dict(m.kwargs.get("backbone_kwargs") or {}) if m.is_task_model else m.kwargs
    explicit = {**(ABLATIONS.get(m.ablation, {}) if m.ablation else {}), **own}
    changes: dict[str, Any] = {k: float(explicit[k]) for k in ("beta1", "beta2") if k in explicit}
    if explicit.get("beta_schedule") == "fixed":
        changes["fixed_beta"] = True
    if changes:
        logger.info("loss settings from the model's ablation/overrides: %s", changes)
    return dataclasses.replace(config.loss, **changes).validate() if changes else config.loss


def stage_objective(ctx: RunContext, loss_cfg: LossConfig, stage: StageConfig, spe: int) -> IBObjective | None:
    """The stage's IB objective (None for plain cross-entropy stages)."""
    if stage.loss != "objective" or stage.trainable == "branches":
        return None
    if stage.ib == "off":
        cfg = dataclasses.replace(loss_cfg, beta1=0.0, beta2=0.0, diversity_weight=0.0, entropy_weight=0.0,
                                  orthogonality_weight=0.0)
    else:  # "ramp": 0 -> target over the stage; "full": at target from the first step
        cfg = dataclasses.replace(loss_cfg, ramp_steps=ramp_steps(stage, spe) if stage.ib == "ramp" else 0)
    counts = [ctx.bundle.class_counts.get(c, 0) for c in range(ctx.config.model.num_classes)]
    objective = IBObjective(cfg, counts).to(ctx.device)
    objective.set_progress(0.0)
    return objective


def stage_runtime(ctx: RunContext, loss_cfg: LossConfig, index: int) -> StageRuntime:
    """Freeze/unfreeze for the stage and build its optimiser, schedule and objective."""
    assert ctx.config.stages is not None  # TrainConfig.__post_init__ fills the default stages
    stage = ctx.config.stages[index]
    configure_trainable(ctx.model, ctx.heads, stage.trainable)
    optimizer = build_optimizer({"model": ctx.model, "heads": ctx.heads}, ctx.config.optim, stage.lr)
    spe = steps_per_epoch(ctx.bundle, ctx.config)
    grad_params = list(ctx.heads.parameters()) if stage.trainable == "branches" and ctx.heads is not None \
        else classifier_parameters(ctx.model)
    clipper = build_clipper(ctx.config.optim, ctx.model, ctx.heads)
    return StageRuntime(stage, index, optimizer, build_stage_scheduler(stage, optimizer, spe),
                        stage_objective(ctx, loss_cfg, stage, spe), spe, clipper, grad_params,
                        ctx.config.task_weights)


# ----------------------------------------------------------------------------- stages
def run_stage(ctx: RunContext, loss_cfg: LossConfig, index: int, resume_state: dict[str, Any] | None) -> None:
    """Train stage ``index`` from where the counters say (its first epoch, or after a checkpoint)."""
    cfg, c = ctx.config, ctx.counters
    stage = cfg.stages[index]  # type: ignore[index]
    ckpt_dir = Path(cfg.output_dir) / "checkpoints"
    continuing = c["stage_index"] == index and c["stage_epoch"] > 0
    if not continuing:
        c.update(stage_index=index, stage_epoch=0, stage_done=False, stage_step=0,
                 stage_best_bacc=-math.inf, bad_epochs=0)
    rt = stage_runtime(ctx, loss_cfg, index)
    if continuing and resume_state is not None:
        rt.optimizer.load_state_dict(resume_state["optimizer"])
        rt.scheduler.load_state_dict(resume_state["scheduler"])
        if ctx.amp.scaler is not None and resume_state.get("scaler"):
            ctx.amp.scaler.load_state_dict(resume_state["scaler"])
        if resume_state.get("clipper") and hasattr(rt.clipper, "load_state_dict"):
            rt.clipper.load_state_dict(resume_state["clipper"])  # type: ignore[union-attr]
    logger.info("stage %s: %d epoch(s), lr %g, trainable %s, loss %s, %d step(s)/epoch", stage.name,
                stage.epochs, stage.lr, stage.trainable, stage.loss, rt.steps_per_epoch)
    patience = cfg.early_stopping_patience
    for stage_epoch in range(c["stage_epoch"] + 1, stage.epochs + 1):
        t0 = time.perf_counter()
        epoch = c["epoch"] + 1
        stats = train_epoch(ctx, rt, epoch, stage_epoch)
        val = validate(ctx, stage)
        bacc, auprc = finite_or(val.get("balanced_accuracy"), -math.inf), finite_or(val.get("auprc"), -math.inf)
        if bacc > c["stage_best_bacc"]:
            c["stage_best_bacc"], c["bad_epochs"] = bacc, 0
        else:
            c["bad_epochs"] += 1
        is_best = stage.select_best and auprc > c["best_auprc"]
        if is_best:
            save_best(ctx, ckpt_dir, epoch)
            c.update(best_epoch=epoch, best_auprc=auprc, best_val=dict(val))
        stop = patience is not None and c["bad_epochs"] >= patience and stage_epoch < stage.epochs
        c.update(epoch=epoch, stage_epoch=stage_epoch, stage_done=stop or stage_epoch == stage.epochs)
        row = {"epoch": epoch, "stage": stage.name, "stage_epoch": stage_epoch, **stats,
               **{f"val/{k}": v for k, v in val.items()}, "best": is_best, "early_stop": stop,
               "seconds": time.perf_counter() - t0}
        ctx.history.append(row)
        ctx.run_logger.log("epoch", row)
        save_checkpoint(ckpt_dir, epoch, checkpoint_tensors(ctx), checkpoint_state(ctx, rt),
                        {"stage": stage.name, "stage_index": index, "stage_epoch": stage_epoch,
                         "global_step": c["global_step"]})
        prune_best(ckpt_dir, c["best_epoch"])
        logger.info("epoch %d (%s %d/%d): loss %.4f, val bacc %.3f, val AUPRC %.3f%s", epoch, stage.name,
                    stage_epoch, stage.epochs, stats["train_loss"], bacc, auprc, " *" if is_best else "")
        if stop:
            logger.info("stage %s: early stop after %d epoch(s) without val balanced-accuracy gain",
                        stage.name, patience)
            break
    c["stage_done"] = True


# ----------------------------------------------------------------------------- the run
def train(config: TrainConfig, *, resume: bool = False, progress: bool | None = None) -> TrainResult:
    """Run (or, with ``resume``, continue) the training described by ``config``.

    Raises :class:`~wsi_cmaf.errors.OutputExistsError` when ``config.output_dir`` already holds a
    run and ``resume`` is false; a finished run resumed returns its stored result.
    """
    config.validate()
    if config.early_stopping_patience is not None and config.early_stopping_patience < 1:
        raise ConfigError("early_stopping_patience must be >= 1 (epochs), or null for no early stopping")
    t_start = time.perf_counter()
    out = Path(config.output_dir).resolve()
    config = dataclasses.replace(config, output_dir=str(out))
    if check_output_dir(out, config, resume):
        logger.info("%s already finished; returning its stored result", out)
        return TrainResult.from_dict(json.loads((out / RESULT).read_text(encoding="utf-8")))
    out.mkdir(parents=True, exist_ok=True)
    show = config.progress_bar if progress is None else progress
    seed_everything(config.seed)
    device = resolve_device(config.device)
    amp = Amp(config.precision, device)
    bundle = build_data(config.data, config.model, out, config.seed, pin_memory=device.type == "cuda")
    pipeline = build_pipeline(config.data, config.model, bundle, config.seed, device)
    seed_everything(config.seed)  # model initialisation independent of how much data setup drew
    model = build_model(config, bundle.info.get("views")).to(device)
    heads = BranchHeads(model, config.model.num_classes).to(device) \
        if any(s.trainable == "branches" for s in config.stages or []) else None
    if config.grad_checkpointing and not enable_grad_checkpointing(model):
        logger.warning("grad_checkpointing: %s has nothing to checkpoint", config.model.name)
    mode = compile_mode(config.compile, device)
    if mode is not None:
        compile_for_training(model, heads, mode)
    ckpt_dir = out / "checkpoints"
    if not (ckpt_dir / "last.json").is_file():  # written once data and model were built without error
        config.to_json(out / CONFIG_COPY)
    run_logger = RunLogger(out / "logs")
    ctx = RunContext(config, device, model, heads, bundle, pipeline, amp, run_logger,
                     bool(show) and sys.stderr is not None, counters=fresh_counters())
    resume_state = restore_checkpoint(ctx, ckpt_dir) if resume else None
    if resume:
        run_logger.truncate_after(ctx.counters["epoch"])
    loss_cfg = effective_loss_config(config)
    for index, stage in enumerate(config.stages or []):
        c = ctx.counters
        if index < c["stage_index"] or (index == c["stage_index"] and c["stage_done"]):
            continue
        if stage.epochs == 0:
            continue
        run_stage(ctx, loss_cfg, index, resume_state)
        resume_state = None
    return finish(ctx, t_start)


def finish(ctx: RunContext, t_start: float) -> TrainResult:
    """Best weights -> test report, metrics.json, exported model, result.json."""
    cfg = ctx.config
    out = Path(cfg.output_dir)
    best_epoch = load_best(ctx, out / "checkpoints")
    test_ds = ctx.bundle.datasets["test"]
    # The reported test metrics are computed in fp32, as `wsi-cmaf evaluate` computes them: the
    # numbers a run publishes must not depend on the device's autocast precision (bf16 on GPUs).
    report = split_report(
        primary_view(ctx.model), ctx.bundle.loaders["test"], ctx.prepare("test"), device=ctx.device,
        autocast_dtype=None, class_names=cfg.model.class_names, positive_class=cfg.model.positive_class,
        meta=split_frame(ctx.bundle, "test"), patient_ids=test_ds.patient_ids,  # type: ignore[attr-defined]
        out_dir=out, n_boot=cfg.bootstrap, seed=cfg.seed, prefix="test")
    if is_multitask(ctx.model):  # secondary tasks: point metrics over their labelled test samples
        probs, labels, _ = predict_tasks(ctx.model, ctx.bundle.loaders["test"], ctx.prepare("test"), ctx.device)
        report["tasks"] = {"primary": next(iter(probs)), **secondary_metrics(probs, labels)}
    bacc = report["metrics"].get("balanced_accuracy")
    bacc = bacc.get("value") if isinstance(bacc, dict) else bacc
    note = cfg.weights_note or default_weights_note(cfg, ctx.bundle.info.get("source", ""), best_epoch,
                                                    finite_or(bacc, math.nan))
    model_dir = export_model(ctx.model, cfg, out / "model", note)
    seconds = time.perf_counter() - t_start
    write_json(out / "metrics.json", {**report, "split": "test", "best_epoch": best_epoch,
                                      "best_val": ctx.counters.get("best_val", {}), "model_dir": str(model_dir),
                                      "weights_note": note, "bootstrap": cfg.bootstrap})
    ctx.run_logger.log("test", {"epoch": ctx.counters["epoch"], "best_epoch": best_epoch,
                                **{k: v.get("value") if isinstance(v, dict) else v
                                   for k, v in report["metrics"].items()
                                   if not isinstance(v, dict) or "value" in v},
                                **{k: v for k, v in report.get("tasks", {}).items() if k != "primary"}})
    result = TrainResult(out, model_dir, best_epoch, dict(ctx.counters.get("best_val", {})), report,
                         list(ctx.history), seconds, out / "logs")
    write_json(out / RESULT, result.to_dict())
    logger.info("finished in %.0f s: best epoch %d, model in %s", seconds, best_epoch, model_dir)
    return result
