"""The ``credit-dtensor`` command: ``info`` in-process, as a module and under torchrun; the README
quick start; every misuse is a usage error (exit 2, an argparse-style message); one exit-status
policy; help texts with defaults; the local process launcher; benchmark scripts' help."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from credit_dtensor import DomainParallelError
from credit_dtensor.cli import COMMANDS, EXIT_FAILED, EXIT_OK, EXIT_USAGE, build_parser, main
from credit_dtensor.cli._args import HelpFormatter

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
    from credit_dtensor.intercept import registered_functions

    ops = registered_functions()  # main imported every op family
    assert f"{len(ops)} torch functions routed" in out
    from credit_dtensor.ops.family import families

    for fam in families():  # every family, from its descriptor
        assert f"{fam.name} " in out, fam.name
    assert "Conv2d" in out and "GroupNorm" in out  # the modules each family converts
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


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")


@pytest.mark.skipif(_torchrun() is None, reason="torchrun not installed next to this python")
def test_readme_quick_start_runs(tmp_path):
    """The README's Quick start block runs as written on 2 ranks."""
    text = open(README, encoding="utf-8").read()
    blocks = [b.split("```", 1)[0] for b in text.split("```python\n")[1:]]
    (block,) = [b for b in blocks if "torchrun" in b and "shard_tensor" in b]
    script = tmp_path / "quickstart.py"
    script.write_text(block)
    cmd = [*_torchrun(), "--standalone", "--nproc-per-node", "2", str(script)]
    for attempt in range(2):
        proc = subprocess.run(cmd, capture_output=True, text=True, env=_clean_env(), timeout=300, cwd=tmp_path)
        # the rows the comments promise (7 on rank 0, 6 on rank 1); the two ranks' prints may
        # interleave on the shared pipe (print writes its items separately), so look for the shapes
        assert "(1, 3, 7, 8)" in proc.stdout and "(1, 3, 6, 8)" in proc.stdout, proc.stdout + proc.stderr
        # gloo can abort a rank at process exit after the job has finished (a teardown race inside
        # gloo, seen once in CI under load, not reproduced in 35 runs): retry that one case once
        if proc.returncode != 0 and attempt == 0 and "terminate called without an active exception" in proc.stderr:
            continue
        break
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --- misuses: exit status 2 and an argparse-style message naming the option -----------------------

