"""A norm's statistics round folded with the next convolution's halo round (``ops.fold``), fp64.

The truth is the one-device model: outputs, input gradients, parameter gradients and running
statistics of every step must match it -- the first (the norm probes its consumer), the second
(the ranks agree) and the later, folded ones -- for chains the fold serves (BatchNorm / GroupNorm
/ InstanceNorm -> elementwise ops, in-place ones included, and pads of W -> convolutions of any stride,
dilation, padding mode, transposed) and chains it must not touch (a residual add, an in-place
change after the norm, a second convolution, an H-varying operand), on even, uneven (H=13 on 3)
and empty shards. Residual sums (``relu(bn2(y) + x)``, torchvision's ``out += identity``, any
elementwise op of two carried outputs) carry the op of their rows. Folding must remove rounds and
move no more bytes at two ranks (``CREDIT_DTENSOR_FOLD=rounds``: one row set more per projected
shortcut, exactly).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from torch import nn

from tests import harness

TOL = 1e-10


class Chain(nn.Module):
    """Every chain the fold serves, back to back."""

    def __init__(self) -> None:
        super().__init__()
        self.c0 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(6)
        self.c1 = nn.Conv2d(6, 6, 3, padding=1, bias=False)  # bn0 -> relu -> c1
        self.gn = nn.GroupNorm(3, 6)
        # gn -> silu_ -> mul_ -> c2
        self.c2 = nn.Conv2d(6, 4, 3, stride=2, padding=2, dilation=2, padding_mode="reflect")
        self.inn = nn.InstanceNorm2d(4, affine=True)
        self.c3 = nn.ConvTranspose2d(4, 4, 4, stride=2, padding=1)  # inn -> leaky_relu -> c3
        self.bn1 = nn.BatchNorm2d(4, affine=False)
        self.c4 = nn.Conv2d(4, 2, (5, 3), padding=(2, 1), padding_mode="circular")  # bn1 -> relu_ -> pad W -> c4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.c1(F.relu(self.bn0(self.c0(x))))
        y = self.c2(F.silu(self.gn(y), inplace=True).mul_(2.0))  # an in-place method: the rows follow
        y = self.c3(F.leaky_relu(self.inn(y), 0.1))
        return self.c4(F.pad(F.relu(self.bn1(y), inplace=True), (2, 1, 0, 0), mode="reflect"))  # a pad of W only


class Untouched(nn.Module):
    """Chains the fold must leave to the usual exchange (or get right through them)."""

    def __init__(self) -> None:
        super().__init__()
        self.c0 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(4)
        self.c1 = nn.Conv2d(4, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 4, 3, padding=2, dilation=2)
        self.bn1 = nn.BatchNorm2d(4)
        self.c3 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(4)
        self.c4 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn3 = nn.BatchNorm2d(4)
        self.c5 = nn.Conv2d(4, 3, 3, padding=1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, stale: bool) -> torch.Tensor:
        a = F.relu(self.bn0(self.c0(x)))
        y = self.c1(a) + self.c2(a) + a  # two convolutions and the tensor itself read the output
        b = F.relu(self.bn1(y)) * 1.0  # (relu's backward reads its output: not the one changed below)
        if stale:  # modified after the norm (once the fold is decided) by an operand it has no rows of
            b.mul_(mask + 0.5)
        y = self.c3(b)
        y = self.c4(F.relu(self.bn2(y) + y))  # a residual add: the rows of y would be needed too
        return self.c5(self.bn3(y) * mask)  # an operand that varies along H


def _affine(model: nn.Module) -> nn.Module:
    """Norm weights and biases away from their (1, 0) init, so every term of the folded rows counts."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, (nn.BatchNorm2d, nn.GroupNorm, nn.InstanceNorm2d)) and mod.weight is not None:
                mod.weight.copy_(1 + 0.5 * torch.randn(mod.weight.shape, generator=g, dtype=mod.weight.dtype))
                mod.bias.copy_(0.5 * torch.randn(mod.bias.shape, generator=g, dtype=mod.bias.dtype))
    return model


