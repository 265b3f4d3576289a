"""Fault tolerance under ``torchrun --max-restarts=1``: rank 1 SIGKILLs itself mid-run (first
attempt only); torchrun restarts both ranks, they resume from the last checkpoint and finish with
exactly the final loss of an uninterrupted run. Both runs go concurrently to save wall time."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train.py"
STEPS, EVERY, FAULT_STEP = 8, 3, 5
PG_TIMEOUT = 60  # seconds: a rank stuck on a dead peer fails after this at the latest
RUN_TIMEOUT = 400


def _launch(ckpt: Path, fault: bool) -> subprocess.Popen:
    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        "--standalone", "--nproc-per-node", "2", "--max-restarts", "1", "--monitor-interval", "0.5",
        str(SCRIPT),
        "--dp", "1", "--domain", "2", "--steps", str(STEPS), "--resolution", "16x32",
        "--checkpoint-dir", str(ckpt), "--checkpoint-every", str(EVERY), "--resume",
        "--pg-timeout", str(PG_TIMEOUT),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
    env.pop("CREDIT_DTENSOR_FAULT_STEP", None)
    if fault:
        env["CREDIT_DTENSOR_FAULT_STEP"] = str(FAULT_STEP)
        env["CREDIT_DTENSOR_FAULT_RANK"] = "1"
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _final_loss(out: str) -> tuple[str, int]:
    found = re.findall(r"final step (\d+) loss (\S+) \(started at step (\d+)\)", out)
    assert found, f"no final loss line in the output:\n{out[-4000:]}"
    step, loss, start = found[-1]
    assert int(step) == STEPS
    return loss, int(start)


def _known_rendezvous_race(out: str) -> bool:
    return "connectFullMesh" in out or "Connection refused" in out


@pytest.mark.slow
@pytest.mark.timeout(2 * RUN_TIMEOUT + 60)
def test_killed_rank_restarts_from_checkpoint(tmp_path: Path) -> None:
    t0 = time.monotonic()
    clean = _launch(tmp_path / "clean", fault=False)
    faulty = _launch(tmp_path / "faulty", fault=True)
    outs = {}
    for name, proc in (("clean", clean), ("faulty", faulty)):
        try:
            outs[name], _ = proc.communicate(timeout=max(1.0, RUN_TIMEOUT - (time.monotonic() - t0)))
        except subprocess.TimeoutExpired:
            clean.kill()
            faulty.kill()
            pytest.fail(f"torchrun ({name}) did not finish within {RUN_TIMEOUT} s")
        if name == "clean":
            assert proc.returncode == 0, f"{name} run failed ({proc.returncode}):\n{outs[name][-4000:]}"
    if faulty.returncode != 0 and _known_rendezvous_race(outs["faulty"]):
        # torchrun's agent reuses one store across restarts; a restarted rank can, rarely, read the
        # dead peer's address before the new one is published (a torch issue, see cli_train's
        # per-attempt store prefix). Retry the whole faulty job once, from a clean directory.
        faulty = _launch(tmp_path / "faulty_retry", fault=True)
        outs["faulty"], _ = faulty.communicate(timeout=RUN_TIMEOUT)
    assert faulty.returncode == 0, f"faulty run failed ({faulty.returncode}):\n{outs['faulty'][-4000:]}"
    clean_loss, clean_start = _final_loss(outs["clean"])
    faulty_loss, faulty_start = _final_loss(outs["faulty"])
    assert clean_start == 0
    # the kill happened (signal 9 reported by the agent) and the second attempt resumed
    assert "fault injection" in outs["faulty"] or "Signal 9" in outs["faulty"] or "SIGKILL" in outs["faulty"]
    assert "restart 1" in outs["faulty"], outs["faulty"][-4000:]
    last_ckpt = (FAULT_STEP // EVERY) * EVERY
    assert faulty_start == last_ckpt, f"resumed at step {faulty_start}, expected {last_ckpt}"
    assert faulty_loss == clean_loss, f"final loss after restart {faulty_loss} != uninterrupted {clean_loss}"
