"""``analyze_slide``: tissue -> tile grid -> dask-read blocks -> batched model -> OME-Zarr heatmap."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from distributed import Client
from tqdm.auto import tqdm

from wsi_cmaf.errors import NoDecodableTissueError, OutputWriteError, WsiCmafError
from wsi_cmaf.infer.attrs import _attrs, _um_per_tile
from wsi_cmaf.infer.callargs import merge_run_config
from wsi_cmaf.infer.checks import check_device, check_inputs
from wsi_cmaf.infer.config import InferenceConfig
from wsi_cmaf.infer.dask_tasks import BlockFailure, SlideSpec, read_block_task
from wsi_cmaf.infer.device_decode import (
    DecodedFeed,
    DeviceTilesRunner,
    decode_identity,
    plan_decode,
    read_jpeg_block_task,
)
from wsi_cmaf.infer.guards import check_nonfinite, check_output_space, output_write_errors, writer_lock
from wsi_cmaf.infer.inputs import RunInputs, load_inputs, restore_stain, run_identity, save_inputs, save_stain
from wsi_cmaf.infer.modelspec import ResolvedModel, resolve_model
from wsi_cmaf.infer.multitask import segments, task_outputs
from wsi_cmaf.infer.multiview import read_block_views_task
from wsi_cmaf.infer.replay import pixel_reader
from wsi_cmaf.infer.result import SlideResult
from wsi_cmaf.infer.run import SlideRun, StageTimer
from wsi_cmaf.infer.runner import BatchRunner
from wsi_cmaf.infer.stainfit import fit_from_blocks, fit_from_tiles, read_sample, sample_is_all_tissue, sample_tiles
from wsi_cmaf.infer.stream import BlockFeed, stream_blocks
from wsi_cmaf.infer.summary import failure_records, summarise
from wsi_cmaf.output.provenance import api_call, run_provenance
from wsi_cmaf.output.store import HeatmapStore
from wsi_cmaf.preprocess import TilePreprocessor, ViewsPreprocessor
from wsi_cmaf.qc.stage import qc_before_inference, qc_identity, qc_into_store, qc_summary
from wsi_cmaf.slide.grid import BlockTiles, GridConfig, TileGrid
from wsi_cmaf.slide.level0 import block_tiles_for_level0
from wsi_cmaf.slide.opener import open_slide
from wsi_cmaf.slide.tissue import TissueConfig, tissue_mask_from_rgb

logger = logging.getLogger(__name__)


_CLIENT_LOCK = threading.Lock()


@contextmanager
def _dask_client(client: Client | None, threads: int) -> Iterator[Client]:
    """Use the caller's client, or a short-lived in-process one (no extra processes, no pickling)."""
    if client is not None:
        yield client
        return
    from wsi_cmaf.cluster.worker_pool import thread_reader_pool

    shared = thread_reader_pool(threads)  # a batch worker's pool, kept across its slides
    if shared is not None:
        yield shared
        return
    # No dashboard: this pool is internal, and on a GPU node running several slides at once the
    # dashboard's lazy imports raced between threads ("module 'distributed.dashboard' has no
    # attribute 'scheduler'", seen on an H200 node). Creation is serialised for the same reason.
    # Its HTTP servers (which run even without a dashboard) bind 127.0.0.1 only.
    from wsi_cmaf.cluster.loopback import in_process_client

    with _CLIENT_LOCK:
        own = in_process_client(threads)
    try:
        yield own
    finally:
        own.close()


def default_output_dir(slide: Path) -> Path:
    """Where results go when ``out`` is not given: ``./wsi_cmaf_results/<slide stem>``."""
    return Path.cwd() / "wsi_cmaf_results" / slide.stem


