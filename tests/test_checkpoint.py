"""DCP checkpoints: resume is bit-identical; a (2 x 2) checkpoint loads on (1 x 4), (4 x 1) and
as a plain 1-process state_dict with the original module keys."""

from __future__ import annotations

import pytest
import torch

from tests import harness

N = 2
BASE = dict(nlat=10, nlon=16, channels=3, width=8, global_batch=4, lr=1e-2)


def _cfg(**kw):
    from credit_dtensor.tools.train import TrainConfig

    return TrainConfig(**{**BASE, **kw})


def _optim_full(opt: torch.optim.Optimizer, model) -> dict[str, torch.Tensor]:
    """Full optimizer state tensors keyed by parameter name (collective)."""
    from torch.distributed.tensor import DTensor

    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for p, st in opt.state.items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                out[f"{names[id(p)]}.{k}"] = (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
    return out


def task_resume(root: str) -> dict:
    """2N uninterrupted steps vs N steps + save + fresh model/optimizer + resume N steps (2 x 2)."""
    import torch.distributed as dist

    from credit_dtensor.tools.train import full_state_dict, setup, train

    m = harness.manager(2)
    full = train(_cfg(steps=2 * N), m)
    cfg_a = _cfg(steps=N, checkpoint_dir=root, checkpoint_every=N)
    first = train(cfg_a, m)
    rng_at_save = torch.get_rng_state()
    torch.manual_seed(1000 + dist.get_rank())  # the restart must bring the saved RNG state back
    cfg_b = _cfg(steps=2 * N, checkpoint_dir=root, checkpoint_every=N, resume=True)
    model, opt = setup(cfg_b, m)  # a restart: new model and optimizer objects
    second = train(cfg_b, m, model_and_optimizer=(model, opt))
    state = full_state_dict(model)  # collective: every rank
    return {
        "rng_restored": torch.equal(torch.get_rng_state(), rng_at_save),
        "full": full.losses,
        "resumed": first.losses + second.losses,
        "start": second.start_step,
        "state": state if dist.get_rank() == 0 else None,
    }


def task_state_at(root: str, step: int, domain: int) -> dict:
    """Load the checkpoint of ``step`` on a mesh with ``domain``; return full model/optimizer state
    and the loss of one more step."""
    import torch.distributed as dist

    from credit_dtensor.tools.checkpoint import checkpoint_path, load_checkpoint
    from credit_dtensor.tools.train import full_state_dict, setup, train

    m = harness.manager(domain)
    cfg = _cfg(steps=step + 1)
    model, opt = setup(cfg, m)
    loaded = load_checkpoint(checkpoint_path(root, step), model, opt)
    state = full_state_dict(model)
    optim = _optim_full(opt, model)
    cont = _cfg(steps=step + 1, resume_from=str(checkpoint_path(root, step)))
    res = train(cont, m, model_and_optimizer=setup(cont, m))
    keep = dist.get_rank() == 0
    return {"step": loaded, "state": state if keep else None, "optim": optim if keep else None, "next": res.losses}


@pytest.mark.slow
def test_resume_is_bit_identical_and_reshards(tmp_path) -> None:
    from credit_dtensor.tools.checkpoint import checkpoint_path, latest_checkpoint, load_plain_state_dict
    from credit_dtensor.tools.train import build_model

    root = str(tmp_path / "ckpt")
    world = harness.get_world(4)
    res = world.run(task_resume, root)[0]
    assert res["start"] == N
    assert res["rng_restored"], "RNG state not restored on resume"
    assert res["resumed"] == res["full"], "resumed loss curve differs from the uninterrupted run"
    assert latest_checkpoint(root) == checkpoint_path(root, 2 * N)
    assert not list((tmp_path / "ckpt").glob("*.tmp")), "temporary checkpoint directories left behind"

    # the same checkpoint (written on 2 x 2) on 2 x 2, 1 x 4 and 4 x 1
    ref = world.run(task_state_at, root, N, 2)[0]
    assert ref["step"] == N
    for domain in (4, 1):
        got = world.run(task_state_at, root, N, domain)[0]
        assert got["step"] == N
        for k, v in ref["state"].items():
            assert torch.equal(got["state"][k], v), f"domain={domain}: parameter {k} not restored exactly"
        assert got["optim"].keys() == ref["optim"].keys() and got["optim"]
        for k, v in ref["optim"].items():
            assert torch.equal(got["optim"][k], v), f"domain={domain}: optimizer state {k} not restored exactly"
        # the next step continues the run (other mesh: same value up to fp32 reduction order)
        assert abs(got["next"][0] - ref["next"][0]) <= 1e-5 * abs(ref["next"][0]), (domain, got["next"], ref["next"])

    # plain 1-process state_dict (no process group here) with the original module keys
    plain = build_model(_cfg())
    sd = load_plain_state_dict(checkpoint_path(root, N), plain)
    assert sd.keys() == plain.state_dict().keys()
    for k, v in ref["state"].items():
        assert torch.equal(plain.state_dict()[k], v), f"plain load: {k}"
    raw = load_plain_state_dict(checkpoint_path(root, N))
    assert raw.keys() == ref["state"].keys()
    assert all(torch.equal(raw[k], v) for k, v in ref["state"].items())


# --- damaged checkpoints: resume falls back to the newest one that loads -----------------------

D = 1  # steps between checkpoints in the damage tests
DAMAGES = ("corrupt_metadata", "truncated_distcp", "missing_distcp", "empty_dir", "corrupt_distcp")


def _damage(path, how: str) -> None:
    import shutil

    shards = sorted(path.glob("*.distcp"))
    if how == "corrupt_metadata":
        data = bytearray((path / ".metadata").read_bytes())
        data[: len(data) // 2] = b"\0" * (len(data) // 2)  # same size: only reading it can tell
        (path / ".metadata").write_bytes(bytes(data))
    elif how == "truncated_distcp":
        with open(shards[-1], "r+b") as f:
            f.truncate(shards[-1].stat().st_size // 2)
    elif how == "missing_distcp":
        shards[0].unlink()
    elif how == "corrupt_distcp":  # same size, so only loading it can tell
        data = bytearray(shards[-1].read_bytes())
        data[:64] = b"\0" * 64
        shards[-1].write_bytes(bytes(data))
    elif how == "empty_dir":
        shutil.rmtree(path)
        path.mkdir()
    else:
        raise ValueError(how)


def task_resume_damaged(root: str) -> dict:
    """Checkpoints at D and 2D; for each damage of step 2D, resume to 3D from step D; then with
    every checkpoint damaged, resume fails on every rank with CheckpointError."""
    import logging
    import shutil
    from pathlib import Path

    import torch.distributed as dist

    from credit_dtensor.tools.checkpoint import CheckpointError, checkpoint_path
    from credit_dtensor.tools.train import setup, train

    m = harness.manager(2)
    base = Path(root) / "base"
    full = train(_cfg(steps=3 * D), m)
    train(_cfg(steps=2 * D, checkpoint_dir=str(base), checkpoint_every=D), m)
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda rec: records.append(rec.getMessage())  # type: ignore[method-assign]
    log = logging.getLogger("credit_dtensor.tools.checkpoint")
    log.addHandler(handler)
    log.setLevel(logging.WARNING)
    out: dict = {"full": full.losses[-1], "runs": {}}
    try:
        for how in DAMAGES:
            d = Path(root) / how
            if dist.get_rank() == 0:
                shutil.copytree(base, d)
                _damage(checkpoint_path(d, 2 * D), how)
            dist.barrier()
            records.clear()
            cfg = _cfg(steps=3 * D, checkpoint_dir=str(d), resume=True)
            res = train(cfg, m, model_and_optimizer=setup(cfg, m))
            out["runs"][how] = {"start": res.start_step, "final": res.losses[-1], "log": list(records)}
        d = Path(root) / "all_damaged"
        if dist.get_rank() == 0:
            shutil.copytree(base, d)
            _damage(checkpoint_path(d, 2 * D), "truncated_distcp")
            _damage(checkpoint_path(d, D), "missing_distcp")
        dist.barrier()
        try:
            cfg = _cfg(steps=3 * D, checkpoint_dir=str(d), resume=True)
            train(cfg, m, model_and_optimizer=setup(cfg, m))
            out["none_loads"] = None
        except CheckpointError as exc:
            out["none_loads"] = str(exc)
    finally:
        log.removeHandler(handler)
    return out


@pytest.mark.slow
def test_resume_skips_damaged_checkpoints(tmp_path) -> None:
    per_rank = harness.get_world(4).run(task_resume_damaged, str(tmp_path))
    why = {
        "corrupt_metadata": "unreadable .metadata",
        "truncated_distcp": "truncated",
        "missing_distcp": "is missing",
        "empty_dir": "COMPLETE.json",
        "corrupt_distcp": "failed to load",
    }
    for rank, res in enumerate(per_rank):
        for how in DAMAGES:
            run = res["runs"][how]
            assert run["start"] == D, (rank, how, run)
            assert run["final"] == res["full"], f"{how}: final loss {run['final']} != undamaged {res['full']}"
            if rank == 0:  # rank 0 reports, once per skipped checkpoint
                (msg,) = run["log"]
                assert f"step_{2 * D:08d}" in msg and why[how] in msg, (how, msg)
            else:
                assert run["log"] == []
        msg = res["none_loads"]
        assert msg is not None, f"rank {rank}: resume with no loadable checkpoint did not raise"
        assert "no checkpoint under" in msg and f"step_{D:08d}" in msg and f"step_{2 * D:08d}" in msg, msg


def test_interrupted_save_leaves_no_complete_looking_directory(tmp_path, monkeypatch) -> None:
    """One process, no process group: a crash before the marker leaves only ``step_N.tmp``."""
    from credit_dtensor.tools import checkpoint as ck
    from credit_dtensor.tools.train import build_model

    model = build_model(_cfg())
    opt = torch.optim.AdamW(model.parameters())
    ck.save_checkpoint(tmp_path, 1, model, opt)

    def crash(*a, **k):
        raise RuntimeError("simulated crash before the marker")

    monkeypatch.setattr(ck, "_write_marker", crash)
    try:
        ck.save_checkpoint(tmp_path, 2, model, opt)
    except RuntimeError:
        pass
    else:
        raise AssertionError("the simulated crash did not happen")
    assert (tmp_path / "step_00000002.tmp").is_dir() and not (tmp_path / "step_00000002").exists()
    assert ck.latest_checkpoint(tmp_path) == ck.checkpoint_path(tmp_path, 1)
    monkeypatch.undo()
    ck.save_checkpoint(tmp_path, 2, model, opt)  # the next save clears the leftover
    assert not list(tmp_path.glob("*.tmp"))
    assert ck.latest_checkpoint(tmp_path) == ck.checkpoint_path(tmp_path, 2)
    assert ck.checkpoint_problem(tmp_path / "step_00000002") is None
    with pytest.raises(ck.CheckpointError, match="incomplete or damaged"):
        ck.load_checkpoint(tmp_path / "nope", model, opt)
