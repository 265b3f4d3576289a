"""``credit-dtensor demo``: the main job, no torchrun and no flags.

Launches 4 local CPU processes (a 2 x 2 ``("dp", "domain")`` mesh over gloo), trains the demo
U-Net on the synthetic global dataset with FSDP2 + exact domain parallelism, then trains the
same steps in this one process with the plain, unconverted model and checks that the loss curves
and final parameters agree within fp32 tolerance. The summary reports the mesh, activation
memory saved for backward per rank vs one device, the bytes our op rules communicate per step
vs the halo minimum (computed independently from the conv geometry), and step times.
"""

from __future__ import annotations

import contextlib
import logging
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from .launch import LocalWorld, RankContext

__all__ = ["DemoConfig", "run_demo", "saved_tensor_bytes", "halo_minimum_bytes"]

logger = logging.getLogger(__name__)

#: fp32 agreement required between the 4-process run and the 1-process reference.
LOSS_RTOL = 1e-5
PARAM_ATOL = 1e-5


@dataclass
class DemoConfig:
    dp: int = 2
    domain: int = 2
    steps: int = 30
    nlat: int = 32
    nlon: int = 64
    global_batch: int = 4
    timeout: float = 300.0  # seconds for the whole distributed run

    def train_config(self):
        from .train import TrainConfig

        return TrainConfig(steps=self.steps, nlat=self.nlat, nlon=self.nlon, global_batch=self.global_batch)


# ---------------------------------------------------------------------------------------------
# measurements
# ---------------------------------------------------------------------------------------------


def _storage_ptr(t: torch.Tensor) -> int:
    if isinstance(t, DTensor):
        t = t._local_tensor
    return t.untyped_storage().data_ptr()


@contextlib.contextmanager
def saved_tensor_bytes(model: nn.Module) -> Iterator[dict[str, int]]:
    """Count the bytes autograd saves for backward inside the block (activations only).

    Each storage counts once (a DTensor counts its local shard); storages of the model's
    parameters -- including FSDP2's unsharded ones, registered while a block runs -- are excluded.
    """
    out = {"bytes": 0}
    seen: set[int] = set()

    def pack(t: torch.Tensor) -> torch.Tensor:
        local = t._local_tensor if isinstance(t, DTensor) else t
        st = local.untyped_storage()
        ptr = st.data_ptr()
        if ptr not in seen:
            params = {_storage_ptr(p) for p in model.parameters()}
            if ptr not in params:
                seen.add(ptr)
                out["bytes"] += st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield out


Layer = tuple[nn.Module, tuple[int, ...], bool]


def _layer_inputs(model: nn.Module) -> tuple[list[Layer], Callable[[], None]]:
    """Record ``(conv module, input shape, input requires grad)`` of every conv call (forward hooks)."""
    seen: list[Layer] = []
    handles = []

    def hook(mod: nn.Module, args: tuple, _out: Any) -> None:
        seen.append((mod, tuple(args[0].shape), args[0].requires_grad))

    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            handles.append(m.register_forward_hook(hook))

    def remove() -> None:
        for h in handles:
            h.remove()

    return seen, remove


