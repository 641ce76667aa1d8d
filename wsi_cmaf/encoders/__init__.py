"""Pathology foundation-model tile encoders (UNI, Virchow, H-optimus, Prov-GigaPath, Phikon, Hibou ...)
run on the wsi-cmaf engine: a registry kept as data, offline weight loading, embedding runs into
heatmap stores, and AnnData / TRIDENT-CLAM HDF5 exports.

Imports are lazy so ``wsi-cmaf encoders`` lists the registry without importing torch.
"""

from __future__ import annotations

from typing import Any

from wsi_cmaf.encoders.registry import EncoderSpec, get_encoder, list_encoders

__all__ = ["EncoderSpec", "get_encoder", "list_encoders", "load_encoder", "build_encoder", "embed_slide",
           "embed_slides", "export_anndata", "export_h5"]

_LAZY = {"load_encoder": "wsi_cmaf.encoders.loader", "build_encoder": "wsi_cmaf.encoders.build",
         "embed_slide": "wsi_cmaf.encoders.embed", "embed_slides": "wsi_cmaf.encoders.embed",
         "export_anndata": "wsi_cmaf.encoders.export", "export_h5": "wsi_cmaf.encoders.export"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(name)
