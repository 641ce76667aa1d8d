"""Loading an encoder's weights the way offline clusters need: local files first, never a download.

Where weights come from, in order:

1. ``weights=`` a file (``.safetensors``, ``pytorch_model.bin``, ``.pt``/``.pth``) or a folder (a
   timm or Hugging Face model folder, or a Hugging Face cache snapshot) holding one of the
   entry's checkpoint files;
2. the Hugging Face cache (``HF_HUB_CACHE`` / ``HF_HOME`` / ``~/.cache/huggingface``) for the
   entry's repository, read without any network access;
3. only with ``allow_download=True``: a download through ``huggingface_hub``, which itself
   refuses when ``HF_HUB_OFFLINE`` is set.

Every tensor must land: a missing or unexpected key, or a tensor of the wrong shape, is a named
error that says which encoder and which checkpoint (there is no ``strict=False``). The weights
are identified in provenance by the SHA-256 of the checkpoint file.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from wsi_cmaf.encoders.build import EncoderModule, build_encoder, embedding_dim
from wsi_cmaf.encoders.keymap import hf_to_timm
from wsi_cmaf.encoders.registry import EncoderSpec, get_encoder
from wsi_cmaf.errors import CheckpointKeyError, CheckpointShapeError, EncoderError, EncoderWeightsNotFoundError
from wsi_cmaf.model_files import sha256_file

logger = logging.getLogger(__name__)

_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
#: timm classifier-head tensors: an encoder has no head, so a timm ImageNet checkpoint's is left out
_TIMM_HEAD = ("head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias")


@dataclass
class LoadedEncoder:
    """An encoder ready to run and what identifies it."""

    module: EncoderModule
    spec: EncoderSpec
    dim: int
    weights_path: Path | None
    weights_sha256: str
    note: str

    @property
    def untrained(self) -> bool:
        """True for random weights (tests, benchmarks)."""
        return self.weights_path is None


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache this process would use (same environment rules as huggingface_hub)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def _cached_snapshot(repo: str) -> Path | None:
    """The snapshot folder of ``repo`` in the HF cache (the revision ``refs/main`` names, else the
    newest snapshot), or None. Pure file-system reads: works with no network at all."""
    root = hf_cache_dir() / f"models--{repo.replace('/', '--')}"
    return _snapshot_under(root) if (root / "snapshots").is_dir() else None


def _file_in(folder: Path, spec: EncoderSpec) -> Path | None:
    for name in spec.checkpoint_files or ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return folder / name
    return None


def find_weights(spec: EncoderSpec, weights: str | Path | None = None, *, allow_download: bool = False) -> Path:
    """The checkpoint file to load for ``spec`` (see the module docstring for the order)."""
    if weights is not None:
        path = Path(weights).expanduser()
        if path.is_file():
            return path
        if path.is_dir():
            snap = _snapshot_under(path) if (path / "snapshots").is_dir() else None
            hit = _file_in(path, spec) or (_file_in(snap, spec) if snap is not None else None)
            if hit is not None:
                return hit
            raise EncoderWeightsNotFoundError(
                f"encoder {spec.name}: folder {path} holds none of {list(spec.checkpoint_files)}; "
                "point --weights at the checkpoint file or the folder that holds it")
        raise EncoderWeightsNotFoundError(f"encoder {spec.name}: weights {path} do not exist")
    if spec.hf_repo:
        snap = _cached_snapshot(spec.hf_repo)
        hit = _file_in(snap, spec) if snap is not None else None
        if hit is not None:
            logger.info("encoder %s: weights from the Hugging Face cache %s", spec.name, hit)
            return hit
    if allow_download and spec.hf_repo:
        return _download(spec)
    where = (f"the Hugging Face cache ({hf_cache_dir()}) has no {spec.hf_repo}" if spec.hf_repo
             else "a timm: encoder has no repository to look in")
    raise EncoderWeightsNotFoundError(
        f"encoder {spec.name}: no local weights ({where}); pass --weights FILE_OR_FOLDER "
        + (f"(from https://huggingface.co/{spec.hf_repo}" + (", a gated repository: request access first)"
                                                              if spec.gated else ")") if spec.hf_repo else "")
        + " or --allow-download to fetch them now")


def _snapshot_under(root: Path) -> Path | None:
    """The current snapshot of a ``models--org--name`` cache folder (``refs/main``, else the newest)."""
    snaps = root / "snapshots"
    ref = root / "refs" / "main"
    if ref.is_file() and (snaps / ref.read_text(encoding="utf-8").strip()).is_dir():
        return snaps / ref.read_text(encoding="utf-8").strip()
    found = sorted((p for p in snaps.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def _download(spec: EncoderSpec) -> Path:
    """Fetch the entry's checkpoint (only when the user passed ``--allow-download``)."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        raise EncoderWeightsNotFoundError(f"encoder {spec.name}: --allow-download was given but HF_HUB_OFFLINE is "
                                          "set; unset it or pass --weights")
    if not spec.hf_repo:
        raise EncoderWeightsNotFoundError(f"encoder {spec.name}: its registry entry names no Hugging Face repository "
                                          "to download from; pass --weights with a local checkpoint")
    from huggingface_hub import hf_hub_download

    last: Exception | None = None
    for name in spec.checkpoint_files:
        try:
            return Path(hf_hub_download(spec.hf_repo, name))
        except Exception as exc:  # noqa: BLE001  (hub errors vary by version: try the next file name)
            last = exc
    raise EncoderWeightsNotFoundError(f"encoder {spec.name}: downloading from {spec.hf_repo} failed: {last}")