def halo_minimum_bytes(layers: list[Layer], domain: int, dp: int) -> int:
    """Bytes one rank must receive per training step (forward halo + backward adjoint), averaged over
    the domain group: the distinct remote input rows each rank's output chunk reads, from the conv
    geometry alone (``torch.chunk`` rule, padding rows free unless they wrap); the adjoint only
    where the conv's input needs a gradient."""
    from ..geometry import (
        chunk_range,
        conv_input_rows,
        conv_out_len,
        conv_transpose_input_rows,
        conv_transpose_out_len,
        source_row,
    )

    total = 0
    for mod, shape, needs_grad in layers:
        b, c, n, w = shape
        k, s, d = mod.kernel_size[0], mod.stride[0], mod.dilation[0]
        p = mod.padding[0] if not isinstance(mod.padding, str) else None
        if p is None:  # 'same' / 'valid'
            p = (d * (k - 1)) // 2 if mod.padding == "same" else 0
        mode = "zeros" if isinstance(mod, nn.ConvTranspose2d) else mod.padding_mode
        if isinstance(mod, nn.ConvTranspose2d):
            n_out = conv_transpose_out_len(n, k, s, p, d, mod.output_padding[0])
        else:
            n_out = conv_out_len(n, k, s, p, p, d)
        rows = 0
        for r in range(domain):
            o0, o1 = chunk_range(n_out, domain, r)
            if isinstance(mod, nn.ConvTranspose2d):
                a, z = conv_transpose_input_rows(o0, o1, n, k, s, p, d)
            else:
                a, z = conv_input_rows(o0, o1, k, s, p, d)
            own = range(*chunk_range(n, domain, r))
            src = {source_row(g, n, mode) for g in range(a, z)}
            rows += sum(1 for g in src if g is not None and g not in own)
        elem = torch.finfo(torch.float32).bits // 8
        total += (1 + needs_grad) * rows * (b // dp) * c * w * elem  # forward rows + their gradients back
    return total // domain


def _fsdp_estimate(param_bytes: int, dp: int, domain: int) -> int:
    """Ring-algorithm bytes one rank sends per step for FSDP2 (all-gather forward and backward,
    reduce-scatter) plus the domain all-reduce of Partial gradients."""
    return int(param_bytes * (3 * (dp - 1) / dp + 2 * (domain - 1) / domain))


# ---------------------------------------------------------------------------------------------
# the distributed run
# ---------------------------------------------------------------------------------------------


def _rank_main(ctx: RankContext, domain: int, config: dict) -> dict:
    """One rank of the distributed run: train, measure, return the payload for the summary."""
    from .. import stats
    from ..mesh import DomainParallelManager
    from .train import TrainConfig, full_state_dict, setup, train

    manager = DomainParallelManager(domain, device_type="cpu")
    cfg = TrainConfig(**config)
    model, optimizer = setup(cfg, manager)
    memory: dict[str, int] = {}
    traffic = stats.CommStats()

    @contextlib.contextmanager
    def measure(step: int) -> Iterator[None]:
        if step == 0:
            with saved_tensor_bytes(model) as saved:
                yield
            memory.update(saved)
        else:
            with stats.comm_stats() as s:
                yield
            traffic.add(s.sent_bytes, s.recv_bytes, s.messages, s.collectives)
            for k, v in s.by_op.items():
                traffic.by_op[k].add(v.sent_bytes, v.recv_bytes, v.messages, v.collectives)

    def on_step(step: int, loss: float, seconds: float) -> None:
        if ctx.rank == 0:
            ctx.post((step, loss, seconds))

    res = train(cfg, manager, on_step=on_step, model_and_optimizer=(model, optimizer), step_context=measure)
    state = full_state_dict(model)
    n_measured = max(1, cfg.steps - 1)
    return {
        "losses": res.losses,
        "step_times": res.step_times,
        "activation_bytes": memory.get("bytes", 0),
        "sent_per_step": traffic.sent_bytes / n_measured,
        "by_op": {k: v.sent_bytes / n_measured for k, v in traffic.by_op.items()},
        "dp_rank": manager.dp_rank,
        "domain_rank": manager.domain_rank,
        # numpy, not torch: a torch tensor would travel as a shared-memory handle that dies
        # with this process
        "state": {k: v.numpy() for k, v in state.items()} if ctx.rank == 0 else None,
    }


def _start_workers(cfg: DemoConfig) -> LocalWorld:
    """Start the ranks (before any thread, e.g. rich's refresh thread, exists in this process)."""
    # Imported here so forked ranks inherit them instead of importing 4 times on 2 cores.
    import torch.distributed.checkpoint  # noqa: F401
    import torch.distributed.fsdp  # noqa: F401

    from . import train  # noqa: F401

    # fork shares the imported torch (seconds saved per rank); LocalWorld falls back to spawn
    # where fork is unsafe
    tcfg = asdict(cfg.train_config())
    return LocalWorld(_rank_main, cfg.dp * cfg.domain, (cfg.domain, tcfg), method="fork", pg_timeout=120)


# ---------------------------------------------------------------------------------------------
# the summary
# ---------------------------------------------------------------------------------------------


@dataclass
class DemoReport:
    ok: bool
    seconds: float
    loss_max_rel: float
    param_max_abs: float
    losses: list[float]
    ref_losses: list[float]
    activation_per_rank: list[int]
    activation_one_device: int
    traffic_per_rank: float
    halo_traffic_per_rank: float
    halo_minimum: int
    by_op: dict[str, float]
    fsdp_estimate: int
    step_time: float
    ref_step_time: float
    extra: dict = field(default_factory=dict)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n}"


