"""Host-to-device copies of a training step do not block the host: the augmentation's CPU random
draws, the per-patient stain rows and the labels go with ``non_blocking``, and CUDA runs get
page-locked loader batches. On the CPU the copies are recorded; on CUDA a step of the batch
pipeline runs under ``torch.cuda.set_sync_debug_mode("error")``."""

from __future__ import annotations

import pytest
import torch

from wsi_cmaf.stain import MacenkoNormalizer
from wsi_cmaf.stain import reference_fit as _reference_fit
from wsi_cmaf.train.data.augment import AugmentConfig, BatchAugment, PatientStainNormalizer

#: every augmentation on, stain transfer included, so every draw of a step is exercised
ALL_ON = AugmentConfig(elastic_p=1.0, stain_transfer_p=1.0)


def _step_modules(device: torch.device) -> tuple[BatchAugment, PatientStainNormalizer]:
    reference = _reference_fit()
    normalizer = PatientStainNormalizer()
    for i, pid in enumerate(("a", "b", "c")):
        normalizer._keys[pid] = f"p{i}"
        normalizer.normalizers[f"p{i}"] = MacenkoNormalizer().set_source(reference)
    augment = BatchAugment(ALL_ON, seed=5).set_stain_references(reference, [reference, reference])
    return augment.to(device).train(), normalizer.to(device)


def _batch(device: torch.device) -> torch.Tensor:
    return torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(0)).mul(255).to(device)


def _step(augment: BatchAugment, normalizer: PatientStainNormalizer, x: torch.Tensor) -> torch.Tensor:
    return augment(normalizer(x, ["a", "b", "c", "a", "b", "c"]))


def test_a_step_moves_nothing_to_the_device_with_a_blocking_copy(monkeypatch):
    cpu = torch.device("cpu")
    augment, normalizer = _step_modules(cpu)
    x = _batch(cpu)
    blocking = []
    real_to = torch.Tensor.to

    def to(self, *args, **kwargs):
        target = kwargs.get("device", args[0] if args else None)
        if isinstance(target, (torch.device, str)) and not kwargs.get("non_blocking", False):
            blocking.append(tuple(self.shape))
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", to)
    out = _step(augment, normalizer, x)
    monkeypatch.setattr(torch.Tensor, "to", real_to)
    assert out.shape == (6, 3, 32, 32) and torch.isfinite(out).all()
    assert not blocking, f"blocking copies to the device of tensors shaped {blocking}"


def test_cuda_runs_get_page_locked_loader_batches(tmp_path, monkeypatch):
    from wsi_cmaf.train.engine import trainer

    seen = {}

    monkeypatch.setattr(trainer, "build_data", lambda *a, **kw: seen.update(kw) or (_ for _ in ()).throw(
        RuntimeError("stop after the data step")))
    from tests.helpers.train import tiny_config
    from wsi_cmaf.train.config import TrainConfig

    with pytest.raises(RuntimeError, match="stop after the data step"):
        trainer.train(TrainConfig.from_dict(tiny_config(tmp_path / "run", tmp_path / "syn", device="cpu",
                                                        precision="off")))
    assert seen["pin_memory"] is False  # CPU runs: nothing to page-lock for
    monkeypatch.setattr(trainer, "resolve_device", lambda _d: torch.device("cuda"))
    seen.clear()
    with pytest.raises(RuntimeError, match="stop after the data step"):
        trainer.train(TrainConfig.from_dict(tiny_config(tmp_path / "run2", tmp_path / "syn", device="cpu",
                                                        precision="off")))
    assert seen["pin_memory"] is True


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="host syncs are a CUDA matter; needs a GPU (benchmarks/gpu_check.sh runs it)")
def test_cuda_step_of_the_batch_pipeline_makes_no_host_sync():
    cuda = torch.device("cuda")
    augment, normalizer = _step_modules(cuda)
    x = _batch(cuda)
    _step(augment, normalizer, x)  # first call: lazily built state
    y = torch.tensor([0, 1, 0, 1, 0, 1]).pin_memory()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = _step(augment, normalizer, x)
        target = y.to(cuda, non_blocking=True)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert out.shape == (6, 3, 32, 32) and target.device.type == "cuda"