def analyze_slide(
    path: str | Path,
    model: Any = None,
    out: str | Path | None = None,
    *,
    config: InferenceConfig | None = None,
    model_config: Any = None,
    mpp: float | tuple[float, float] | str | None = None,
    backend: str = "auto",
    tissue: TissueConfig | None = None,
    resume: bool = True,
    overwrite: bool = False,
    client: Client | None = None,
    wait_lock: bool = False,
    **overrides: Any,
) -> SlideResult:
    """Analyse one slide and write its heatmap store, overlay PNG, GeoJSON and summary JSON.

    ``model``: registry name, weights directory/.safetensors, TorchScript file, or ``nn.Module``
    (with ``model_config``); None takes the project's default model. ``out``: the output folder
    (default :func:`default_output_dir`). ``mpp`` overrides the slide's level-0 µm/px (a number,
    an (x, y) pair, or "estimate").

    How the run goes is an :class:`InferenceConfig`: ``config``, with any of its fields given as
    keyword ``overrides`` on top (``device="cpu"``, ``batch_size=64``, ``stain="none"``,
    ``precision="off"``, ``embeddings=True`` ...; they win over ``config`` and are logged). A name
    that is not a field raises :class:`~wsi_cmaf.errors.ConfigError` listing the valid ones.
    ``stain=None`` (the default) follows the model config, "macenko" forces Macenko
    normalisation, "none" turns it off. ``embeddings=True`` also stores every tissue tile's
    feature vector (the classifier head's input) in the store's ``embeddings`` array, from the
    same forward pass (read it with :func:`wsi_cmaf.slidelevel.read_embeddings`). With
    ``resume`` a rerun computes only the blocks not marked done (and retries blocks with
    undecodable tiles), reusing the stored tissue mask, grid and stain fit; ``overwrite``
    replaces an existing store.

    Undecodable slide tiles are isolated: the tissue stage paints them as background, block reads
    drop only the grid tiles they touch (NaN in the heatmap, flagged in the store's ``failed_tiles``)
    and the result lists them with their level-0 locations. The slide fails as a whole only when it
    cannot be opened or none of its tissue decodes (:class:`~wsi_cmaf.errors.NoDecodableTissueError`).
    A tile whose model output is NaN/Inf is a failed tile too; more than 1 % of them fail the slide
    (:class:`~wsi_cmaf.errors.NonFiniteOutputError`).

    One run writes a store at a time: a second one raises :class:`~wsi_cmaf.errors.StoreLockedError`
    naming the holder, or with ``wait_lock`` waits for it. A store that clearly does not fit the
    free space is refused before inference; a write error (full disk, read-only, no permission)
    is an :class:`~wsi_cmaf.errors.OutputWriteError` that leaves the store resumable.
    """
    cfg = merge_run_config(config, overrides)
    timer = StageTimer()
    warn: list[str] = []
    slide_path = Path(path)
    out_dir = Path(out) if out is not None else default_output_dir(slide_path)
    # cheap checks first: a wrong path, output or device fails before the model loads or any output exists
    check_inputs(slide_path, out_dir)
    dev = check_device(cfg.device)
    call = api_call("wsi_cmaf.analyze_slide", slide_path, model=model if isinstance(model, (str, Path)) else None,
                    out=out_dir, device=cfg.device)
    with timer("model"):
        resolved = resolve_model(model, model_config)  # fail on a bad model before any slide work
        embed = _embedding_model(resolved) if cfg.embeddings else None
    if resolved.untrained:
        warn.append(f"model {resolved.name!r} has untrained weights: probabilities are meaningless")
    with ExitStack() as stack:
        with timer("open"):
            reader = stack.enter_context(open_slide(slide_path, backend=backend, mpp=mpp))
            slide_mpp = reader.mpp  # raises MissingResolutionError before we create outputs
            pixels = pixel_reader(reader, cfg, stack)
        mc = resolved.config
        tcfg = tissue or TissueConfig()
        gcfg = GridConfig(mpp=mc.spacing_um_px, tile_size=mc.patch_size_pixels,
                          tissue_threshold=cfg.tissue_threshold, source=mc.patch_source,
                          block_tiles=cfg.block_tiles if mc.patch_source == "pyramid" else block_tiles_for_level0(
                              cfg.block_tiles, mc.patch_size_pixels, mc.spacing_um_px, slide_mpp))
        # extra["store_name"]: a store inside another one (an encoder's embeddings beside a heatmap)
        store_path = out_dir / cfg.extra.get("store_name", "{stem}.zarr").format(stem=slide_path.stem)
        identity = run_identity(reader, resolved, gcfg, tcfg, _stain_method(resolved, cfg))
        identity.update(qc_identity(cfg))  # a store analysed with blurred tiles left out resumes only so
        decoding = plan_decode(pixels, gcfg, cfg, dev, resolved.views)  # None: the CPU path
        identity.update(decode_identity(decoding))  # a store never resumes with the other decoder
        stack.enter_context(output_write_errors(out_dir, store_path))
        stack.callback(writer_lock(out_dir, store_path, wait_lock).release)  # held until the summary is written
        with timer("inputs"):  # a resumed run takes tissue mask, grid and stain fit from its store
            inputs = load_inputs(store_path, identity, reader, gcfg) if resume and not overwrite else None
        reused = inputs is not None
        if inputs is None:
            inputs = _tissue_and_grid(reader, pixels, tcfg, gcfg, cfg, timer)
        mask, grid = inputs.mask, inputs.grid
        qc = qc_before_inference(reader, pixels, grid, mask, cfg, timer, warn)  # µm/px check, ink, focus
        check_output_space(store_path, grid, mc.num_classes, overwrite=overwrite,
                           embedding_dim=embed[1] if embed is not None else None,
                           n_tasks=max(0, len(resolved.tasks or {}) - 1))
        store = HeatmapStore.open_or_create(
            store_path, grid_shape=grid.shape, chunk=grid.block_shape, class_names=list(mc.class_names),
            identity=identity, attrs=_attrs(reader, resolved, grid, cfg, mask),
            um_per_tile=_um_per_tile(grid), resume=resume, overwrite=overwrite,
            embedding_dim=embed[1] if embed is not None else None, tasks=resolved.tasks or None,
        )
        if not reused:
            save_inputs(store, inputs)  # tissue label image, masks, background: before any block
        qc_into_store(store, qc)
        run = SlideRun(slide_path, reader, pixels, resolved, cfg, dev, grid, mask, store, timer, warn)
        # blocks written with undecodable tiles are retried: a transfer error may be gone now
        todo = [b for b in grid.blocks if not store.done[b.index] or store.block_has_failed_tiles(b.index)]
        skipped = len(grid.blocks) - len(todo)
        if not grid.blocks:
            warn.append("no tissue found: the result is empty")
            logger.warning("%s: no tissue tiles found; writing an empty result", slide_path)
        try:
            failed = _infer(run, todo, client, inputs.stain, embed[0] if embed is not None else None, decoding)
        except KeyboardInterrupt:
            logger.warning("%s: interrupted; %d of %d blocks are stored: rerun the same call to resume",
                           store.path, int(store.done.sum()), len(grid.blocks))
            raise
        n_failed_tiles, failures = failure_records(grid, store, mask)
        with timer("finalize"):
            # the heatmap is the result that must be durable first; pictures come after
            prov = run_provenance(model_name=resolved.name, weights_sha256=resolved.weights_sha256,
                                  weights_note=resolved.note, slide_path=slide_path,
                                  slide_fingerprint=store.identity.get("slide_fingerprint"),
                                  store_path=store.path, call=call)
            prov["slide"].update(mpp=list(reader.mpp), mpp_source=reader.mpp_source)  # e.g. "estimated from nuclei"
            store.finalize(extra_attrs={"timings": dict(timer), "provenance": prov})
        label = f"{resolved.name} ({model})" if isinstance(model, (str, Path)) else resolved.name
        check_nonfinite(store, grid, label, cfg.precision, warn)  # before "undecodable": not the file's fault
        if grid.n_tissue and n_failed_tiles >= grid.n_tissue:  # the store keeps what is known
            first = next(f["reason"] for f in failures if f["stage"] == "inference")
            raise NoDecodableTissueError(
                slide_path, f"none of the {grid.n_tissue} tissue tiles at level {grid.level} could be decoded "
                f"(first error: {first}); the file is corrupt: re-export or re-transfer it")
        outputs = {"store": store.path}
        exports = _Exports(store, slide_path, out_dir, pixels, cfg, inputs.background)
        result = summarise(run, outputs, computed=len(todo) - failed, skipped=skipped,
                           failures=(n_failed_tiles, failures))
        result.outputs.update(exports.join(result.warnings))
        result.provenance = prov
        result.qc = qc_summary(qc)
        result.timings["exports"] = round(exports.seconds, 4)
        summary = out_dir / cfg.extra.get("summary_name", "{stem}_summary.json").format(stem=slide_path.stem)
        result.outputs["summary"] = summary
        result.to_json(summary)  # under the lock: the summary belongs to this run's store
    return result


