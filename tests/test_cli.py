"""The debugging CLI: every command run as `python -m sparsec.cli ...` on a small built-in demo (or the
structured MLP of tests/cli_model.py), checking what it prints, not just its exit status."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sparsec import cli, logging_config
from sparsec.pass_manager import PassContext

TESTS = Path(__file__).parent
ROOT = TESTS.parent
WRONG_PASS = str(TESTS / "cli_wrong_pass.py")
STRUCTURED = f"{TESTS / 'cli_model.py'}:structured_mlp"
COMMANDS = ("inspect", "opt", "bisect", "explain", "report", "bench")


def run_cli(*args, env=None, cwd=None, check_rc=0):
    environment = {**os.environ, "COLUMNS": "220", **(env or {})}
    if not (env and "SPARSEC_LOG" in env):
        environment.pop("SPARSEC_LOG", None)
    proc = subprocess.run([sys.executable, "-m", "sparsec.cli", *args], capture_output=True, text=True,
                          env=environment, cwd=cwd or ROOT, timeout=120)
    if check_rc is not None:
        assert proc.returncode == check_rc, f"rc={proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


def run_here(capsys, *args, check_rc=0):
    """The CLI in this process (quicker than a subprocess: no second torch import); (stdout, stderr)."""
    capsys.readouterr()
    rc = cli.main(list(args))
    out, err = capsys.readouterr()
    if check_rc is not None:
        assert rc == check_rc, f"rc={rc}\nstdout:\n{out}\nstderr:\n{err}"
    return out, err


# ---------------------------------------------------------------------------------------------
# --help
# ---------------------------------------------------------------------------------------------

def test_every_command_is_listed_and_its_help_is_complete():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert set(COMMANDS) <= set(sub.choices)
    for name in COMMANDS:
        command = sub.choices[name]
        text = command.format_help()
        assert "MODEL_SPEC" in text and "file.py:function" in text, name
        for action in command._actions:
            assert action.help and action.help.strip(), f"sparsec {name} {action.option_strings or action.dest}: no help"
    opt_help = sub.choices["opt"].format_help()
    for flag in ("--passes", "--print-ir-after", "--print-ir-before", "--verify-each", "--stats", "--emit", "--output",
                 "--rewrite-limit", "--load-passes"):
        assert flag in opt_help
    assert "-o FILE.html" in sub.choices["report"].format_help() and "--png" in sub.choices["report"].format_help()


def test_top_level_help_lists_the_commands():
    out = cli.build_parser().format_help()
    for name in COMMANDS:
        assert name in out


# ---------------------------------------------------------------------------------------------
# inspect
# ---------------------------------------------------------------------------------------------

def test_inspect_shows_shape_density_pattern_and_tiles_per_layer():
    out = run_cli("inspect", "gpt2").stdout
    assert "tiles 16" in out and "tiles 64" in out
    line = next(l for l in out.splitlines() if "c_attn.weight" in l)
    assert "384x128" in line and "0.200" in line and "unstructured" in line and "12/12" in line
    assert "mlp_proj.weight" in out and "overall density 0.200" in out


def test_inspect_json_finds_the_structure_of_each_weight(capsys):
    rows = {r["name"]: r for r in json.loads(run_here(capsys, "inspect", STRUCTURED, "--json")[0])}
    assert rows["fc1.weight"]["pattern"] == "channels" and rows["fc1.weight"]["zero_rows"] == 128
    assert rows["fc2.weight"]["pattern"] == "block16" and rows["fc2.weight"]["tiles"]["16"] < 100
    assert rows["fc3.weight"]["pattern"] == "2:4"


# ---------------------------------------------------------------------------------------------
# opt
# ---------------------------------------------------------------------------------------------

def test_opt_prints_ir_before_and_after_with_stats_emits_python_and_logs(tmp_path):
    target = tmp_path / "out.py"
    proc = run_cli("opt", "mlp", "--passes", "mask-fold,analyze", "--print-ir-before", "mask-fold",
                   "--print-ir-after", "analyze", "--verify-each", "--stats", "--emit", "python", "-o", str(target),
                   env={"SPARSEC_LOG": "passes"})
    err = proc.stderr
    before, after = err.split("// IR before mask-fold")[1].split("// IR after analyze")
    assert "aten.mul.Tensor" in before and "constant fc1.weight_mask" in before  # the pruning hook's mask
    after_ir = after.split("}")[0]
    assert "aten.mul" not in after_ir  # the masks are folded
    weight_line = next(l for l in after_ir.splitlines() if "constant fc1.weight" in l)
    assert "float32[512, 128]" in weight_line and "density=0.200" in weight_line and "pattern=unstructured" in weight_line
    assert "// IR after mask-fold" not in err  # only what was asked for
    assert "pass statistics" in err and "folded=3" in err
    assert "[sparsec.passes] I pass mask-fold" in err  # SPARSEC_LOG=passes
    code = target.read_text()
    assert code.startswith("def forward") and "torch.ops.aten.linear.default" in code


def test_opt_print_ir_after_channel_slice_shows_the_sliced_shapes():
    """The built-in llama demo has half of each FFN's 1536 channels pruned: after channel-slice the
    IR shows gate/up with 768 rows and down with 768 columns, and nothing before it is printed."""
    proc = run_cli("opt", "llama", "--passes", "mask-fold,analyze,channel-slice", "--print-ir-after", "channel-slice",
                   "--emit", "none")
    ir_text = proc.stderr.split("// IR after channel-slice")[1]
    lines = {name: next(l for l in ir_text.splitlines() if f"constant layers.0.mlp.{name}.weight " in l)
             for name in ("gate_proj", "up_proj", "down_proj")}
    assert "float32[768, 512]" in lines["gate_proj"] and "float32[768, 512]" in lines["up_proj"]
    assert "float32[512, 768]" in lines["down_proj"]
    assert "// IR after mask-fold" not in proc.stderr and "// IR after analyze" not in proc.stderr


def test_opt_emits_ir_to_stdout_by_default(capsys):
    out, _ = run_here(capsys, "opt", "mlp", "--passes", "mask-fold")
    assert out.startswith("graph {") and "aten.linear(" in out and out.rstrip().endswith("}")


def _have_mlir() -> bool:
    try:
        import sparsec.codegen.mlir  # noqa: F401
        return True
    except ImportError:
        return False


@pytest.mark.skipif(_have_mlir(), reason="torch-mlir (the mlir extra) is installed here: the error cannot happen")
def test_opt_emit_mlir_says_clearly_when_it_is_not_there(capsys):
    _, err = run_here(capsys, "opt", "mlp", "--passes", "analyze", "--emit", "mlir", check_rc=2)
    assert "MLIR" in err and "mlir extra" in err


@pytest.mark.skipif(not _have_mlir(), reason="torch-mlir (the mlir extra) is not installed")
def test_opt_emit_mlir_writes_sparse_encodings():
    proc = run_cli("opt", "llama", "--emit", "mlir")
    out = proc.stdout
    assert "layers.0.self_attn.o_proj.weight (CSR)" in out  # the demo's 90% unstructured attention
    assert "#sparse_tensor.encoding<{ map = (d0, d1) -> (d0 : dense, d1 : compressed)" in out
    assert "torch.aten.mm" in out and "func.func @main" in out


def test_opt_verify_each_names_a_wrong_pass_and_rewrite_limit_reproduces_it(capsys):
    common = ("opt", "gpt2", "--passes", "analyze,test-wrong-bias", "--load-passes", WRONG_PASS, "--verify-each", "--emit", "none")
    _, err = run_here(capsys, *common, check_rc=1)
    assert "pass 'test-wrong-bias' changed the model's output" in err and "sparsec bisect" in err
    # The third bias rewrite is the wrong one: with only two rewrites allowed the pipeline verifies.
    _, err = run_here(capsys, *common, "--rewrite-limit", "2")
    assert "rewrite limit 2: 6 rewrites asked for, 4 skipped" in err and "last rewrite allowed: #2 copy" in err


def test_unknown_pass_is_a_clear_error(capsys):
    _, err = run_here(capsys, "opt", "mlp", "--passes", "analyze,no-such-pass", check_rc=2)
    assert "no-such-pass" in err and "known passes" in err


# ---------------------------------------------------------------------------------------------
# bisect
# ---------------------------------------------------------------------------------------------

def test_bisect_names_the_wrong_pass_and_its_first_bad_rewrite():
    proc = run_cli("bisect", "gpt2", "--passes", "mask-fold,analyze,test-harmless,test-wrong-bias",
                   "--load-passes", WRONG_PASS, check_rc=1)
    out = proc.stdout
    assert "pass 3/4 test-harmless: ok (2 rewrites)" in out
    assert "first bad pass: test-wrong-bias (pass 4 of 4)" in out
    # Rewrites are counted over the pipeline: 2 in test-harmless, then copy ln_1.bias, c_attn.bias, negate c_proj.bias.
    assert "first bad rewrite: #5 in pass test-wrong-bias: negate c_proj.bias" in out
    assert "--rewrite-limit 5" in out
    assert "--- IR before rewrite #5" in out and "+++ IR after rewrite #5" in out
    assert "constant c_proj.bias (%c_proj_bias): 128 of 128 values changed" in out


def test_bisect_of_a_correct_pipeline_finds_nothing(capsys):
    out, _ = run_here(capsys, "bisect", "mlp", "--passes", "mask-fold,analyze,test-harmless", "--load-passes", WRONG_PASS)
    assert "no pass changes the output beyond tolerance (3 passes, 2 rewrites checked)" in out


def test_allow_rewrite_counts_over_the_pipeline_and_honours_the_limit():
    import sparsec

    ctx = PassContext(options=sparsec.Options(), example_inputs=[])
    assert [ctx.allow_rewrite(f"r{i}") for i in range(3)] == [True] * 3
    ctx.rewrite_limit = 4
    assert [ctx.allow_rewrite(f"s{i}") for i in range(3)] == [True, False, False]
    assert ctx.rewrite_count == 6 and ctx.rewrites[3] == (4, "s0", True) and ctx.rewrites[4] == (5, "s1", False)


# ---------------------------------------------------------------------------------------------
# explain
# ---------------------------------------------------------------------------------------------

def test_explain_shows_each_pass_per_layer_and_the_kernel():
    out = run_cli("explain", "mlp").stdout
    table = out.split("what each pass did")[0]
    line = next(l for l in table.splitlines() if "fc2.weight" in l)
    assert "linear" in line and "512x512" in line and "0.200" in line and "unstructured" in line
    for heading in ("kernel", "predicted ms", "measured ms"):
        assert heading in table
    per_layer = out.split("what each pass did, per layer:")[1]
    assert "fc1.weight (linear, kernel" in per_layer
    assert "mask-fold: appears as a linear with a constant weight 512x128 (density 0.200, unstructured)" in per_layer
    assert "passes" in out and "folded=3" in out


def test_explain_json_on_structured_weights(capsys):
    data = json.loads(run_here(capsys, "explain", STRUCTURED, "--json")[0])
    layers = {r["name"]: r for r in data["layers"]}
    assert layers["fc1.weight"]["pattern"] == "channels" and layers["fc3.weight"]["pattern"] == "2:4"
    assert all("kernel" in r and "tiles_before" in r and "tiles_after" in r for r in data["layers"])
    assert [p["name"] for p in data["passes"]] == data["pipeline"].split(",")
    if "co-permute" in data["pipeline"]:
        assert any("co-permute" == c["pass"] for c in data["changes"].get("fc2.weight", []))


# ---------------------------------------------------------------------------------------------
# report (the HTML itself is checked in test_html_report.py)
# ---------------------------------------------------------------------------------------------

def test_report_writes_html_and_one_layer_png(tmp_path):
    page = tmp_path / "report.html"
    out = run_cli("report", "mlp", "-o", str(page)).stdout
    assert f"wrote {page}: 3 layers, 3 heat maps" in out
    text = page.read_text()
    assert text.count("<svg") >= 7 and "fc3.weight" in text and "tiles 16/32/64 before" in text
    assert "http://" not in text.replace("http://www.w3.org/2000/svg", "")  # self-contained


def test_report_png_of_one_layer(tmp_path, capsys):
    png = tmp_path / "fc1.png"
    out, _ = run_here(capsys, "report", "mlp", "--layer", "fc1", "--png", str(png))
    assert "fc1.weight tile occupancy at 16x16, before (left) and after (right)" in out
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    _, err = run_here(capsys, "report", "mlp", "--png", str(tmp_path / "x.png"), check_rc=2)
    assert "--png needs exactly one layer" in err and "fc1.weight" in err


# ---------------------------------------------------------------------------------------------
# bench
# ---------------------------------------------------------------------------------------------

def test_bench_times_eager_and_sparsec_and_shows_the_floor():
    out = run_cli("bench", "mlp", "--backends", "eager,sparsec", "--no-inductor", "--repeats", "3", "--warmup", "1").stdout
    assert "median of 3 runs" in out
    eager = next(l for l in out.splitlines() if l.startswith("│ eager"))
    compiled = next(l for l in out.splitlines() if l.startswith("│ sparsec"))
    assert "1.00x" in eager and "yes" in eager and "yes" in compiled
    assert "floor (any kernel)" in out and "density 0.200" in out and "5.00x" in out


# ---------------------------------------------------------------------------------------------
# SPARSEC_LOG
# ---------------------------------------------------------------------------------------------

def test_sparsec_log_spec_parsing():
    import logging

    levels, unknown = logging_config.parse("passes,+kernels,sparsec.codegen.cpp,bogus")
    assert levels["sparsec.passes"] == logging.INFO and levels["sparsec.codegen"] == logging.DEBUG
    assert levels["sparsec.codegen.cpp"] == logging.INFO and unknown == ["bogus"]
    assert logging_config.parse("all")[0] == {"sparsec": logging.INFO}


def test_sparsec_log_shows_the_backend_at_work_inside_torch_compile():
    code = ("import torch, torch.nn as nn\n"
            "m = nn.Sequential(nn.Linear(8, 8), nn.ReLU()).eval()\n"
            "with torch.no_grad():\n"
            "    torch.compile(m, backend='sparsec', options={'inductor': False})(torch.randn(2, 8))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "SPARSEC_LOG": "passes"})
    assert proc.returncode == 0, proc.stderr
    assert "[sparsec.passes] I pass analyze" in proc.stderr
