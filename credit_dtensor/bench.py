"""Benchmarks: traffic, activation memory, FLOPs and wall time of the domain-parallel path.

Measured per rank, forward + backward, for single layers and the demo U-Net, against exact
references that do not trust our own bookkeeping:

* bytes: every ``torch.distributed`` send/recv/collective (and functional collective) is wrapped
  inside the benchmark process only (:class:`WireCounter`); the minimum is derived from geometry
  (halo rows each rank must receive, statistics scalars) on the single-device model;
* activation memory: unique storages saved for backward (``saved_tensors_hooks``), parameters excluded;
* FLOPs: ``torch.utils.flop_counter.FlopCounterMode``;
* time: medians of repeats, the DTensor path next to a hand-written lower bound (local op on a
  pre-padded shard, raw P2P halo, one all-reduce per statistic, no DTensor) on the same processes.

:func:`run` spawns one gloo world per domain size and returns JSON-able rows.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .launch import free_port

__all__ = ["BenchConfig", "CASES", "WireCounter", "minimum_bytes", "run", "summarize"]

logger = logging.getLogger(__name__)

CASES = ("conv3x3", "conv_stride2", "conv_transpose", "group_norm", "demo")


@dataclass
class BenchConfig:
    worlds: tuple[int, ...] = (1, 2, 4)
    resolutions: tuple[tuple[int, int], ...] = ((32, 64), (64, 128), (128, 256))
    cases: tuple[str, ...] = CASES
    batch: int = 2
    channels: int = 8
    repeats: int = 5
    warmup: int = 1
    threads: int = 1
    dtype: str = "float32"


def build_case(name: str, channels: int) -> tuple[nn.Module, int]:
    """``(plain module, input channels)`` for a case name."""
    if name == "conv3x3":
        return nn.Conv2d(channels, channels, 3, padding=1), channels
    if name == "conv_stride2":
        return nn.Conv2d(channels, channels, 3, stride=2, padding=1), channels
    if name == "conv_transpose":
        return nn.ConvTranspose2d(channels, channels, 4, stride=2, padding=1), channels
    if name == "group_norm":
        return nn.GroupNorm(4, channels), channels
    if name == "demo":
        from .models.demo import DemoNet

        return DemoNet(channels=4, width=channels), 4
    raise ValueError(f"bench: unknown case {name!r}; choose from {CASES}")


# ---------------------------------------------------------------------------------------------
# bytes on the wire: wrap torch.distributed inside this process
# ---------------------------------------------------------------------------------------------


def _nbytes(t: object) -> int:
    if isinstance(t, torch.Tensor):
        return t.numel() * t.element_size()
    if isinstance(t, (list, tuple)):
        return sum(_nbytes(x) for x in t)
    return 0


@dataclass
class WireCounter:
    """Bytes this rank hands to the process group, by phase (set with :meth:`phase`)."""

    sent: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    recv: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    calls: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    current: str = "other"

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        old, self.current = self.current, name
        try:
            yield
        finally:
            self.current = old

    def add(self, kind: str, sent: int, recv: int) -> None:
        self.sent[self.current] += sent
        self.recv[self.current] += recv
        self.calls[f"{self.current}:{kind}"] += 1


# (function name, bytes sent, bytes received) as functions of the call's arguments
def _args0(a, k):
    return a[0] if a else k.get("tensor", k.get("input", k.get("self")))


_WIRE: dict[str, Callable] = {
    "send": lambda a, k: (_nbytes(_args0(a, k)), 0),
    "isend": lambda a, k: (_nbytes(_args0(a, k)), 0),
    "recv": lambda a, k: (0, _nbytes(_args0(a, k))),
    "irecv": lambda a, k: (0, _nbytes(_args0(a, k))),
    "all_reduce": lambda a, k: (_nbytes(_args0(a, k)), _nbytes(_args0(a, k))),
    "broadcast": lambda a, k: (_nbytes(_args0(a, k)), _nbytes(_args0(a, k))),
    "all_gather": lambda a, k: (_nbytes(a[1] if len(a) > 1 else k.get("tensor")), _nbytes(_args0(a, k))),
    "all_gather_into_tensor": lambda a, k: (
        _nbytes(a[1] if len(a) > 1 else k.get("input_tensor")),
        _nbytes(_args0(a, k)),
    ),
    "reduce_scatter": lambda a, k: (_nbytes(a[1] if len(a) > 1 else k.get("input_list")), _nbytes(_args0(a, k))),
    "reduce_scatter_tensor": lambda a, k: (_nbytes(a[1] if len(a) > 1 else k.get("input")), _nbytes(_args0(a, k))),
}
_FUNCOL: dict[str, Callable] = {
    "all_reduce": lambda a, k: (_nbytes(a[0]), _nbytes(a[0])),
    "all_gather_tensor": lambda a, k: (_nbytes(a[0]), 0),
    "all_gather_tensor_autograd": lambda a, k: (_nbytes(a[0]), 0),
    "reduce_scatter_tensor": lambda a, k: (_nbytes(a[0]), 0),
    "reduce_scatter_tensor_autograd": lambda a, k: (_nbytes(a[0]), 0),
    "all_to_all_single": lambda a, k: (_nbytes(a[0]), 0),
    "broadcast": lambda a, k: (_nbytes(a[0]), _nbytes(a[0])),
}


@contextlib.contextmanager
def intercept(counter: WireCounter) -> Iterator[WireCounter]:
    """Wrap the process-group entry points (package and ``distributed_c10d`` names alike, so
    ``P2POp``'s identity checks still pass) and the functional collectives; restore on exit."""
    import torch.distributed._functional_collectives as funcol
    import torch.distributed.distributed_c10d as c10d

    saved: list[tuple[object, str, object]] = []
    wrappers: dict[int, Callable] = {}

    def wrap(mod: object, name: str, size: Callable, kind: str) -> None:
        orig = getattr(mod, name, None)
        if orig is None:
            return
        if id(orig) not in wrappers:

            def wrapper(*a, __orig=orig, **k):
                s, r = size(a, k)
                counter.add(kind, s, r)
                return __orig(*a, **k)

            wrapper.__name__ = orig.__name__
            wrappers[id(orig)] = wrapper
        saved.append((mod, name, orig))
        setattr(mod, name, wrappers[id(orig)])

    for name, size in _WIRE.items():
        wrap(c10d, name, size, name)
        wrap(dist, name, size, name)
    for name, size in _FUNCOL.items():
        wrap(funcol, name, size, f"funcol.{name}")
    try:
        yield counter
    finally:
        for mod, name, orig in reversed(saved):
            setattr(mod, name, orig)


# ---------------------------------------------------------------------------------------------
# the arithmetic minimum, from geometry on the single-device model
# ---------------------------------------------------------------------------------------------


def _chunk_ranges(n: int, world: int) -> list[range]:
    """torch.chunk rule: ceil(n/world) rows each, the rest to the last non-empty ranks."""
    size = -(-n // world) if n else 0
    return [range(min(r * size, n), min((r + 1) * size, n)) for r in range(world)]


def _needed_rows(mod: nn.Module, h_in: int, out_rows: range) -> set[int]:
    k, s, p, d = mod.kernel_size[0], mod.stride[0], mod.padding[0], mod.dilation[0]
    need: set[int] = set()
    if isinstance(mod, nn.ConvTranspose2d):
        for y in out_rows:
            for kk in range(k):
                num = y + p - kk * d
                if num % s == 0 and 0 <= num // s < h_in:
                    need.add(num // s)
    else:
        for o in out_rows:
            for kk in range(k):
                i = o * s - p + kk * d
                if 0 <= i < h_in:
                    need.add(i)
    return need


def minimum_bytes(model: nn.Module, x: torch.Tensor, world: int, input_grad: bool) -> dict[str, list[int]]:
    """Per-rank minimum bytes *sent*, ``{"halo": [...], "stats": [...], "grad_reduce": [...]}``.

    Halo: each conv's input rows another rank needs (forward) plus, when that input needs a
    gradient, the gradient of every row this rank borrowed (backward). Statistics: GroupNorm's
    per-(sample, group) sum and sum of squares in forward and two sums in backward. Gradient
    reduction: one all-reduce of every parameter gradient (for world > 1).
    """
    halo, stats = [0] * world, [0] * world
    records: list[tuple[nn.Module, torch.Tensor, torch.Tensor]] = []
    hooks = [
        m.register_forward_hook(lambda m, a, y: records.append((m, a[0], y)))
        for m in model.modules()
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.GroupNorm))
    ]
    try:
        with torch.no_grad():
            x = x.detach().requires_grad_(input_grad)
            with torch.enable_grad():
                model(x)
    finally:
        for h in hooks:
            h.remove()
    if world == 1:
        return {"halo": halo, "stats": stats, "grad_reduce": [0]}
    for mod, inp, out in records:
        el = inp.element_size()
        if isinstance(mod, nn.GroupNorm):
            scalars = inp.shape[0] * mod.num_groups * 2
            for r in range(world):
                stats[r] += scalars * el * (2 if inp.requires_grad else 1)
            continue
        h_in, h_out = inp.shape[2], out.shape[2]
        row = inp[:, :, :1].numel() * el
        owned = _chunk_ranges(h_in, world)
        for r, rows in enumerate(_chunk_ranges(h_out, world)):
            borrowed = _needed_rows(mod, h_in, rows) - set(owned[r])
            for i in borrowed:
                owner = next(q for q, o in enumerate(owned) if i in o)
                halo[owner] += row  # forward: owner sends the row
                if inp.requires_grad:
                    halo[r] += row  # backward: the row's gradient goes back
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"halo": halo, "stats": stats, "grad_reduce": [params] * world}


