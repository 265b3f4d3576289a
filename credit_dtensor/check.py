"""Per-module parity check: the converted model against the plain one, on the same input.

``check(model, manager, example_input)`` runs a plain copy of ``model`` on the full input (every
rank) and a converted copy on the H-sharded input, with forward hooks on every module. Each
module's output is gathered (``full_tensor``) and compared with the plain output as it is
produced, so the report names the *first* module whose sharded output diverges -- turning "my
loss differs" into "block 3's attention is not shard-local". It also flags modules whose output
came back replicated from a sharded input (PyTorch gathered the whole activation: exact but not
parallel), then compares the input gradient and every parameter gradient after one backward.

Call it on every rank of the domain (it communicates). Both copies start from the same values:
the converted copy's parameters are broadcast from domain rank 0 and loaded into the plain copy.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.utils._pytree import tree_flatten

from . import guard, sharding
from .audit.report import rich_text
from .convert import convert_to_domain_parallel
from .dtensor import is_sharded, sharded_dim, wrap_replicate
from .errors import DomainParallelError
from .guard import GatherEvent
from .mesh import DomainParallelManager
from .nn._base import DomainParallelModule
from .sharding import shard_tensor

if TYPE_CHECKING:  # rich is imported where a table is drawn: the package imports without it
    from rich.console import Console

__all__ = ["check", "CheckReport", "ModuleCheck", "render_check"]

logger = logging.getLogger(__name__)

DEFAULT_ATOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}


@dataclass
class ModuleCheck:
    """One module call (or gradient): its relative max error and what came back."""

    path: str
    kind: str
    placement: str = ""
    shape: tuple[int, ...] | None = None
    error: float = 0.0
    status: str = "ok"  # ok | diverged | gathered | raised | unmatched
    note: str = ""


@dataclass
class CheckReport:
    """Result of :func:`check`; ``report.ok``, ``report.first_divergence``, ``print(report)``."""

    model: str
    input_shape: tuple[int, ...]
    domain: int
    atol: float
    modules: list[ModuleCheck] = field(default_factory=list)
    grads: list[ModuleCheck] = field(default_factory=list)
    output_error: float = math.nan
    exception: str | None = None
    #: every implicit activation all-gather seen (forward and backward), with its op and module
    gather_events: list[GatherEvent] = field(default_factory=list)

    @property
    def first_divergence(self) -> ModuleCheck | None:
        """The first module (in completion order) whose output diverged or raised."""
        return next((m for m in self.modules if m.status in ("diverged", "raised")), None)

    @property
    def first_grad_divergence(self) -> ModuleCheck | None:
        return next((g for g in self.grads if g.status == "diverged"), None)

    @property
    def gathered(self) -> list[ModuleCheck]:
        return [m for m in self.modules if m.status == "gathered"]

    @property
    def ok(self) -> bool:
        """Every output and gradient within ``atol`` and nothing raised (gathers are warnings)."""
        return self.exception is None and self.first_divergence is None and self.first_grad_divergence is None

    def summary(self) -> str:
        head = f"{self.model}: input {self.input_shape} over {self.domain} ranks, atol {self.atol:g}"
        if self.exception:
            return f"{head}: RAISED in {self.exception}"
        first = self.first_divergence
        if first is not None:
            return f"{head}: first divergence at {first.path} ({first.kind}): error {first.error:.3g}"
        g = self.first_grad_divergence
        if g is not None:
            return f"{head}: forward exact (output error {self.output_error:.3g}); gradient of {g.path} diverges: {g.error:.3g}"
        worst = max([m.error for m in self.modules] + [g.error for g in self.grads] + [0.0])
        tail = f"; {len(self.gathered)} module(s) gathered the activation" if self.gathered else ""
        if self.gather_events:
            sites = sorted({f"{e.op} in {e.module or '(root)'} ({e.phase})" for e in self.gather_events})
            tail += f"; {len(self.gather_events)} implicit all-gather(s): " + ", ".join(sites)
        return (
            f"{head}: exact -- {len(self.modules)} module outputs and {len(self.grads)} gradients, "
            f"worst error {worst:.3g}{tail}"
        )

    def __str__(self) -> str:
        return rich_text(render_check, self, 140)


def render_check(report: CheckReport, console: Console | None = None, *, max_rows: int = 60) -> None:
    """Rich table of the module outputs (all, or the interesting ones for big models) and gradients."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    rows = report.modules
    if len(rows) > max_rows:
        first = report.first_divergence
        cut = rows.index(first) + 1 if first is not None else max_rows // 2
        rows = [m for i, m in enumerate(rows) if i < min(cut, max_rows // 2) or m.status != "ok" or m is first]
    table = Table(title=report.summary(), title_justify="left", caption="* converted module", caption_justify="left")
    for col in ("#", "module", "type", "output placement", "shape", "rel. error", "status"):
        table.add_column(col, overflow="fold")
    for i, m in enumerate(rows):
        style = {"diverged": "red", "raised": "red", "gathered": "yellow", "unmatched": "dim"}.get(m.status, "green")
        status = f"[{style}]{m.status}[/{style}]" + (f" {m.note}" if m.note else "")
        table.add_row(str(i), m.path or "(root)", m.kind, m.placement, _shape(m.shape), f"{m.error:.2e}", status)
    console.print(table)
    bad = [g for g in report.grads if g.status != "ok"]
    if bad:
        gt = Table(title=f"{len(bad)} of {len(report.grads)} gradients diverge", title_justify="left")
        for col in ("gradient", "rel. error"):
            gt.add_column(col)
        for g in bad[:max_rows]:
            gt.add_row(g.path, f"[red]{g.error:.2e}[/red]")
        console.print(gt)
    elif report.grads:
        worst = max(g.error for g in report.grads)
        console.print(f"gradients: input + {len(report.grads) - 1} parameters exact (worst {worst:.2e})")
    if report.gather_events:
        gt = Table(
            title=f"{len(report.gather_events)} implicit all-gather(s) of H-sharded activations", title_justify="left"
        )
        for col in ("module", "op", "phase", "bytes", "call site"):
            gt.add_column(col, overflow="fold")
        for e in report.gather_events[:max_rows]:
            gt.add_row(e.module or "(root)", e.op, e.phase, f"{e.nbytes:,}", e.call_site or "")
        console.print(gt)
    if report.exception:
        console.print(f"[red]raised[/red] in {report.exception}")


def _kind(mod: nn.Module) -> str:
    """The user's class name; ``*`` marks a converted (wrapped) module."""
    if isinstance(mod, DomainParallelModule):
        base = next((c for c in type(mod).__mro__[1:] if not issubclass(c, DomainParallelModule)), type(mod))
        return f"{base.__name__}*"
    return type(mod).__name__


def _shape(s: tuple[int, ...] | None) -> str:
    return "" if s is None else "×".join(str(v) for v in s)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return math.inf
    if a.numel() == 0:
        return 0.0
    scale = max(1.0, b.abs().max().item())
    return (a.to(b.dtype) - b).abs().max().item() / scale


def _tensors(x: Any) -> list[torch.Tensor]:
    return [t for t in tree_flatten(x)[0] if isinstance(t, torch.Tensor)]


def _placement(t: torch.Tensor) -> str:
    if not isinstance(t, DTensor):
        return "plain"
    return ",".join(str(p) for p in t.placements)


def check(
    model: nn.Module,
    manager: DomainParallelManager,
    example_input: torch.Tensor,
    *,
    atol: float | None = None,
    backward: bool = True,
    shard_dim: int = -2,
    custom_converters: Mapping[type, Callable[..., nn.Module]] | None = None,
    train: bool = False,
    seed: int = 0,
) -> CheckReport:
    """Compare the converted ``model`` with the plain one module by module (see module doc).

    ``example_input`` is the full input (the same on every rank); ``atol`` is the relative max
    error allowed (default by dtype: fp64 1e-10, fp32 1e-5). ``train=False`` runs both copies in
    eval mode (dropout would differ). ``model`` itself is not modified.
    """
    if any(isinstance(m, DomainParallelModule) for m in model.modules()) or any(
        isinstance(p, DTensor) for p in model.parameters()
    ):
        raise DomainParallelError("check: pass the plain (unconverted) model; check converts its own copy")
    if not isinstance(example_input, torch.Tensor) or isinstance(example_input, DTensor):
        raise DomainParallelError("check: example_input must be the full plain tensor (the same on every rank)")
    tol = atol if atol is not None else DEFAULT_ATOL.get(example_input.dtype, 1e-5)
    mesh = manager.domain_mesh
    hdim = shard_dim % example_input.ndim
    report = CheckReport(type(model).__name__, tuple(example_input.shape), mesh.size(), tol)

    plain = copy.deepcopy(model)
    conv = convert_to_domain_parallel(copy.deepcopy(model), manager, custom_converters=custom_converters)
    plain.load_state_dict(conv.state_dict(), strict=False)  # same values as the broadcast replicas
    plain.train(train)
    conv.train(train)

    ref_out: dict[str, list[list[torch.Tensor]]] = {}
    handles = [
        mod.register_forward_hook(
            lambda m, a, o, p=path: ref_out.setdefault(p, []).append([t.detach().clone() for t in _tensors(o)])
        )
        for path, mod in plain.named_modules()
    ]
    x_ref = example_input.detach().clone().requires_grad_(example_input.is_floating_point() and backward)
    try:
        y_ref = plain(x_ref)
    finally:
        for h in handles:
            h.remove()

    stack: list[str] = []
    calls: dict[str, int] = {}
    in_sharded: dict[str, bool] = {}

    def pre(mod: nn.Module, args: tuple, path: str) -> None:
        stack.append(path)
        in_sharded[path] = any(is_sharded(t) for t in _tensors(args))

    def post(mod: nn.Module, args: tuple, out: Any, path: str) -> None:
        stack.pop()
        i = calls.get(path, 0)
        calls[path] = i + 1
        outs = _tensors(out)
        ref = ref_out.get(path, [])
        row = ModuleCheck(path, _kind(mod), _placement(outs[0]) if outs else "")
        if i >= len(ref) or len(ref[i]) != len(outs):
            row.status, row.note = "unmatched", "no plain counterpart"
            report.modules.append(row)
            return
        with torch.no_grad():
            errs = [_rel_err(_full(t), r) for t, r in zip(outs, ref[i], strict=True)]
        row.shape = tuple(ref[i][0].shape) if ref[i] else None
        row.error = max(errs, default=0.0)
        if not row.error <= tol:
            row.status = "diverged"
        elif in_sharded.get(path) and outs and not any(is_sharded(t) for t in outs) and outs[0].ndim >= 3:
            row.status, row.note = "gathered", "sharded input, replicated output: the activation was all-gathered"
        report.modules.append(row)

    handles = []
    for path, mod in _visible_modules(conv):
        handles.append(mod.register_forward_pre_hook(lambda m, a, p=path: pre(m, a, p)))
        handles.append(mod.register_forward_hook(lambda m, a, o, p=path: post(m, a, o, p)))
    with sharding.verifying():  # inside check, ranks must also agree on the content
        x = shard_tensor(example_input.detach().clone(), manager, hdim)
    if x_ref.requires_grad:
        x.requires_grad_(True)
    try:
        with guard.gather_policy("allow"), guard.record_gathers() as events:
            y = conv(x)
        report.gather_events.extend(events)
    except Exception as exc:  # noqa: BLE001 - report where it happened
        where = stack[-1] if stack else ""
        report.exception = f"{where or '(root)'}: {type(exc).__name__}: {exc}"
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        report.modules.append(
            ModuleCheck(
                where, _kind(conv.get_submodule(where)), status="raised", note=f"{type(exc).__name__}: {first_line}"
            )
        )
        return report
    finally:
        for h in handles:
            h.remove()
    y_t, yr_t = _tensors(y), _tensors(y_ref)
    with torch.no_grad():
        report.output_error = max((_rel_err(_full(a), b) for a, b in zip(y_t, yr_t, strict=False)), default=0.0)
    if backward and yr_t and yr_t[0].requires_grad:
        try:
            with guard.gather_policy("allow"), guard.record_gathers() as events:
                _compare_grads(report, plain, conv, x_ref, x, y_t[0], yr_t[0], mesh, seed, tol)
            report.gather_events.extend(events)
        except Exception as exc:  # noqa: BLE001 - a failing backward is a finding, not a crash
            report.exception = (
                f"backward: {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            )
    logger.info("check: %s", report.summary())
    return report


def _visible_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules whose outputs are model-level tensors: not inside a wrapper or a custom-converted
    module (a shard-local module's children see plain local tensors)."""
    out, hidden = [], []
    for path, mod in model.named_modules():
        if any(path.startswith(h + ".") for h in hidden):
            continue
        out.append((path, mod))
        if isinstance(mod, DomainParallelModule) or getattr(mod, "_dp_custom", False):
            hidden.append(path)
    return out


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.detach().full_tensor() if isinstance(t, DTensor) else t.detach()


def _compare_grads(report, plain, conv, x_ref, x, y, y_ref, mesh, seed, tol) -> None:
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(y_ref.shape, generator=gen, dtype=y_ref.dtype)
    y_ref.backward(g)
    if isinstance(y, DTensor):
        d = sharded_dim(y)
        gd = shard_tensor(g, mesh, d) if d is not None else wrap_replicate(g, mesh)
    else:
        gd = g
    y.backward(gd)
    pairs = [("input", x.grad, x_ref.grad)] if x_ref.grad is not None else []
    params = dict(conv.named_parameters())
    pairs += [(f"{n}.grad", params[n].grad if n in params else None, p.grad) for n, p in plain.named_parameters()]
    for name, a, b in pairs:
        row = ModuleCheck(name, "grad")
        if a is None or b is None:
            row.error = 0.0 if a is None and b is None else math.inf
        else:
            with torch.no_grad():
                row.error = _rel_err(_full(a), b)
        row.status = "ok" if row.error <= tol else "diverged"
        report.grads.append(row)
