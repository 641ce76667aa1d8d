"""Worker process for tests/slide/test_fuzz.py: runs the slide engine on one mutated file per request.

Protocol: one JSON object per stdin line, ``{"path": ..., "backend": ...}`` (or ``{"selftest":
"crash" | "hang"}``, to test the harness); one stdout line
per request, ``@@RESULT {"outcome": "ok" | "named" | "raw", ...}``. A crash inside a C library
kills only this process (faulthandler writes the native traceback to stderr), and the test
process reports the case that caused it.
"""

from __future__ import annotations

import faulthandler
import json
import logging
import sys
import traceback
import warnings
from typing import Any

MARK = "@@RESULT "


def run_case(path: str, backend: str) -> dict[str, Any]:
    """open + info + thumbnail/tissue + one block read; a named error is a valid outcome."""
    from wsi_cmaf.errors import WsiCmafError
    from wsi_cmaf.slide import GridConfig, TileGrid, TissueConfig, detect_tissue, open_slide, read_block

    steps: list[str] = []
    try:
        reader = open_slide(path, backend=backend)
        steps.append(f"open:{reader.backend}")
        with reader:
            info = {"levels": reader.level_dimensions, "vendor": reader.vendor, "mpp_source": reader.mpp_source,
                    "n_props": len(reader.properties), "associated": list(reader.associated_images)}
            for name in list(reader.associated_images)[:1]:
                _ = reader.associated_images[name].shape
            steps.append("info")
        # no µm/px in the (mutated) file: go on with an override, to reach the pixel paths
        reader = open_slide(path, backend=backend, mpp=None if info["mpp_source"] else 0.5)
        with reader:
            mask = detect_tissue(reader, TissueConfig())
            steps.append(f"tissue:{mask.mask.shape}:failed={mask.n_failed_tiles}")
            grid = TileGrid.from_slide(reader, GridConfig(mpp=4.0, tile_size=50, block_tiles=4), mask)
            if grid.blocks:
                tiles = read_block(reader, grid, grid.blocks[0])
                steps.append(f"block:{tiles.tiles.shape}")
            else:
                w, h = reader.level_dimensions[0]
                region = reader.read_region((w // 2, h // 2), 0, (min(256, w), min(256, h)))
                steps.append(f"region:{region.shape}")
        return {"outcome": "ok", "steps": steps}
    except WsiCmafError as exc:
        return {"outcome": "named", "error": type(exc).__name__, "message": str(exc)[:500], "steps": steps}
    except Exception as exc:  # noqa: BLE001 - the point of the fuzz test is to report these
        return {"outcome": "raw", "error": type(exc).__name__, "message": str(exc)[:500], "steps": steps,
                "traceback": traceback.format_exc()[-4000:]}


def main() -> None:
    """Serve requests until stdin closes."""
    faulthandler.enable()
    logging.basicConfig(level=logging.ERROR)
    warnings.simplefilter("ignore")
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        if req.get("selftest") == "crash":  # lets the test prove that a native crash is reported
            import ctypes

            ctypes.string_at(0)
        if req.get("selftest") == "hang":
            import time

            time.sleep(3600)
        result = run_case(req["path"], req.get("backend", "auto"))
        sys.stdout.write(MARK + json.dumps(result, default=str) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
