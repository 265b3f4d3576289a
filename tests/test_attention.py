"""Attention across shards vs one device: ``F.scaled_dot_product_attention`` and
``nn.MultiheadAttention`` over token-sharded q/k/v (Ulysses all-to-all to whole-token units and
back), fp64 1e-10, forward, input gradients and every parameter gradient, worlds 1-4, even and
uneven tokens, fewer units than ranks, under the gather guard in ``raise`` mode, with per-rank
byte counts equal to an independent formula; clear errors for what is refused; einsum attention
goes through the gather guard; ``torch.compile(fullgraph=True)`` of a model with attention.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.harness import get_world, manager, raises, still_in_step
from tests.parity import rel_err

TOL = 1e-10


def _full(t):
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _sizes(n: int, world: int) -> list[int]:
    """torch.chunk sizes of n rows over world ranks (zeros for ranks without a chunk)."""
    parts = [len(c) for c in torch.arange(n).chunk(world)] if n else []
    return parts + [0] * (world - len(parts))


def _units(p: int, world: int) -> list[int]:
    """Units (batch x key/value heads) per rank: p // world, the first p % world ranks one more."""
    return [p // world + (1 if r < p % world else 0) for r in range(world)]


def _bytes(q_shape, k_shape, v_shape, world: int, rank: int, *, grads="qkv", weights: bool = False, elem: int = 8):
    """Independent count of what one rank sends: forward (q, k, v to units; out back) and backward
    (grad out to units; the needed grads back). ``weights``: the softmax weights go back too."""
    p = math.prod(k_shape[:-2])
    g = math.prod(q_shape[:-2]) // p
    (L, E), (S, Ev) = q_shape[-2:], (k_shape[-2], v_shape[-1])
    u, ls, ss = _units(p, world), _sizes(L, world), _sizes(S, world)
    others = [s for s in range(world) if s != rank]
    to_units = sum(u[s] * (g * ls[rank] * E + ss[rank] * E + ss[rank] * Ev) for s in others)
    back = sum(u[rank] * g * ls[s] * (Ev + (S if weights else 0)) for s in others)
    fwd = to_units + back
    width = {"q": lambda s: g * ls[s] * E, "k": lambda s: ss[s] * E, "v": lambda s: ss[s] * Ev}
    bwd = sum(u[s] * g * ls[rank] * Ev for s in others) + sum(u[rank] * width[w](s) for w in grads for s in others)
    return fwd * elem, bwd * elem


# --- F.scaled_dot_product_attention ---------------------------------------------------------------------

# name -> (q shape, k shape, v shape, kwargs, mask kind)
SDPA_CASES = {
    "even": ((2, 3, 12, 4), (2, 3, 12, 4), (2, 3, 12, 4), {}, None),
    "uneven": ((2, 3, 13, 4), (2, 3, 13, 4), (2, 3, 13, 4), {}, None),
    "few_heads": ((1, 2, 13, 4), (1, 2, 13, 4), (1, 2, 13, 4), {}, None),
    "one_unit": ((1, 1, 7, 3), (1, 1, 7, 3), (1, 1, 7, 3), {}, None),
    "cross": ((2, 2, 13, 4), (2, 2, 7, 4), (2, 2, 7, 5), {}, None),
    "tiny_tokens": ((2, 3, 2, 4), (2, 3, 2, 4), (2, 3, 2, 4), {}, None),
    "causal": ((2, 3, 13, 4), (2, 3, 13, 4), (2, 3, 13, 4), {"is_causal": True}, None),
    "causal_cross": ((1, 3, 13, 4), (1, 3, 9, 4), (1, 3, 9, 4), {"is_causal": True}, None),
    "scale": ((2, 3, 13, 4), (2, 3, 13, 4), (2, 3, 13, 4), {"scale": 0.3}, None),
    "gqa": ((2, 4, 13, 4), (2, 2, 13, 4), (2, 2, 13, 4), {"enable_gqa": True}, None),
    "no_heads_3d": ((3, 13, 4), (3, 13, 4), (3, 13, 4), {}, None),
    "hw_tokens": ((1, 2, 13 * 5, 4), (1, 2, 13 * 5, 4), (1, 2, 13 * 5, 4), {}, None),
    "mask_bool_2d": ((2, 3, 13, 4), (2, 3, 13, 4), (2, 3, 13, 4), {}, "bool_ls"),
    "mask_bool_batch": ((2, 3, 13, 4), (2, 3, 11, 4), (2, 3, 11, 4), {}, "bool_b1ls"),
    "mask_bias_heads_grad": ((2, 3, 13, 4), (2, 3, 13, 4), (2, 3, 13, 4), {}, "float_1hls_grad"),
    "mask_replicate_dtensor": ((2, 3, 13, 4), (2, 3, 13, 4), (2, 3, 13, 4), {}, "float_ls_replicate"),
    "kv_plain": ((2, 3, 13, 4), (2, 3, 9, 4), (2, 3, 9, 4), {"is_causal": True}, "kv_full"),
    "kv_plain_mask": ((2, 3, 13, 4), (2, 3, 9, 4), (2, 3, 9, 4), {}, "kv_full+float_ls_grad"),
}


def _mask(kind, q_shape, k_shape, g):
    if kind is None or kind == "kv_full":
        return None
    kind = kind.replace("kv_full+", "")
    (b, h), L, S = q_shape[:2], q_shape[-2], k_shape[-2]
    if kind == "bool_ls":
        m = torch.rand(L, S, generator=g) > 0.3
        m[:, 0] = True  # every query sees a key
        return m
    if kind == "bool_b1ls":
        m = torch.rand(b, 1, L, S, generator=g) > 0.4
        m[..., 1] = True
        return m
    if kind in ("float_1hls_grad",):
        return torch.randn(1, h, L, S, generator=g, dtype=torch.float64).requires_grad_()
    if kind in ("float_ls_replicate", "float_ls_grad"):
        m = torch.randn(L, S, generator=g, dtype=torch.float64)
        return m.requires_grad_() if kind.endswith("grad") else m
    raise AssertionError(kind)


def _sdpa_task(name: str) -> dict[str, float]:
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    import credit_dtensor as cd

    m = manager()
    world, rank = m.domain_world_size, m.domain_rank
    q_shape, k_shape, v_shape, kw, mask_kind = SDPA_CASES[name]
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(s, generator=g, dtype=torch.float64) for s in (q_shape, k_shape, v_shape))
    mask = _mask(mask_kind, q_shape, k_shape, g)
    kv_full = mask_kind is not None and mask_kind.startswith("kv_full")
    refs = [t.clone().requires_grad_() for t in (q, k, v)]
    mask_ref = mask.detach().clone().requires_grad_(mask.requires_grad) if mask is not None else None
    out_ref = F.scaled_dot_product_attention(*refs, attn_mask=mask_ref, **kw)
    gy = torch.randn(out_ref.shape, generator=g, dtype=torch.float64)
    out_ref.backward(gy)

    td = len(q_shape) - 2
    qs = cd.shard_tensor(q.clone(), m, td).requires_grad_()
    if kv_full:
        ks, vs = k.clone().requires_grad_(), v.clone().requires_grad_()
    else:
        ks = cd.shard_tensor(k.clone(), m, td).requires_grad_()
        vs = cd.shard_tensor(v.clone(), m, td).requires_grad_()
    ms = mask.detach().clone().requires_grad_(mask.requires_grad) if mask is not None else None
    if mask_kind == "float_ls_replicate":
        ms = distribute_tensor(ms, m.domain_mesh, [Replicate()])
    with cd.gather_policy("raise"):
        with cd.comm_stats() as fwd:
            out = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=ms, **kw)
        with cd.comm_stats() as bwd:
            out.backward(cd.shard_tensor(gy, m, td))
    errs = {
        f"placement {out.placements}": 0.0 if isinstance(out, DTensor) and out.placements == (Shard(td),) else math.inf,
        "out": rel_err(out, out_ref),
        "grad q": rel_err(qs.grad, refs[0].grad),
        "grad k": rel_err(ks.grad, refs[1].grad),
        "grad v": rel_err(vs.grad, refs[2].grad),
    }
    if mask is not None and mask.requires_grad:
        errs["grad mask"] = rel_err(ms.grad, mask_ref.grad)
    if kv_full:
        errs[f"bytes fwd {fwd.sent_bytes} (full k/v: none)"] = 0.0 if fwd.sent_bytes == 0 else math.inf
    else:
        want_f, want_b = _bytes(q_shape, k_shape, v_shape, world, rank)
        if mask is not None and mask.requires_grad and world > 1:  # a plain mask's gradient: one all-reduce
            want_b += 8 * mask.numel()
        errs[f"bytes fwd {fwd.sent_bytes} != {want_f}"] = 0.0 if fwd.sent_bytes == want_f else math.inf
        errs[f"bytes bwd {bwd.sent_bytes} != {want_b}"] = 0.0 if bwd.sent_bytes == want_b else math.inf
        errs[f"recv fwd {fwd.recv_bytes} != sent"] = 0.0 if world == 1 or fwd.recv_bytes > 0 else math.inf
        # never an activation-sized gather: less than q + k + v + out of the whole problem
        total = 8 * (q.numel() + k.numel() + v.numel() + out_ref.numel())
        errs[f"bytes fwd {fwd.sent_bytes} >= {total}"] = 0.0 if fwd.sent_bytes < total else math.inf
        errs[f"bytes bwd {bwd.sent_bytes} >= {total}"] = 0.0 if bwd.sent_bytes < total else math.inf
    return errs