# ---------------------------------------------------------------------------------------------
# activation memory and FLOPs
# ---------------------------------------------------------------------------------------------


def _storage_key(t: torch.Tensor) -> tuple[int, int] | None:
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        t = t._local_tensor
    try:
        st = t.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return None
    return (st.data_ptr(), st.nbytes())


@contextlib.contextmanager
def saved_bytes(exclude: set) -> Iterator[dict[str, int]]:
    """Unique storages autograd saves for backward inside the block (``exclude``: parameter keys)."""
    seen: dict[tuple[int, int], int] = {}
    out = {"bytes": 0}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key is not None and key not in exclude and key not in seen:
            seen[key] = key[1]
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield out
    out["bytes"] = sum(seen.values())


def _param_keys(model: nn.Module) -> set:
    return {k for p in model.parameters() if (k := _storage_key(p.detach())) is not None}


# ---------------------------------------------------------------------------------------------
# hand-written lower bound: raw P2P halo + local op, no DTensor
# ---------------------------------------------------------------------------------------------


def _p2p(
    send_up: torch.Tensor | None,
    send_down: torch.Tensor | None,
    n_up: int,
    n_down: int,
    like: torch.Tensor,
    rank: int,
    world: int,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Send ``send_up`` to rank-1 and ``send_down`` to rank+1; receive ``n_up`` rows from rank-1
    and ``n_down`` rows from rank+1, all in one batched round."""
    ops, up, down = [], None, None
    shape = list(like.shape)
    if rank > 0:
        if n_up:
            shape[2] = n_up
            up = like.new_empty(shape)
            ops.append(dist.P2POp(dist.irecv, up, rank - 1))
        if send_up is not None and send_up.shape[2]:
            ops.append(dist.P2POp(dist.isend, send_up.contiguous(), rank - 1))
    if rank < world - 1:
        if n_down:
            shape[2] = n_down
            down = like.new_empty(shape)
            ops.append(dist.P2POp(dist.irecv, down, rank + 1))
        if send_down is not None and send_down.shape[2]:
            ops.append(dist.P2POp(dist.isend, send_down.contiguous(), rank + 1))
    if ops:
        for req in dist.batch_isend_irecv(ops):
            req.wait()
    return up, down


class _Halo(torch.autograd.Function):
    """Pad the local shard with ``t`` rows from above and ``b`` from below (zeros at the edges);
    backward sends the borrowed rows' gradients back and adds them."""

    @staticmethod
    def forward(ctx, x, t, b, rank, world):
        ctx.t, ctx.b, ctx.rank, ctx.world = t, b, rank, world
        up, down = _p2p(x[:, :, :b] if b else None, x[:, :, x.shape[2] - t :] if t else None, t, b, x, rank, world)
        zeros = lambda n: x.new_zeros(x.shape[0], x.shape[1], n, x.shape[3])  # noqa: E731
        return torch.cat([up if up is not None else zeros(t), x, down if down is not None else zeros(b)], 2)

    @staticmethod
    def backward(ctx, g):
        t, b = ctx.t, ctx.b
        n = g.shape[2] - t - b
        gx = g[:, :, t : t + n].clone()
        back_up, back_down = _p2p(
            g[:, :, :t] if t else None, g[:, :, t + n :] if b else None, b, t, g, ctx.rank, ctx.world
        )
        if back_up is not None:
            gx[:, :, :b] += back_up
        if back_down is not None:
            gx[:, :, n - t :] += back_down
        return gx, None, None, None, None


class _AllReduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        if dist.get_world_size() > 1:
            dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, g):
        g = g.clone()
        if dist.get_world_size() > 1:
            dist.all_reduce(g)
        return g