def _models():
    torch.manual_seed(0)
    return _affine(Chain().double()), _affine(Untouched().double())


def _data(h: int, step: int):
    g = torch.Generator().manual_seed(100 * h + step)
    x = torch.randn(2, 3, h, 6, generator=g, dtype=torch.float64)
    mask = torch.rand(1, 1, h, 6, generator=g, dtype=torch.float64)
    return x, mask


STEPS = 3  # probe, agree, folded


def _reference(h: int) -> list[dict]:
    chain, other = _models()
    out = []
    for step in range(STEPS):
        x, mask = _data(h, step)
        x.requires_grad_(True)
        for m in (chain, other):
            m.zero_grad(set_to_none=True)
        ya, yb = chain(x), other(x, mask, step == STEPS - 1)
        (
            ya.square().sum() + (yb * torch.linspace(-1, 1, yb.shape[2], dtype=yb.dtype).view(1, 1, -1, 1)).sum()
        ).backward()
        out.append(
            {
                "ya": ya.detach(),
                "yb": yb.detach(),
                "gx": x.grad.clone(),
                "grads": {
                    f"{k}.{n}": p.grad.clone() for k, m in (("a", chain), ("b", other)) for n, p in m.named_parameters()
                },
                "buffers": {
                    f"{k}.{n}": t.clone() for k, m in (("a", chain), ("b", other)) for n, t in m.named_buffers()
                },
            }
        )
    return out


def task_fold(h: int, folding: bool) -> list[dict]:
    from torch.distributed.tensor import DTensor

    from credit_dtensor import comm_stats, convert_to_domain_parallel, shard_tensor
    from credit_dtensor.comm import forget_groups
    from credit_dtensor.ops import fold

    forget_groups()  # a fresh start: every norm probes again
    fold.ENABLED = folding
    try:
        m = harness.manager()
        chain, other = _models()
        chain, other = convert_to_domain_parallel(chain, m), convert_to_domain_parallel(other, m)
        out = []
        for step in range(STEPS):
            x, mask = _data(h, step)
            xs = shard_tensor(x, m, 2).detach().requires_grad_(True)
            ms = shard_tensor(mask, m, 2)
            for mod in (chain, other):
                mod.zero_grad(set_to_none=True)
            with comm_stats() as st:
                ya, yb = chain(xs), other(xs, ms, step == STEPS - 1)
                ramp = shard_tensor(torch.linspace(-1, 1, yb.shape[2], dtype=yb.dtype).view(1, 1, -1, 1), m, 2)
                (ya.square().sum() + (yb * ramp).sum()).backward()
            grads, buffers = {}, {}
            for k, mod in (("a", chain), ("b", other)):
                for n, p in mod.named_parameters():
                    g = p.grad
                    if isinstance(g, DTensor):
                        g = g.full_tensor()
                    grads[f"{k}.{n}"] = g.clone()
                for n, t in mod.named_buffers():
                    buffers[f"{k}.{n}"] = (t.full_tensor() if isinstance(t, DTensor) else t).clone()
            out.append(
                {
                    "ya": ya.detach().full_tensor(),
                    "yb": yb.detach().full_tensor(),
                    "gx": xs.grad.full_tensor(),
                    "grads": grads,
                    "buffers": buffers,
                    "rounds": st.messages and (st.collectives, st.messages),
                    "sent": st.sent_bytes,
                    "norm_bytes": {k: v.sent_bytes for k, v in st.by_op.items()},
                }
            )
        return out
    finally:
        fold.ENABLED = True
        forget_groups()


def _close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    err = (a - b).abs().max().item() / max(b.abs().max().item(), 1.0)
    assert err < TOL, f"{what}: relative error {err:.3e}"


