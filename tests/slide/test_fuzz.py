"""Property-based fuzzing of the slide engine with mutated real and synthetic slide files.

Every mutated file must give a result (open + info + thumbnail/tissue + one block read) or a
named :class:`~wsi_cmaf.errors.WsiCmafError`, within :data:`CASE_TIMEOUT_S`: never a hang, a
segfault or a raw exception. Cases run in a worker subprocess (``tests/slide/_fuzz_worker.py``), so a
crash inside a C library (libjpeg, libtiff, OpenJPEG, OpenSlide) is caught and reported with
the mutation that caused it; the worker is restarted after a crash or a hang.

Fault classes covered (issue 13 §4), on a synthetic Aperio-style pyramid and on the real files
of ../shared/data/slides when present (SVS JPEG, generic pyramidal TIFF, SVS JPEG 2000, DICOM):

- truncation at a random offset;
- byte flips in headers (TIFF header, IFD entries, out-of-line tag values such as the
  ImageDescription and the tile offset/byte-count arrays; the first 8 KiB of a DICOM file);
- byte flips in tile data (any tile of any level);
- zeroed tile offsets (some or all entries of a level's TileOffsets array).

Default run: the "ci" Hypothesis profile of tests/conftest.py (fixed seed, 60 cases plus the
fixed cases below; ~15 s for the file on 2 cores). ``pytest tests/slide/test_fuzz.py -s
--hypothesis-profile=long`` runs 3,000 cases with a fresh seed (~11 min on 2 shared cores; last
run: 2,325 results, 675 named errors, no raw exception, crash or hang); ``-s`` prints the tally.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

hypothesis = pytest.importorskip("hypothesis", reason="hypothesis is not installed (pip install -e '.[dev]')")
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tests.helpers.realdata import REAL_SLIDES, real_data_dir  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("_fuzz_worker.py")
MARK = "@@RESULT "
#: A case (open, info, 8 µm/px thumbnail, one block) takes < 1 s on these small files.
CASE_TIMEOUT_S = 30.0
#: Worker start (imports numpy, PIL, OpenSlide, tiffslide, dask, scikit-image).
START_TIMEOUT_S = 60.0


# --------------------------------------------------------------------------- file layout
@dataclass
class Seed:
    """One unmutated slide file and where its structures lie."""

    name: str
    data: bytes = field(repr=False)
    suffix: str
    backends: tuple[str, ...]
    header_spans: list[tuple[int, int]] = field(default_factory=list, repr=False)  # (start, length)
    tiles: list[tuple[int, int]] = field(default_factory=list, repr=False)  # (offset, bytecount)
    offset_arrays: list[tuple[int, int, int]] = field(default_factory=list, repr=False)  # (offset, count, itemsize)

    def __repr__(self) -> str:
        return f"Seed({self.name!r}, {len(self.data):,} bytes)"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        # Hypothesis prints failing cases with its pretty-printer: keep megabytes of bytes out
        printer.text(repr(self))


def _layout(seed: Seed, path: Path) -> None:
    """Fill the seed's spans from tifffile; non-TIFF files get generic header/body spans."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tf:
            big = tf.is_bigtiff
            seed.header_spans.append((0, 16 if big else 8))
            for page in tf.pages:
                tags = page.tags
                seed.header_spans.append((page.offset, (8 + 20 * len(tags) + 8) if big else (2 + 12 * len(tags) + 4)))
                for tag in tags:
                    if tag.valuebytecount > (8 if big else 4):
                        seed.header_spans.append((tag.valueoffset, min(tag.valuebytecount, 4096)))
                    if tag.code in (273, 324) and tag.count:  # Strip/TileOffsets
                        seed.offset_arrays.append((tag.valueoffset, tag.count, tag.valuebytecount // tag.count))
                seed.tiles += [(o, n) for o, n in zip(page.dataoffsets, page.databytecounts) if o and n]
    except (tifffile.TiffFileError, ValueError):
        size = len(seed.data)
        seed.header_spans = [(0, min(size, 8192))]
        seed.tiles = [(min(size - 1, 8192), max(1, size - 8192))]


@pytest.fixture(scope="session")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> list[Seed]:
    """The synthetic seed, plus every real slide found (a printed reason when there are none)."""
    from wsi_cmaf.slide import write_synthetic_slide

    d = tmp_path_factory.mktemp("fuzz_seeds")
    synth = write_synthetic_slide(d / "synthetic.svs", width=1536, height=1024, mpp=0.5, tile=256,
                                  downsamples=(1, 4), seed=3, save_mask=False).path
    paths = [synth]
    real = real_data_dir()
    if real.is_dir():
        paths += [real / n for n in REAL_SLIDES.values() if (real / n).is_file()]
    else:
        print(f"[test_fuzz] real slides not found at {real}: fuzzing the synthetic slide only")
    out = []
    for p in paths:
        tiff = p.suffix.lower() != ".dcm"
        seed = Seed(p.name, p.read_bytes(), p.suffix, ("auto", "tiffslide") if tiff else ("auto",))
        _layout(seed, p)
        out.append(seed)
    return out


# --------------------------------------------------------------------------- mutations
def truncate(data: bytes, at: int) -> bytes:
    """The first ``at`` bytes."""
    return data[:at]


def flip(data: bytes, positions: list[tuple[int, int]]) -> bytes:
    """XOR byte ``pos`` with ``mask`` (1..255, so the byte always changes) for each pair."""
    out = bytearray(data)
    for pos, mask in positions:
        if 0 <= pos < len(out):
            out[pos] ^= mask
    return bytes(out)


def zero_offsets(data: bytes, array: tuple[int, int, int], entries: list[int]) -> bytes:
    """Set entries of a Strip/TileOffsets array to 0."""
    start, count, size = array
    out = bytearray(data)
    for i in entries:
        pos = start + (i % count) * size
        out[pos:pos + size] = bytes(size)
    return bytes(out)


@st.composite
def mutations(draw: st.DrawFn, seeds: list[Seed]) -> tuple[Seed, str, bytes, str]:
    """(seed, description, mutated bytes, backend)."""
    seed = draw(st.sampled_from(seeds))
    size = len(seed.data)
    kind = draw(st.sampled_from(["truncate", "header_flip", "tile_flip", "zero_offsets"]))
    flips = st.lists(st.tuples(st.integers(0, 10**9), st.integers(1, 255)), min_size=1, max_size=8)
    if kind == "truncate":
        at = draw(st.integers(1, size - 1))
        desc, data = f"truncate at {at} of {size}", truncate(seed.data, at)
    elif kind == "header_flip" or (kind == "zero_offsets" and not seed.offset_arrays):
        start, length = draw(st.sampled_from(seed.header_spans))
        pos = [(start + p % max(1, length), m) for p, m in draw(flips)]
        desc, data = f"header flips {pos}", flip(seed.data, pos)
    elif kind == "tile_flip":
        off, n = draw(st.sampled_from(seed.tiles))
        pos = [(off + p % n, m) for p, m in draw(flips)]
        desc, data = f"tile flips {pos} (tile at {off}, {n} bytes)", flip(seed.data, pos)
    else:
        array = draw(st.sampled_from(seed.offset_arrays))
        entries = draw(st.lists(st.integers(0, array[1] - 1), min_size=1, max_size=array[1]))
        desc, data = f"zero offsets {sorted(set(entries))[:20]} of array at {array[0]} ({array[1]} entries)", \
            zero_offsets(seed.data, array, entries)
    backend = draw(st.sampled_from(seed.backends))
    return seed, f"{seed.name}: {kind}: {desc} [{backend}]", data, backend


# --------------------------------------------------------------------------- worker
class FuzzWorker:
    """A long-lived worker subprocess; restarted after a crash or a hang."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[str] | None = None
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.stderr_path: Path | None = None
        self.n = 0
        self.tally: dict[str, int] = {}  # outcome (and error name) -> cases

    def _start(self, stderr_dir: Path) -> None:
        # extend PYTHONPATH (never replace it): the worker must import this checkout of wsi_cmaf
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
        self.stderr_path = stderr_dir / f"worker_{self.n}.stderr"
        self.n += 1
        self.proc = subprocess.Popen(
            [sys.executable, "-u", str(WORKER)], cwd=REPO, env=env, text=True, bufsize=1,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(self.stderr_path, "w"),  # noqa: SIM115
        )
        self.lines = queue.Queue()
        threading.Thread(target=self._pump, args=(self.proc, self.lines), daemon=True).start()

    @staticmethod
    def _pump(proc: subprocess.Popen[str], lines: queue.Queue[str | None]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith(MARK):
                lines.put(line[len(MARK):])
        lines.put(None)  # EOF: the worker died

    def run(self, path: Path | None, backend: str, stderr_dir: Path, *, timeout: float = CASE_TIMEOUT_S,
            selftest: str | None = None) -> dict[str, Any]:
        """Result dict of one case; outcome 'crash' or 'hang' when the worker gives none."""
        first = self.proc is None or self.proc.poll() is not None
        if first:
            self._start(stderr_dir)
        assert self.proc is not None and self.proc.stdin is not None
        request = {"selftest": selftest} if selftest else {"path": str(path), "backend": backend}
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        try:
            line = self.lines.get(timeout=timeout + (START_TIMEOUT_S if first else 0))
        except queue.Empty:
            self.proc.kill()
            self.proc.wait()
            return {"outcome": "hang", "stderr": self._stderr_tail()}
        if line is None:
            code = self.proc.wait()
            return {"outcome": "crash", "returncode": code, "stderr": self._stderr_tail()}
        result = json.loads(line)
        key = result["outcome"] + (f":{result['error']}" if "error" in result else "")
        self.tally[key] = self.tally.get(key, 0) + 1
        return result

    def _stderr_tail(self) -> str:
        return self.stderr_path.read_text(errors="replace")[-3000:] if self.stderr_path else ""

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="session")
def worker() -> FuzzWorker:
    w = FuzzWorker()
    yield w
    w.close()
    print(f"\n[test_fuzz] {sum(w.tally.values())} cases: "
          + ", ".join(f"{k}={v}" for k, v in sorted(w.tally.items(), key=lambda kv: -kv[1])))


def _check(worker: FuzzWorker, tmp: Path, name: str, data: bytes, backend: str, desc: str) -> dict[str, Any]:
    path = tmp / name
    path.write_bytes(data)
    result = worker.run(path, backend, tmp)
    detail = json.dumps({k: v for k, v in result.items() if k != "traceback"}, default=str)[:1500]
    assert result["outcome"] != "crash", f"worker crashed on {desc}: {detail}"
    assert result["outcome"] != "hang", f"no result within {CASE_TIMEOUT_S:.0f} s on {desc}: {detail}"
    assert result["outcome"] in ("ok", "named"), (
        f"raw exception on {desc}: {detail}\n{result.get('traceback', '')}")
    return result


# --------------------------------------------------------------------------- tests
def test_harness_reports_a_native_crash_and_a_hang(tmp_path) -> None:
    w = FuzzWorker()
    try:
        crash = w.run(None, "auto", tmp_path, selftest="crash")
        assert crash["outcome"] == "crash" and crash["returncode"] == -11  # SIGSEGV
        assert "Fatal Python error: Segmentation fault" in crash["stderr"]  # faulthandler's report
        w._start(tmp_path)  # a live worker: the next request gets the short per-case timeout
        hang = w.run(None, "auto", tmp_path, timeout=2.0, selftest="hang")
        assert hang["outcome"] == "hang"
    finally:
        w.close()


@pytest.mark.slow
def test_fixed_fault_classes_on_synthetic(seeds: list[Seed], worker: FuzzWorker, tmp_path_factory) -> None:
    """One case of each fault class on the synthetic seed, with outcomes pinned by hand."""
    tmp = tmp_path_factory.mktemp("fuzz_fixed")
    seed = seeds[0]
    data = seed.data
    level0_offsets = seed.offset_arrays[0]  # page 0 = level 0 (24 tiles of 256 px)
    assert level0_offsets[1] == 24
    first_tile = seed.tiles[0]
    cases = {
        "clean": (data, "ok"),
        "truncated_half": (truncate(data, len(data) // 2), None),
        "truncated_header": (truncate(data, 6), "named"),
        "tiff_magic_flipped": (flip(data, [(2, 0xFF)]), "named"),
        "tile_marker_flipped": (flip(data, [(first_tile[0] + 3, 0xFF ^ data[first_tile[0] + 3] ^ 0x3F)]), "ok"),
        "level0_offsets_zeroed": (zero_offsets(data, level0_offsets, list(range(24))), None),
    }
    for name, (mutated, expected) in cases.items():
        for backend in seed.backends:
            result = _check(worker, tmp, f"{name}.svs", mutated, backend, f"{name} [{backend}]")
            if expected is not None:
                assert result["outcome"] == expected, (name, backend, result)


#: Cases the fuzzer found (seed file, mutation, argument), kept as fixed regressions.
REGRESSIONS = [
    # pydicom's BytesLengthException (not a subclass of any builtin error) escaped open_slide
    ("small_dicom.dcm", "flip", [(137, 16)]),
]


def test_regressions_found_by_fuzzing(seeds: list[Seed], worker: FuzzWorker, tmp_path_factory) -> None:
    tmp = tmp_path_factory.mktemp("fuzz_regressions")
    by_name = {s.name: s for s in seeds}
    missing = [name for name, _, _ in REGRESSIONS if name not in by_name]
    if missing:
        print(f"[test_fuzz] regressions on {missing} skipped: real slides not found at {real_data_dir()}")
    for name, kind, arg in REGRESSIONS:
        if name not in by_name:
            continue
        seed = by_name[name]
        data = flip(seed.data, arg) if kind == "flip" else truncate(seed.data, arg)
        for backend in seed.backends:
            _check(worker, tmp, f"regression{seed.suffix}", data, backend, f"{name}: {kind} {arg} [{backend}]")


@pytest.mark.slow
@pytest.mark.timeout(6 * 3600)  # the "long" profile; each case has its own CASE_TIMEOUT_S
@given(data=st.data())
def test_mutated_slides_give_a_result_or_a_named_error(data: st.DataObject, seeds: list[Seed], worker: FuzzWorker,
                                                     tmp_path_factory) -> None:
    seed, desc, mutated, backend = data.draw(mutations(seeds))
    tmp = tmp_path_factory.getbasetemp() / "fuzz_cases"
    tmp.mkdir(exist_ok=True)
    _check(worker, tmp, f"case{seed.suffix}", mutated, backend, desc)
