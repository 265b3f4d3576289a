"""One CREDIT model case on one gloo world: the single-device truth against the converted, H-sharded
model, with a structured report. Used by ``tests/credit/test_credit_models.py`` (policy ``raise``)
and ``scripts/credit_probe.py`` (policy ``allow``, every implicit gather recorded).

:func:`run_case` is a harness task (module level, runs on every rank). It returns a dict per rank
on success; on failure every rank raises :class:`CaseFailed` whose message ends with one line
``CASE-JSON: {...}`` (exception type, first line of the message, the innermost frames in CREDIT,
in credit_dtensor and in torch, the tensors in CREDIT's failing frame with their DTensor
placements), so the harness restarts a torn world and the probe can still print the details.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import sys
import time
import traceback
import warnings
from collections import Counter

import torch

from tests.credit.cases import CASES, build_model, tol_for
from tests.harness import manager

MARK = "CASE-JSON: "


class CaseFailed(RuntimeError):
    """Raised on every rank of a failed case; the message carries the JSON report."""


# --- errors --------------------------------------------------------------------------------------


def _dirs() -> dict[str, str]:
    import credit

    import credit_dtensor

    return {
        "credit": os.path.dirname(os.path.abspath(credit.__file__)) + os.sep,
        "credit_dtensor": os.path.dirname(os.path.abspath(credit_dtensor.__file__)) + os.sep,
        "torch": os.path.dirname(os.path.abspath(torch.__file__)) + os.sep,
    }


_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))) + os.sep


def _short(path: str) -> str:
    """``credit/models/x.py``, ``torch/...``, ``credit_dtensor/...``, ``tests/...``: no install prefix."""
    i = path.rfind("site-packages" + os.sep)
    if i >= 0:
        return path[i + len("site-packages" + os.sep) :]
    return path[len(_REPO) :] if path.startswith(_REPO) else path


def describe_tensor(t: object) -> str | None:
    """``DTensor(global (..), local (..), [Shard(3)])`` / ``Tensor(..)`` / None for other objects."""
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        return (
            f"DTensor(global {tuple(t.shape)}, local {tuple(t._local_tensor.shape)}, "
            f"{list(t.placements)}, {str(t.dtype).replace('torch.', '')})"
        )
    if isinstance(t, torch.Tensor):
        return f"Tensor({tuple(t.shape)}, {str(t.dtype).replace('torch.', '')})"
    return None


def _tensors_in(frame) -> dict[str, str]:
    out = {}
    for k, v in frame.f_locals.items():
        if isinstance(v, (tuple, list)) and v and all(isinstance(e, torch.Tensor) for e in v[:4]):
            out[k] = "[" + ", ".join(describe_tensor(e) for e in v[:4]) + ("]" if len(v) <= 4 else ", ...]")
            continue
        d = describe_tensor(v)
        if d is not None:
            out[k] = d
    return out


def _failing_op(tbs: list) -> dict | None:
    """The innermost aten/custom op being dispatched when the error was raised, with its arguments."""
    for t in reversed(tbs):
        loc_ = t.tb_frame.f_locals
        for key in ("self", "func", "op_call"):
            op = loc_.get(key)
            if isinstance(op, torch._ops.OpOverload):
                args = loc_.get("args", ())
                if isinstance(args, dict):  # some frames keep (args, kwargs) differently
                    args = tuple(args.values())
                shown = []
                for a in args if isinstance(args, (tuple, list)) else ():
                    d = describe_tensor(a)
                    if d is None and isinstance(a, (tuple, list)) and a and isinstance(a[0], torch.Tensor):
                        d = "[" + ", ".join(describe_tensor(e) or "?" for e in a[:4]) + "]"
                    shown.append(d if d is not None else repr(a)[:80])
                return {"op": str(op), "args": shown[:6]}
    return None


def _forward_of_backward(seen: list) -> list[str] | None:
    """Under anomaly mode, the forward call whose backward failed: its model frames (CREDIT, einops, ...)."""
    for w in seen:
        text = str(w.message)
        if "Traceback of forward call" not in text:
            continue
        frames = []
        lines = text.splitlines()
        for i, line in enumerate(lines):
            line = line.strip()
            if line.startswith('File "') and "site-packages" in line and "/torch/" not in line:
                path = line.split('"')[1]
                lineno = line.split("line ")[1].split(",")[0] if "line " in line else "?"
                src = lines[i + 1].strip() if i + 1 < len(lines) else ""
                frames.append(f"{_short(path)}:{lineno}  {src}")
        head = text.splitlines()[0][:200]
        return [head, *frames[-6:]]
    return None


def error_report(exc: BaseException) -> dict:
    """Type, message, and where: innermost frames per package, tensors of CREDIT's failing frame."""
    dirs = _dirs()
    tbs = []
    tb = exc.__traceback__
    while tb is not None:
        tbs.append(tb)
        tb = tb.tb_next
    frames = []
    for t in tbs:
        f = t.tb_frame
        path = os.path.abspath(f.f_code.co_filename)
        pkg = next((k for k in ("credit_dtensor", "credit", "torch") if path.startswith(dirs[k])), "other")
        frames.append((pkg, t, path))

    def loc(t, path):
        import linecache

        line = linecache.getline(path, t.tb_lineno).strip()
        return {"at": f"{_short(path)}:{t.tb_lineno}", "function": t.tb_frame.f_code.co_name, "line": line}

    report: dict = {
        "type": type(exc).__name__,
        "message": (str(exc).strip().splitlines() or [""])[0][:400],
    }
    for pkg in ("credit", "credit_dtensor", "torch"):
        hits = [(t, p) for k, t, p in frames if k == pkg]
        if hits:
            report[f"innermost_{pkg}"] = loc(*hits[-1])
    # the model code above the failing op, innermost last (CREDIT, einops, timm, smp), for the catalog
    report["model_stack"] = [
        loc(t, p) for k, t, p in frames if k in ("credit", "other") and "tests" + os.sep + "credit" not in p
    ][-6:]
    op = _failing_op(tbs)
    if op:
        report["aten_op"] = op
    hits = [t for k, t, _ in frames if k == "credit"]
    if hits:
        report["credit_tensors"] = _tensors_in(hits[-1].tb_frame)
    others = [t for k, t, p in frames if k == "other" and "tests" + os.sep + "credit" not in p]
    if others:  # third-party model code (einops, timm, smp) below CREDIT's frame
        report["innermost_other"] = loc(others[-1], os.path.abspath(others[-1].tb_frame.f_code.co_filename))
        report["other_tensors"] = _tensors_in(others[-1].tb_frame)
    cause = exc.__cause__ or exc.__context__
    if cause is not None:
        report["cause"] = f"{type(cause).__name__}: {(str(cause).strip().splitlines() or [''])[0][:300]}"
    report["traceback_tail"] = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)[-8:])[-3000:]
    return report