@pytest.mark.parametrize("world,h", [(2, 12), (3, 13), (4, 9), (4, 3)])
def test_folded_steps_equal_one_device(world: int, h: int) -> None:
    ref = _reference(h)
    for folding in (True, False):
        results = harness.get_world(world).run(task_fold, h, folding)
        for rank, res in enumerate(results):
            for step, (got, want) in enumerate(zip(res, ref)):
                where = f"rank {rank} step {step} folding={folding}"
                for k in ("ya", "yb", "gx"):
                    _close(got[k], want[k], f"{where} {k}")
                assert got["grads"].keys() == want["grads"].keys()
                for n in want["grads"]:
                    _close(got["grads"][n], want["grads"][n], f"{where} grad {n}")
                for n in want["buffers"]:
                    _close(got["buffers"][n].double(), want["buffers"][n].double(), f"{where} buffer {n}")


def _p2p_rounds(res: dict) -> int:
    return res["rounds"][1] if res["rounds"] else 0


def test_folding_removes_rounds_not_bytes() -> None:
    """Two ranks: in a folded step every fold spares the norm's collective each way and sends no
    more bytes (the norm sends the rows the convolution would have sent, in one message with its
    statistics). A carry made stale costs its rows' bytes (and the usual exchange), nothing else."""
    on = harness.get_world(2).run(task_fold, 12, True)
    off = harness.get_world(2).run(task_fold, 12, False)
    for a, b in zip(on, off):
        assert [s["sent"] for s in b] == [b[0]["sent"]] * STEPS
        assert a[0]["sent"] == b[0]["sent"] and a[0]["rounds"] == b[0]["rounds"]  # probing: the usual path
        # step 1 folds six norms (Chain's four, Untouched's bn0 -> c1 and bn1 -> c3): the six
        # statistics collectives of forward and backward ride in the halo messages
        assert a[1]["rounds"] == (b[1]["rounds"][0] - 12, b[1]["rounds"][1])
        # the same bytes, but for c4's rows: its norm sends them before the pad of W (6 columns),
        # the convolution after it (9): 4 rows x 2 x 4 channels x 3 columns of fp64, each way
        assert a[1]["sent"] == b[1]["sent"] - 2 * (4 * 2 * 4 * 3 * 8)
        # step 2 changes bn1's output in place: c3 exchanges its own halo (2 more messages) and
        # bn1's borrowed rows (2 x 4 x 1 x 6 fp64, each way) are spent for nothing
        assert a[2]["rounds"] == (b[2]["rounds"][0] - 12, b[2]["rounds"][1] + 2)
        assert a[2]["sent"] == a[1]["sent"] + 2 * (2 * 4 * 1 * 6 * 8)


# --- residual blocks: a sum of two norms' outputs carries their summed rows -----------------------