def _check(results, world, name):
    for rank, errors in enumerate(results):
        bad = {k: v for k, v in errors.items() if not v <= TOL}
        assert not bad, f"rank {rank}, world {world}, {name}: {bad}"


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("name", list(SDPA_CASES))
def test_sdpa_matches_one_device(world, name):
    _check(get_world(world).run(_sdpa_task, name), world, name)


# --- nn.MultiheadAttention --------------------------------------------------------------------------------

# name -> (constructor kwargs, L, S, batch (None: unbatched), call kwargs, key kind)
MHA_CASES = {
    "self_batch_first": ({"batch_first": True}, 13, 13, 2, {}, "self"),
    "self_seq_first_no_weights": ({}, 13, 13, 2, {"need_weights": False}, "self"),
    "per_head_weights": ({"batch_first": True}, 13, 13, 2, {"average_attn_weights": False}, "self"),
    "few_heads_no_bias": ({"batch_first": True, "bias": False, "num_heads": 2}, 11, 11, 1, {}, "self"),
    "unbatched": ({}, 13, 13, None, {}, "self"),
    "unbatched_no_weights": ({}, 13, 13, None, {"need_weights": False}, "self"),
    "causal_mask": ({"batch_first": True}, 13, 13, 2, {"causal": True, "need_weights": False}, "self"),
    "causal_mask_weights": ({"batch_first": True}, 13, 13, 2, {"causal": True}, "self"),
    "padding_mask": ({"batch_first": True}, 13, 13, 2, {"kpm": True, "need_weights": False}, "self"),
    "float_3d_mask": ({"batch_first": True}, 13, 13, 2, {"mask3d": True}, "self"),
    "cross_sharded_kdim": ({"batch_first": True, "kdim": 5, "vdim": 3}, 13, 7, 2, {}, "sharded"),
    "cross_kv_same": ({}, 13, 9, 2, {"need_weights": False}, "kv_same"),
    "cross_plain_memory": ({"batch_first": True}, 13, 6, 2, {"kpm": True}, "plain"),
    "plain_module": ({"batch_first": True}, 13, 13, 2, {"need_weights": False}, "self_unconverted"),
    "eval_no_grad": ({"batch_first": True}, 13, 13, 2, {"eval": True}, "self"),
}
EMBED, HEADS = 6, 3