def read_state_dict(path: Path, spec: EncoderSpec) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file (safetensors, or a torch pickle read with ``weights_only``)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path), device="cpu")
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001  (corrupt files raise many kinds of errors)
        raise EncoderError(f"encoder {spec.name}: {path} is not a readable checkpoint "
                           f"({type(exc).__name__}: {exc})") from exc
    # training checkpoints wrap the weights; only an unambiguous single wrapper is unwrapped
    if isinstance(state, dict) and len(state) == 1 and next(iter(state)) in ("state_dict", "model", "teacher"):
        state = next(iter(state.values()))
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise EncoderError(f"encoder {spec.name}: {path} does not hold a flat dict of tensors")
    return state


def to_timm_state(state: dict[str, torch.Tensor], spec: EncoderSpec, module: EncoderModule, path: Path
                  ) -> dict[str, torch.Tensor]:
    """The checkpoint ``state`` in the names of ``module.trunk`` (HF layouts mapped, timm heads dropped)."""
    if spec.checkpoint_format == "timm":
        dropped = [k for k in _TIMM_HEAD if k in state and k not in module.trunk.state_dict()]
        if dropped:
            logger.info("encoder %s: leaving out the classifier head %s of %s", spec.name, dropped, path.name)
        return {k: v for k, v in state.items() if k not in dropped}
    fold = bool(getattr(module.trunk, "no_embed_class", False))
    mapped, unmapped = hf_to_timm(state, spec.checkpoint_format, fold_cls_pos=fold)
    if unmapped:
        raise CheckpointKeyError(f"encoder {spec.name}: checkpoint {path} has {len(unmapped)} tensors that have no "
                                 f"place in a {spec.checkpoint_format} {spec.timm_arch} (first: {unmapped[:5]}); "
                                 "it is not this encoder's checkpoint", unexpected=unmapped)
    return mapped


