"""The ``credit-dtensor`` command: ``info`` in-process, as a module, under torchrun; stubs exit 2."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from credit_dtensor import DomainParallelError
from credit_dtensor.cli import EXIT_BAD_CONFIG, EXIT_NOT_AVAILABLE, EXTENSION_ERRORS, PENDING, build_parser, main

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS}
    env["COLUMNS"] = "200"  # one table row per line, whatever the terminal
    return env


def test_info_in_process(monkeypatch, capsys):
    for k in TORCHRUN_VARS:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert torch.__version__ in out
    assert "gloo yes" in out
    assert "not under torchrun" in out
    from credit_dtensor.ops._dispatch import registered_ops

    ops = registered_ops()  # main imported every op module
    assert f"{len(ops)} aten ops" in out if ops else "none yet" in out
    for op in ops:
        assert op.removeprefix("aten.").removesuffix(".default") in out
    assert not dist.is_initialized()  # info must not leave a process group behind


def test_info_verbose_in_process(monkeypatch, capsys):
    for k in TORCHRUN_VARS:
        monkeypatch.delenv(k, raising=False)
    assert main(["-v", "info"]) == 0
    assert "torch" in capsys.readouterr().out


def test_info_as_module():
    proc = subprocess.run(
        [sys.executable, "-m", "credit_dtensor.cli", "info"],
        capture_output=True,
        text=True,
        env=_clean_env(),
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert torch.__version__ in proc.stdout and "backends" in proc.stdout


def _subcommands() -> dict:
    parser = build_parser()
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return action.choices


@pytest.mark.parametrize("command", sorted(PENDING))
def test_every_subcommand_is_implemented_or_a_placeholder(command, capsys):
    sub = _subcommands()[command]
    if sub.get_default("placeholder"):
        assert main([command, "--anything"]) == EXIT_NOT_AVAILABLE
        assert "not available yet" in capsys.readouterr().out
    else:  # registered by a credit_dtensor.cli_* module
        assert callable(sub.get_default("handler")), command
    assert not EXTENSION_ERRORS, EXTENSION_ERRORS


def test_extension_handler_errors_are_reported_cleanly(monkeypatch, capsys):
    def boom(args, console):
        raise DomainParallelError("boom: use fewer ranks")

    original = argparse.ArgumentParser.parse_known_args

    def patched(self, *a, **kw):
        args, extra = original(self, *a, **kw)
        if getattr(args, "command", None) == "info" and self.prog == "credit-dtensor":
            args.command, args.handler = "fake", boom
        return args, extra

    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", patched)
    assert main(["info"]) == EXIT_BAD_CONFIG
    assert "boom: use fewer ranks" in capsys.readouterr().out


def test_missing_or_unknown_command_is_a_usage_error():
    for argv in ([], ["frobnicate"], ["info", "--bogus"]):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2


def _torchrun() -> list[str] | None:
    exe = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    return [exe] if exe else None


@pytest.mark.skipif(_torchrun() is None, reason="torchrun not installed next to this python")
def test_info_under_torchrun():
    base = [*_torchrun(), "--standalone", "--nproc-per-node", "2", "-m", "credit_dtensor.cli", "info"]
    proc = subprocess.run([*base, "--domain", "1"], capture_output=True, text=True, env=_clean_env(), timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "dp=2 x domain=1" in proc.stdout
    assert "[0] [1]" in proc.stdout and "[0, 1]" in proc.stdout  # domain groups, dp group
    assert proc.stdout.count("credit-dtensor") == 1  # only rank 0 prints


def test_info_reports_bad_launch_without_traceback(monkeypatch, capsys):
    # RANK/WORLD_SIZE set but no rendezvous address: a clean message and status 1, no group left
    for k in TORCHRUN_VARS:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert main(["info"]) == 1
    out = capsys.readouterr().out
    assert "MASTER_ADDR" in out and "torchrun" in out and "Traceback" not in out
    assert not dist.is_initialized()


README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


@pytest.mark.skipif(_torchrun() is None, reason="torchrun not installed next to this python")
def test_readme_quick_start_runs(tmp_path):
    """The README's Quick start block runs as written on 2 ranks."""
    text = open(README, encoding="utf-8").read()
    blocks = [b.split("```", 1)[0] for b in text.split("```python\n")[1:]]
    (block,) = [b for b in blocks if "torchrun" in b and "shard_tensor" in b]
    script = tmp_path / "quickstart.py"
    script.write_text(block)
    cmd = [*_torchrun(), "--standalone", "--nproc-per-node", "2", str(script)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_clean_env(), timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
