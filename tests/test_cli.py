"""The CLI: bad input gives one line on stderr and exit code 2; commands delegate to their modules."""

from __future__ import annotations

import pytest
import torch

from samrepro import cli, models, patch_table, plans


def run(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = cli.main(list(argv))
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["ablate", "vit_z", "cpu"], "invalid choice: 'vit_z' (choose from 'tiny', 'vit_b', 'vit_l', 'vit_h')"),
        (["ablate", "tiny", "tpu", "--weights", "random"], "unknown device 'tpu'; valid: cpu, cuda"),
        (["ablate", "tiny", "cpu", "--images", "0"], "expected a positive integer, got 0"),
        (["ablate", "tiny", "cpu", "--batch-size", "-2"], "expected a positive integer, got -2"),
        (
            ["ablate", "tiny", "cpu", "--plan", "nope", "--weights", "random"],
            f"unknown plan 'nope'; valid: {', '.join(plans.available_plans())}",
        ),
        (["ablate", "tiny", "cpu", "--mode", "sideways"], "invalid choice: 'sideways'"),
        (["ablate", "tiny", "cpu", "--weights", "/no/such.pth"], "not found: /no/such.pth"),
        (["ablate", "tiny", "cpu", "--weights", "random", "--data", "imagenet"], "coco:DIR, noise[:P]"),
        (["ablate", "tiny", "cpu", "--weights", "random", "--data", "noise:0"], "noise:P needs a positive number"),
        (["report", "/no/such/dir"], "results folder not found"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["patches", "--colour"], "unrecognized arguments: --colour"),
    ],
)
def test_bad_input_one_line_exit_2(capsys, argv, message):
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and message in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_gpu(capsys):
    code, _, err = run(capsys, "ablate", "tiny", "cuda", "--weights", "random")
    assert code == 2 and err.count("\n") == 1 and "no CUDA GPU is available" in err


def test_missing_shipped_weights(capsys, monkeypatch, tmp_path):
    """A copy installed without its weights: the default tiny run stops before any step and says what to do."""
    monkeypatch.setattr(models, "TINY_WEIGHTS", tmp_path / "sam_tiny.safetensors")
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, "ablate", "tiny", "cpu")
    assert code == 2 and err.count("\n") == 1
    assert "shipped tiny weights are missing" in err and "--weights random" in err


def test_bad_plan_file_names_file_and_key(capsys, tmp_path):
    plan = tmp_path / "p.toml"
    plan.write_text('name = "p"\n[[steps]]\nname = "fp32"\nwhat = 1\n')
    code, _, err = run(capsys, "ablate", "tiny", "cpu", "--plan", str(plan), "--weights", "random")
    assert code == 2 and err.count("\n") == 1 and str(plan) in err and "unknown key(s) ['what']" in err


def test_debug_gives_the_traceback(capsys):
    with pytest.raises(ValueError, match="unknown device"):
        cli.main(["ablate", "tiny", "tpu", "--weights", "random", "--debug"])


def test_patches_table(capsys):
    code, out, _ = run(capsys, "patches")
    lines = out.splitlines()
    assert code == 0 and lines[0].split()[0] == "name"
    sync = next(line for line in lines if line.startswith("sync_free"))
    assert "exact" in sync and "yes" in sync


def test_patches_markdown_is_the_generated_table(capsys):
    code, out, _ = run(capsys, "patches", "--markdown")
    assert code == 0 and out == patch_table.markdown() + "\n"