class _Block(nn.Module):
    """ResNet's basic block; ``inplace``: torchvision's form (``out += identity``, in-place ReLU)."""

    def __init__(self, cin: int, cout: int, inplace: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = None if cin == cout else nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.inplace = inplace

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        sc = x if self.short is None else self.short(x)
        if self.inplace:
            y += sc
            return F.relu(y, inplace=True)
        return F.relu(y + sc)


class Residual(nn.Module):
    """Four blocks: ``a`` adds the stem's carried output to ``bn2``'s (same convolution next: both
    fold), ``b`` adds two norms in place (projected shortcut), ``c`` adds ``b``'s carried output in
    place, ``d`` meets a strided head, for which the identity carries no rows: ``d.bn2`` must not
    borrow rows it could not use."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.a, self.b = _Block(4, 4, inplace=False), _Block(4, 6, inplace=True)
        self.c, self.d = _Block(6, 6, inplace=True), _Block(6, 6, inplace=False)
        self.head = nn.Conv2d(6, 2, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn(self.stem(x)))
        return self.head(self.d(self.c(self.b(self.a(y)))))


def task_counted(name: str, h: int, folding: str) -> dict:
    """Three steps (probe, agree, folded) of :class:`Residual` or :class:`Pooled` against the
    one-device model, computed here: mismatches (max-pool indices included), ``(collectives,
    messages, bytes)`` per step and the norms' decisions. ``folding``: ``off``, ``on`` (the
    default) or ``rounds``."""
    from credit_dtensor import comm_stats, convert_to_domain_parallel, shard_tensor
    from credit_dtensor.comm import forget_groups
    from credit_dtensor.ops import fold

    forget_groups()
    fold.ENABLED, fold.ROUNDS = folding != "off", folding == "rounds"
    try:
        m = harness.manager()
        cls = {"residual": Residual, "pooled": Pooled}[name]
        torch.manual_seed(3)
        ref = _affine(cls().double())
        dist_model = convert_to_domain_parallel(cls().double(), m)
        dist_model.load_state_dict(ref.state_dict())
        problems, counts = [], []
        for step in range(STEPS):
            g = torch.Generator().manual_seed(step)
            x = torch.randn(2, 3, h, 6, generator=g, dtype=torch.float64)
            xr = x.clone().requires_grad_(True)
            xs = shard_tensor(x, m, 2).detach().requires_grad_(True)
            yr, ir = _with_indices(ref(xr))
            w = torch.randn(yr.shape, generator=g, dtype=torch.float64)
            (yr * w).sum().backward()
            ws = shard_tensor(w, m, 2)
            with comm_stats() as st:
                ys, idx = _with_indices(dist_model(xs))
                (ys * ws).sum().backward()
            counts.append((st.collectives, st.messages, st.sent_bytes))
            if ir is not None and not torch.equal(idx.full_tensor(), ir):
                problems.append(f"step {step}: max-pool indices differ")
            problems += _mismatches(f"step {step}", (ys, xs, dist_model), (yr.detach(), xr, ref))
            for (n, a), (_, b) in zip(dist_model.named_buffers(), ref.named_buffers()):
                if b.is_floating_point() and (a - b).abs().max().item() > TOL * max(b.abs().max().item(), 1.0):
                    problems.append(f"step {step} buffer {n}")
        decided = [e.conv is not None for _, e in fold._STATE.values() if e.decided]
        return {"problems": problems, "counts": counts, "decided": decided}
    finally:
        fold.ENABLED, fold.ROUNDS = True, False
        forget_groups()


def _with_indices(out):
    return out if isinstance(out, tuple) else (out, None)


@pytest.mark.parametrize("world,h", [(2, 12), (3, 13), (4, 9)])
def test_residual_sums_equal_one_device(world: int, h: int) -> None:
    for folding in ("on", "rounds", "off"):
        for rank, res in enumerate(harness.get_world(world).run(task_counted, "residual", h, folding)):
            assert not res["problems"], f"rank {rank} folding={folding}:\n" + "\n".join(res["problems"][:10])


@pytest.mark.parametrize("folding,norms,convs,extra_rows", [("on", 6, 6, 0), ("rounds", 9, 8, 1)])
def test_residual_rounds(folding: str, norms: int, convs: int, extra_rows: int) -> None:
    """Two ranks, folded steps. By default six norms borrow rows and six convolutions post nothing,
    with the same bytes: the stem's and ``a.bn1``/``a.bn2``'s rows (``a.bn2`` summed with the stem's
    rows that ``y`` still carries), ``b.bn1``, ``c.bn1``, ``d.bn1``. Block ``b``'s two norms would
    each send rows for ``c.conv1`` (more bytes than its exchange), so they, and ``c.bn2`` whose sum
    needs theirs, do not; ``d.bn2``'s first reader is the strided head, for which the identity
    carries no rows. With ``rounds`` nine norms borrow (all but ``d.bn2``), eight convolutions post
    nothing, and block ``b`` sends one row of 2 x 6 x 6 fp64 more each way. Each direction: a
    norm's collective becomes its message, a convolution's message goes."""
    run = harness.get_world(2).run
    for on, off in zip(run(task_counted, "residual", 12, folding), run(task_counted, "residual", 12, "off")):
        assert sorted(on["decided"]) == [False] * (10 - norms) + [True] * norms
        assert on["counts"][0] == off["counts"][0]  # probing: the usual path
        for step in (1, 2):
            (c_on, m_on, b_on), (c_off, m_off, b_off) = on["counts"][step], off["counts"][step]
            assert (c_on, m_on) == (c_off - 2 * norms, m_off + 2 * (norms - convs))
            assert b_on == b_off + extra_rows * 2 * (2 * 6 * 1 * 6 * 8)


# --- max pooling reads a norm's borrowed rows too (ResNet's stem) -----------------------------------


class Pooled(nn.Module):
    """``bn0 -> relu -> max_pool(3, 2, 1)`` (ResNet's stem), a pool with indices after ``bn1``, and
    a pool without a halo (kernel = stride) after ``bn2``, which must not fold."""

    def __init__(self) -> None:
        super().__init__()
        self.c0, self.bn0 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.c1, self.bn1 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.bn2, self.c2 = nn.BatchNorm2d(4), nn.Conv2d(4, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.pool(F.relu(self.bn0(self.c0(x))))
        y, idx = F.max_pool2d(F.relu(self.bn1(self.c1(y))), (3, 2), 1, (1, 0), return_indices=True)
        return self.c2(F.max_pool2d(self.bn2(y), 2, 2)), idx


@pytest.mark.parametrize("world,h", [(2, 12), (3, 13), (4, 9)])
def test_pooled_equal_one_device(world: int, h: int) -> None:
    for folding in ("on", "off"):
        for rank, res in enumerate(harness.get_world(world).run(task_counted, "pooled", h, folding)):
            assert not res["problems"], f"rank {rank} folding={folding}:\n" + "\n".join(res["problems"][:10])
            if folding == "on":
                assert res["decided"] == [True, True, False]  # bn0, bn1 (pools with a halo); bn2 not


def test_pooled_rounds() -> None:
    """Two ranks: the two pools with a halo post nothing, the same bytes move. Each rank's four
    norm collectives (two norms, two directions) become one message each, and the pools' messages
    go: the stem pool's halo runs one way (rank 1 reads rank 0's last row; its gradient returns),
    the other pool's both ways, so each rank sent three pool messages and now one more."""
    run = harness.get_world(2).run
    for on, off in zip(run(task_counted, "pooled", 12, "on"), run(task_counted, "pooled", 12, "off")):
        assert on["counts"][0] == off["counts"][0]
        for step in (1, 2):
            (c_on, m_on, b_on), (c_off, m_off, b_off) = on["counts"][step], off["counts"][step]
            assert (c_on, m_on, b_on) == (c_off - 4, m_off + 1, b_off)


