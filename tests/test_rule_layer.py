"""The rule layer uses public mechanisms only: importing the package leaves DTensor's private op
handler table untouched, every op family registers (a broken family is an import error, not a
silent fallback to PyTorch's rule), and the communicating rules are torch.library custom ops."""

from __future__ import annotations

import subprocess
import sys

import torch
import torch.nn.functional as F

SNAPSHOT = """
import sys
from torch.distributed.tensor import DTensor
table = DTensor._op_dispatcher._custom_op_handlers
before = {str(k): id(v) for k, v in table.items()}
import credit_dtensor
after = {str(k): id(v) for k, v in DTensor._op_dispatcher._custom_op_handlers.items()}
assert DTensor._op_dispatcher._custom_op_handlers is table, "the table was rebound"
print("SAME" if before == after else f"CHANGED {sorted(set(after.items()) ^ set(before.items()))}")
"""


def test_import_adds_nothing_to_dtensors_private_handler_table():
    out = subprocess.run([sys.executable, "-c", SNAPSHOT], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "SAME", out.stdout


def test_rules_are_registered_for_the_functions_users_call():
    from credit_dtensor.intercept import _RULES, registered_functions
    from credit_dtensor.ops import FAMILIES

    assert set(FAMILIES) >= {"conv", "norm", "pad", "resample", "reduce", "loss", "pointwise", "move", "refuse"}
    for fn in (
        F.conv2d,
        F.conv_transpose3d,
        F.group_norm,
        F.layer_norm,
        F.pad,
        F.interpolate,
        F.max_pool2d,
        F.adaptive_avg_pool2d,
        F.mse_loss,
        F.cross_entropy,
        torch.roll,
        torch.Tensor.__getitem__,
        torch.cat,
        torch.Tensor.mean,
        torch.var,
        F.silu,
        torch.Tensor.__mul__,
        F.unfold,
    ):
        assert fn in _RULES, fn
    names = registered_functions()
    assert "F.conv2d" in names or "torch.conv2d" in names


def test_communicating_rules_are_custom_ops():
    import credit_dtensor  # noqa: F401 - registers the ops

    for name in ("halo_conv", "halo_conv_backward", "rule", "rule_backward"):
        op = getattr(torch.ops.credit_dtensor, name)
        assert isinstance(op.default, torch._ops.OpOverload), name


PLAIN_CODE = """
import os, torch, credit_dtensor
from torch.overrides import _get_current_function_mode_stack
assert not _get_current_function_mode_stack(), "importing pushed a torch-function mode"
assert not credit_dtensor.intercept.enabled()
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["PORT"], RANK="0", WORLD_SIZE="1")
manager = credit_dtensor.DomainParallelManager(1, device_type="cpu")
assert credit_dtensor.intercept.enabled(), "a manager turns the rules on"
manager.close()
print("OK")
"""


def test_import_leaves_plain_code_alone_until_a_manager_exists():
    """No cost on plain code after ``import credit_dtensor`` (issue 19): the interception mode is
    pushed by the first manager / shard / conversion on a thread, not by the import."""
    import os
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PORT=str(port))
    out = subprocess.run([sys.executable, "-c", PLAIN_CODE], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("OK"), out.stdout


def test_rules_never_import_the_converter_or_the_wrappers():
    """Layers flow one way (issue 20): ``ops`` may use ``dtensor``, ``geometry``, ``guard``, ``halo``
    and ``comm``, never ``convert`` or ``nn`` (which sit above it)."""
    import ast
    from pathlib import Path

    import credit_dtensor.ops

    bad = []
    for path in Path(credit_dtensor.ops.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 2:
                names = [node.module or ""] + ([a.name for a in node.names] if not node.module else [])
                bad += [f"{path.name}: from ..{n}" for n in names if n.split(".")[0] in ("convert", "nn", "converters")]
    assert not bad, bad


def test_one_registration_style():
    """Every rule is registered through its family's descriptor (``FAMILY.rule`` / ``.sharding`` /
    ``.converts``, issue 20): no ops or nn module registers with ``intercept`` or ``register_sharding``
    itself, and the converter discovers nothing by name (no pkgutil scan, no ``*_WRAPPERS`` suffix)."""
    import ast
    from pathlib import Path

    import credit_dtensor

    root = Path(credit_dtensor.__file__).parent
    bad = []
    for path in [*(root / "ops").glob("*.py"), *(root / "nn").glob("*.py")]:
        if path.name == "family.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = {a.name for a in node.names}
                if names & {"register", "register_many", "register_sharding", "register_routes"}:
                    bad.append(f"{path.parent.name}/{path.name}: imports {sorted(names)} from {node.module}")
    assert not bad, bad
    text = (root / "converters.py").read_text()
    assert "pkgutil" not in text and "_WRAPPERS" not in text


def test_every_rule_belongs_to_a_family():
    """The descriptors and the interception agree: every torch function with a rule is in exactly
    the families that registered it, and every family entry's functions have its rule."""
    from credit_dtensor import intercept
    from credit_dtensor.ops.family import families

    declared: dict = {}
    for fam in families():
        for e in fam.entries:
            if e.rule is None:  # declared without a rule: PyTorch's own (under the gather guard)
                assert all(f not in intercept._RULES for f in e.funcs), (fam.name, e.names)
                continue
            for f in e.funcs:
                declared.setdefault(f, []).append(e.rule)
    assert set(declared) == set(intercept._RULES)
    for f, rules in intercept._RULES.items():
        assert rules == declared[f], f
