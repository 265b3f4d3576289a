"""The docs hold up: every page docs/index.md links exists and none is "(coming)"; every example
output listed here is in the doc right after the command that produces it, and running that
command today prints the same key lines.

Commands run in this process (``credit-dtensor`` through ``cli.main``; ``check`` on a persistent
harness world of ``--domain`` ranks instead of freshly spawned processes, to stay fast). Key
lines are compared with whitespace collapsed (rich wraps long lines at the terminal width).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import shlex
from pathlib import Path

import pytest

from tests import harness

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
WIDTH = "150"  # the terminal width the doc outputs were captured with

CROSSFORMER_PLAN = (
    "credit-dtensor plan credit_dtensor.models:crossformer --input-shape 1,3,32,16 --domain 4 "
    """--kwargs '{"windows": [[2, 4], [2, 2]]}' --hide-local"""
)
PANGU_PLAN = (
    "credit-dtensor plan credit_dtensor.models:pangu --input-shape 1,3,2,26,16 --domain 3 "
    """--kwargs '{"grid": [2, 26, 16], "shift": true}' --hide-local"""
)
PANGU_CHECK = (
    """credit-dtensor check credit_dtensor.models:pangu --input-shape 1,3,2,26,16 --domain 3 """
    """--kwargs '{"grid": [2, 26, 16]}'"""
)
LDA_CHECK = (
    "credit-dtensor check credit_dtensor.models:crossformer --input-shape 1,3,32,16 --domain 3 "
    """--kwargs '{"lda_over_h": true}' --fail-on-gather"""
)
LDA_CHECK_2 = (
    "credit-dtensor check credit_dtensor.models:crossformer --input-shape 1,3,32,16 --domain 2 "
    """--kwargs '{"lda_over_h": true}'"""
)
FPAD_CHECK = (
    "credit-dtensor check credit_dtensor.models:unet --input-shape 1,3,26,16 --domain 3 "
    """--kwargs '{"functional_pad": true}'"""
)
CKPT_DAMAGED = "credit-dtensor train --steps 6 --resolution 8x16 --width 4 --checkpoint-dir ckpt --resume"

#: (doc, the block's last command, key lines of its output)
EXAMPLES = [
    ("usage.md", "credit-dtensor --version", ["credit-dtensor 0.1.0"]),
    (
        "usage.md",
        "credit-dtensor train --steps -3",
        ["credit-dtensor train: error: argument --steps: must be a positive integer (>= 1), got '-3'"],
    ),
    (
        "usage.md",
        "credit-dtensor train --resume",
        ["credit-dtensor train: error: argument --resume: needs --checkpoint-dir DIR (where checkpoints are found)"],
    ),
    (
        "usage.md",
        CKPT_DAMAGED,
        [
            "WARNING skipping checkpoint ckpt/step_00000004: __0_0.distcp has 100 bytes,",
            "were written (truncated or overwritten)",
            "resumed from ckpt/step_00000002",
            "final step 6 loss",
            "(started at step 2)",
        ],
    ),
    (
        "convert.md",
        CROSSFORMER_PLAN,
        [
            "CrossFormer: input (1, 3, 32, 16), H=32 over 4 ranks [8, 8, 8, 8]; 2 halo, 22 local, 4 re-chunk, "
            "4 shard-local; 0 hazard(s); 3 error(s)",
            "error: 2 module(s) need a local H that the shards of this input do not provide (first: "
            "stages.1.blocks.0.attn): use at most 2 domain ranks, or change the input size / window sizes",
        ],
    ),
    (
        "convert.md",
        PANGU_PLAN,
        [
            "PanguLite: input (1, 3, 2, 26, 16), H=26 over 3 ranks [9, 9, 8]; 4 halo, 11 local, 1 re-chunk, "
            "2 shard-local; 0 hazard(s)",
            "torch.roll along H (shifted windows): exact,",
            "plan ok: 0 hazard(s) to review",
        ],
    ),
    (
        "convert.md",
        PANGU_CHECK,
        [
            "PanguLite: input (1, 3, 2, 26, 16) over 3 ranks, atol 1e-10: exact -- 23 module outputs and 35 gradients",
            "gradients: input + 34 parameters exact",
        ],
    ),
    (
        "convert.md",
        LDA_CHECK,
        [
            "CrossFormer: input (1, 3, 32, 16) over 3 ranks, atol 1e-10: exact -- 53 module outputs and 60 gradients",
            "│ 43 │ stages.1.blocks.1.attn │ LongDistanceAttention │ S(1) │ 1×4×2×16 │",
            "gradients: input + 59 parameters exact",
        ],
    ),
    (
        "convert.md",
        LDA_CHECK_2,
        [
            "CrossFormer: input (1, 3, 32, 16) over 2 ranks, atol 1e-10: exact -- 53 module outputs and 60 gradients",
            "│ 43 │ stages.1.blocks.1.attn │ LongDistanceAttention │ S(1) │ 1×4×2×16 │",
        ],
    ),
    (
        "convert.md",
        FPAD_CHECK,
        [
            "WeatherUNet: input (1, 3, 26, 16) over 3 ranks, atol 1e-10: exact -- 59 module outputs and 47 gradients",
            "│ 2 │ inc.conv1 │ PeriodicConv2d │ S(2) │",
            "gradients: input + 46 parameters exact",
        ],
    ),
]


def _norm(text: str) -> str:
    return " ".join(text.split())


def _blocks(doc: str) -> list[tuple[list[str], str | None]]:
    """``(commands, output)`` for every ```bash block; output is the next ```text block before any
    other ```bash block."""
    text = (DOCS / doc).read_text(encoding="utf-8")
    fences = re.findall(r"```(\w*)\n(.*?)```", text, flags=re.S)
    out = []
    for i, (lang, body) in enumerate(fences):
        if lang != "bash":
            continue
        joined = re.sub(r"\\\n\s*", "", body)
        commands = [c.split("  #")[0].strip() for c in joined.splitlines() if c.strip()]
        output = None
        for later, later_body in fences[i + 1 :]:  # the next ```text block (a ```python one may come first)
            if later in ("bash", "text"):
                output = later_body if later == "text" else None
                break
        out.append((commands, output))
    return out


def _doc_example(doc: str, command: str) -> tuple[list[str], str]:
    for commands, output in _blocks(doc):
        if commands and commands[-1] == command:
            assert output is not None, f"{doc}: no example output after `{command}`"
            return commands, output
    raise AssertionError(f"{doc}: no ```bash block ending with `{command}`")


def _cli(argv: list[str]) -> str:
    """``credit-dtensor argv`` in this process; stdout + stderr."""
    from credit_dtensor.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        try:
            main(argv)
        except SystemExit:
            pass
        finally:  # main attaches a rich handler to the package logger: leave it as it was
            pkg = logging.getLogger("credit_dtensor")
            for h in [h for h in pkg.handlers if getattr(h, "_credit_dtensor_cli", False)]:
                pkg.removeHandler(h)
            pkg.setLevel(logging.NOTSET)
    return buf.getvalue()


def _check_on_world(argv: list[str]) -> str:
    """A harness task: ``credit-dtensor check`` on the launched world (as under torchrun)."""
    import torch.distributed as dist

    os.environ.update(RANK=str(dist.get_rank()), WORLD_SIZE=str(dist.get_world_size()), COLUMNS=WIDTH)
    try:
        return _cli(argv)
    finally:
        for k in ("RANK", "WORLD_SIZE"):
            os.environ.pop(k, None)


def _run(commands: list[str], tmp_path: Path) -> str:
    out = ""
    for command in commands:
        argv = shlex.split(command)
        if argv[0] == "truncate":  # truncate -s SIZE FILE
            os.truncate(tmp_path / argv[3], int(argv[2]))
            continue
        assert argv[0] == "credit-dtensor", command
        if argv[1] == "check":
            domain = int(argv[argv.index("--domain") + 1])
            out = harness.get_world(domain).run(_check_on_world, argv[1:])[0]
        else:
            out = _cli(argv[1:])
    return out


@pytest.mark.parametrize("doc,command,keys", EXAMPLES, ids=[f"{d}:{c[15:60]}" for d, c, _ in EXAMPLES])
def test_example_output_comes_from_its_command(doc, command, keys, tmp_path, monkeypatch):
    commands, expected = _doc_example(doc, command)
    for key in keys:
        assert _norm(key) in _norm(expected), f"{doc}: the example after `{command}` lacks {key!r}"
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("COLUMNS", WIDTH)
    monkeypatch.chdir(tmp_path)
    got = _run(commands, tmp_path)
    for key in keys:
        assert _norm(key) in _norm(got), f"`{command}` no longer prints {key!r}:\n{got[-3000:]}"


def test_index_links_exist_and_nothing_is_coming():
    index = (DOCS / "index.md").read_text(encoding="utf-8")
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", index)
    assert "usage.md" in links
    for link in links:
        if "://" not in link:
            assert (DOCS / link).resolve().exists(), f"docs/index.md links a missing page: {link}"
    for page in DOCS.glob("*.md"):
        assert "(coming)" not in page.read_text(encoding="utf-8"), f"{page.name} still says (coming)"


def test_usage_documents_every_environment_variable():
    """Every CREDIT_DTENSOR_* variable the package or the test harness reads is in docs/usage.md."""
    used = set()
    for path in [*(ROOT / "credit_dtensor").rglob("*.py"), ROOT / "tests" / "harness.py"]:
        used |= set(re.findall(r"CREDIT_DTENSOR_[A-Z_]+[A-Z]", path.read_text(encoding="utf-8")))
    usage = (DOCS / "usage.md").read_text(encoding="utf-8")
    missing = sorted(v for v in used if v not in usage)
    assert not missing, f"docs/usage.md does not document {missing}"


def _shard_dim_task() -> tuple[list[str], int, int]:
    import warnings

    from credit_dtensor import DomainParallelManager

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        old = DomainParallelManager(1, device_type="cpu", shard_dim=-3)
        new = DomainParallelManager(1, device_type="cpu")
    messages = [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)]
    return messages, old.shard_dim, new.shard_dim


def test_shard_dim_is_deprecated_as_documented():
    ((messages, old, new),) = harness.get_world(1).run(_shard_dim_task)
    assert len(messages) == 1 and "shard_dim" in messages[0] and "deprecated and ignored" in messages[0]
    assert (old, new) == (-3, -2)
    assert "`DomainParallelManager(shard_dim=...)` is deprecated" in (DOCS / "usage.md").read_text(encoding="utf-8")


@pytest.mark.skipif(
    not __import__("torch").__version__.startswith("2.13."),
    reason="docs/families.md lists the functions found on the pinned torch (2.13); other versions name a few more",
)
def test_families_page_is_generated_from_the_descriptors():
    from credit_dtensor.catalog import markdown

    page = (DOCS / "families.md").read_text()
    assert page == markdown(), "docs/families.md is stale: run `python scripts/gen_families.py`"