def _three_steps(where: str, ref: nn.Module, dist_model: nn.Module, h: int, forward) -> list[str]:
    """Probe, agree, folded: ``forward(model, x)`` of a ``(2, 2, h, 5)`` input, each step's output
    and gradients against the one-device model (:func:`_mismatches`)."""
    from credit_dtensor import shard_tensor

    m = harness.manager()
    problems = []
    for step in range(STEPS):
        g = torch.Generator().manual_seed(step)
        x = torch.randn(2, 2, h, 5, generator=g, dtype=torch.float64)
        xr = x.clone().requires_grad_(True)
        xs = shard_tensor(x, m, 2).detach().requires_grad_(True)
        yr, ys = forward(ref, xr), forward(dist_model, xs)
        w = torch.randn(yr.shape, generator=g, dtype=torch.float64)
        (yr * w).sum().backward()
        (ys * shard_tensor(w, m, 2)).sum().backward()
        problems += _mismatches(f"{where} step {step}", (ys, xs, dist_model), (yr, xr, ref))
    return problems


#: hypothesis over distributed runs: no shrinking (every example runs on several worlds, and a
#: failure names its case), no deadline, the same examples every run
_DISTRIBUTED = dict(
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
)


# --- property: any elementwise op of two carried norm outputs before any convolution --------------


