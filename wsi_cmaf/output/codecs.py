"""Zarr codecs of wsi-cmaf stores, so that every array written beside a heatmap is encoded alike."""

from __future__ import annotations

from zarr.codecs import BloscCodec, BloscShuffle


def heatmap_compressors() -> tuple[BloscCodec, ...]:
    """The ``compressors`` of every array of a heatmap store: Blosc zstd level 5 with byte shuffle.

    A fresh tuple per call, for ``create_array(compressors=...)``; arrays that other modules add
    to a store (slide-level maps, explanation maps) use it too, so a store reads as one format.
    """
    return (BloscCodec(cname="zstd", clevel=5, shuffle=BloscShuffle.shuffle),)