def lower_bound_fn(name: str, mod: nn.Module, h_global: int, rank: int, world: int) -> Callable | None:
    """``fn(x_local) -> y_local`` for the hand-written lower bound of a single-layer case."""
    if name not in ("conv3x3", "conv_stride2", "conv_transpose", "group_norm"):
        return None
    w = mod.weight.detach().clone().requires_grad_()
    b = mod.bias.detach().clone().requires_grad_()
    if name == "conv3x3":
        return lambda x: F.conv2d(_Halo.apply(x, 1, 1, rank, world), w, b, padding=(0, 1))
    if name == "conv_stride2":
        return lambda x: F.conv2d(_Halo.apply(x, 1, 0, rank, world), w, b, stride=2, padding=(0, 1))
    if name == "conv_transpose":

        def ct(x):
            y = F.conv_transpose2d(_Halo.apply(x, 1, 1, rank, world), w, b, stride=2, padding=(0, 1))
            return y[:, :, 3 : 3 + 2 * x.shape[2]]

        return ct
    if name == "group_norm":
        groups, eps = mod.num_groups, mod.eps

        def gn(x):
            bsz, c = x.shape[:2]
            xg = x.reshape(bsz, groups, -1)
            s = _AllReduce.apply(torch.stack([xg.sum(-1), (xg * xg).sum(-1)]))
            count = c // groups * h_global * x.shape[3]
            mean = s[0] / count
            inv = torch.rsqrt(s[1] / count - mean * mean + eps)
            y = ((xg - mean[..., None]) * inv[..., None]).reshape(x.shape)
            return y * w[None, :, None, None] + b[None, :, None, None]

        return gn
    return None


