"""Converter, audit, parity check and their CLI.

Unit tests (no processes): the registry, ``_replace_module``, ``validate_sharding_constraints``,
the audit's rules and hazards, ``credit-dtensor plan``. Distributed tests batch many checks into
one ``World.run`` per world size: parameters/buffers replicated, state_dict in both directions,
idempotence, custom converters, bad input, parametrizations and hooks, explicit padding modules,
Linear and shard-local wrappers, tied weights, and ``check`` finding the first diverging layer.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from credit_dtensor._torch_versions import at_least
from credit_dtensor.audit import plan
from credit_dtensor.convert import (
    _replace_module,
    converter_for,
    register_converter,
    validate_sharding_constraints,
)
from credit_dtensor.models import crossformer, pangu, unet
from credit_dtensor.models.crossformer import WindowAttention
from tests.harness import get_world, manager
from tests.parity import assert_parity, parity

# ---------------------------------------------------------------------------------------------
# Small models used by several tests (module-level: tasks are pickled by reference)
# ---------------------------------------------------------------------------------------------


class Mixed(nn.Module):
    """Halo conv, 1x1 conv, GroupNorm, LayerNorm over channels, Linear over channels, a buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.point = nn.Conv2d(4, 4, 1)
        self.norm = nn.GroupNorm(2, 4)
        self.ln = nn.LayerNorm(4)
        self.fc = nn.Linear(4, 4)
        self.register_buffer("scale", torch.tensor([1.0, 2.0, 3.0, 4.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.point(self.conv(x)))
        y = self.fc(self.ln(y.permute(0, 2, 3, 1))) * self.scale
        return y.permute(0, 3, 1, 2)


class PadConvs(nn.Module):
    """Explicit padding modules in front of padding=0 convs (CrossFormer / periodic-conv style)."""

    def __init__(self) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            [
                nn.Sequential(nn.ZeroPad2d((1, 2, 3, 0)), nn.Conv2d(2, 2, (4, 4), stride=(2, 1))),
                nn.Sequential(nn.ReflectionPad2d((1, 1, 2, 2)), nn.Conv2d(2, 2, 5, stride=(2, 1), padding=(0, 1))),
                nn.Sequential(nn.ReplicationPad2d((0, 0, 1, 2)), nn.Conv2d(2, 2, (4, 1), stride=(2, 1))),
                nn.Sequential(nn.CircularPad2d((1, 1, 1, 1)), nn.Conv2d(2, 2, 3, stride=(2, 1))),
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([b(x) for b in self.branches], dim=1)


class Reparam(nn.Module):
    """Weight norm and spectral norm (parametrizations and the older hook API), a user pre-hook."""

    def __init__(self) -> None:
        super().__init__()
        P = nn.utils.parametrizations
        self.a = P.weight_norm(nn.Conv2d(2, 3, 3, padding=1))
        self.b = P.spectral_norm(nn.Conv2d(3, 3, 3, padding=1))
        self.c = nn.utils.spectral_norm(nn.Conv2d(3, 2, 3, padding=1))
        self.d = nn.Conv2d(2, 2, 3, padding=1)
        self.d.register_forward_pre_hook(_double_input)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.d(self.c(self.b(self.a(x))))


class ConvThenTanh(nn.Conv2d):
    """A subclass whose forward adds to its torch class's (calls ``super().forward``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(super().forward(x))


class StandardizedConv(nn.Conv2d):
    """Weight standardization in ``_conv_forward`` (timm's ``StdConv2d`` idea)."""

    def _conv_forward(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return super()._conv_forward(x, w, b)


class SameConv(nn.Conv2d):
    """TensorFlow "same" padding from the input's size, then a padding-0 strided conv (timm's Conv2dSame)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s in zip(x.shape[-2:], self.kernel_size, self.stride):
            total = max((-(-size // s) - 1) * s + k - size, 0)
            pads = [total // 2, total - total // 2, *pads]
        return F.conv2d(F.pad(x, pads), self.weight, self.bias, self.stride)


class SameMaxPool(nn.MaxPool2d):
    """A "same"-padded max pool: pads with -inf first (timm's MaxPool2dSame)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(F.pad(x, (0, 1, 0, 1), value=-float("inf")), self.kernel_size, self.stride)


class NormAct(nn.BatchNorm2d):
    """Batch norm and its activation in one forward (timm's BatchNormAct2d)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training, 0.1, self.eps)
        return F.relu(y)


class GroupNormAct(nn.GroupNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps))


class InitOnlyConv(nn.Conv2d):
    """Redefines nothing a forward uses: still wrapped."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.tag = "mine"


class Eca(nn.Module):
    """timm's ECA attention: a 1-D conv over the pooled channel vector of a 2-D field (not over H)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, 1, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x.mean((2, 3)).unsqueeze(1)).squeeze(1)
        return x * torch.sigmoid(y)[:, :, None, None]


class Subclassed(nn.Module):
    """Subclasses of converted torch classes that redefine their forward (or a method it calls), and
    a 1-D conv over channels in a 2-D model (converted with the default ``shard_dim=-2``)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            ConvThenTanh(2, 4, 3, padding=1),
            NormAct(4),
            StandardizedConv(4, 4, 3, padding=1),
            GroupNormAct(2, 4),
            SameConv(4, 4, 3, stride=2),
            SameMaxPool(3, 1),
            Eca(),
            InitOnlyConv(4, 3, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _double_input(module: nn.Module, args: tuple) -> tuple:
    return (args[0] * 2,)


class Resampling(nn.Module):
    """Pooling down-path and Upsample / pixel-shuffle up-path modules (the resample family)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1),
            nn.MaxPool2d(2),
            nn.AvgPool2d(3, stride=1, padding=1),
            nn.Upsample(scale_factor=2, mode="bilinear"),
            nn.PixelUnshuffle(2),
            nn.PixelShuffle(2),
            nn.Conv2d(4, 2, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Conv2d(2, 2, 3, padding=1)
        self.dec = nn.Conv2d(2, 2, 3, padding=1)
        self.dec.weight = self.enc.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dec(torch.tanh(self.enc(x)))


class NotRowLocal(nn.Module):
    """Pretends to be shard-local but halves the rows."""

    window_size = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, ::2]


class LocalConv(nn.Module):
    """A wrong custom converter's result: a 3x3 conv on each shard with zero padding at shard edges."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, x):
        from credit_dtensor.dtensor import wrap_shard as wrap_local

        y = self.conv(x.to_local())
        shape = (x.shape[0], y.shape[1], x.shape[2], y.shape[3])
        return wrap_local(y, x.device_mesh, 2, shape)


class Marker(nn.Module):
    """Custom-converter result that keeps the original module inside it."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)


# ---------------------------------------------------------------------------------------------
# Unit tests
# ---------------------------------------------------------------------------------------------


def test_registry_families():
    fam = {
        nn.Conv2d(2, 2, 3): "conv",
        nn.ConvTranspose3d(2, 2, 2): "conv",
        nn.GroupNorm(1, 2): "norm",
        nn.ZeroPad2d(1): "pad",
        nn.CircularPad3d(1): "pad",
        nn.Linear(2, 2): "linear",
        WindowAttention(4, 2, (1, 2)): "models",
    }
    for mod, family in fam.items():
        conv = converter_for(mod)
        assert conv is not None and conv.family == family, (mod, conv)
    assert converter_for(nn.GELU()) is None
    assert not converter_for(nn.Conv2d(2, 2, 1)).applies(nn.Conv2d(2, 2, 1))  # 1x1: left local
    assert converter_for(nn.Conv2d(2, 2, 3, padding=1)).applies(nn.Conv2d(2, 2, 3, padding=1))
    assert not converter_for(nn.LayerNorm(4)).applies(nn.LayerNorm(4))  # over channels: local


def test_registry_user_registration_wins():
    class MyConv(nn.Conv2d):
        pass

    def factory(module, manager):
        return module

    register_converter(MyConv, factory, family="mine")
    assert converter_for(MyConv(2, 2, 3)).family == "mine"
    assert converter_for(nn.Conv2d(2, 2, 3)).family == "conv"  # the base class is unaffected


def test_replace_module_dotted():
    model = nn.Sequential(nn.Sequential(nn.Linear(2, 2), nn.ReLU()), nn.Linear(2, 2))
    new = nn.Tanh()
    _replace_module(model, "0.1", new)
    assert model[0][1] is new
    _replace_module(model, "1", nn.Identity())
    assert isinstance(model[1], nn.Identity)


def test_validate_sharding_constraints_reads_strides():
    model = crossformer(windows=((2, 4), (2, 2)))  # strides 4 then 2
    assert validate_sharding_constraints(model, 16) == []  # 16/4=4, 16/8=2: multiples of 2
    warns = validate_sharding_constraints(model, 8)  # 8/8 = 1 < 2 at stage 1
    assert warns and all("stages.1" in w for w in warns) and "smaller than the window height 2" in warns[0]
    assert any("not divisible" in w for w in validate_sharding_constraints(model, 12))  # 12/8 not integer
    # original API: window size per level, levels read from the model's down-sampling
    assert validate_sharding_constraints(model, 24, window_sizes=[3, 3]) == []
    warns = validate_sharding_constraints(model, 24, window_sizes=[2, 2])  # level 1: 24/8 = 3
    assert len(warns) == 1 and warns[0].startswith("level 1")
    assert "extra entries" in validate_sharding_constraints(model, 16, window_sizes=[2, 2, 2])[0]


def test_plan_models_ok_and_rules():
    p = plan(unet(), 3, (1, 3, 26, 16))
    assert p.ok and not p.hazards, p
    assert p.row("inc.conv1.conv").rule == "halo" and p.row("inc.conv1.conv").halo == (1, 1)
    assert p.row("inc.norm1").rule == "distributed stats"
    assert p.row("inc.conv1.wrap").rule == "re-chunk"
    assert p.row("head").rule == "local"
    assert p.row("up1").rule == "halo"  # ConvTranspose2d, output_size taken from the traced shapes
    c = plan(crossformer(), 4, (1, 3, 32, 16))
    assert c.ok and not c.hazards
    assert c.row("stages.0.blocks.0.attn").rule == "shard-local"
    assert c.row("stages.0.blocks.0.mlp.0").rule == "local"
    assert c.row("stages.0.embed.branches.1.1").halo == (3, 3)
    g = plan(pangu(grid=(2, 26, 16)), 3, (1, 3, 2, 26, 16))
    assert g.ok and not g.hazards
    assert g.row("embed").rule == "halo"  # patch embedding on shards that are not stride-aligned
    assert "not stride-aligned" in " ".join(g.row("embed").notes)
    assert "CrossFormer" in str(c) and "shard-local" in str(c)


def test_plan_flags_hazards():
    lda = plan(crossformer(lda_over_h=True), 2, (1, 3, 32, 16))
    # the window split is exact (reshape rules) and the attention over H tokens too (the operands are
    # re-laid out onto a batch dim): notes, no hazard
    assert not lda.hazards, lda.hazards
    notes = " ".join(n for r in lda.rows for n in r.notes)
    assert "splits H" in notes and "attention over H" in notes, notes
    shifted = plan(pangu(shift=True), 2, (1, 3, 2, 32, 16))  # torch.roll along H: exact now, a note
    assert not [h for _, h in shifted.hazards if "roll" in h]
    assert any("torch.roll along H" in n for r in shifted.rows for n in r.notes)
    fpad = plan(unet(functional_pad=True), 2, (1, 3, 32, 16))  # functional circular pad: exact now
    assert not [h for _, h in fpad.hazards if "F.pad" in h]
    assert any("F.pad(mode='circular')" in n for r in fpad.rows for n in r.notes)


class _Hazards(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.over_h = nn.Linear(8, 8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.mha = nn.MultiheadAttention(2, 1, batch_first=True)

    def forward(self, x):
        a = self.over_h(x.transpose(2, 3))  # Linear on H
        b = x[:, :, 1]  # one row of H
        tokens = x.flatten(2).transpose(1, 2)  # (B, H*W, C)
        c = self.mha(tokens, tokens, tokens)[0]
        d = x.softmax(dim=2)
        return a.sum() + b.sum() + c.sum() + d.sum() + self.pool(x).sum() + x.mean()


def test_plan_hazard_catalogue():
    p = plan(_Hazards(), 2, (1, 2, 8, 4))
    by = {}
    for path, h in p.hazards:
        by.setdefault(path, []).append(h)
    assert "over_h" not in by  # Linear over H: the shards move to another dim first (a note)
    root = " ".join(by.get("", []))
    assert "softmax over H" not in root, root  # exact: per-row statistics over the ranks (a note)
    assert "indexing H" not in root  # one row: broadcast from its owner (a note)
    assert "merges H" not in root  # flatten(2) keeps H outermost: exact through the reshape rules
    assert any("MultiheadAttention" in h for h in by["mha"])
    # exact now (one all-reduce; Replicate result): notes, not hazards
    assert "pool" not in by and "mean over H" not in root
    notes = " ".join(n for r in p.rows for n in r.notes)
    assert "global pooling over H" in notes and "mean over H: exact" in notes
    assert "Linear over the sharded dim: exact" in notes and "indexing H with 1: exact" in notes
    assert "softmax over H: exact" in notes


class _Refused(nn.Module):
    def forward(self, x):
        patches = F.unfold(x, 3, padding=1)  # refused on H shards: flagged by plan
        windows = x.unfold(2, 2, 2)  # Tensor.unfold along H: exact (same name, other function)
        return patches.sum() + windows.sum()


def test_plan_reads_refusals_from_the_descriptors():
    p = plan(_Refused(), 2, (1, 2, 8, 4))
    hazards = " ".join(h for _, h in p.hazards)
    assert "unfold on an H-sharded tensor is refused (patches flatten (H, W) into one dim)" in hazards, hazards
    assert hazards.count("refused") == 1, hazards


def test_plan_window_constraint_error_names_the_fix():
    p = plan(crossformer(windows=((2, 4), (2, 2))), 4, (1, 3, 32, 16))
    assert not p.ok and p.max_domain == 2
    assert p.row("stages.1.blocks.0.attn").errors
    assert "use at most 2 domain ranks" in p.errors[-1]
    assert plan(crossformer(windows=((2, 4), (2, 2))), 2, (1, 3, 32, 16)).ok


def test_plan_sync_batchnorm_is_an_error():
    p = plan(nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.SyncBatchNorm(2)), 2, (2, 2, 8, 8))
    assert not p.ok and p.row("1").rule == "unsupported"


def test_cli_plan(capsys, monkeypatch):
    from credit_dtensor.cli import main

    monkeypatch.setenv("COLUMNS", "200")
    assert main(["plan", "credit_dtensor.models:unet", "--input-shape", "1,3,26,16", "--domain", "3"]) == 0
    assert "distributed stats" in capsys.readouterr().out
    bad = ["plan", "credit_dtensor.models:crossformer", "--input-shape", "1,3,32,16", "--domain", "4"]
    assert main([*bad, "--kwargs", '{"windows": [[2, 4], [2, 2]]}']) == 1
    assert "use at most 2 domain ranks" in capsys.readouterr().out
    assert main(["plan", "no_such_module:f", "--input-shape", "1,3,8,8", "--domain", "2"]) == 2


@pytest.mark.skipif(
    not at_least(2, 13),
    reason="torch 2.11's DTensor lacks sharding rules that the gathered op of tests/gather_model.py needs in "
    "backward: a NotImplementedError, never a wrong value",
)
def test_cli_check_spawns_processes(capsys, monkeypatch):
    from credit_dtensor.cli import main

    monkeypatch.setenv("COLUMNS", "200")
    for k in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    args = ["check", "credit_dtensor.models:unet", "--input-shape", "1,3,11,8", "--domain", "2"]
    assert main([*args, "--kwargs", '{"width": 4}', "--fail-on-gather"]) == 0  # nothing gathered
    out = capsys.readouterr().out
    assert "exact" in out and "gradients: input +" in out
    gathers = ["check", "tests/gather_model.py:build", "--input-shape", "1,3,10,6", "--domain", "2"]
    assert main(gathers) == 0  # exact: gathers are reported, not failures...
    out = capsys.readouterr().out
    assert "implicit all-gather" in out and "torch.sort" in out
    assert main([*gathers, "--fail-on-gather"]) == 1  # ...unless asked to fail on them


# ---------------------------------------------------------------------------------------------
# Distributed tests
# ---------------------------------------------------------------------------------------------


def _state_and_idempotence() -> None:
    from torch.distributed.tensor import DTensor, Replicate

    from credit_dtensor import DomainParallelError, MeshMismatchError
    from credit_dtensor.convert import convert_to_domain_parallel
    from credit_dtensor.nn._base import DomainParallelModule

    m = manager()
    torch.manual_seed(0)
    plain = Mixed().double()
    conv = convert_to_domain_parallel(copy.deepcopy(plain), m)
    for name, p in conv.named_parameters():
        assert isinstance(p, DTensor) and p.placements == (Replicate(),), name
    assert isinstance(conv.scale, DTensor)
    assert isinstance(conv.conv, DomainParallelModule) and not isinstance(conv.point, DomainParallelModule)
    assert conv._dp_conversion == {"Conv2d": 1, "GroupNorm": 1, "Linear": 1}
    # state_dict: same keys, plain tensors, loads both ways
    sd = conv.state_dict()
    assert list(sd) == list(plain.state_dict())
    assert not any(isinstance(v, DTensor) for v in sd.values())
    fresh = Mixed().double()
    fresh.load_state_dict(sd)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, plain.state_dict()[k]), k
    other = Mixed().double()
    conv.load_state_dict(other.state_dict())
    for k, v in conv.state_dict().items():
        assert torch.equal(v, other.state_dict()[k]), k
    assert isinstance(conv.fc.weight, DTensor)
    # idempotent
    before = {n: (type(mod), [id(p) for p in mod.parameters(recurse=False)]) for n, mod in conv.named_modules()}
    assert convert_to_domain_parallel(conv, m) is conv
    after = {n: (type(mod), [id(p) for p in mod.parameters(recurse=False)]) for n, mod in conv.named_modules()}
    assert before == after
    assert conv._dp_conversion == {"Conv2d": 1, "GroupNorm": 1, "Linear": 1}
    # bad input
    with pytest.raises(DomainParallelError, match="shard_dim=-1 is not H"):
        convert_to_domain_parallel(copy.deepcopy(plain), m, shard_dim=-1)
    with pytest.raises(DomainParallelError, match="shard_dim=3 is not H"):
        convert_to_domain_parallel(copy.deepcopy(plain), m, shard_dim=3)
    convert_to_domain_parallel(copy.deepcopy(plain), m, shard_dim=2)  # H counted from the front
    with pytest.raises(DomainParallelError, match="returned int, not an nn.Module"):
        convert_to_domain_parallel(copy.deepcopy(plain), m, custom_converters={nn.GroupNorm: lambda mod: 3})
    with pytest.raises(DomainParallelError, match="SyncBatchNorm"):
        convert_to_domain_parallel(nn.Sequential(nn.SyncBatchNorm(2)), m)
    if m.domain_world_size == 4:
        half = manager(2)  # a (2 x 2) mesh: another domain mesh
        on_other = convert_to_domain_parallel(copy.deepcopy(plain), half)
        with pytest.raises(MeshMismatchError, match="already domain-parallel on mesh"):
            convert_to_domain_parallel(on_other, m)


def _custom_and_logging() -> None:
    from torch.distributed.tensor import DTensor

    from credit_dtensor.convert import convert_to_domain_parallel

    m = manager()
    seen = []

    def wrap_norm(mod):
        seen.append(type(mod).__name__)
        return Marker(mod)

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    log = logging.getLogger("credit_dtensor.convert")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.Sequential(nn.GroupNorm(2, 4), nn.Conv2d(4, 4, 3)))
        out = convert_to_domain_parallel(model, m, custom_converters={nn.Sequential: wrap_norm})
    finally:
        log.removeHandler(handler)
    # the root itself is a Sequential: the custom converter replaced it, nothing else was processed
    assert isinstance(out, Marker) and seen == ["Sequential"]
    assert not any(isinstance(p, DTensor) for p in out.parameters())
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.Sequential(nn.GroupNorm(2, 4), nn.Conv2d(4, 4, 3)))
    custom = {nn.GroupNorm: lambda mod: Marker(mod)}
    out = convert_to_domain_parallel(nn.ModuleDict({"net": model}), m, custom_converters=custom)
    assert isinstance(out.net[1][0], Marker)  # replaced by the custom converter (checked first)
    assert type(out.net[1][0].inner) is nn.GroupNorm  # its descendants were not processed
    assert not isinstance(out.net[1][0].inner.weight, DTensor)
    assert isinstance(out.net[1][1].weight, DTensor)
    text = " ".join(r.getMessage() for r in records)
    assert "Sequential (custom)" in text


def _linear_and_shard_local() -> None:
    from torch.distributed.tensor import DTensor, Replicate

    from credit_dtensor import DomainParallelError, shard_tensor
    from credit_dtensor.convert import convert_to_domain_parallel
    from credit_dtensor.nn.local import shard_local

    m = manager()
    torch.manual_seed(1)
    for h in (13, 7, 2):  # uneven and empty shards: PyTorch's own linear refuses uneven ones
        lin = nn.Linear(5, 3).double()
        ref = copy.deepcopy(lin)
        conv = convert_to_domain_parallel(copy.deepcopy(lin), m)
        x = torch.randn(2, h, 4, 5, dtype=torch.float64)
        errs = parity(
            m,
            ref,
            conv,
            [x],
            shard_dims=[1],
            out_dim=1,
            ref_params=dict(ref.named_parameters()),
            dist_params=dict(conv.named_parameters()),
        )
        assert_parity(errs, torch.float64, f"linear h={h}")
        # sharded on the contracted dim: the shards move to the token dim (all-to-all), exact
        xt = torch.randn(2, 4, 5, generator=torch.Generator().manual_seed(h), dtype=torch.float64)
        assert (conv(shard_tensor(xt, m, 2)).full_tensor() - ref(xt)).abs().max().item() < 1e-12
        # no other dim can hold 3 shards: each rank's partial product, summed once (a Replicate result)
        xs = torch.randn(2, 2, 5, generator=torch.Generator().manual_seed(h), dtype=torch.float64)
        ys = conv(shard_tensor(xs, m, 2))
        if m.domain_world_size > 2:
            assert ys.placements == (Replicate(),)
        assert (ys.full_tensor() - ref(xs)).abs().max().item() < 1e-12
        y = conv(torch.randn(3, 5, dtype=torch.float64))  # a plain (conditioning) input: replicated
        assert isinstance(y, DTensor) and y.placements == (Replicate(),)
    bad = convert_to_domain_parallel(nn.Sequential(NotRowLocal()), m, custom_converters={NotRowLocal: shard_local})
    with pytest.raises(DomainParallelError, match="not row-local"):
        bad(shard_tensor(torch.randn(1, 8, 2, 2), m, 1))
    win = convert_to_domain_parallel(WindowAttention(4, 2, (2, 2)).double(), m)
    with pytest.raises(DomainParallelError, match="do not fit the shards"):
        win(shard_tensor(torch.randn(1, 2 * m.domain_world_size + 1, 4, 4, dtype=torch.float64), m, 1))


def _parity_models(h: int) -> None:
    from credit_dtensor.convert import convert_to_domain_parallel

    m = manager()
    for name, factory, train in (
        ("pads", PadConvs, True),
        ("reparam", Reparam, True),
        ("tied", Tied, True),
        ("mixed", Mixed, True),
    ):
        torch.manual_seed(2)
        model = factory().double().train(train)
        ref = copy.deepcopy(model)
        conv = convert_to_domain_parallel(copy.deepcopy(model), m)
        if name == "tied":
            assert conv.dec.weight is conv.enc.weight
        x = torch.randn(2, 3 if name == "mixed" else 2, h, 6, dtype=torch.float64)
        errs = parity(
            m,
            ref,
            conv,
            [x],
            shard_dims=[2],
            out_dim=2,
            ref_params=dict(ref.named_parameters()),
            dist_params=dict(conv.named_parameters()),
        )
        assert_parity(errs, torch.float64, f"{name} h={h} world={m.domain_world_size}")
        if name == "reparam":  # the power-iteration buffers moved identically
            assert torch.allclose(
                conv.b.parametrizations.weight[0]._u.full_tensor(), ref.b.parametrizations.weight[0]._u, atol=1e-12
            )


def _converted_parity(model: nn.Module, x: torch.Tensor, context: str) -> tuple[nn.Module, nn.Module]:
    """``(reference, converted)`` copies of ``model``, asserted equal (fp64: output, input and
    parameter gradients) on ``x`` against ``x`` sharded on H."""
    from credit_dtensor.convert import convert_to_domain_parallel

    m = manager()
    ref = copy.deepcopy(model)
    conv = convert_to_domain_parallel(copy.deepcopy(model), m)
    errs = parity(
        m,
        ref,
        conv,
        [x],
        shard_dims=[2],
        out_dim=2,
        ref_params=dict(ref.named_parameters()),
        dist_params=dict(conv.named_parameters()),
    )
    assert_parity(errs, torch.float64, f"{context} world={m.domain_world_size}")
    return ref, conv


def _subclassed_exact(h: int) -> list[str]:
    torch.manual_seed(3)
    model = Subclassed().double().train()
    x = torch.randn(2, 2, h, 7, dtype=torch.float64)
    ref, conv = _converted_parity(model, x, f"subclassed h={h}")
    stats = (conv.body[1].running_mean, conv.body[1].running_var)
    assert all(
        torch.allclose(a, b, atol=1e-12) for a, b in zip(stats, (ref.body[1].running_mean, ref.body[1].running_var))
    )
    return [type(mod).__name__ for mod in conv.body]


@pytest.mark.parametrize("size,h", [(2, 12), (3, 13)])
def test_subclasses_that_redefine_forward_keep_it(size, h):
    """A subclass of a converted torch class whose own forward (or ``_conv_forward``) differs from
    its torch class's is not swapped for the wrapper (whose forward would silently replace it): its
    forward runs and the op rules make it exact; a subclass that only adds an ``__init__`` is wrapped."""
    for names in get_world(size).run(_subclassed_exact, h):
        assert names[:-1] == [type(mod).__name__ for mod in Subclassed().body][:-1], names
        assert names[-1].startswith("DomainParallelConv2d"), names


def _resample_exact(h: int) -> list[str]:
    torch.manual_seed(4)
    model = Resampling().double()
    x = torch.randn(1, 2, h, 8, dtype=torch.float64)
    _, conv = _converted_parity(model, x, f"resampling modules h={h}")
    return sorted(conv._dp_conversion)


def _check_reports() -> dict:
    from credit_dtensor.check import check

    m = manager()
    out = {}
    torch.manual_seed(3)
    x = torch.randn(1, 3, 26, 16, dtype=torch.float64)
    r = check(unet().double(), m, x)
    out["unet"] = (r.ok, r.output_error, len(r.grads), len(r.gathered))
    r = check(unet(functional_pad=True).double(), m, x)
    out["fpad"] = (r.ok, sorted({g.path.split(".")[0] for g in r.gathered}))
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.GELU(), nn.Conv2d(4, 3, 3, padding=1), nn.GELU())
    r = check(model.double(), m, x, custom_converters={nn.Conv2d: lambda c: LocalConv(c) if c.in_channels == 4 else c})
    first = r.first_divergence
    out["wrong"] = (r.ok, first.path if first else None, first.error if first else 0.0)
    r = check(crossformer(lda_over_h=True).double(), m, torch.randn(1, 3, 32, 16, dtype=torch.float64))
    out["lda"] = (r.ok, r.output_error, sorted({e.module or "" for e in r.gather_events}))
    out["text"] = str(r)
    unfold = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Unfold(2, stride=2))  # refused: names the layer
    r = check(unfold.double(), m, x)
    out["unfold"] = (r.ok, r.first_divergence.path if r.first_divergence else None, r.exception)
    return out


@pytest.mark.parametrize("size", [3, 4])
def test_state_dict_idempotence_and_bad_input(size):
    get_world(size).run(_state_and_idempotence)


def test_custom_converters_and_logging():
    get_world(3).run(_custom_and_logging)


def test_linear_and_shard_local():
    get_world(3).run(_linear_and_shard_local)


@pytest.mark.parametrize("size,h", [(2, 9), (3, 10), (4, 13)])
def test_padding_reparam_tied_models_exact(size, h):
    get_world(size).run(_parity_models, h)


def _has_family(name: str) -> bool:
    from credit_dtensor.convert import registered_converters

    return any(c.family == name for c in registered_converters().values())


@pytest.mark.xfail(
    not _has_family("resample"), reason="resample wrappers (credit_dtensor/nn/resample.py) missing", strict=True
)
def test_resampling_modules_converted_and_exact():
    for rank, kinds in enumerate(get_world(3).run(_resample_exact, 14)):  # parity asserted in the task
        assert {"MaxPool2d", "AvgPool2d", "Upsample", "PixelShuffle", "PixelUnshuffle"} <= set(kinds), (rank, kinds)


def test_check_finds_first_divergence():
    for rank, res in enumerate(get_world(3).run(_check_reports)):
        ok, err, n_grads, n_gathered = res["unet"]
        assert ok and err < 1e-12 and n_grads > 40 and n_gathered == 0, (rank, res["unet"])
        ok, gathered = res["fpad"]
        assert ok and not gathered, (rank, res["fpad"])  # F.pad(mode="circular") is routed to the exact rule
        ok, path, err = res["wrong"]
        assert not ok and path == "2" and err > 1e-3, (rank, res["wrong"])  # the layer without a halo, not the GELU
        # long-distance attention over H tokens (uneven shards 2, 2, 0): the window reshapes re-chunk,
        # the attention's matmul re-lays q, k, v out onto the batch of groups (all-to-all): exact, no gather
        ok, err, gathered = res["lda"]
        assert ok and err < 1e-12 and not gathered, (rank, res["lda"])
        assert "Tensor.matmul" not in res["text"], (rank, res["text"])
        ok, path, exc = res["unfold"]
        assert not ok and path == "1" and "UnsupportedShardingError" in exc and "unfold" in exc, (rank, res["unfold"])


class _TimeConditioned(nn.Module):
    """A diffusion-style ``forward(x, t)``: the time embedding is added per channel."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.time = nn.Linear(1, 8)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + self.time(t[:, None])[:, :, None, None]


def test_plan_traces_models_with_extra_inputs():
    """Issue 18: ``plan`` runs ``forward(x, *extra_inputs)`` (a diffusion model's time step); without
    them the trace fails and the plan says so."""
    model = _TimeConditioned()
    p = plan(model, 3, (2, 3, 13, 8), extra_inputs=(torch.tensor([0.5, 0.25]),))
    assert p.ok and not p.hazards, str(p)
    conv = next(r for r in p.rows if r.path.endswith("conv"))
    assert conv.in_shape == (2, 3, 13, 8) and conv.out_shape == (2, 8, 13, 8), (conv.in_shape, conv.out_shape)
    missing = plan(model, 3, (2, 3, 13, 8))
    assert "could not be traced" in str(missing), str(missing)


def test_plan_flags_modules_the_descriptors_refuse():
    p = plan(nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.LPPool2d(2, 2), nn.Unfold(2)), 2, (1, 2, 8, 8))
    assert p.row("1").rule == "unsupported" and "LP pooling" in " ".join(p.row("1").hazards)
    assert p.row("2").rule == "unsupported" and "F.unfold is refused" in " ".join(p.row("2").hazards)
