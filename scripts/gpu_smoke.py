"""GPU smoke: prove the CUDA/NCCL path of credit_dtensor in one command (under 5 minutes).

Needs nothing but torch (2.11-2.14) and this repository: run it from the repository root, where
nothing has to be installed:

    PYTHONPATH=. python scripts/gpu_smoke.py --json gpu_smoke.jsonl     # every visible GPU
    PYTHONPATH=. python scripts/gpu_smoke.py --device cpu --ranks 1,2     # the same checks on gloo

It launches itself: one rank with an NCCL process group, then (when several GPUs are visible) one
rank per GPU, each spawned with ``torch.multiprocessing``. Every rank runs, on its own GPU:

* ``shard/gather``: ``shard_tensor`` (local slicing and ``src=0`` scatter) and ``gather_tensor``
  give back the tensor bit for bit, local shapes follow ``torch.chunk``;
* ``fp32 fwd+bwd``: a converted conv + GroupNorm + SiLU + ``nn.MultiheadAttention`` model (tokens
  = H*W flattened) against the plain model on the same GPU: output, input gradient and every
  parameter gradient within 1e-5 (relative to max(1, max|reference|); TF32 off), output placed
  ``Shard(H)``, no implicit all-gather (``gather_policy("raise")``);
* ``bf16 autocast``: the same under ``torch.autocast(device, bfloat16)`` against the plain model
  under the same autocast: the output dtype must match and the errors stay within 3e-2;
  report-only on CPU (exit status ignores it there);
* ``compile``: ``torch.compile`` (inductor by default) of the converted model against eager, fp32
  within 1e-5, with the cold compile time (fresh inductor cache) and the graphs / graph breaks
  Dynamo reported (``--fullgraph`` makes a graph break a failure);
* ``train step``: one AdamW step of the plain and the converted model on a larger input, split into
  host time (until the step returns), GPU span (CUDA events), GPU busy time (profiler kernels) and
  wall time, plus peak GPU memory of each.

Prints a table (rich when installed, plain text otherwise) and one JSON line (last line of stdout,
also appended to ``--json PATH``). Exit status 0 when every required check passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # runnable from a checkout without installing the package
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

FP32_TOL = 1e-5
BF16_TOL = 3e-2
SMALL = dict(batch=2, c_in=4, height=13, width=16, channels=32, heads=4, groups=8)


# --- the model ---------------------------------------------------------------------------------------------


def _model(c_in: int, channels: int, heads: int, groups: int) -> torch.nn.Module:
    from torch import nn

    class SmokeNet(nn.Module):
        """conv -> GroupNorm -> SiLU -> attention over the H*W tokens (residual) -> GroupNorm -> SiLU -> conv."""

        def __init__(self) -> None:
            super().__init__()
            self.inp = nn.Conv2d(c_in, channels, 3, padding=1)
            self.norm1 = nn.GroupNorm(groups, channels)
            self.attn = nn.MultiheadAttention(channels, heads, batch_first=True)
            self.norm2 = nn.GroupNorm(groups, channels)
            self.out = nn.Conv2d(channels, c_in, 3, padding=1, padding_mode="circular")
            self.act = nn.SiLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.act(self.norm1(self.inp(x)))
            b, c, hh, ww = h.shape
            tokens = h.flatten(2).transpose(1, 2)  # (B, H*W, C): H outermost, sharded with it
            a = self.attn(tokens, tokens, tokens, need_weights=False)[0]
            h = h + a.transpose(1, 2).reshape(b, c, hh, ww)
            return self.out(self.act(self.norm2(h)))

    return SmokeNet()


# --- helpers run on each rank ------------------------------------------------------------------------------


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _err(got: torch.Tensor | None, ref: torch.Tensor | None) -> float:
    """max|got - ref| / max(1, max|ref|) in float64 (inf when a side is missing or shapes differ)."""
    if got is None or ref is None:
        return float("inf")
    got, ref = _full(got).detach().double(), _full(ref).detach().double()
    if got.shape != ref.shape:
        return float("inf")
    if ref.numel() == 0:
        return 0.0
    return float((got - ref).abs().max() / max(1.0, float(ref.abs().max())))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _inputs(shape: tuple[int, ...], device: torch.device, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device)


def _models(opts: dict, device: torch.device, manager: Any) -> tuple[torch.nn.Module, torch.nn.Module]:
    import credit_dtensor as cd

    torch.manual_seed(0)
    ref = _model(opts["c_in"], opts["channels"], opts["heads"], opts["groups"]).to(device)
    return ref, cd.convert_to_domain_parallel(copy.deepcopy(ref), manager)


def _fwd_bwd(model: torch.nn.Module, x: torch.Tensor, gy: torch.Tensor, autocast: torch.dtype | None) -> dict:
    """Run forward + backward; return the output, the input gradient and the parameter gradients."""
    import credit_dtensor as cd

    for p in model.parameters():
        p.grad = None
    x = x.detach().requires_grad_()
    ctx = torch.autocast(x.device.type, dtype=autocast) if autocast is not None else contextlib.nullcontext()
    with cd.gather_policy("raise"):  # an implicit all-gather (forward or backward) fails the check
        with ctx:
            y = model(x)
        y.backward(gy.to(y.dtype))
    return {"out": y, "grad x": x.grad, **{f"grad {n}": p.grad for n, p in model.named_parameters()}}


def _compare(got: dict, ref: dict) -> tuple[float, str]:
    errs = {k: _err(got.get(k), v) for k, v in ref.items()}
    worst = max(errs, key=errs.get)
    return errs[worst], worst


def _placement_ok(y: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor, Shard

    return isinstance(y, DTensor) and tuple(y.placements) == (Shard(2),)


def check_shard_gather(manager: Any, device: torch.device) -> dict:
    import credit_dtensor as cd

    x = _inputs((2, 3, 13, 8), device, seed=1)
    world, rank = manager.domain_world_size, manager.domain_rank
    expected = tuple(x.chunk(world, dim=2)[rank].shape) if rank < len(x.chunk(world, dim=2)) else (2, 3, 0, 8)
    problems = []
    for how, xs in (("slice", cd.shard_tensor(x, manager, dim=2)), ("src=0", cd.shard_tensor(x, manager, 2, src=0))):
        if tuple(xs.to_local().shape) != expected:
            problems.append(f"{how}: local shape {tuple(xs.to_local().shape)} != torch.chunk {expected}")
        if xs.to_local().device != device:
            problems.append(f"{how}: local shard on {xs.to_local().device}, expected {device}")
        back = cd.gather_tensor(xs * 2)
        if not torch.equal(back, x * 2):
            problems.append(f"{how}: gather_tensor(shard * 2) != x * 2")
    return {"ok": not problems, "err": 0.0 if not problems else float("inf"), "tol": 0.0, "detail": "; ".join(problems)}


def check_parity(manager: Any, device: torch.device, opts: dict, autocast: torch.dtype | None) -> dict:
    import credit_dtensor as cd
    from credit_dtensor._torch_versions import ieee_fp32

    shape = (opts["batch"], opts["c_in"], opts["height"], opts["width"])
    x, gy = _inputs(shape, device, seed=2), _inputs(shape, device, seed=3)
    with ieee_fp32():
        ref, dp = _models(opts, device, manager)
        want = _fwd_bwd(ref, x, gy, autocast)
        got = _fwd_bwd(dp, cd.shard_tensor(x, manager, 2), cd.shard_tensor(gy, manager, 2), autocast)
    err, worst = _compare(got, want)
    tol = FP32_TOL if autocast is None else BF16_TOL
    problems = []
    if not _placement_ok(got["out"]):
        problems.append(
            f"output placement {getattr(got['out'], 'placements', type(got['out']).__name__)}, not Shard(2)"
        )
    if got["out"].dtype != want["out"].dtype:
        problems.append(f"output dtype {got['out'].dtype} != plain model's {want['out'].dtype}")
    if not err <= tol:
        problems.append(f"worst: {worst}")
    detail = "; ".join(problems) or f"worst: {worst}; out {str(want['out'].dtype).replace('torch.', '')}"
    return {"ok": not problems, "err": err, "tol": tol, "detail": detail}


def check_compile(manager: Any, device: torch.device, opts: dict, backend: str, fullgraph: bool = False) -> dict:
    import torch._dynamo as dynamo

    import credit_dtensor as cd
    from credit_dtensor._torch_versions import ieee_fp32

    shape = (opts["batch"], opts["c_in"], opts["height"], opts["width"])
    x, gy = _inputs(shape, device, seed=2), _inputs(shape, device, seed=3)
    with ieee_fp32():
        _, dp = _models(opts, device, manager)
        xs, gs = cd.shard_tensor(x, manager, 2), cd.shard_tensor(gy, manager, 2)
        want = _fwd_bwd(dp, xs, gs, None)
        dynamo.reset()
        dynamo.utils.counters.clear()
        compiled = torch.compile(dp, backend=backend, fullgraph=fullgraph)
        _sync(device)
        t0 = time.perf_counter()
        got = _fwd_bwd(compiled, xs, gs, None)  # first call: compiles forward and backward
        _sync(device)
        compile_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        got = _fwd_bwd(compiled, xs, gs, None)
        _sync(device)
        second_ms = (time.perf_counter() - t0) * 1e3
    got = {k.replace("_orig_mod.", ""): v for k, v in got.items()}
    err, worst = _compare(got, want)
    problems = [] if err <= FP32_TOL else [f"worst: {worst}"]
    if not _placement_ok(got["out"]):
        problems.append("compiled output not Shard(2)")
    breaks = dict(dynamo.utils.counters["graph_break"])
    graphs = int(dynamo.utils.counters["stats"].get("unique_graphs", 0))
    shape = f"{graphs} graph{'s' if graphs != 1 else ''}" + (
        f", {sum(breaks.values())} graph breaks (first: {next(iter(breaks)).splitlines()[0][:120]})" if breaks else ""
    )
    detail = "; ".join(problems) or f"{backend}: compile {compile_s:.1f} s, then {second_ms:.1f} ms/step; {shape}"
    return {
        "ok": not problems,
        "err": err,
        "tol": FP32_TOL,
        "detail": detail,
        "compile_s": round(compile_s, 3),
        "compiled_step_ms": round(second_ms, 3),
        "graphs": graphs,
        "graph_breaks": sum(breaks.values()),
        "break_reasons": sorted(breaks)[:5],
    }


def _gpu_busy_ms(step: Any, device: torch.device) -> float | None:
    """Kernel time of one step on the GPU (sum of the profiler's device self time)."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        _sync(device)
    from torch.autograd import DeviceType

    total_us = 0.0
    for evt in prof.key_averages():  # kernels (memcpy/memset and NCCL's included), not the CPU ops above them
        if getattr(evt, "device_type", DeviceType.CUDA) != DeviceType.CUDA:
            continue
        us = getattr(evt, "self_device_time_total", None)
        total_us += float(us if us is not None else getattr(evt, "self_cuda_time_total", 0.0))
    return total_us / 1e3


def time_step(manager: Any, device: torch.device, opts: dict, distributed: bool) -> dict:
    import torch.nn.functional as F

    import credit_dtensor as cd

    b, c, h, w = opts["timing_shape"]
    sub = dict(opts, c_in=c, channels=opts["timing_channels"])
    ref, dp = _models(sub, device, manager)
    model = dp if distributed else ref
    x, target = _inputs((b, c, h, w), device, seed=4), _inputs((b, c, h, w), device, seed=5)
    if distributed:
        x, target = cd.shard_tensor(x, manager, 2), cd.shard_tensor(target, manager, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.mse_loss(model(x), target).backward()
        opt.step()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(2):  # warm-up: allocator, cuDNN autotuning, optimizer state
        step()
    _sync(device)
    walls, hosts, spans = [], [], []
    for _ in range(opts["steps"]):
        _sync(device)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        step()
        t1 = time.perf_counter()
        if device.type == "cuda":
            end.record()
        _sync(device)
        t2 = time.perf_counter()
        hosts.append((t1 - t0) * 1e3)
        walls.append((t2 - t0) * 1e3)
        if device.type == "cuda":
            spans.append(start.elapsed_time(end))
    busy = _gpu_busy_ms(step, device)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {
        "wall_ms": round(statistics.median(walls), 3),
        "host_ms": round(statistics.median(hosts), 3),
        "gpu_span_ms": round(statistics.median(spans), 3) if spans else None,
        "gpu_busy_ms": round(busy, 3) if busy is not None else None,
        "peak_mem_mib": round(peak, 1) if peak is not None else None,
    }


def _rank_main(rank: int, world: int, port: int, device_type: str, opts: dict, outdir: str) -> None:
    """One rank of one world: run every check, write ``rank{r}.json`` after each (partial results survive)."""
    from datetime import timedelta

    import torch.distributed as dist

    if device_type == "cuda":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    else:
        torch.set_num_threads(opts["threads"])
        device = torch.device("cpu")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    os.environ.setdefault("LOCAL_RANK", str(rank))
    tmp = os.path.join(outdir, f"cache_rank{rank}")  # cold compile caches: the compile time is the real one
    os.environ.update(
        TORCHINDUCTOR_CACHE_DIR=os.path.join(tmp, "inductor"), TRITON_CACHE_DIR=os.path.join(tmp, "triton")
    )
    results: dict[str, Any] = {"rank": rank, "device": str(device), "checks": {}}
    out = Path(outdir) / f"rank{rank}.json"

    def save() -> None:
        out.write_text(json.dumps(results))

    t_start = time.perf_counter()
    kwargs = {"device_id": device} if device_type == "cuda" else {}
    dist.init_process_group(
        "nccl" if device_type == "cuda" else "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=opts["pg_timeout"]),
        **kwargs,
    )
    results["backend"] = dist.get_backend()
    import credit_dtensor as cd

    manager = cd.DomainParallelManager(world, device_type=device_type)
    results["init_s"] = round(time.perf_counter() - t_start, 3)
    save()
    checks = [
        ("shard/gather", lambda: check_shard_gather(manager, device)),
        ("fp32 fwd+bwd", lambda: check_parity(manager, device, opts, None)),
        ("bf16 autocast", lambda: check_parity(manager, device, opts, torch.bfloat16)),
    ]
    if opts["compile"] != "off":
        checks.append(("compile", lambda: check_compile(manager, device, opts, opts["compile"], opts["fullgraph"])))
    checks.append(("train step", lambda: _timing(manager, device, opts)))
    failed = False
    for name, fn in checks:
        t0 = time.perf_counter()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        try:
            res = fn()
        except Exception as exc:  # noqa: BLE001 - reported, and the remaining checks are skipped
            res = {"ok": False, "err": float("inf"), "detail": f"{type(exc).__name__}: {exc}"}
            res["traceback"] = traceback.format_exc()
            # the gather guard raises on every rank at the same op, before communicating: go on
            failed = not isinstance(exc, cd.ImplicitGatherError)
        res["seconds"] = round(time.perf_counter() - t0, 3)
        if device.type == "cuda":
            res["peak_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        results["checks"][name] = res
        if failed:  # a rank that raised may have left a collective behind: stop this world here
            results["stopped"] = name
        save()
        if failed:
            break
    results["seconds"] = round(time.perf_counter() - t_start, 3)
    save()
    if not failed:
        dist.barrier()
        dist.destroy_process_group()
    else:
        os._exit(0)  # do not wait for peers stuck in a collective; the parent reports the failure


def _timing(manager: Any, device: torch.device, opts: dict) -> dict:
    plain = time_step(manager, device, opts, distributed=False)
    ours = time_step(manager, device, opts, distributed=True)
    detail = (
        f"plain {plain['wall_ms']:.1f} ms, converted {ours['wall_ms']:.1f} ms wall "
        f"(host {ours['host_ms']:.1f} ms"
        + (f", GPU busy {ours['gpu_busy_ms']:.1f} ms" if ours["gpu_busy_ms"] is not None else "")
        + ")"
    )
    return {"ok": True, "err": None, "tol": None, "detail": detail, "plain": plain, "converted": ours}


# --- the parent: launch worlds, aggregate, report ----------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_world(world: int, device_type: str, opts: dict, timeout: float) -> dict:
    """Spawn ``world`` ranks and collect their per-rank results (a failure or timeout is a result)."""
    import torch.multiprocessing as tmp

    outdir = tempfile.mkdtemp(prefix=f"gpu_smoke_w{world}_")
    t0 = time.perf_counter()
    error = None
    ctx = tmp.start_processes(
        _rank_main,
        args=(world, _free_port(), device_type, opts, outdir),
        nprocs=world,
        join=False,
        start_method="spawn",
    )
    deadline = t0 + timeout
    try:
        while not ctx.join(timeout=1.0):
            if time.perf_counter() > deadline:
                error = error or f"timed out after {timeout:.0f} s"
                break
            if error is None:  # a rank that raised stops; its peers may wait in a collective: 20 s grace
                stopped = _stopped_ranks(outdir, world)
                if stopped:
                    error = f"rank {stopped[0]} stopped after an exception (see its check)"
                    deadline = min(deadline, time.perf_counter() + 20.0)
    except Exception as exc:  # noqa: BLE001 - a rank died: report it with whatever the ranks wrote
        error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join(5)
    ranks = []
    for r in range(world):
        f = Path(outdir) / f"rank{r}.json"
        ranks.append(json.loads(f.read_text()) if f.exists() else {"rank": r, "checks": {}})
    shutil.rmtree(outdir, ignore_errors=True)
    return _aggregate(world, ranks, error, time.perf_counter() - t0, device_type, opts["compile"] != "off")


def _stopped_ranks(outdir: str, world: int) -> list[int]:
    stopped = []
    for r in range(world):
        with contextlib.suppress(OSError, ValueError):
            if json.loads((Path(outdir) / f"rank{r}.json").read_text()).get("stopped"):
                stopped.append(r)
    return stopped


def _aggregate(
    world: int, ranks: list[dict], error: str | None, seconds: float, device_type: str, compiled: bool
) -> dict:
    names = ["shard/gather", "fp32 fwd+bwd", "bf16 autocast", "compile", "train step"]
    checks = {}
    for name in names:
        per_rank = [r["checks"].get(name) for r in ranks]
        if all(p is None for p in per_rank):
            continue
        missing = [i for i, p in enumerate(per_rank) if p is None]
        bad = [i for i, p in enumerate(per_rank) if p is not None and not p["ok"]]
        errs = [p["err"] for p in per_rank if p is not None and p.get("err") is not None]
        first = per_rank[bad[0]] if bad else next(p for p in per_rank if p is not None)
        detail = first.get("detail", "")
        if bad and world > 1:
            detail = f"rank {bad[0]}: {detail}"
        if missing:
            detail = f"no result from ranks {missing}; {detail}"
        entry = {
            "ok": not bad and not missing,
            "required": not (name == "bf16 autocast" and device_type == "cpu"),
            "err": max(errs) if errs else None,
            "tol": first.get("tol"),
            "seconds": max(p["seconds"] for p in per_rank if p is not None),
            "detail": detail,
        }
        peaks = [p["peak_mib"] for p in per_rank if p is not None and p.get("peak_mib") is not None]
        if peaks:
            entry["peak_mib"] = max(peaks)
        for key in (
            "compile_s",
            "compiled_step_ms",
            "graphs",
            "graph_breaks",
            "break_reasons",
            "plain",
            "converted",
            "traceback",
        ):
            if key in first:
                entry[key] = first[key]
        checks[name] = entry
    expected = [n for n in names if n != "compile" or compiled]
    ok = error is None and all(n in checks for n in expected)
    ok = ok and all(c["ok"] or not c["required"] for c in checks.values())
    return {
        "world": world,
        "ok": ok,
        "error": error,
        "seconds": round(seconds, 2),
        "init_s": max((r.get("init_s", 0.0) for r in ranks), default=None),
        "peak_mem_mib": max((c.get("peak_mib") or 0.0 for r in ranks for c in r["checks"].values()), default=0.0)
        or None,
        "checks": checks,
    }


def _environment(device_type: str) -> dict:
    env: dict[str, Any] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": device_type,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "host": platform.node(),
    }
    try:
        import credit_dtensor

        env["credit_dtensor"] = credit_dtensor.__version__
    except Exception as exc:  # noqa: BLE001 - reported in the JSON; the ranks will fail with details
        env["credit_dtensor"] = f"import failed: {type(exc).__name__}: {exc}"
    with contextlib.suppress(Exception):
        env["commit"] = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5
        ).stdout.strip()
    if device_type == "cuda":
        env["cuda"] = torch.version.cuda
        env["gpus"] = torch.cuda.device_count()
        env["gpu"] = torch.cuda.get_device_name(0)
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
        with contextlib.suppress(Exception):
            env["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    return env


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "inf" if v == float("inf") else f"{v:.2e}" if v < 0.01 and v != 0 else f"{v:.3g}"
    return str(v)


def _table_rows(report: dict) -> list[list[str]]:
    rows = []
    for w in report["worlds"]:
        if w["error"]:
            rows.append([str(w["world"]), "launch", "FAIL", "-", "-", _fmt(w["seconds"]), w["error"]])
        for name, c in w["checks"].items():
            status = "ok" if c["ok"] else ("FAIL" if c["required"] else "fail (report-only)")
            rows.append(
                [str(w["world"]), name, status, _fmt(c["err"]), _fmt(c["tol"]), _fmt(c["seconds"]), c["detail"]]
            )
    return rows


def print_table(report: dict) -> None:
    env = report["env"]
    title = (
        f"credit_dtensor GPU smoke: torch {env['torch']} on {env.get('gpu', env['device'])}"
        + (f" x{env['gpus']}" if env.get("gpus") else "")
        + f" -- {'PASS' if report['ok'] else 'FAIL'} in {report['seconds']:.0f} s"
    )
    header = ["ranks", "check", "result", "rel. error", "tol", "s", "detail"]
    rows = _table_rows(report)
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
        print(title)
        for r in [header, *rows]:
            print("  ".join(c.ljust(wd) for c, wd in zip(r, widths)) + "  " + r[-1])
    else:
        table = Table(title=title, title_justify="left")
        for col in header:
            table.add_column(col, overflow="fold")
        for r in rows:
            style = {"ok": "green", "FAIL": "red"}.get(r[2], "yellow")
            table.add_row(*r[:2], f"[{style}]{r[2]}[/{style}]", *r[3:])
        Console(width=max(shutil.get_terminal_size((160, 20)).columns, 140)).print(table)
    for w in report["worlds"]:
        if w.get("peak_mem_mib"):
            peaks = ", ".join(f"{n} {c['peak_mib']}" for n, c in w["checks"].items() if "peak_mib" in c)
            print(f"ranks={w['world']} peak GPU memory per check [MiB, max over ranks]: {peaks}")
        step = w["checks"].get("train step")
        if step and "converted" in step:
            p, c = step["plain"], step["converted"]
            print(
                f"ranks={w['world']} one AdamW step [ms] plain / converted: wall {p['wall_ms']} / {c['wall_ms']}, "
                f"host {p['host_ms']} / {c['host_ms']}, GPU span {_fmt(p['gpu_span_ms'])} / {_fmt(c['gpu_span_ms'])}, "
                f"GPU busy {_fmt(p['gpu_busy_ms'])} / {_fmt(c['gpu_busy_ms'])}; peak memory [MiB] "
                f"{_fmt(p['peak_mem_mib'])} / {_fmt(c['peak_mem_mib'])}"
            )
        for name, c in w["checks"].items():
            if "traceback" in c:
                print(f"--- ranks={w['world']} {name} traceback ---\n{c['traceback']}")


def _jsonable(obj: Any) -> Any:
    """Strict JSON: infinite errors become the string "inf", tracebacks stay in the printed report."""
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items() if k != "traceback"}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and (obj != obj or abs(obj) == float("inf")):
        return str(obj)
    return obj


def _parse_shape(text: str) -> tuple[int, int, int, int]:
    parts = tuple(int(p) for p in text.split(","))
    if len(parts) != 4 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"expected B,C,H,W (four positive integers), got {text!r}")
    return parts  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto", help="cuda (nccl) or cpu (gloo)")
    ap.add_argument("--ranks", default=None, help="comma-separated world sizes (default: 1, plus every GPU if >1)")
    ap.add_argument("--compile", choices=("inductor", "aot_eager", "eager", "off"), default="inductor")
    ap.add_argument("--fullgraph", action="store_true", help="compile with fullgraph=True (a graph break fails)")
    ap.add_argument("--timing-shape", type=_parse_shape, default=None, help="B,C,H,W of the timed step")
    ap.add_argument("--steps", type=int, default=3, help="timed training steps (median reported)")
    ap.add_argument("--timeout", type=float, default=240.0, help="seconds per world before it is killed")
    ap.add_argument("--json", default=None, help="also append the JSON line to this file")
    args = ap.parse_args(argv)

    device_type = args.device
    if device_type == "auto":
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if device_type == "cuda" and not torch.cuda.is_available():
        print("gpu_smoke: --device cuda but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    available = torch.cuda.device_count() if device_type == "cuda" else os.cpu_count() or 1
    if args.ranks:
        worlds = [int(w) for w in args.ranks.split(",")]
    elif device_type == "cuda":
        worlds = [1] + ([available] if available > 1 else [])
    else:
        worlds = [1, 2]
    if device_type == "cuda" and max(worlds) > available:
        print(f"gpu_smoke: {max(worlds)} ranks asked but only {available} GPUs visible", file=sys.stderr)
        return 2
    timing = args.timing_shape or ((2, 4, 64, 128) if device_type == "cuda" else (2, 4, 13, 16))
    opts = dict(
        SMALL,
        timing_shape=timing,
        timing_channels=64 if device_type == "cuda" else 32,
        steps=args.steps,
        compile=args.compile,
        fullgraph=args.fullgraph,
        pg_timeout=max(60.0, args.timeout),
        threads=1,
    )
    t0 = time.perf_counter()
    env = _environment(device_type)
    results = [run_world(w, device_type, opts, args.timeout) for w in worlds]
    report = {
        "smoke": "credit_dtensor.gpu_smoke",
        "ok": all(w["ok"] for w in results),
        "seconds": round(time.perf_counter() - t0, 2),
        "env": env,
        "worlds": results,
    }
    print_table(report)
    line = json.dumps(_jsonable(report))
    print(line)
    if args.json:
        with open(args.json, "a") as fh:
            fh.write(line + "\n")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