_BINARY = {
    "add": lambda a, b: a + b,
    "sub_alpha": lambda a, b: torch.sub(a, b, alpha=0.5),
    "mul": lambda a, b: a * b,
    "maximum": torch.maximum,
    "iadd": lambda a, b: a.add_(b),
    "isub_self": lambda a, b: a.sub_(a * 0.5),  # one norm's rows twice
}


@st.composite
def pair_case(draw) -> dict:
    """A convolution with a halo along H (kernel >= 2 there) after the op of two norms' outputs."""
    k, stride, dilation = draw(st.integers(2, 4)), draw(st.integers(1, 2)), draw(st.integers(1, 2))
    span = dilation * (k - 1) + 1
    pad = draw(st.integers(0 if span > stride else 1, dilation * (k - 1)))  # else no halo: nothing to fold
    case = {
        "norm": draw(st.sampled_from(["batch", "group", "instance"])),
        "conv": dict(kernel_size=(k, 3), stride=(stride, 1), dilation=(dilation, 1), padding=(pad, 1)),
        "mode": draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"])),
        "transposed": False,
        "h": draw(st.integers(max(pad + 1, dilation * (k - 1) + 1 - 2 * pad, 1), 14)),
    }
    case["op"] = draw(st.sampled_from(sorted(_BINARY)))
    case["act2"] = draw(st.sampled_from(["relu", "scale", "leaky"]))
    case["norm2"] = draw(st.sampled_from(["batch", "group", "instance"]))
    return case


def _pair_model(case: dict) -> nn.Module:
    m = _chain_model(case)
    torch.manual_seed(case["h"] + 1)
    norm = {"batch": nn.BatchNorm2d(4), "group": nn.GroupNorm(2, 4), "instance": nn.InstanceNorm2d(4, affine=True)}
    m["pre2"], m["norm2"] = nn.Conv2d(2, 4, 1).double(), _affine(norm[case["norm2"]].double())
    return m


def _pair_forward(m: nn.Module, x: torch.Tensor, case: dict) -> torch.Tensor:
    act = {"relu": F.relu, "scale": lambda t: t * 0.5 - 1.0, "leaky": lambda t: F.leaky_relu(t, 0.2)}
    a = F.relu(m["norm"](m["pre"](x))) * 1.0  # (relu's saved output is not the one added to in place)
    b = act[case["act2"]](m["norm2"](m["pre2"](x)))
    return m["conv"](_BINARY[case["op"]](a, b))


def task_pairs(cases: list[dict], rounds: bool) -> list[str]:
    """Each case: three steps against the one-device model; with ``rounds`` both norms must fold
    (their rows combined by the op), by default neither (two row sets for one convolution)."""
    from credit_dtensor import convert_to_domain_parallel
    from credit_dtensor.ops import fold

    m = harness.manager()
    problems = []
    fold.ROUNDS = rounds
    try:
        for case in cases:
            fold._STATE.clear()
            ref, dist_model = _pair_model(case), convert_to_domain_parallel(_pair_model(case), m)
            problems += _three_steps(
                f"{case}", ref, dist_model, case["h"], lambda mod, x, c=case: _pair_forward(mod, x, c)
            )
            # [norm, norm2] (insertion order): with ``rounds`` both borrow, by default neither;
            # after ``isub_self`` (norm2's output unused) the first alone, in either mode
            decided = [e.conv is not None for _, e in fold._STATE.values() if e.decided]
            want = [True, False] if case["op"] == "isub_self" else [rounds, rounds]
            if m.domain_world_size > 1 and decided != want:
                problems.append(f"{case}: decisions {decided}, expected {want}")
    finally:
        fold.ROUNDS = False
    return problems