def _tissue_and_grid(reader, pixels, tcfg: TissueConfig, gcfg: GridConfig, cfg: InferenceConfig,
                     timer: StageTimer) -> RunInputs:
    """Tissue mask (from a thumbnail that tolerates undecodable tiles), tile grid, overlay background."""
    with timer("tissue"):
        thumb = pixels.thumbnail(tcfg.mpp)
        mask = tissue_mask_from_rgb(thumb, tcfg.mpp, tcfg)
        # kept (cut down to figure size) for the overlay, which then decodes nothing again
        background = None
        if cfg.overlay:
            from wsi_cmaf.output.overlay import background_from

            background = background_from(thumb)
        del thumb
    with timer("grid"):
        grid = TileGrid.from_slide(reader, gcfg, mask)
    return RunInputs(mask, grid, background)


def _stain_method(resolved, cfg: InferenceConfig) -> str:
    return cfg.stain if cfg.stain is not None else (resolved.config.stain_normalization or "none")


def _embedding_model(resolved: ResolvedModel):
    """(wrapper returning [logits | features], D) for ``cfg.embeddings``; a named error when the
    model has no ``forward_features`` (raised before any slide work)."""
    from wsi_cmaf.infer.embeddings import with_embeddings

    return with_embeddings(resolved.module, resolved.config.input_size, repr(resolved.name),
                           tasks=resolved.tasks or None, views=resolved.views)