def check_and_load(module: EncoderModule, state: dict[str, torch.Tensor], spec: EncoderSpec, path: Path) -> None:
    """Load ``state`` into the trunk; every key present, none extra, every shape equal, or a named error."""
    own = module.trunk.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise CheckpointKeyError(
            f"encoder {spec.name}: checkpoint {path} does not match {spec.timm_arch}: "
            + (f"{len(missing)} missing key(s) (first: {missing[:5]})" if missing else "")
            + ("; " if missing and unexpected else "")
            + (f"{len(unexpected)} unexpected key(s) (first: {unexpected[:5]})" if unexpected else "")
            + "; check that these are this encoder's weights", missing=missing, unexpected=unexpected)
    wrong = {k: (tuple(state[k].shape), tuple(v.shape)) for k, v in own.items()
             if tuple(state[k].shape) != tuple(v.shape)}
    if wrong:
        first = next(iter(wrong.items()))
        raise CheckpointShapeError(f"encoder {spec.name}: checkpoint {path} has {len(wrong)} tensor(s) of another "
                                   f"shape (first: {first[0]} is {first[1][0]}, the encoder needs {first[1][1]}); "
                                   "it was made for another architecture or input size", wrong=wrong)
    module.trunk.load_state_dict(state, strict=True, assign=True)
    left = [n for n, t in [*module.trunk.named_parameters(), *module.trunk.named_buffers()] if t.is_meta]
    if left:  # a tensor the state dict does not hold (a non-persistent buffer): cannot happen for timm ViTs
        raise EncoderError(f"encoder {spec.name}: {path} leaves {left[:5]} without values")


def load_encoder(name: str | EncoderSpec, weights: str | Path | None = None, *, allow_download: bool = False,
                 random_weights: bool = False, device: str = "cpu", input_size: int | None = None,
                 mpp: float | None = None) -> LoadedEncoder:
    """An encoder with its weights: ``name`` (registry name or ``timm:<arch>``) and where they are.

    ``random_weights=True`` skips loading (tests, benchmarks); the weights are then identified by
    the hash of their tensors and the note says they are untrained.
    """
    from wsi_cmaf.infer.modelspec import state_dict_sha256

    spec = name if isinstance(name, EncoderSpec) else get_encoder(name, input_size=input_size, mpp=mpp)
    path = None if random_weights else find_weights(spec, weights, allow_download=allow_download)
    # with weights to load, the trunk is built on the meta device and takes the checkpoint's
    # tensors (assign): no random initialisation of a billion parameters only to overwrite them
    module = build_encoder(spec, "meta" if path is not None else device)
    if path is not None:
        state = to_timm_state(read_state_dict(path, spec), spec, module, path)
        check_and_load(module, state, spec, path)
        module = module.to(device)
        sha = sha256_file(path)
        note = f"weights from {path} (sha256 {sha[:12]})"
        module.rebuild_from = (rebuild_encoder, (spec, str(path.resolve()), sha))
    else:
        sha, note = state_dict_sha256(module), "untrained (random initialisation)"
    dim = embedding_dim(module, spec) if spec.pooling != "timm" else _probe_dim(module, spec)
    logger.info("encoder %s: %s, %d-dim embeddings", spec.name, note, dim)
    return LoadedEncoder(module.eval(), spec, dim, path, sha, note)


def _probe_dim(module: EncoderModule, spec: EncoderSpec) -> int:
    """Width of a ``timm:`` encoder's pooled output, from one forward on a zero tile."""
    try:
        with torch.inference_mode():
            x = torch.zeros(1, 3, spec.input_size, spec.input_size)
            return int(module.embed(x).shape[-1])
    except Exception as exc:  # noqa: BLE001  (a user's architecture: report it as an encoder problem)
        raise EncoderError(f"encoder {spec.name}: a 1x3x{spec.input_size}x{spec.input_size} forward "
                           f"failed: {exc}") from exc


def rebuild_encoder(spec: EncoderSpec, path: str, sha256: str) -> EncoderModule:
    """The encoder a pickled :class:`EncoderModule` names: ``spec`` with the checkpoint at ``path``,
    which must still hash to ``sha256`` (a batch worker reads the file itself)."""
    loaded = load_encoder(spec, path)
    if loaded.weights_sha256 != sha256:
        raise EncoderError(f"encoder {spec.name}: {path} changed since the run started (sha256 "
                           f"{loaded.weights_sha256[:12]}, expected {sha256[:12]}); rerun with the new weights")
    return loaded.module
