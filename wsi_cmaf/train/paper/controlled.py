"""Controlled imbalance experiment: ``wsi-cmaf protocol imbalance-controlled``.

The earlier sweep (``protocol imbalance``) could not separate the losses: the minority count
shrank with the ratio (imbalance confounded with few-shot learning), stage 1 was cross-entropy for
every arm and stage 2 froze the extractors, checkpoints were picked where A-CBFL's t ≡ 0, and it had
3 seeds and 8 test patients. This experiment is built so that a difference, if there is one, shows:

* **Data.** One synthetic data set (``n_patients`` patients, split by patient into train / val /
  test). Per seed, ``n_minority`` training positives are drawn once and kept for every ratio; the
  negatives are nested (the 70:30 set ⊂ the 95:5 set ⊂ the 99:1 set), so a ratio only adds
  majority samples. Validation and test are every patch of their patients (the generated mix).
* **Stage 1 once per seed.** The two extractors and their linear heads are trained with
  cross-entropy on the seed's 70:30 set (data every ratio contains), then frozen. Stage 2 of the
  recipe trains on frozen extractors by design, so caching their maps F_s / F_t is exact.
* **Fusion stage per loss × ratio × seed.** CMAF block + bottlenecks + head (+ DFA readout) on the
  cached maps, with the same initial weights and the same batch order for every loss of a seed,
  a fixed number of steps, A-CBFL's t running 0 → 1 over them, the project's IB weights, and the
  final weights scored (no checkpoint selection). ``class_weighted_ib`` is off for every arm so that
  each arm's class treatment is its loss alone.

The report (:mod:`wsi_cmaf.train.paper.controlled_report`) gives AUROC, AUPRC, sensitivity at the
validation-chosen 95 % specificity and at 0.5, calibration error, degenerate runs, and paired
patient-bootstrap differences against √-weighted cross-entropy.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from wsi_cmaf.errors import ConfigError
from wsi_cmaf.train.data.imbalance import parse_ratio
from wsi_cmaf.train.paper.controlled_config import ARMS, ControlledConfig, Data

if TYPE_CHECKING:  # imported where a net is built: torch models load late
    from wsi_cmaf.models.cmaf_net import CMAFNet

logger = logging.getLogger(__name__)

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------- data
def make_data(cfg: ControlledConfig, cache: Path | None = None) -> Data:
    """Generate (or load from ``cache``) the synthetic patches and split them by patient."""
    from wsi_cmaf.train.data.synthetic_patches import SyntheticPatchConfig, generate_patches

    if cache is not None and cache.is_file():
        z = np.load(cache, allow_pickle=False)
        return Data(z["images"], z["labels"], z["patients"], z["split"])
    syn = generate_patches(SyntheticPatchConfig(
        n_patients=cfg.n_patients, patches_per_patient=cfg.patches_per_patient, ratio=cfg.generated_ratio,
        signal=cfg.signal, seed=cfg.data_seed))
    ids = np.array(sorted(set(syn.patient_ids.tolist())))
    order = np.random.default_rng(cfg.data_seed).permutation(len(ids))
    n_tr, n_va, _ = cfg.split_patients
    which = {pid: ("train" if i < n_tr else "val" if i < n_tr + n_va else "test")
             for i, pid in enumerate(ids[order])}
    split = np.array([which[p] for p in syn.patient_ids.tolist()])
    data = Data(syn.images, syn.labels.astype(np.int64), syn.patient_ids.astype(str), split)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp.npz")
        np.savez(tmp, images=data.images, labels=data.labels, patients=data.patients, split=data.split)
        tmp.replace(cache)
    return data


def negatives_for(ratio: str, n_minority: int) -> int:
    """Majority count that puts ``n_minority`` positives at ``ratio`` (majority:minority)."""
    major, minor = parse_ratio(ratio)
    return int(round(n_minority * major / minor))


def training_sets(data: Data, cfg: ControlledConfig, seed: int) -> dict[str, np.ndarray]:
    """Indices of each ratio's training set for ``seed``: fixed positives, nested negatives."""
    rng = np.random.default_rng([seed, 1000])
    train = data.split == "train"
    pos = np.flatnonzero(train & (data.labels == 1))
    neg = np.flatnonzero(train & (data.labels == 0))
    need = max(negatives_for(r, cfg.n_minority) for r in cfg.ratios)
    if len(pos) < cfg.n_minority or len(neg) < need:
        raise ConfigError(f"the training patients hold {len(pos)} positives and {len(neg)} negatives; the "
                          f"design needs {cfg.n_minority} and {need}: raise n_patients or patches_per_patient")
    chosen_pos = rng.choice(pos, cfg.n_minority, replace=False)
    neg_order = rng.permutation(neg)
    return {r: np.sort(np.concatenate([chosen_pos, neg_order[: negatives_for(r, cfg.n_minority)]]))
            for r in cfg.ratios}


