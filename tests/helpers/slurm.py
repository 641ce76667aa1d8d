"""Bring up (or find) the single-node SLURM that the SLURM tests submit real jobs to.

The work is done by ``.ci/slurm-up`` (CI runs it too); this module only runs it and turns its
failure into a reason a test can skip with.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / ".ci" / "slurm-up"


def ensure_slurm(timeout: float = 240.0) -> str | None:
    """None when SLURM answers with an idle node, else why it does not (to skip with)."""
    if not SCRIPT.is_file():
        return f"{SCRIPT} is missing"
    try:
        proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"{SCRIPT} did not finish in {timeout:.0f} s"
    if proc.returncode != 0:
        return f"SLURM is not available: {(proc.stderr or proc.stdout).strip()[-400:]}"
    for tool in ("sbatch", "squeue", "scancel"):
        if shutil.which(tool) is None:
            return f"SLURM came up but {tool} is not on PATH"
    return None


def node_gpus() -> int:
    """GPUs (gres gpu) the SLURM node declares; 0 when none or unknown."""
    try:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%G"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return 0
    for part in out.split(","):
        bits = part.strip().split(":")
        if bits and bits[0] == "gpu" and bits[-1].split("(")[0].isdigit():
            return int(bits[-1].split("(")[0])
    return 0


def jobs_named(name: str) -> list[str]:
    """Job ids of the running or pending jobs with this name."""
    out = subprocess.run(["squeue", "-h", "-n", name, "-o", "%i %T"], capture_output=True, text=True,
                         timeout=20).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def running_jobs_named(name: str) -> list[str]:
    """Job ids of the running jobs with this name."""
    out = subprocess.run(["squeue", "-h", "-n", name, "-t", "RUNNING", "-o", "%i"], capture_output=True,
                         text=True, timeout=20).stdout
    return [line.strip() for line in out.splitlines() if line.strip()]