# ---------------------------------------------------------------------------------------------
# one rank
# ---------------------------------------------------------------------------------------------


def _median_time(fn: Callable[[], None], repeats: int, warmup: int) -> float:
    times = []
    for i in range(warmup + repeats):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        dist.barrier()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _local_flop_counter():
    """``FlopCounterMode`` that counts ops seen on DTensors with the rank's *local* shapes.

    A dispatch mode sees DTensor-level aten ops (e.g. a 1x1 conv PyTorch's own DTensor rule runs)
    with global shapes and never sees the local kernel underneath; stock FlopCounterMode would
    charge every rank the whole field's FLOPs for them.
    """
    from torch.distributed.tensor import DTensor
    from torch.utils._pytree import tree_map
    from torch.utils.flop_counter import FlopCounterMode

    class LocalFlopCounterMode(FlopCounterMode):
        def _count_flops(self, func_packet, out, args, kwargs):
            def loc(t):
                return t._local_tensor if isinstance(t, DTensor) else t

            largs, lkwargs, lout = tree_map(loc, (args, kwargs, out))
            super()._count_flops(func_packet, lout, largs, lkwargs)
            return out

    return LocalFlopCounterMode(display=False)


def _flops(fn: Callable[[], None]) -> int:
    with _local_flop_counter() as fc:
        fn()
    return int(fc.get_total_flops())