@settings(max_examples=4, **_DISTRIBUTED)
@given(cases=st.lists(pair_case(), min_size=4, max_size=4))
def test_property_pairs(cases: list[dict]) -> None:
    for world, rounds in ((2, True), (3, True), (4, False)):
        problems = [p for rank in harness.get_world(world).run(task_pairs, cases, rounds) for p in rank]
        assert not problems, f"world {world} rounds={rounds}:\n" + "\n".join(problems[:10])


# --- property: any convolution after any channel norm and elementwise chain ------------------------


@st.composite
def chain_case(draw) -> dict:
    transposed = draw(st.booleans())
    k = draw(st.integers(1, 5))
    stride = draw(st.integers(1, 2))
    dilation = draw(st.integers(1, 2))
    pad = draw(st.integers(0, dilation * (k - 1)))
    mode = "zeros" if transposed else draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
    h = draw(st.integers(max(pad + 1, dilation * (k - 1) + 1 - 2 * pad, 1), 14))
    return {
        "norm": draw(st.sampled_from(["batch", "group", "instance"])),
        "act": draw(st.sampled_from(["relu", "silu_", "scale", "leaky", "pad_w"])),
        "conv": dict(kernel_size=(k, 3), stride=(stride, 1), dilation=(dilation, 1), padding=(pad, 1)),
        "mode": mode,
        "transposed": transposed,
        "h": h,
    }


def _chain_model(case: dict) -> nn.Module:
    torch.manual_seed(case["h"])
    norm = {"batch": nn.BatchNorm2d(4), "group": nn.GroupNorm(2, 4), "instance": nn.InstanceNorm2d(4, affine=True)}
    if case["transposed"]:
        conv = nn.ConvTranspose2d(4, 3, **case["conv"])
    else:
        conv = nn.Conv2d(4, 3, padding_mode=case["mode"], **case["conv"])
    return _affine(nn.ModuleDict({"pre": nn.Conv2d(2, 4, 1), "norm": norm[case["norm"]], "conv": conv}).double())


def _chain_forward(m: nn.Module, x: torch.Tensor, act: str) -> torch.Tensor:
    y = m["norm"](m["pre"](x))
    y = {
        "relu": lambda t: F.relu(t),
        "silu_": lambda t: F.silu(t, inplace=True),
        "scale": lambda t: t * 0.5 - 1.0,
        "leaky": lambda t: F.leaky_relu(t, 0.2),
        "pad_w": lambda t: F.pad(F.relu(t), (1, 2, 0, 0), mode="circular"),
    }[act](y)
    return m["conv"](y)


def _mismatches(where: str, sharded: tuple, one: tuple) -> list[str]:
    """Output, input gradient and parameter gradients of a step, ``(y, x, model)`` sharded against
    one device, to ``TOL``; the models' gradients are cleared for the next step."""
    from torch.distributed.tensor import DTensor

    (ys, xs, dist_model), (yr, xr, ref) = sharded, one
    pairs = [("y", ys.detach().full_tensor(), yr), ("dx", xs.grad.full_tensor(), xr.grad)]
    for (n, p), (_, q) in zip(dist_model.named_parameters(), ref.named_parameters()):
        pairs.append((n, p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad, q.grad))
    out = []
    for n, got, want in pairs:
        if got is None or want is None:  # a parameter the step does not reach
            if (got is None) != (want is None):
                out.append(f"{where} {n}: gradient {got is not None} against {want is not None} on one device")
            continue
        err = (got - want).abs().max().item() / max(want.abs().max().item(), 1.0)
        if not err < TOL:
            out.append(f"{where} {n}: relative error {err:.2e}")
    for mod in (ref, dist_model):
        mod.zero_grad(set_to_none=True)
    return out