NO_DIR = "/nonexistent/credit_dtensor_dir"
SHAPE = ["--input-shape", "1,3,8,8"]
MISUSES = [
    (["train", "--steps", "-3"], ["--steps", "positive integer", "-3"]),
    (["train", "--steps", "abc"], ["--steps", "integer", "abc"]),
    (["train", "--pg-timeout", "0"], ["--pg-timeout", "positive"]),
    (["train", "--pg-timeout", "inf"], ["--pg-timeout", "finite"]),
    (["train", "--global-batch", "0"], ["--global-batch", "positive integer"]),
    (["train", "--lr", "nan"], ["--lr", "positive"]),
    (["train", "--channels", "0"], ["--channels", "positive"]),
    (["train", "--width", "-1"], ["--width", "positive"]),
    (["train", "--dp", "0"], ["--dp", "positive"]),
    (["train", "--domain", "0"], ["--domain", "positive"]),
    (["train", "--seed", "-1"], ["--seed", "non-negative"]),
    (["train", "--resolution", "7x16"], ["--resolution", "even"]),
    (["train", "--resolution", "0x16"], ["--resolution", "positive"]),
    (["train", "--resolution", "axb"], ["--resolution", "HxW"]),
    (["train", "--checkpoint-every", "0", "--checkpoint-dir", "ck"], ["--checkpoint-every", "positive"]),
    (["train", "--checkpoint-every", "5"], ["--checkpoint-every", "--checkpoint-dir"]),
    (["train", "--resume"], ["--resume", "--checkpoint-dir"]),
    (["train", "--resume", "--resume-from", ".", "--checkpoint-dir", "ck"], ["--resume-from", "not allowed"]),
    (["train", "--resume-from", NO_DIR], ["--resume-from", "no such directory"]),
    (["train", "--dp", "3", "--global-batch", "4"], ["--global-batch", "not divisible", "--dp 3"]),
    (["train", "--device", "tpu"], ["--device", "invalid choice"]),
    (["train", "--model", "resnet"], ["--model", "invalid choice"]),
    (["info", "--domain", "0"], ["--domain", "positive"]),
    (["plan", "credit_dtensor.models:unet", "--input-shape", "1,3"], ["--input-shape", "B,C,H"]),
    (["plan", "credit_dtensor.models:unet", "--input-shape", "1,0,8"], ["--input-shape", ">= 1"]),
    (["plan", "credit_dtensor.models:unet", *SHAPE, "--domain", "0"], ["--domain", "positive"]),
    (["plan", "credit_dtensor.models:unet", *SHAPE, "--kwargs", "[1]"], ["--kwargs", "JSON object"]),
    (["plan", "credit_dtensor.models:unet", *SHAPE, "--kwargs", "{bad"], ["--kwargs", "not valid JSON"]),
    (["plan", "credit_dtensor.models:unet", *SHAPE], ["--domain", "required outside torchrun"]),
    (["plan", "credit_dtensor.models:unet"], ["--input-shape", "required"]),
    (["check", "credit_dtensor.models:unet", *SHAPE, "--domain", "2", "--atol", "0"], ["--atol", "positive"]),
    (["check", "credit_dtensor.models:unet", *SHAPE, "--domain", "2", "--seed", "-2"], ["--seed", "non-negative"]),
    (["check", "credit_dtensor.models:unet", *SHAPE, "--dtype", "float16"], ["--dtype", "invalid choice"]),
    (["bench", "--worlds", "0"], ["--worlds", "positive"]),
    (["bench", "--worlds", "1,x"], ["--worlds", "integer"]),
    (["bench", "--resolutions", "32"], ["--resolutions", "HxW"]),
    (["bench", "--cases", "conv3x3,nope"], ["--cases", "nope", "choose from"]),
    (["bench", "--batch", "0"], ["--batch", "positive"]),
    (["bench", "--channels", "0"], ["--channels", "positive"]),
    (["bench", "--repeats", "0"], ["--repeats", "positive"]),
    (["bench", "--warmup", "-1"], ["--warmup", "non-negative"]),
    (["bench", "--threads", "0"], ["--threads", "positive"]),
    (["bench", "--from-json", NO_DIR], ["--from-json", "no such file"]),
    (["bench", "--profile", "nope"], ["--profile", "invalid choice"]),
    (["frobnicate"], ["invalid choice"]),
    ([], ["required", "COMMAND"]),
    (["info", "--bogus"], ["unrecognized arguments", "--bogus"]),
]


def _no_torchrun(monkeypatch) -> None:
    for k in TORCHRUN_VARS:
        monkeypatch.delenv(k, raising=False)