def bench_case(name: str, hw: tuple[int, int], cfg: BenchConfig, manager, rank: int, world: int) -> dict:
    from . import comm_stats, shard_tensor
    from .convert import convert_to_domain_parallel
    from .parallelize import reduce_gradients

    dtype = getattr(torch, cfg.dtype)
    torch.manual_seed(0)
    plain, cin = build_case(name, cfg.channels)
    plain = plain.to(dtype)
    input_grad = name != "demo"  # the demo's input is data; single layers sit inside a network
    x = torch.randn(cfg.batch, cin, *hw, dtype=dtype, generator=torch.Generator().manual_seed(1))
    mins = minimum_bytes(plain, x, world, input_grad)
    y_ref = plain(x)
    g = torch.randn(y_ref.shape, dtype=dtype, generator=torch.Generator().manual_seed(2))
    row: dict = {
        "case": name,
        "H": hw[0],
        "W": hw[1],
        "world": world,
        "rank": rank,
        "batch": cfg.batch,
        "channels": cfg.channels,
        "dtype": cfg.dtype,
    }

    # single process: the plain module on its own
    if world == 1:
        xs = x.clone().requires_grad_(input_grad)

        def plain_step():
            plain.zero_grad(set_to_none=True)
            plain(xs).backward(g)

        with saved_bytes(_param_keys(plain)) as mem:
            plain(xs).backward(g)
        row["act_bytes_plain"] = mem["bytes"]
        row["flops_plain"] = _flops(plain_step)
        row["time_plain_s"] = _median_time(plain_step, cfg.repeats, cfg.warmup)

    model = convert_to_domain_parallel(copy.deepcopy(plain), manager)
    xd = shard_tensor(x, manager, 2).detach().requires_grad_(input_grad)
    gd = shard_tensor(g, manager, 2)

    def dt_step():
        xd.grad = None
        model.zero_grad(set_to_none=True)
        model(xd).backward(gd)

    dt_step()  # warm caches (halo plans) before counting
    counter = WireCounter()
    with intercept(counter), comm_stats() as ours:
        with counter.phase("fwd_bwd"):
            with saved_bytes(_param_keys(model)) as mem:
                y = model(xd)
            y.backward(gd)
        with counter.phase("grad_reduce"):
            reduce_gradients(model, manager)
    row.update(
        wire_sent_bytes=counter.sent.get("fwd_bwd", 0),
        wire_recv_bytes=counter.recv.get("fwd_bwd", 0),
        wire_calls={k: v for k, v in counter.calls.items()},
        grad_reduce_sent_bytes=counter.sent.get("grad_reduce", 0),
        counted_sent_bytes=ours.sent_bytes,
        counted_by_op={k: v.sent_bytes for k, v in ours.by_op.items()},
        min_halo_bytes=mins["halo"][rank],
        min_stats_bytes=mins["stats"][rank],
        min_bytes=mins["halo"][rank] + mins["stats"][rank],
        min_grad_reduce_bytes=mins["grad_reduce"][rank] if world > 1 else 0,
        act_bytes=mem["bytes"],
        flops=_flops(dt_step),
    )
    row["time_dtensor_s"] = _median_time(dt_step, cfg.repeats, cfg.warmup)
    lb = lower_bound_fn(name, plain, hw[0], rank, world)
    if lb is not None:
        xl = xd.to_local().detach().clone().requires_grad_(input_grad)
        gl = gd.to_local()

        def lb_step():
            xl.grad = None
            lb(xl).backward(gl)

        lb_counter = WireCounter()
        with intercept(lb_counter):
            lb_step()
        row["lower_bound_sent_bytes"] = lb_counter.sent.get("other", 0)
        row["time_lower_bound_s"] = _median_time(lb_step, cfg.repeats, cfg.warmup)
    return row


