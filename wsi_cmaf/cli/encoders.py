"""``wsi-cmaf encoders``: the registered foundation-model tile encoders (no torch import)."""

from __future__ import annotations

import argparse
import json

VERB = "encoders"
HELP = "list the registered pathology foundation-model encoders: dimension, input, µm/px, licence"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Register the verb's options."""
    p.add_argument("--json", action="store_true", help="print the registry entries as JSON")
    p.add_argument("--sources", action="store_true", help="also print where each entry's facts come from")


def run(args: argparse.Namespace) -> int:
    """Print one line per encoder (or the entries as JSON)."""
    from wsi_cmaf.encoders.registry import list_encoders

    specs = list_encoders()
    if args.json:
        print(json.dumps([{**s.to_dict(), "title": s.title, "params": s.params, "gating": s.gating,
                           "sources": list(s.sources)} for s in specs], indent=2))
        return 0
    print(f"{'name':<15} {'dim':>5} {'input':>7} {'µm/px':>6} {'params':>7}  {'gated':<5}  licence")
    for s in specs:
        print(f"{s.name:<15} {s.dim:>5} {s.input_size:>4} px {s.mpp:>6.2f} {s.params or '':>7}  "
              f"{'yes' if s.gated else 'no':<5}  {s.licence}")
        if args.sources:
            for src in s.sources:
                print(f"{'':<15} source: {src}")
    print("any timm model: --encoder timm:<architecture> with --weights FILE (ImageNet normalisation, "
          "224 px at 0.5 µm/px unless --input-size/--encoder-mpp say otherwise)")
    return 0