def task_chains(cases: list[dict]) -> list[str]:
    """Each case: three steps (probe, agree, folded) against the one-device model, computed here."""

    from credit_dtensor import convert_to_domain_parallel
    from credit_dtensor.ops import fold

    m = harness.manager()
    problems = []
    for case in cases:
        fold._STATE.clear()
        ref, dist_model = _chain_model(case), convert_to_domain_parallel(_chain_model(case), m)
        problems += _three_steps(
            f"{case}", ref, dist_model, case["h"], lambda mod, x, c=case: _chain_forward(mod, x, c["act"])
        )
        decided = [e.conv for _, e in fold._STATE.values() if e.decided]
        if m.domain_world_size > 1 and not decided:
            problems.append(f"{case}: the norm never decided")
    return problems


@settings(max_examples=6, **_DISTRIBUTED)
@given(cases=st.lists(chain_case(), min_size=5, max_size=5))
def test_property_chains(cases: list[dict]) -> None:
    for world in (2, 3, 4):
        problems = [p for rank in harness.get_world(world).run(task_chains, cases) for p in rank]
        assert not problems, f"world {world}:\n" + "\n".join(problems[:10])


# --- activation checkpointing: the recomputation must save what the forward saved -----------------


class Checkpointed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c0 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(4)  # outside the checkpoint, its consumer inside
        self.c1 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)  # inside the checkpoint, with its consumer
        self.c2 = nn.Conv2d(4, 2, 3, padding=1)

    def inner(self, a: torch.Tensor) -> torch.Tensor:
        return self.c2(F.relu(self.bn1(self.c1(a))))

    def forward(self, x: torch.Tensor, reentrant: bool) -> torch.Tensor:
        from torch.utils.checkpoint import checkpoint

        return checkpoint(self.inner, F.relu(self.bn0(self.c0(x))), use_reentrant=reentrant)


def task_checkpoint(h: int) -> list[str]:

    from credit_dtensor import convert_to_domain_parallel, shard_tensor
    from credit_dtensor.ops import fold

    m = harness.manager()
    problems = []
    for reentrant in (False, True):
        fold._STATE.clear()
        torch.manual_seed(1)
        ref = _affine(Checkpointed().double())
        dist_model = convert_to_domain_parallel(Checkpointed().double(), m)
        dist_model.load_state_dict(ref.state_dict())
        for step in range(4):
            x = torch.randn(2, 3, h, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(step))
            xr = x.clone().requires_grad_(True)
            xs = shard_tensor(x, m, 2).detach().requires_grad_(True)
            yr, ys = ref(xr, reentrant), dist_model(xs, reentrant)
            yr.square().sum().backward()
            ys.square().sum().backward()
            problems += _mismatches(f"reentrant={reentrant} step {step}", (ys, xs, dist_model), (yr, xr, ref))
    return problems


@pytest.mark.parametrize("world,h", [(2, 10), (3, 13)])
def test_checkpointed_chains(world: int, h: int) -> None:
    problems = [p for rank in harness.get_world(world).run(task_checkpoint, h) for p in rank]
    assert not problems, "\n".join(problems[:10])


def task_random_activation(h: int) -> list:
    """``norm -> rrelu (training) -> conv``: the borrowing rank would draw other slopes than the rows'
    owner, so the probe must not pass the activation (the convolution exchanges its own halo)."""
    from credit_dtensor import convert_to_domain_parallel, shard_tensor
    from credit_dtensor.ops import fold

    m = harness.manager()
    fold._STATE.clear()
    torch.manual_seed(0)
    model = convert_to_domain_parallel(nn.ModuleDict({"bn": nn.BatchNorm2d(3), "c": nn.Conv2d(3, 2, 3, padding=1)}), m)
    for _ in range(STEPS):
        x = shard_tensor(torch.randn(2, 3, h, 4), m, 2)
        model["c"](F.rrelu(model["bn"](x), training=True)).sum().backward()
    return [(e.decided, e.conv) for _, e in fold._STATE.values()]


def test_random_activation_does_not_carry() -> None:
    for rank in harness.get_world(2).run(task_random_activation, 10):
        assert rank == [(True, None)]