def _mha_task(name: str) -> dict[str, float]:
    from torch.distributed.tensor import Shard

    import credit_dtensor as cd

    m = manager()
    world = m.domain_world_size
    ctor, L, S, batch, call, kind = MHA_CASES[name]
    ctor = {"num_heads": HEADS, **ctor}
    bf = ctor.get("batch_first", False)
    g = torch.Generator().manual_seed(11)
    torch.manual_seed(3)
    ref = nn.MultiheadAttention(EMBED, **ctor).double()
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.5)
    dp = nn.MultiheadAttention(EMBED, **ctor).double()
    dp.load_state_dict(ref.state_dict())
    if kind != "self_unconverted":
        dp = cd.convert_to_domain_parallel(dp, m)

    def tokens(n, width):
        shape = (n, width) if batch is None else ((batch, n, width) if bf else (n, batch, width))
        return torch.randn(shape, generator=g, dtype=torch.float64)

    tdim = 1 if (bf and batch is not None) else 0
    x = tokens(L, EMBED)
    mem = tokens(S, ctor.get("kdim", EMBED))
    val = tokens(S, ctor.get("vdim", EMBED))
    kwargs = {k: v for k, v in call.items() if k in ("need_weights", "average_attn_weights")}
    if call.get("causal"):
        kwargs["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(L, dtype=torch.float64)
        kwargs["is_causal"] = True
    if call.get("kpm"):
        kpm = torch.rand((batch, S) if batch else (S,), generator=g) > 0.7
        kpm[..., 0] = False
        kwargs["key_padding_mask"] = kpm
    if call.get("mask3d"):
        kwargs["attn_mask"] = torch.randn((batch or 1) * ctor["num_heads"], L, S, generator=g, dtype=torch.float64)
    if call.get("eval"):
        ref.eval()
        dp.eval()

    def run(model, q_in, k_in, v_in):
        if call.get("eval"):
            with torch.no_grad():
                return model(q_in, k_in, v_in, **kwargs)
        return model(q_in, k_in, v_in, **kwargs)

    xr = x.clone().requires_grad_()
    if kind.startswith("self"):
        kr = vr = xr
    elif kind == "kv_same":
        kr = vr = mem.clone().requires_grad_()
    else:
        kr, vr = mem.clone().requires_grad_(), (val if kind == "sharded" else mem).clone().requires_grad_()
    out_ref, w_ref = run(ref, xr, kr, vr)
    gy = torch.randn(out_ref.shape, generator=g, dtype=torch.float64)
    gw = torch.randn(w_ref.shape, generator=g, dtype=torch.float64) if w_ref is not None else None
    if not call.get("eval"):
        ((out_ref * gy).sum() + ((w_ref * gw).sum() if w_ref is not None else 0)).backward()

    xs = cd.shard_tensor(x.clone(), m, tdim).requires_grad_()
    if kind.startswith("self"):
        ks = vs = xs
    elif kind == "kv_same":
        ks = vs = cd.shard_tensor(mem.clone(), m, tdim).requires_grad_()
    elif kind == "sharded":
        ks = cd.shard_tensor(mem.clone(), m, tdim).requires_grad_()
        vs = cd.shard_tensor(val.clone(), m, tdim).requires_grad_()
    else:  # plain memory, every rank holds it in full
        ks = mem.clone().requires_grad_()
        vs = mem.clone().requires_grad_()
    with cd.gather_policy("raise"), cd.comm_stats() as s:
        out, w = run(dp, xs, ks, vs)
        if not call.get("eval"):
            loss = (out * cd.shard_tensor(gy, m, tdim)).sum()
            if w is not None:
                loss = loss + (w * cd.shard_tensor(gw, m, w.ndim - 2)).sum()
            loss.backward()
    errs = {
        f"out placement {out.placements}": 0.0 if out.placements == (Shard(tdim),) else math.inf,
        "out": rel_err(out, out_ref),
        "weights": rel_err(w, w_ref),
    }
    if w is not None:
        errs[f"weights placement {w.placements}"] = 0.0 if w.placements == (Shard(w.ndim - 2),) else math.inf
    if not call.get("eval"):
        errs["grad x"] = rel_err(xs.grad, xr.grad)
        if ks is not xs:
            errs["grad key"] = rel_err(ks.grad, kr.grad)
            if vs is not ks:
                errs["grad value"] = rel_err(vs.grad, vr.grad)
        for (n, p), q in zip(dp.named_parameters(), ref.parameters()):
            errs[f"grad {n}"] = rel_err(p.grad, q.grad)
    if kind in ("self", "self_unconverted") and batch is not None and world > 1 and not call.get("eval"):
        n_tok = batch * L * EMBED
        errs[f"bytes {s.sent_bytes} > activations"] = 0.0 if s.sent_bytes < 8 * 8 * n_tok else math.inf
    return errs


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("name", list(MHA_CASES))
def test_multihead_attention_matches_one_device(world, name):
    _check(get_world(world).run(_mha_task, name), world, name)


def _mha_bytes_task() -> dict[str, float]:
    """Self-attention bytes: exactly the core's all-to-alls (projections are local), weights included."""
    import credit_dtensor as cd

    m = manager()
    world, rank = m.domain_world_size, m.domain_rank
    b, L, h = 2, 13, HEADS
    hd = EMBED // h
    mha = cd.convert_to_domain_parallel(nn.MultiheadAttention(EMBED, h, batch_first=True).double(), m)
    x = cd.shard_tensor(torch.randn(b, L, EMBED, dtype=torch.float64), m, 1).requires_grad_()
    errs = {}
    for need_weights in (False, True):
        with cd.gather_policy("raise"):
            with cd.comm_stats() as fwd:
                out, w = mha(x, x, x, need_weights=need_weights)
            loss = (out * out.detach()).sum()
            with cd.comm_stats() as bwd:
                loss.backward()  # weights unused: their backward sends nothing
        shape = (b, h, L, hd)
        want_f, want_b = _bytes(shape, shape, shape, world, rank, weights=need_weights)
        errs[f"weights={need_weights}: fwd {fwd.sent_bytes} != {want_f}"] = 0.0 if fwd.sent_bytes == want_f else 1.0
        errs[f"weights={need_weights}: bwd {bwd.sent_bytes} != {want_b}"] = 0.0 if bwd.sent_bytes == want_b else 1.0
        errs[f"weights={need_weights}: only attention traffic {dict(fwd.by_op)}"] = (
            0.0 if set(fwd.by_op) <= {"attention"} else 1.0
        )
    return errs


@pytest.mark.parametrize("world", [2, 3])
def test_multihead_attention_bytes(world):
    _check(get_world(world).run(_mha_bytes_task), world, "bytes")


# --- refusals and the gather guard ---------------------------------------------------------------------------


def _refusal_task() -> str:
    from torch.distributed.tensor import Shard, distribute_tensor

    import credit_dtensor as cd

    m = manager()
    U = cd.UnsupportedShardingError
    q = cd.shard_tensor(torch.randn(1, 2, 7, 4, dtype=torch.float64), m, 2)
    raises(lambda: F.scaled_dot_product_attention(q, q, q, dropout_p=0.1), U, "dropout_p=0.1", "RNG", "dropout_p=0.0")
    still_in_step()
    heads = distribute_tensor(torch.randn(1, 2, 7, 4, dtype=torch.float64), m.domain_mesh, [Shard(1)])
    raises(lambda: F.scaled_dot_product_attention(q, heads, heads), U, "key has placements", "token dim")
    raises(
        lambda: F.scaled_dot_product_attention(q, q, q.detach()[:, :1].full_tensor()),
        U,
        "key is sharded",
        "value is full",
    )
    mask = cd.shard_tensor(torch.ones(7, 7, dtype=torch.bool), m, 0)
    raises(lambda: F.scaled_dot_product_attention(q, q, q, attn_mask=mask), U, "attn_mask", "Replicate")
    raises(
        lambda: F.scaled_dot_product_attention(q, q, q, attn_mask=torch.ones(7, 7, dtype=torch.bool), is_causal=True),
        RuntimeError,
        "is_causal",
    )
    still_in_step()
    tokens = cd.shard_tensor(torch.randn(2, 7, 6, dtype=torch.float64), m, 1)
    for ctor, words in (
        ({"add_bias_kv": True}, ("bias_k", "add_bias_kv")),
        ({"add_zero_attn": True}, ("add_zero_attn",)),
        ({"dropout": 0.2}, ("dropout_p=0.2",)),
    ):
        mha = cd.convert_to_domain_parallel(nn.MultiheadAttention(6, 2, batch_first=True, **ctor).double(), m)
        raises(lambda mha=mha: mha(tokens, tokens, tokens), U, "multi_head_attention_forward", *words)
        still_in_step()
    mha = cd.convert_to_domain_parallel(nn.MultiheadAttention(6, 2, batch_first=True, dropout=0.2).double(), m)
    mha.eval()  # dropout is off in eval: exact
    ref = nn.MultiheadAttention(6, 2, batch_first=True, dropout=0.2).double().eval()
    ref.load_state_dict({k: _full(v) for k, v in mha.state_dict().items()})
    with cd.gather_policy("raise"):
        assert rel_err(mha(tokens, tokens, tokens)[0], ref(*[tokens.full_tensor()] * 3)[0]) <= TOL
    raises(
        lambda: mha(
            tokens, tokens, tokens, key_padding_mask=cd.shard_tensor(torch.zeros(2, 7, dtype=torch.bool), m, 1)
        ),
        U,
        "key_padding_mask",
        "Replicate",
    )
    still_in_step()
    return "ok"


@pytest.mark.parametrize("world", [1, 3])
def test_refusals_are_clear_on_every_rank(world):
    assert get_world(world).run(_refusal_task) == ["ok"] * world


def _einsum_task() -> dict[str, float]:
    """Einsum attention over token-sharded q, k, v: the score matrix needs every key, so the operands
    are re-laid out onto the heads (one all-to-all each) and the product is local: exact, no gather,
    each rank sending at most its share. With fewer heads than ranks (and one sample) no dim can take
    the product: a clear error on every rank instead of a gather."""
    import credit_dtensor as cd

    m = manager()
    g = torch.Generator().manual_seed(5)
    world = m.domain_world_size

    def attn(q, k, v):
        s = torch.einsum("bhqd,bhkd->bhqk", q, k) / 2.0
        return torch.einsum("bhqk,bhkd->bhqd", s.softmax(-1), v)

    errs = {}
    q, k, v = (torch.randn(1, 4, 13, 4, generator=g, dtype=torch.float64) for _ in range(3))
    qs, ks, vs = (cd.shard_tensor(t, m, 2) for t in (q, k, v))
    with cd.gather_policy("raise"), cd.comm_stats() as st:
        y = attn(qs, ks, vs)
    errs["einsum: exact"] = rel_err(y, attn(q, k, v))
    share = q.numel() * q.element_size() / world
    errs["einsum: bytes within share"] = float(st.sent_bytes > 4 * share)  # q, k, v to heads, scores stay local
    with cd.gather_policy("raise"):  # the same attention through F.scaled_dot_product_attention
        errs["sdpa: exact"] = rel_err(F.scaled_dot_product_attention(qs, ks, vs, scale=0.5), attn(q, k, v))
    if world > 2:
        # fewer heads than ranks: re-laid out onto the 2 heads (some ranks idle), none receiving more
        # than twice its share (UnetDiffusion's bottom attention on 3 and 4 ranks)
        small = [cd.shard_tensor(t[:, :2], m, 2) for t in (q, k, v)]
        with cd.gather_policy("raise"), cd.comm_stats() as st:
            y = attn(*small)
        errs["einsum, 2 heads: exact"] = rel_err(y, attn(q[:, :2], k[:, :2], v[:, :2]))
        errs["einsum, 2 heads: bytes within twice the share"] = float(st.sent_bytes > 2 * 3 * share / 2)
    if world > 1:
        # one head, one sample: the whole product would land on one rank (a gather): refused on every rank
        one = [cd.shard_tensor(t[:, :1], m, 2) for t in (q, k, v)]
        raises(
            lambda: attn(*one), cd.DomainParallelError, "einsum", f"has 1 entries for {world} ranks", "one rank", "Fix"
        )
        still_in_step()
    return errs


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_einsum_attention_is_exact_without_gathers(world):
    _check(get_world(world).run(_einsum_task), world, "einsum")


def test_einsum_relayout_bound():
    """A free dim with fewer entries than ranks takes the re-layout while no rank receives more than
    twice its share (the worst case of a dim with ``world + 1`` entries); one entry never."""
    from credit_dtensor.ops.einsum import min_relayout_size, relayout_domain_sizes, relayout_ok

    assert all(relayout_ok(s, n) for n in range(1, 9) for s in range(n, 3 * n))
    assert [min_relayout_size(n) for n in range(2, 10)] == [2, 2, 2, 2, 3, 3, 4, 4]
    assert not any(relayout_ok(1, n) for n in range(2, 9))
    assert relayout_domain_sizes(2) == [2, 3, 4, 5]
    assert relayout_domain_sizes(1) == []


# --- torch.compile ---------------------------------------------------------------------------------------


class TokenBlock(nn.Module):
    """Tokens ``(B, heads, N, C)`` sharded on N: per-head q/k/v Linears, causal SDPA over all tokens,
    a projection, the mean over heads, then an ``nn.MultiheadAttention`` residual over the tokens."""

    def __init__(self, c: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.q, self.k, self.v, self.proj = (nn.Linear(c, c) for _ in range(4))
        self.mha = nn.MultiheadAttention(c, heads, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.scaled_dot_product_attention(self.q(x), self.k(x), self.v(x), is_causal=True)
        y = self.proj(y).mean(dim=1)
        return y + self.mha(y, y, y, need_weights=False)[0]


def _compile_task(tokens: int, tmp: str) -> dict:
    import torch._dynamo as dynamo

    import credit_dtensor as cd

    m = manager()
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(tmp, f"inductor_rank{m.domain_rank}")
    torch._functorch.config.enable_autograd_cache = False
    torch.manual_seed(0)
    ref = TokenBlock().double()
    dp = cd.convert_to_domain_parallel(TokenBlock().double(), m)
    dp.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, tokens, 8, dtype=torch.float64)
    xr = x.clone().requires_grad_()
    yr = ref(xr)
    gy = torch.randn(yr.shape, dtype=torch.float64)
    yr.backward(gy)
    dynamo.reset()
    dynamo.utils.counters.clear()
    graphs: list = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.backends.debugging.aot_eager(gm, example_inputs)

    compiled = torch.compile(dp, backend=counting, fullgraph=True, dynamic=False)
    xs = cd.shard_tensor(x, m, 2).requires_grad_()
    with cd.gather_policy("raise"):
        y = compiled(xs)
        y.backward(cd.shard_tensor(gy, m, 1))
    errs = {"out": rel_err(y, yr), "grad x": rel_err(xs.grad, xr.grad)}
    for (n, p), q in zip(dp.named_parameters(), ref.parameters()):
        errs[f"grad {n}"] = rel_err(p.grad, q.grad)
    return {"graphs": len(graphs), "breaks": sum(dynamo.utils.counters["graph_break"].values()), "errs": errs}


@pytest.mark.parametrize("world,tokens", [(2, 12), (3, 13)])
def test_compile_fullgraph_attention(world, tokens, tmp_path):
    for rank, res in enumerate(get_world(world).run(_compile_task, tokens, str(tmp_path))):
        assert res["graphs"] == 1 and res["breaks"] == 0, (rank, res["graphs"], res["breaks"])
        bad = {k: v for k, v in res["errs"].items() if not v <= TOL}
        assert not bad, (rank, bad)


def test_the_shape_check_runs_once_per_shape_and_never_caches_an_error():
    """``_check_like_torch`` (PyTorch's own function on meta tensors: its errors on every rank, the
    output shape) is remembered by shapes, dtypes and values; a failing check raises every time."""
    from credit_dtensor.ops import attention

    calls = []

    def fake(q, k, *, scale=None):
        calls.append((tuple(q.shape), q.dtype, tuple(k.shape), scale))
        if q.shape[-1] != k.shape[-1]:
            raise RuntimeError("last dims differ")
        return q

    q, k = torch.zeros(2, 3, 4), torch.zeros(2, 5, 4)
    first = attention._check_like_torch(fake, (q, k), {"scale": None})
    assert first.device.type == "meta" and tuple(first.shape) == (2, 3, 4)
    attention._check_like_torch(fake, (torch.ones(2, 3, 4), k), {"scale": None})  # same shapes: remembered
    assert len(calls) == 1
    attention._check_like_torch(fake, (q.double(), k), {"scale": None})  # another dtype
    attention._check_like_torch(fake, (q, k), {"scale": 0.5})  # another value
    attention._check_like_torch(fake, (torch.zeros(2, 4, 4), k), {"scale": None})  # another shape
    assert len(calls) == 4
    for _ in range(2):
        with pytest.raises(RuntimeError, match="last dims differ"):
            attention._check_like_torch(fake, (torch.zeros(2, 3, 3), k), {"scale": None})
    assert len(calls) == 6