def _infer(run: SlideRun, todo: list, client: Client | None, stored_stain: Any = None,
           embed_module: Any = None, decoding: Any = None) -> int:
    """Fit the stain matrix and stream the ``todo`` blocks through the model; return #failed.

    Reads run on dask reader threads (``pixels``' file reopened with its backend). The first
    blocks are already decoding while the stain sample is read (through the opening ``reader``)
    and fitted. The fit is stored at once; ``stored_stain`` (an earlier run's) is used instead
    of fitting again. ``embed_module`` (a :class:`~wsi_cmaf.infer.embeddings.WithEmbeddings`)
    replaces the model when tile embeddings are stored too.
    """
    if not todo:
        return 0
    reader, pixels, grid, resolved, cfg = run.reader, run.pixels, run.grid, run.resolved, run.cfg
    dev, store, timer, warn = run.device, run.store, run.timer, run.warnings
    mc = resolved.config
    spec = SlideSpec(str(pixels.path), pixels.backend, _mpp_override(pixels))
    n_tiles = int(sum(int(grid.tissue[b.rows, b.cols].sum()) for b in todo))
    method = _stain_method(resolved, cfg)
    use_stain = method == "macenko"
    # a small slide's stain sample is all its tissue tiles: read every block once, fit from them
    # (not for multi-view models, whose block reads hold packed views rather than tiles)
    from_blocks = use_stain and stored_stain is None and sample_is_all_tissue(grid) and not resolved.views
    t0 = time.perf_counter()
    bar = None
    with _dask_client(client, cfg.reader_threads) as dc:
        grid_ref = dc.scatter(grid, broadcast=True, hash=False) if client is not None else grid
        read: Callable[..., object]
        read_args: tuple[Any, ...]
        read, read_args = ((read_block_views_task, (spec, grid_ref, resolved.views)) if resolved.views
                           else (read_block_task, (spec, grid_ref)))
        if decoding is not None:  # device decoding (infer.device_decode): raw JPEG tiles are read instead
            read, read_args = read_jpeg_block_task, (decoding.source, grid_ref)
        blocks = grid.blocks if from_blocks else todo
        feed: BlockFeed | DecodedFeed = BlockFeed(dc, read, read_args, blocks, cfg.prefetch_blocks)
        if decoding is not None:
            feed = DecodedFeed(feed, decoding, grid, host=from_blocks)
        try:
            source: Iterable[BlockTiles | BlockFailure] = feed
            stain_module = None
            if use_stain and stored_stain is not None:
                stain_module, stain_warning = restore_stain(stored_stain)
                if stain_warning:
                    warn.append(stain_warning)
            elif use_stain:
                t_fit = time.perf_counter()
                if from_blocks:
                    items = list(feed)
                    stain_module, stain_warning = fit_from_blocks(grid, items)
                    wanted = {b.index for b in todo}
                    source = [it for it in items if (it.index if isinstance(it, BlockFailure)
                                                     else it.block.index) in wanted]
                else:
                    feed.start()  # the first blocks decode on the reader threads meanwhile
                    # Sample reads here, through the opening reader: it is open already (a reader
                    # thread would open the file once more first) and OpenSlide caches decoded tiles.
                    rng, rows, cols = sample_tiles(grid)
                    stain_module, stain_warning = fit_from_tiles(read_sample(reader, grid, rows, cols), rng)
                save_stain(store, method, stain_module, stain_warning)  # before any block uses it
                timer["stain_fit"] = time.perf_counter() - t_fit
                if stain_warning:
                    warn.append(stain_warning)
            preprocess: TilePreprocessor | ViewsPreprocessor
            preprocess = TilePreprocessor(mc.input_size, tuple(mc.mean), tuple(mc.std), mc.resize_interpolation,
                                          stain_module)
            if resolved.views:  # each view preprocessed like a tile; the model gets (views, missing)
                preprocess = ViewsPreprocessor(preprocess, [v.size for v in resolved.views])
            module = embed_module if embed_module is not None else (
                task_outputs(resolved.module, list(resolved.tasks)) if resolved.tasks else resolved.module)
            runner = (BatchRunner if decoding is None else DeviceTilesRunner)(
                module, preprocess, dev, cfg.batch_size, cfg.precision, compile=cfg.compile,
                inflight=cfg.inflight_batches, outputs_in_flight=cfg.write_queue + 2,
                segments=(segments(resolved.tasks, mc.num_classes)
                          if embed_module is not None or resolved.tasks else None),
            )
            # disable=None: a bar only when stderr is a terminal; progress="always" forces it
            forced = cfg.progress == "always"
            bar = tqdm(total=n_tiles, unit="tile", disable=False if forced else (None if cfg.progress else True),
                       desc=pixels.path.name)
            n_failed = stream_blocks(source, runner, store, grid, mc.num_classes,
                                     write_queue=cfg.write_queue, on_written=bar.update,
                                     tasks={t: len(c) for t, c in list(resolved.tasks.items())[1:]})
        finally:
            feed.cancel()
            if bar is not None:
                bar.close()
    timer["inference"] = timer.get("inference", 0.0) + time.perf_counter() - t0 - timer.get("stain_fit", 0.0)
    if n_failed:
        warn.append(f"{n_failed} block(s) could not be read and are marked failed in the store")
    return n_failed