def _worker(rank: int, world: int, port: int, cfg: BenchConfig, queue) -> None:
    torch.set_num_threads(cfg.threads)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        from .mesh import DomainParallelManager

        manager = DomainParallelManager(world, device_type="cpu")
        rows = []
        for name in cfg.cases:
            for hw in cfg.resolutions:
                rows.append(bench_case(name, hw, cfg, manager, rank, world))
        queue.put(("ok", rank, rows))
    except BaseException as exc:  # noqa: BLE001 - report to the parent instead of hanging it
        import traceback

        queue.put(("error", rank, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_world(world: int, cfg: BenchConfig, timeout: float = 1800.0) -> list[dict]:
    """Spawn ``world`` CPU processes (gloo), run every case, return all ranks' rows."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, cfg, queue)) for r in range(world)]
    for p in procs:
        p.start()
    rows, errors = [], []
    try:
        deadline = time.monotonic() + timeout
        for _ in procs:
            while True:
                try:
                    status, rank, payload = queue.get(timeout=5)
                    break
                except Exception:  # queue.Empty: check the ranks are alive
                    dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                    if dead or time.monotonic() > deadline:
                        status, rank, payload = "error", -1, f"ranks died or timed out (exit codes {dead})"
                        break
            if status == "ok":
                rows.extend(payload)
            else:
                errors.append(f"rank {rank}: {payload}")
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
    if errors:
        from .errors import DomainParallelError

        raise DomainParallelError("bench: a rank failed:\n" + "\n".join(errors))
    return rows


def run(cfg: BenchConfig, on_world: Callable[[int, list[dict]], None] | None = None) -> list[dict]:
    rows: list[dict] = []
    for world in cfg.worlds:
        t0 = time.perf_counter()
        got = run_world(world, cfg)
        logger.info("world %d done in %.1f s", world, time.perf_counter() - t0)
        rows.extend(got)
        if on_world is not None:
            on_world(world, got)
    return rows


# ---------------------------------------------------------------------------------------------
# summary: one line per (case, resolution, world)
# ---------------------------------------------------------------------------------------------


def summarize(rows: list[dict]) -> list[dict]:
    """Aggregate ranks: max bytes per rank, memory/FLOPs summed over ranks vs one device,
    median times of rank 0 (ranks are barrier-synchronised)."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["case"], r["H"], r["W"], r["world"])].append(r)
    single = {(c, h, w): rs[0] for (c, h, w, n), rs in groups.items() if n == 1}
    out = []
    for (case, h, w, n), rs in sorted(groups.items()):
        rs = sorted(rs, key=lambda r: r["rank"])
        one = single.get((case, h, w))
        s = {"case": case, "H": h, "W": w, "world": n}
        sent = [r["wire_sent_bytes"] for r in rs]
        mins = [r["min_bytes"] for r in rs]
        s["max_sent_bytes"] = max(sent)
        s["max_min_bytes"] = max(mins)
        s["bytes_ratio"] = (sum(sent) / sum(mins)) if sum(mins) else (1.0 if not sum(sent) else float("inf"))
        s["counted_sent_bytes"] = sum(r["counted_sent_bytes"] for r in rs)
        s["grad_reduce_sent_bytes"] = max(r["grad_reduce_sent_bytes"] for r in rs)
        s["min_grad_reduce_bytes"] = max(r["min_grad_reduce_bytes"] for r in rs)
        s["act_bytes_max_rank"] = max(r["act_bytes"] for r in rs)
        s["flops_max_rank"] = max(r["flops"] for r in rs)
        s["time_dtensor_s"] = rs[0]["time_dtensor_s"]
        if "time_lower_bound_s" in rs[0]:
            s["time_lower_bound_s"] = rs[0]["time_lower_bound_s"]
            s["overhead"] = s["time_dtensor_s"] / s["time_lower_bound_s"]
            s["lower_bound_sent_bytes"] = max(r["lower_bound_sent_bytes"] for r in rs)
        if one is not None:
            s["act_bytes_1proc"] = one["act_bytes_plain"]
            s["flops_1proc"] = one["flops_plain"]
            if one["act_bytes_plain"]:
                s["act_ratio"] = n * s["act_bytes_max_rank"] / one["act_bytes_plain"]
            if one["flops_plain"]:  # FlopCounterMode counts matmuls and convolutions only
                s["flops_ratio"] = n * s["flops_max_rank"] / one["flops_plain"]
            s["time_plain_1proc_s"] = one["time_plain_s"]
            s["speedup_vs_1proc"] = one["time_plain_s"] / s["time_dtensor_s"]
        out.append(s)
    return out


def config_dict(cfg: BenchConfig) -> dict:
    return asdict(cfg)


def profile_case(name: str, hw: tuple[int, int], cfg: BenchConfig, row_limit: int = 12) -> str:
    """torch.profiler tables (self CPU time) of one DTensor step and one lower-bound step in a
    single-rank gloo world: what the DTensor path spends beyond the local kernels."""
    from torch.profiler import ProfilerActivity, profile

    from . import shard_tensor
    from .convert import convert_to_domain_parallel
    from .mesh import DomainParallelManager

    torch.set_num_threads(cfg.threads)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        manager = DomainParallelManager(1, device_type="cpu")
        dtype = getattr(torch, cfg.dtype)
        torch.manual_seed(0)
        plain, cin = build_case(name, cfg.channels)
        plain = plain.to(dtype)
        x = torch.randn(cfg.batch, cin, *hw, dtype=dtype)
        g = torch.randn(plain(x).shape, dtype=dtype)
        model = convert_to_domain_parallel(copy.deepcopy(plain), manager)
        xd = shard_tensor(x, manager, 2).detach().requires_grad_()
        gd = shard_tensor(g, manager, 2)
        lb = lower_bound_fn(name, plain, hw[0], 0, 1)
        xl = x.clone().requires_grad_()
        steps = {"DTensor path": lambda: model(xd).backward(gd)}
        if lb is not None:
            steps["lower bound"] = lambda: lb(xl).backward(g)
        out = []
        for label, fn in steps.items():
            for _ in range(2):
                fn()
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(cfg.repeats):
                    fn()
            out.append(f"== {label}: {name} {hw[0]}x{hw[1]}, {cfg.repeats} steps ==")
            out.append(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=row_limit))
        manager.close()
        return "\n".join(out)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