def to_input(images: np.ndarray, size: int) -> torch.Tensor:
    """uint8 (N, P, P, 3) -> normalised float (N, 3, size, size), bilinear with antialias."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (x - mean) / std


# ----------------------------------------------------------------------------- stage 1 + cache
def _net(cfg: ControlledConfig, dfa: bool = False, counts: tuple[float, float] | None = None) -> CMAFNet:
    from wsi_cmaf.models.cmaf_net import CMAFNet
    from wsi_cmaf.models.config import CMAFConfig

    kwargs = {**cfg.model_kwargs, "input_size": cfg.input_size}
    if dfa:
        assert counts is not None, "a DFA arm is built with the training class counts"
        kwargs.update(dfa=True, dfa_class_counts=tuple(float(c) for c in counts))
    return CMAFNet(CMAFConfig(**kwargs), num_classes=2)


def train_stage1(data: Data, idx: np.ndarray, cfg: ControlledConfig, seed: int) -> CMAFNet:
    """Train both extractors with their stage-1 heads (cross-entropy, AdamW, flips) on ``idx``."""
    from wsi_cmaf.train.engine.stages import BranchHeads

    torch.manual_seed(seed)
    net = _net(cfg)
    assert net.spatial is not None and net.contextual is not None  # the model_kwargs keep both extractors
    heads = BranchHeads(net, 2)
    params = [*net.spatial.parameters(), *net.contextual.parameters(), *heads.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.stage1_lr, weight_decay=cfg.weight_decay)
    rng = np.random.default_rng([seed, 2000])
    x_all, y_all = to_input(data.images[idx], cfg.input_size), torch.from_numpy(data.labels[idx])
    net.train()
    bs = min(32, len(idx))
    for _ in range(cfg.stage1_epochs):
        order = rng.permutation(len(idx))
        for start in range(0, len(order) - bs + 1, bs):
            b = order[start:start + bs]
            x, y = x_all[b], y_all[b]
            if rng.random() < 0.5:
                x = x.flip(-1)
            if rng.random() < 0.5:
                x = x.flip(-2)
            loss = torch.stack([F.cross_entropy(lg, y) for lg in heads(net, x).values()]).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return net.eval()


@torch.inference_mode()
def cache_features(net: CMAFNet, data: Data, idx: np.ndarray, cfg: ControlledConfig,
                   batch: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """F_s and F_t (aligned to F_s's grid, as in ``CMAFNet.forward_features``) of the patches ``idx``."""
    from wsi_cmaf.models.spatial import resample_to

    assert net.spatial is not None and net.contextual is not None  # as train_stage1 built it
    fs, ft = [], []
    for start in range(0, len(idx), batch):
        x = to_input(data.images[idx[start:start + batch]], cfg.input_size)
        s = net.spatial(x)
        fs.append(s)
        ft.append(resample_to(net.contextual(x), (int(s.shape[-2]), int(s.shape[-1]))))
    return torch.cat(fs), torch.cat(ft)


class CachedMap(nn.Module):
    """Stands in for an extractor: returns element ``index`` of the (F_s, F_t) pair it is given."""

    def __init__(self, index: int, out_channels: int | None = None) -> None:
        super().__init__()
        self.index = index
        self.out_channels = out_channels

    def forward(self, pair: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return pair[self.index]


def fusion_model(cfg: ControlledConfig, seed: int, dfa: bool, counts: tuple[float, float]) -> CMAFNet:
    """The fusion part of a fresh CMAF-Net for ``seed``; the extractors become :class:`CachedMap`.

    Every arm of a seed gets the same initial weights: the DFA readout is built last, so its
    presence changes nothing else (:class:`~wsi_cmaf.models.cmaf_net.CMAFNet`).
    """
    torch.manual_seed(seed * 7919 + 1)
    net = _net(cfg, dfa=dfa, counts=counts)
    assert net.spatial is not None
    # duck-typed stand-ins: CMAFNet only calls its extractors and reads spatial.out_channels
    net.spatial = CachedMap(0, net.spatial.out_channels)  # type: ignore[assignment]
    net.contextual = CachedMap(1)  # type: ignore[assignment]
    return net


# ----------------------------------------------------------------------------- fusion runs
def train_fusion(arm: str, feats: tuple[torch.Tensor, torch.Tensor], y: torch.Tensor, cfg: ControlledConfig,
                 seed: int, batches: np.ndarray) -> nn.Module:
    """Train the fusion stage of ``arm`` on cached maps; ``batches`` (steps, B) is the shared order."""
    from wsi_cmaf.losses.objective import IBObjective, LossConfig

    loss_name, loss_kwargs, dfa, fields = ARMS[arm]
    counts = (float((y == 0).sum()), float((y == 1).sum()))
    net = fusion_model(cfg, seed, dfa, counts)
    settings = {"class_weighted_ib": False, **fields}
    objective = IBObjective(LossConfig(loss=loss_name, loss_kwargs=dict(loss_kwargs),
                                       ramp_steps=max(1, len(batches) // 3), **settings), counts)
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    net.train()
    fs, ft = feats
    for step, b in enumerate(batches):
        bt = torch.from_numpy(b)
        objective.update(step, len(batches))
        # the CachedMap stand-ins take the cached (F_s, F_t) pair where CMAFNet declares an image batch
        logits, aux = net.forward_with_aux((fs[bt], ft[bt]))  # type: ignore[arg-type]
        out = objective(logits, y[bt], aux)
        opt.zero_grad(set_to_none=True)
        out.total.backward()
        opt.step()
    return net.eval()


@torch.inference_mode()
def positive_logit(net: nn.Module, feats: tuple[torch.Tensor, torch.Tensor], batch: int = 2048) -> np.ndarray:
    """Logit margin z = l_malignant − l_benign for every cached sample (P(malignant) = sigmoid(z))."""
    fs, ft = feats
    out = []
    for i in range(0, len(fs), batch):
        logits = net((fs[i:i + batch], ft[i:i + batch])).float()
        out.append(logits[:, 1] - logits[:, 0])
    return torch.cat(out).numpy()


def run_seed(data: Data, cfg: ControlledConfig, seed: int) -> dict[str, Any]:
    """Stage 1, the feature cache, and every ratio × arm of one seed: validation and test scores."""
    t0 = time.perf_counter()
    sets = training_sets(data, cfg, seed)
    base_ratio = min(cfg.ratios, key=lambda r: negatives_for(r, cfg.n_minority))
    net = train_stage1(data, sets[base_ratio], cfg, seed)
    pool = np.unique(np.concatenate(list(sets.values())))
    val, test = np.flatnonzero(data.split == "val"), np.flatnonzero(data.split == "test")
    f_pool, f_val, f_test = (cache_features(net, data, i, cfg) for i in (pool, val, test))
    t_cache = time.perf_counter() - t0
    position = {int(g): k for k, g in enumerate(pool)}
    scores: dict[str, dict[str, np.ndarray]] = {}
    for r_index, ratio in enumerate(cfg.ratios):
        local = np.array([position[int(g)] for g in sets[ratio]])
        feats = (f_pool[0][local], f_pool[1][local])
        y = torch.from_numpy(data.labels[sets[ratio]])
        order_rng = np.random.default_rng([seed, 3000, r_index])
        batches = order_rng.integers(0, len(local), size=(cfg.fusion_steps(len(local)),
                                                          min(cfg.batch_size, len(local))))
        for arm in cfg.arms:
            fused = train_fusion(arm, feats, y, cfg, seed, batches)
            scores[f"{ratio}|{arm}"] = {"val": positive_logit(fused, f_val), "test": positive_logit(fused, f_test)}
    logger.info("seed %d: stage 1 + cache %.0f s, %d fusion runs %.0f s", seed, t_cache,
                len(scores), time.perf_counter() - t0 - t_cache)
    return {"scores": scores, "seconds": {"stage1_and_cache": t_cache, "total": time.perf_counter() - t0},
            "train_counts": {r: [int((data.labels[i] == 0).sum()), int((data.labels[i] == 1).sum())]
                             for r, i in sets.items()},
            "fusion_steps": {r: cfg.fusion_steps(len(i)) for r, i in sets.items()}}


def run_controlled(cfg: ControlledConfig, out_dir: str | Path, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) the whole experiment in ``out_dir`` and write its report; returns the summary."""
    cfg.validate()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stamp = out / "config.json"
    settings = {"fingerprint": cfg.fingerprint(), "config": dataclasses.asdict(cfg)}
    if stamp.is_file() and json.loads(stamp.read_text(encoding="utf-8")).get("fingerprint") != cfg.fingerprint():
        raise ConfigError(f"{out} holds results of different settings; use another --out or delete it")
    stamp.write_text(json.dumps(settings, indent=1, default=list), encoding="utf-8")
    # One thread: the tensors are small, so a second thread buys little, and where the two cores
    # are shared with other work two threads spin against each other (100 fusion steps took 0.9 s
    # on one thread and 59 s on two under a load of 5). One thread also keeps results bit-stable.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(cfg, out, progress)
    finally:
        torch.set_num_threads(threads)


def _run(cfg: ControlledConfig, out: Path, progress: bool) -> dict[str, Any]:
    from wsi_cmaf.train.paper.controlled_report import write_report
    from wsi_cmaf.train.paper.controlled_scores import load_seed, save_labels, save_seed, seed_path

    t0 = time.perf_counter()
    data = make_data(cfg, out / "data.npz")
    save_labels(out, data)
    results = {}
    seeds = cfg.seeds
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(seeds), desc="seeds", unit="seed", disable=None)  # None: only on a terminal
    for seed in seeds:
        path = seed_path(out, seed)
        if not path.is_file():
            save_seed(path, run_seed(data, cfg, seed))
        results[seed] = load_seed(path)  # the report reads the stored (float16) scores, as a rederivation does
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return write_report(cfg, data, results, out, wall_seconds=time.perf_counter() - t0)