def _mpp_override(reader) -> tuple[float, float] | None:
    # an estimated µm/px is not in the file either: workers reopen the slide with the run's value
    return tuple(reader.mpp) if reader.mpp_source in ("override", "estimated from nuclei") else None


class _Exports:
    """Overlay PNG and GeoJSON, made on a background thread from the finalised store.

    They start only after ``store.finalize`` (the heatmap is durable first) and run while the
    summary is computed; :meth:`join` waits for them. A failed picture never loses the heatmap:
    its error becomes a warning.
    """

    def __init__(self, store, slide_path: Path, out_dir: Path, reader, cfg: InferenceConfig, background) -> None:
        self.outputs: dict[str, Path] = {}
        self.warnings: list[str] = []
        self.seconds = 0.0
        self._error: BaseException | None = None
        self._args = (store, slide_path, out_dir, reader, cfg, background)
        self._thread = threading.Thread(target=self._run, name="wsi-cmaf-exports", daemon=True)
        if cfg.overlay or cfg.geojson:
            self._thread.start()

    def _run(self) -> None:
        from wsi_cmaf.output.geojson import write_geojson
        from wsi_cmaf.output.overlay import overlay

        store, slide_path, out_dir, reader, cfg, background = self._args
        t0 = time.perf_counter()
        try:
            if cfg.overlay:
                png = out_dir / f"{slide_path.stem}_overlay.png"
                self.outputs["overlay"] = overlay(store, slide=reader, out_png=png, threshold=cfg.decision_threshold,
                                                  thumbnail=background)
            if cfg.geojson:
                self.outputs["geojson"] = write_geojson(store, out_dir / f"{slide_path.stem}_regions.geojson",
                                                        threshold=cfg.decision_threshold)
        except OutputWriteError as exc:  # a full or read-only disk fails the run, as for the store
            self._error = OutputWriteError(exc.path, exc.errno, f"{exc}; the heatmap store {store.path} is complete")
        except WsiCmafError as exc:
            self.warnings.append(f"export failed: {exc}")
            logger.warning("export failed: %s", exc)
        except BaseException as exc:  # a bug: re-raised in the caller's thread by join()
            self._error = exc
        finally:
            self.seconds = time.perf_counter() - t0

    def join(self, warn: list[str]) -> dict[str, Path]:
        """Wait for the exports; add their warnings to ``warn``; return their paths."""
        if self._thread.is_alive() or self._thread.ident is not None:
            self._thread.join()
        if self._error is not None:
            raise self._error
        warn.extend(self.warnings)
        return self.outputs