def _usage_error(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2, (argv, info.value.code, err)
    return err


@pytest.mark.parametrize("argv,words", MISUSES, ids=[" ".join(a) or "no-args" for a, _ in MISUSES])
def test_misuse_is_a_usage_error(argv, words, capsys, monkeypatch):
    _no_torchrun(monkeypatch)
    err = _usage_error(argv, capsys)
    assert "usage: credit-dtensor" in err and "error:" in err, err
    missing = [w for w in words if w not in err]
    assert not missing, f"{argv}: message lacks {missing}:\n{err}"
    assert not re.search(r"\w\(", err.split("error:", 1)[1]), f"message suggests a Python call: {err}"


def test_files_and_factories_are_checked_before_any_work(tmp_path, capsys, monkeypatch):
    """Issue 17: a checkpoint dir that is (or is under) a file fails before training, a malformed
    --from-json file is a usage error, and a factory that rejects its arguments or raises is one
    line (with the --kwargs hint), never a traceback."""
    _no_torchrun(monkeypatch)
    afile = tmp_path / "afile"
    afile.write_text("x")
    for target, where in ((afile, "is a file"), (afile / "sub", "which is a file")):
        err = _usage_error(["train", "--steps", "1", "--checkpoint-dir", str(target)], capsys)
        assert "--checkpoint-dir" in err and where in err and "Traceback" not in err, err
    bad = tmp_path / "rows.jsonl"
    for text, words in (("not json\n", "is not JSON"), ("[1]\n", "not a JSON object")):
        bad.write_text(text)
        err = _usage_error(["bench", "--from-json", str(bad)], capsys)
        assert "--from-json" in err and words in err and "line 1" in err and "Traceback" not in err, err
    factories = tmp_path / "factories.py"
    factories.write_text("def needs(a):\n    raise AssertionError\n\ndef boom():\n    raise RuntimeError('boom')\n")
    cases = (
        (f"{factories}:needs", {}, ["missing a required argument", "--kwargs"]),
        (f"{factories}:boom", {}, ["raised RuntimeError: boom"]),
        ("credit_dtensor.models:unet", {"nonexistent": 1}, ["TypeError", "nonexistent", "--kwargs"]),
    )
    for target, kwargs, words in cases:
        code = main(["plan", target, *SHAPE, "--domain", "2", "--kwargs", json.dumps(kwargs)])
        out = capsys.readouterr()
        text = " ".join((out.out + out.err).split())
        assert code == 2 and all(w in text for w in words) and "Traceback" not in text, (target, code, text)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_gpu_is_a_usage_error(capsys, monkeypatch):
    _no_torchrun(monkeypatch)
    err = _usage_error(["train", "--device", "cuda", "--steps", "1"], capsys)
    assert "--device" in err and "no CUDA GPU" in err and "--device cpu" in err
    assert "NCCL" not in err and "Traceback" not in err
    assert not dist.is_initialized()


def test_bad_torchrun_environment_is_a_usage_error(capsys, monkeypatch):
    # RANK/WORLD_SIZE set but no rendezvous address: a clean message, no group left behind
    _no_torchrun(monkeypatch)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    for command in (["info"], ["train", "--steps", "1"], ["plan", "credit_dtensor.models:unet", *SHAPE]):
        err = _usage_error(command, capsys)
        assert "MASTER_ADDR" in err and "torchrun" in err and "Traceback" not in err
        assert not re.search(r"\w\(", err.split("error:", 1)[1]), err
    assert not dist.is_initialized()


def test_misuse_exit_status_of_the_installed_command():
    """The real process exit status, through ``python -m credit_dtensor.cli``."""
    proc = subprocess.run(
        [sys.executable, "-m", "credit_dtensor.cli", "train", "--steps", "-3"],
        capture_output=True,
        text=True,
        env=_clean_env(),
        timeout=120,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "argument --steps: must be a positive integer" in proc.stderr
    assert "Traceback" not in proc.stderr


# --- the exit-status policy: 0 ok, 1 failed check, 2 usage/configuration --------------------------


def test_configuration_rejected_by_the_library_exits_2(monkeypatch, capsys):
    from credit_dtensor.cli import info as info_mod

    def boom(args, console):
        raise DomainParallelError("boom: use fewer ranks")

    monkeypatch.setattr(info_mod, "cmd_info", boom)
    assert main(["info"]) == EXIT_USAGE == 2
    assert "credit-dtensor info" in capsys.readouterr().out


def test_unimportable_factory_exits_2_and_failed_plan_exits_1(monkeypatch, capsys):
    _no_torchrun(monkeypatch)
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["plan", "no_such_module:f", *SHAPE, "--domain", "2"]) == EXIT_USAGE
    assert "cannot import no_such_module" in capsys.readouterr().out
    bad = ["plan", "credit_dtensor.models:crossformer", "--input-shape", "1,3,32,16", "--domain", "4"]
    assert main([*bad, "--kwargs", '{"windows": [[2, 4], [2, 2]]}']) == EXIT_FAILED == 1


def test_train_without_any_loadable_checkpoint_exits_1(tmp_path, monkeypatch, capsys):
    _no_torchrun(monkeypatch)
    monkeypatch.setenv("COLUMNS", "200")
    (tmp_path / "step_00000002").mkdir()  # looks like a checkpoint, holds nothing
    argv = ["train", "--steps", "3", "--resolution", "8x16", "--width", "4", "--checkpoint-dir", str(tmp_path)]
    assert main([*argv, "--resume"]) == EXIT_FAILED
    out = capsys.readouterr().out
    assert "skipping checkpoint" in out and "COMPLETE.json" in out and "no checkpoint under" in out
    assert not dist.is_initialized()
    # with the empty directory removed: a fresh start, and the final checkpoint is written
    (tmp_path / "step_00000002").rmdir()
    assert main([*argv, "--resume"]) == EXIT_OK
    assert "(started at step 0)" in capsys.readouterr().out
    assert (tmp_path / "step_00000003" / "COMPLETE.json").is_file()


# --- help texts, --version -----------------------------------------------------------------------


def test_version(capsys):
    import credit_dtensor

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"credit-dtensor {credit_dtensor.__version__}"


def test_every_option_has_help_with_its_default(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit):
        main(["--help"])
    top = capsys.readouterr().out
    assert "exit status:" in top and "usage error" in top and "CREDIT_DTENSOR_PG_TIMEOUT" in top
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert set(sub.choices) == set(COMMANDS)
    for name, p in sub.choices.items():
        assert p.formatter_class is HelpFormatter, name
        text = p.format_help().split("\noptions:", 1)[1]
        for action in p._actions:
            if isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
                continue
            assert action.help, f"{name} {action.option_strings or action.dest}: no help text"
            if action.option_strings and action.default is not argparse.SUPPRESS:
                flag = action.option_strings[-1]
                line = text.split(f"  {flag}", 1)[1].split("\n  -", 1)[0]
                assert "(default:" in " ".join(line.split()), f"{name} {flag}: help shows no default"


def _load_script(name: str):
    import importlib.util

    path = os.path.join(ROOT, "scripts", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"_script_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["bench", "bench_conv", "bench_norm", "train"])
def test_script_help_is_plain_text_with_complete_sentences(name, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "120")
    module = _load_script(name)
    with pytest.raises(SystemExit) as info:
        module.main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for markup in ("``", ":func:", ":mod:", ":class:", ":meth:"):
        assert markup not in text, f"scripts/{name}.py --help shows Sphinx markup {markup!r}"
    description = text.split("\n\n", 2)[1]
    assert description[0].isupper() and description.rstrip().endswith("."), description


# --- bench output: a table, JSON only with --json ------------------------------------------------


def test_bench_prints_a_table_and_json_only_when_asked(tmp_path, monkeypatch, capsys):
    _no_torchrun(monkeypatch)
    monkeypatch.setenv("COLUMNS", "250")
    raw = tmp_path / "rows.jsonl"
    small = ["--worlds", "2", "--resolutions", "8x16", "--cases", "conv3x3", "--repeats", "1", "--warmup", "0"]
    assert main(["bench", *small, "--raw", str(raw)]) == 0
    out = capsys.readouterr().out
    assert "conv3x3" in out and "overhead" in out and not any(line.startswith("{") for line in out.splitlines())
    assert len(raw.read_text().splitlines()) == 2  # every rank's row
    assert main(["bench", "--from-json", str(raw), "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert [(s["case"], s["world"]) for s in lines] == [("conv3x3", 2)]
    assert all("bytes_ratio" in s and "overhead" in s for s in lines)


def test_bench_overhead_case_runs_every_variant(tmp_path, monkeypatch, capsys):
    """The side-by-side overhead case: bound, plain wrappers, eager (compile variants skipped here:
    ``--backends none``); a row per variant, and the rendered table names them."""
    _no_torchrun(monkeypatch)
    monkeypatch.setenv("COLUMNS", "250")
    raw = tmp_path / "overhead.jsonl"
    argv = ["bench", "--cases", "overhead", "--worlds", "2", "--fields", "1x4x8x8", "--backends", "none"]
    assert main([*argv, "--overhead-repeats", "2", "--warmup", "0", "--raw", str(raw)]) == 0
    out = capsys.readouterr().out
    for word in ("bound", "plain", "eager", "conv3x3", "conv_gn_silu"):
        assert word in out, (word, out)
    variants = {json.loads(line).get("variant") for line in raw.read_text().splitlines() if line.strip()}
    assert {"bound", "plain", "eager"} <= variants, variants


def test_bench_models_case_times_whole_steps_exactly(tmp_path, monkeypatch, capsys):
    """Whole training steps of the three models: one device, CREDIT-style plain tensors (where its
    wrappers apply), credit_dtensor eager, on the same ranks; credit_dtensor's output matches one
    device (fp32), the plain path's BatchNorm keeps local statistics (so it does not), and both send
    about the same bytes (halos + gradients)."""
    _no_torchrun(monkeypatch)
    monkeypatch.setenv("COLUMNS", "250")
    raw = tmp_path / "step.jsonl"
    argv = ["bench", "--cases", "models", "--worlds", "2", "--step-fields", "1x3x32x32", "--width", "4"]
    assert main([*argv, "--backends", "none", "--repeats", "1", "--warmup", "0", "--raw", str(raw)]) == 0
    out = capsys.readouterr().out
    for word in ("one", "plain", "eager", "resunet", "demo", "crossformer", "syncs"):
        assert word in out, (word, out)
    assert main(["bench", "--from-json", str(raw), "--json", "--plots", str(tmp_path / "plots")]) == 0
    if importlib.util.find_spec("matplotlib") is not None:  # the bench extra; skipped with a notice otherwise
        assert (tmp_path / "plots" / "steps.png").stat().st_size > 0
    rows = [s for s in map(json.loads, capsys.readouterr().out.splitlines()) if s]
    by = {(s["model"], s["variant"]): s for s in rows}
    assert set(by) == {
        *((m, v) for m in ("resunet", "demo") for v in ("one", "plain", "eager", "overlap")),
        *(("crossformer", v) for v in ("one", "eager", "overlap")),  # even kernels: no CREDIT-style path
    }
    for model in ("resunet", "demo", "crossformer"):
        eager, overlap = by[(model, "eager")], by[(model, "overlap")]
        assert eager["max_rel_diff"] < 1e-5 and overlap["max_rel_diff"] < 1e-5, model
        assert overlap["sent_bytes"] == eager["sent_bytes"], model  # the same gradients, bucketed
        assert eager["collectives"] > 0 and eager["speedup"] > 0, model
    # a step's calls, not the one-time agreements of the second step (26 norms' fold decisions):
    # 71 rounds, each one all-to-all of the two ranks (26 norms forward and backward, 13 with a
    # convolution's halo folded in; 10 halo rounds forward, 9 backward: the stem's input needs no
    # gradient), and the gradients' all-reduce
    assert by[("resunet", "eager")]["collectives"] == 71 + 1
    # CREDIT's BatchNorm keeps local statistics (not exact); its GroupNorm sums over the ranks (exact)
    assert by[("resunet", "plain")]["max_rel_diff"] > 1e-5 > by[("demo", "plain")]["max_rel_diff"]
    for model in ("resunet", "demo"):
        assert 0.9 < by[(model, "eager")]["sent_bytes"] / by[(model, "plain")]["sent_bytes"] < 1.2, model


def test_bench_models_skips_what_cannot_run_on_these_shards(monkeypatch, capsys):
    """At 3 ranks a 32x32 field gives uneven shards: the CrossFormer's windows do not fit them (a
    clear error on every rank: its model is skipped with the reason, the benchmark goes on), and
    CREDIT's plain wrappers have no uneven geometry for strided convs (no plain path); the demo
    U-Net's eager step is still exact."""
    from credit_dtensor.models.demo import DemoNet
    from credit_dtensor.models.resunet import resunet
    from credit_dtensor.tools.bench_step import _reference_run

    def _plain_fits(model, x, world):
        return _reference_run(model, x, world)[1]

    x = torch.zeros(1, 3, 32, 32)
    assert _plain_fits(resunet(3, 3, 4), x, 2) and not _plain_fits(resunet(3, 3, 4), x, 3)
    assert _plain_fits(DemoNet(3, 4), x, 4) and not _plain_fits(DemoNet(3, 4), x, 3)
    conv = torch.nn.Conv2d(3, 3, 3, padding=1)
    assert _plain_fits(conv, torch.zeros(1, 3, 4, 8), 4) and not _plain_fits(conv, torch.zeros(1, 3, 3, 8), 4)
    _no_torchrun(monkeypatch)
    monkeypatch.setenv("COLUMNS", "250")
    argv = ["bench", "--cases", "models", "--worlds", "3", "--step-fields", "1x3x32x32", "--width", "4"]
    argv += ["--step-models", "crossformer,demo", "--backends", "none", "--repeats", "1", "--warmup", "0", "--json"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    rows = [json.loads(line) for line in captured.out.splitlines() if line.startswith("{")]
    assert {(r["model"], r["variant"]) for r in rows} == {("demo", v) for v in ("one", "eager", "overlap")}
    assert all(r["max_rel_diff"] < 1e-5 for r in rows if r["variant"] != "one")
    assert "skipped crossformer" in captured.err and "windows of 2 rows" in captured.err, captured.err


# --- the local process launcher ------------------------------------------------------------------


def _launched(ctx, fail_rank: int, domain_error: bool):
    if ctx.rank == fail_rank:
        raise (DomainParallelError if domain_error else RuntimeError)(f"rank {ctx.rank} says no")
    ctx.post(("hello", ctx.rank))
    total = torch.tensor([ctx.rank + 1.0])
    dist.all_reduce(total)
    return float(total)


def test_launcher_collects_results_and_reports_a_failing_rank():
    from credit_dtensor.tools.launch import LaunchError, run_ranks

    seen = []
    got = run_ranks(_launched, 2, (-1, False), on_message=lambda r, v: seen.append((r, v)), timeout=120)
    assert got == [3.0, 3.0] and sorted(seen) == [(0, ("hello", 0)), (1, ("hello", 1))]
    with pytest.raises(LaunchError, match="rank 1 failed: DomainParallelError: rank 1 says no") as info:
        run_ranks(_launched, 2, (1, True), timeout=120)
    assert info.value.rank == 1 and info.value.domain_error
    assert "Traceback" in info.value.detail


# --- layout: the core package does not import the tooling ---------------------------------------


def test_core_package_does_not_import_tools_or_cli():
    pkg = os.path.join(ROOT, "credit_dtensor")
    offenders = []
    for dirpath, _dirs, files in os.walk(pkg):
        rel = os.path.relpath(dirpath, pkg)
        if rel.split(os.sep)[0] in ("tools", "cli"):
            continue
        for name in files:
            if not name.endswith(".py"):
                continue
            text = open(os.path.join(dirpath, name), encoding="utf-8").read()
            if re.search(r"^\s*(from|import)\s+(credit_dtensor\.|\.+)(tools|cli)\b", text, flags=re.M):
                offenders.append(os.path.join(rel, name))
    assert not offenders, f"core modules import credit_dtensor.tools / .cli: {offenders}"


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="plots need the bench extra (matplotlib)")
def test_bench_plots_write_every_figure(tmp_path):
    """The op benchmark's four ratio plots and time vs N, and the overhead case's wall and CPU plots,
    from summaries of the shape the benchmark writes."""
    from credit_dtensor.cli.bench import plot, plot_overhead
    from credit_dtensor.tools.bench_overhead import VARIANTS

    ops = [
        {"case": c, "world": n, "H": h, "W": 2 * h, "bytes_ratio": 1.0, "act_ratio": 1.05, "flops_ratio": 1.0}
        | {"overhead": 1.2, "time_dtensor_s": 1e-3 * h / n}
        for c in ("conv3x3", "group_norm")
        for n in (1, 2)
        for h in (32, 64)
    ]
    over = [
        {"case": "conv3x3", "field": [1, 8, 16, 32], "variant": v, "world": n, "time_s": 1e-3 * n}
        | {"q1_s": 0.9e-3 * n, "q3_s": 1.1e-3 * n, "cpu_s": 1e-3}
        for v in VARIANTS
        for n in (1, 2)
    ]
    paths = plot(ops, tmp_path) + plot_overhead(over, tmp_path)
    names = {"bytes.png", "memory.png", "flops.png", "time_ratio.png", "time_vs_n.png"}
    assert {p.name for p in paths} == names | {"overhead_ops.png", "overhead_ops_cpu.png"}
    assert all(p.stat().st_size > 0 for p in paths)
