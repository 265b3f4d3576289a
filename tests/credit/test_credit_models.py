"""NCAR CREDIT's own models from the installed ``miles-credit`` package, converted and H-sharded.

Opt-in (``make test-credit``; marker ``credit``): skipped where miles-credit is not installed, and
skipped by a plain ``pytest`` run. For every model class of ``credit.models`` that takes a gridded
field (tiny configurations in :mod:`tests.credit.cases`), on worlds of 2, 3 and 4 domain ranks and
two field sizes each (32x64, 64x128; at 3 ranks every shard boundary cuts through windows):
the single-device model in train mode (dropout 0) against
``convert_to_domain_parallel(copy)`` on ``shard_tensor(x, manager, dim=3)``, forward and backward
under ``gather_policy("raise")``: output, input gradient and every parameter gradient within
1e-10 relative (fp64 tensors; 1e-5 for the fp32 ones of mixed-dtype models; relative to the
tensor's largest entry, floored at 1e-4 (fp64) / 1e-2 (fp32) of the largest gradient of that dtype so
that mathematically zero gradients compare their rounding noise), and no implicit activation gather.
``scripts/credit_probe.py`` runs the same matrix and prints what fails where.
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("credit.models", reason="the CREDIT tier needs miles-credit (make test-credit)")

from tests.credit.cases import CASES, matrix  # noqa: E402
from tests.credit.runner import parse_failure, run_case  # noqa: E402
from tests.harness import RankError, get_world  # noqa: E402

pytestmark = pytest.mark.credit

TIMEOUT = 600

#: world-major order, so each world is started once and reused
PARAMS = sorted(matrix(), key=lambda c: (c[1], list(CASES).index(c[0]), c[2]))


def _explain(err: RankError) -> str:
    """A short failure message: the error, CREDIT's line, the op and the tensors involved."""
    text = str(err)
    rep = parse_failure(text)
    if rep is None:
        return text[-4000:]
    lines = [f"{rep['type']}: {rep['message']}"]
    for key in ("innermost_credit", "innermost_other", "innermost_credit_dtensor", "innermost_torch"):
        if key in rep:
            lines.append(f"  {key[len('innermost_') :]}: {rep[key]['at']}  {rep[key]['line']}")
    if "aten_op" in rep:
        lines.append(f"  op: {rep['aten_op']['op']}({', '.join(rep['aten_op']['args'])})")
    for name, t in rep.get("credit_tensors", {}).items():
        lines.append(f"  {name} = {t}")
    if rep.get("cause"):
        lines.append(f"  cause: {rep['cause']}")
    return "\n".join(lines) + "\n\nfull report:\n" + json.dumps(rep, indent=1)


@pytest.mark.parametrize(("name", "world", "field"), PARAMS, ids=[f"{n}-w{w}-{f[0]}x{f[1]}" for n, w, f in PARAMS])
def test_credit_model_exact(name, world, field):
    h, w = field
    failure = None
    try:
        results = get_world(world).run(run_case, name, h, w, "raise", timeout=TIMEOUT)
    except RankError as err:
        failure = f"{name} {h}x{w} on {world} ranks:\n{_explain(err)}"
    if failure is not None:  # outside the except block: the report, not the harness's traceback chain
        pytest.fail(failure, pytrace=False)
    for rank, res in enumerate(results):
        assert not res["bad"], f"{name} {h}x{w} on {world} ranks, rank {rank}: errors over tolerance: {res['bad']}"
        assert not res["gathers"], f"{name} {h}x{w} on {world} ranks, rank {rank}: gathered {res['gathers']}"