def parse_failure(text: str) -> dict | None:
    """The JSON report in a harness error message (first rank that has one)."""
    for line in text.splitlines():
        i = line.find(MARK)
        if i >= 0:
            try:
                return json.loads(line[i + len(MARK) :])
            except json.JSONDecodeError:
                continue
    return None


# --- gathers -------------------------------------------------------------------------------------


class _SiteList(list):
    """A gather recorder that also notes the innermost CREDIT frame when an event is recorded."""

    def __init__(self, credit_dir: str) -> None:
        super().__init__()
        self.credit_dir = credit_dir

    def append(self, event) -> None:  # noqa: D401 - list API
        site = None
        f = sys._getframe(1)
        while f is not None:
            if os.path.abspath(f.f_code.co_filename).startswith(self.credit_dir):
                site = f"{_short(f.f_code.co_filename)}:{f.f_lineno}"
                break
            f = f.f_back
        super().append((event, site))


def _summarise_gathers(events: list) -> list[dict]:
    counts: Counter = Counter()
    nbytes: Counter = Counter()
    for ev, site in events:
        key = (ev.module or "?", ev.op, ev.phase, site or _short(ev.call_site or "?"))
        counts[key] += 1
        nbytes[key] += ev.nbytes
    return [
        {"module": k[0], "op": k[1], "phase": k[2], "site": k[3], "count": n, "bytes": nbytes[k]}
        for k, n in counts.items()
    ]


# --- layout trace (diagnostic) -------------------------------------------------------------------