def run_demo(cfg: DemoConfig | None = None, console: Any = None) -> DemoReport:
    """Run the demo and print the summary with ``console`` (a ``rich.console.Console``)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .train import train_reference

    cfg = cfg or DemoConfig()
    console = console or Console()
    t_start = time.perf_counter()
    world = cfg.dp * cfg.domain
    tcfg = cfg.train_config()
    console.print(
        f"[bold]credit-dtensor demo[/bold]: {world} CPU processes, mesh dp={cfg.dp} x domain={cfg.domain} (gloo), "
        f"U-Net on a {cfg.nlat}x{cfg.nlon} synthetic globe, {cfg.steps} AdamW steps, FSDP2 + exact halos"
    )
    launched = _start_workers(cfg)
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("step {task.fields[dt]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(f"{world} ranks", total=cfg.steps, loss="-", dt="-")

        def on_step(step: int, loss: float, seconds: float) -> None:
            progress.update(task, completed=step + 1, loss=f"{loss:.5f}", dt=f"{seconds * 1e3:.0f} ms")

        ranks_out = launched.collect(timeout=cfg.timeout, on_message=lambda _rank, v: on_step(*v))
        dist_results = dict(enumerate(ranks_out))
        ref_task = progress.add_task("1 process", total=cfg.steps, loss="-", dt="-")

        def on_ref_step(step: int, loss: float, seconds: float) -> None:
            progress.update(ref_task, completed=step + 1, loss=f"{loss:.5f}", dt=f"{seconds * 1e3:.0f} ms")

        from .train import build_model

        ref_model = build_model(tcfg)
        layers, remove = _layer_inputs(ref_model)
        ref_memory: dict[str, int] = {}

        @contextlib.contextmanager
        def measure(step: int) -> Iterator[None]:
            if step == 0:
                with saved_tensor_bytes(ref_model) as saved:
                    yield
                ref_memory.update(saved)
                remove()
            else:
                yield

        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # like each rank: comparable step times, no oversubscription
        try:
            ref, ref_state = train_reference(tcfg, on_step=on_ref_step, step_context=measure, model=ref_model)
        finally:
            torch.set_num_threads(threads)

    r0 = dist_results[0]
    r0["state"] = {k: torch.from_numpy(v) for k, v in r0["state"].items()}
    losses = r0["losses"]
    loss_rel = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(losses, ref.losses, strict=False))
    param_abs = max((r0["state"][k] - v).abs().max().item() for k, v in ref_state.items())
    ok = len(losses) == len(ref.losses) and loss_rel <= LOSS_RTOL and param_abs <= PARAM_ATOL
    ranks = [dist_results[r] for r in range(world)]
    by_op: dict[str, float] = {}
    for r in ranks:
        for k, v in r["by_op"].items():
            by_op[k] = by_op.get(k, 0.0) + v / world
    halo_ops = [k for k in by_op if k.startswith("conv") or k == "pad"]
    param_bytes = sum(v.numel() * v.element_size() for v in ref_state.values())
    report = DemoReport(
        ok=ok,
        seconds=time.perf_counter() - t_start,
        loss_max_rel=loss_rel,
        param_max_abs=param_abs,
        losses=losses,
        ref_losses=ref.losses,
        activation_per_rank=[r["activation_bytes"] for r in ranks],
        activation_one_device=ref_memory.get("bytes", 0),
        traffic_per_rank=sum(r["sent_per_step"] for r in ranks) / world,
        halo_traffic_per_rank=sum(by_op[k] for k in halo_ops),
        halo_minimum=halo_minimum_bytes(layers, cfg.domain, cfg.dp),
        by_op=by_op,
        fsdp_estimate=_fsdp_estimate(param_bytes, cfg.dp, cfg.domain),
        step_time=statistics.median(max(r["step_times"][i] for r in ranks) for i in range(1, cfg.steps)),
        ref_step_time=statistics.median(ref.step_times[1:]),
        extra={"mesh": [(r["dp_rank"], r["domain_rank"]) for r in ranks], "param_bytes": param_bytes},
    )
    _print_summary(report, cfg, console)
    return report


def _print_summary(rep: DemoReport, cfg: DemoConfig, console: Any) -> None:
    from rich.table import Table

    from ..geometry import chunk_range

    world = cfg.dp * cfg.domain
    mesh = Table(title="mesh (dp x domain)", show_header=True)
    for col in ("rank", "dp rank", "domain rank", "latitude rows"):
        mesh.add_column(col)
    for r, (dpr, dor) in enumerate(rep.extra["mesh"]):
        a, b = chunk_range(cfg.nlat, cfg.domain, dor)
        mesh.add_row(str(r), str(dpr), str(dor), f"{a}..{b - 1} of {cfg.nlat}")
    console.print(mesh)

    t = Table(title=f"{world} processes vs 1 process", show_header=True)
    t.add_column("measure", style="bold")
    t.add_column("value")
    status = "[green]PASS[/green]" if rep.ok else "[red]FAIL[/red]"
    t.add_row(
        "loss curve",
        f"{rep.losses[0]:.5f} -> {rep.losses[-1]:.5f} (1 process: {rep.ref_losses[0]:.5f} -> {rep.ref_losses[-1]:.5f})",
    )
    t.add_row("max relative loss difference", f"{rep.loss_max_rel:.2e} (tolerance {LOSS_RTOL:.0e})")
    t.add_row("max parameter difference", f"{rep.param_max_abs:.2e} (tolerance {PARAM_ATOL:.0e})  {status}")
    act = max(rep.activation_per_rank)
    t.add_row(
        "activations saved for backward",
        f"{_fmt_bytes(act)} per rank (max) vs {_fmt_bytes(rep.activation_one_device)} on one device "
        f"({act / max(rep.activation_one_device, 1):.2f}x; 1/{world} = {1 / world:.2f}x without halos)",
    )
    t.add_row(
        "halo traffic per rank per step",
        f"{_fmt_bytes(rep.halo_traffic_per_rank)} sent vs minimum {_fmt_bytes(rep.halo_minimum)} "
        f"({rep.halo_traffic_per_rank / max(rep.halo_minimum, 1):.2f}x)",
    )
    ops = ", ".join(f"{k} {_fmt_bytes(v)}" for k, v in sorted(rep.by_op.items()))
    t.add_row("all credit_dtensor traffic", f"{_fmt_bytes(rep.traffic_per_rank)} per rank per step ({ops})")
    t.add_row(
        "FSDP2 parameters/gradients",
        f"~{_fmt_bytes(rep.fsdp_estimate)} per rank per step (ring estimate, "
        f"{_fmt_bytes(rep.extra['param_bytes'])} of parameters)",
    )
    t.add_row(
        "step time (median)",
        f"{rep.step_time * 1e3:.0f} ms on {world} processes vs {rep.ref_step_time * 1e3:.0f} ms in one process",
    )
    t.add_row("total runtime", f"{rep.seconds:.1f} s")
    console.print(t)
    if rep.ok:
        console.print("[green]domain-parallel training matches the single-device run.[/green]")
    else:
        console.print("[red]MISMATCH: domain-parallel training differs from the single-device run.[/red]")