def _expected_local(dt) -> tuple[int, ...]:
    """The local shape ``torch.chunk`` placement implies for this rank."""
    shape = list(dt.shape)
    for mesh_dim, pl in enumerate(dt.placements):
        if pl.is_shard():
            n, parts = shape[pl.dim], dt.device_mesh.size(mesh_dim)
            r = dt.device_mesh.get_local_rank(mesh_dim)
            c = -(-n // parts) if n else 0
            shape[pl.dim] = max(0, min(c, n - r * c))
    return tuple(shape)


def _layout_problem(dt) -> tuple[str, str] | None:
    """("shape", why) when the local shape is not the placement's chunk, ("stride", why) when the
    global strides claim contiguity the local tensor does not have (a later view then fails)."""
    local = dt._local_tensor
    if tuple(local.shape) != _expected_local(dt):
        return "shape", f"local shape {tuple(local.shape)} != {_expected_local(dt)} implied by {list(dt.placements)}"
    if dt.is_contiguous() and not local.is_contiguous():
        return "stride", f"global stride {dt.stride()} claims contiguous, the local tensor's {local.stride()} is not"
    return None


class LayoutTrace(torch.overrides.TorchFunctionMode):
    """Checks every DTensor a torch function returns (local shape and contiguity against its
    placements); records the first few inconsistent results with the op and CREDIT's line."""

    def __init__(self, credit_dir: str, limit: int = 3) -> None:
        super().__init__()
        self.credit_dir, self.limit, self.problems = credit_dir, limit, []
        self.counts: Counter = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        from torch.distributed.tensor import DTensor

        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else (out,)
        for o in outs:
            if isinstance(o, DTensor):
                found = _layout_problem(o)
                if found is None:
                    continue
                kind, problem = found
                self.counts[kind] += 1
                if self.counts[kind] <= self.limit:
                    site = None
                    f = sys._getframe(1)
                    while f is not None:
                        if os.path.abspath(f.f_code.co_filename).startswith(self.credit_dir):
                            site = f"{_short(f.f_code.co_filename)}:{f.f_lineno}"
                            break
                        f = f.f_back
                    shown = [describe_tensor(a) or repr(a)[:60] for a in args[:4]]
                    self.problems.append(
                        {
                            "kind": kind,
                            "op": getattr(func, "__qualname__", None) or str(func),
                            "site": site,
                            "args": shown,
                            "out": describe_tensor(o),
                            "problem": problem,
                        }
                    )
                    break
        return out


# --- the case ------------------------------------------------------------------------------------


#: a gradient's error is relative to its own largest entry, but never to less than this fraction of
#: the largest parameter gradient of the same dtype: mathematically zero gradients (the bias of the
#: last layer of CrossFormer's position-bias MLP, shifting every logit of a softmax alike) carry only
#: rounding noise. fp32 (Camulator's position-bias MLPs): the gradient arrives as a sum of fp64 terms
#: rounded to fp32 per rank, so its noise scales with the terms, not with the (cancelling) result
ZERO_FLOOR = {torch.float64: 1e-4, torch.float32: 1e-2}


def _rel(a, b, floor: float = 0.0) -> float:
    from torch.distributed.tensor import DTensor

    if a is None or b is None:
        return 0.0 if a is None and b is None else math.inf
    if isinstance(a, DTensor):
        a = a.full_tensor()
    if isinstance(b, DTensor):
        b = b.full_tensor()
    if a.shape != b.shape:
        return math.inf
    if b.numel() == 0:
        return 0.0
    scale = max(b.double().abs().max().item(), floor, 1e-30)
    return (a.double() - b.double()).abs().max().item() / scale


def run_case(name: str, h: int, w: int, policy: str = "raise", trace: bool = False) -> dict:
    """Harness task: the case ``name`` on an (h, w) field, on this world (every rank one domain rank)."""
    from torch.distributed.tensor import DTensor

    import credit_dtensor as cd
    from credit_dtensor import guard
    from credit_dtensor.dtensor import domain_shard_dim, wrap_replicate

    torch.set_num_threads(1)
    case = CASES[name]
    m = manager()
    t0 = time.perf_counter()
    result: dict = {"model": name, "field": f"{h}x{w}", "world": m.domain_world_size}

    # single-device truth (same seeds on every rank)
    ref = build_model(name, h, w)
    dist_model = copy.deepcopy(ref)
    gen = torch.Generator().manual_seed(h * 1000 + w)
    x, extra = case.inputs(h, w, gen, case.dtype)
    xr = x.clone().requires_grad_()
    yr = ref(xr, *extra)
    gy = torch.randn(yr.shape, generator=gen, dtype=yr.dtype)
    yr.backward(gy)
    result["ref_seconds"] = round(time.perf_counter() - t0, 2)

    events: list = []
    stats = None
    tracer = LayoutTrace(_dirs()["credit"]) if trace else None
    seen: list = []
    t1 = time.perf_counter()
    try:
        converted = cd.convert_to_domain_parallel(dist_model, m)
        xs = cd.shard_tensor(x.clone(), m, dim=case.hdim).requires_grad_()
        with cd.gather_policy(policy), cd.comm_stats() as stats, guard.record_gathers() as recorded:
            site_list = None
            if policy != "raise" and hasattr(guard, "_recorders"):  # note CREDIT's line of each gather too
                site_list = _SiteList(_dirs()["credit"])
                guard._recorders().append(site_list)
            anomaly = torch.autograd.detect_anomaly(check_nan=False) if trace else contextlib.nullcontext()
            try:
                with anomaly, warnings.catch_warnings(record=True) as seen:
                    warnings.simplefilter("always")
                    with tracer if tracer is not None else contextlib.nullcontext():
                        y = converted(xs, *extra)
                    if isinstance(y, DTensor):
                        d = domain_shard_dim(y)
                        gd = cd.shard_tensor(gy, m, dim=d) if d is not None else wrap_replicate(gy, m.domain_mesh)
                    else:
                        gd = gy
                    y.backward(gd)
            finally:
                if site_list is not None:
                    guard._recorders().remove(site_list)
                events = list(site_list) if site_list is not None else [(ev, None) for ev in recorded]
    except Exception as exc:  # noqa: BLE001 - reported with the case
        report = error_report(exc)
        report["gathers_before"] = _summarise_gathers(events) if events else []
        if tracer is not None:
            report["layout_problems"] = tracer.problems
            forward = _forward_of_backward(seen)
            if forward:
                report["backward_of"] = forward
        head = f"{name} {h}x{w}: {report['type']}: {report['message']}"
        where = report.get("innermost_credit", {}).get("at", "?")
        raise CaseFailed(f"{head}\n  at CREDIT {where}\n{MARK}{json.dumps(report)}") from exc

    result["dist_seconds"] = round(time.perf_counter() - t1, 2)
    result["out_placement"] = str(list(y.placements)) if isinstance(y, DTensor) else type(y).__name__
    result["sent_bytes"] = stats.sent_bytes if stats is not None else None
    result["x_local_bytes"] = xs.to_local().numel() * xs.element_size()
    errs = {"out": _rel(y, yr), "grad_x": _rel(xs.grad, xr.grad)}
    tols = {"out": tol_for(yr.dtype), "grad_x": tol_for(xr.dtype)}
    ref_params = dict(ref.named_parameters())
    floors: dict = {}
    for p in ref_params.values():
        if p.grad is not None and p.grad.numel():
            floors[p.dtype] = max(floors.get(p.dtype, 0.0), p.grad.abs().max().item())
    floors = {dt: ZERO_FLOOR.get(dt, 1e-2) * g for dt, g in floors.items()}
    for pname, p in converted.named_parameters():
        key = f"grad:{pname}"
        ref_p = ref_params.get(pname)
        errs[key] = _rel(p.grad, ref_p.grad, floors.get(ref_p.dtype, 0.0)) if ref_p is not None else math.inf
        tols[key] = tol_for(p.dtype)
    for pname in sorted(set(ref_params) - {n for n, _ in converted.named_parameters()}):
        errs[f"grad:{pname} (missing after conversion)"] = math.inf
    result["errs"] = errs
    result["max_err"] = max(errs.values())
    result["bad"] = {k: v for k, v in errs.items() if not v <= tols.get(k, 0.0)}
    result["gathers"] = _summarise_gathers(events)
    result["n_gathers"] = len(events)
    if tracer is not None:
        result["layout_problems"] = tracer.problems
    return result
