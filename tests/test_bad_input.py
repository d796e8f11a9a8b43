"""Every bad input: one line on stderr, exit code 2, before any step runs; the traceback only with --debug."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from samrepro import cli, inputs, models, plans, registry
from samrepro.data import write_coco
from samrepro.models import TINY_WEIGHTS, build
from samrepro.patch import EXACT, Patch, PatchConfig, Requires

ABLATE = ["ablate", "tiny", "cpu", "--weights", "random", "--images", "2", "--batch-size", "2", "--no-track"]
TOML_ERROR = 'name = "p"\n[[steps]]\nname = "fp32"\nadd = [bf16]\n'  # an unquoted string on line 4


def one_line(capsys, argv: list[str]) -> str:
    """Run the CLI, check the contract (exit 2, nothing on stdout, one line on stderr), return that line."""
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse
        code = e.code
    out, err = capsys.readouterr()
    assert (code, out, err.count("\n")) == (2, "", 1), err
    return err


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    """Run where a default results folder would appear, and check that none did: bad input stops everything."""
    monkeypatch.chdir(tmp_path)
    yield
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["ablate", "vit_x", "cpu"], "invalid choice: 'vit_x' (choose from 'tiny', 'vit_b', 'vit_l', 'vit_h')"),
        (["ablate", "tiny", "npu", "--weights", "random"], "unknown device 'npu'; valid: cpu, cuda (or cuda:N)"),
        ([*ABLATE, "--plan", "nope"], f"unknown plan 'nope'; valid: {', '.join(plans.available_plans())}"),
        ([*ABLATE, "--patches", "sync_free,warp"], "unknown patch 'warp'; valid: {valid}"),
        ([*ABLATE, "--patches", "sdpa,sdpa"], "patch 'sdpa' is listed twice"),
        ([*ABLATE, "--patches", ","], "no patch names given; valid: {valid}"),
        ([*ABLATE, "--patches", "sdpa", "--plan", "cpu"], "argument --plan: not allowed with argument --patches"),
        ([*ABLATE, "--images", "0"], "argument --images: expected a positive integer, got 0"),
        ([*ABLATE, "--images", "-3"], "argument --images: expected a positive integer, got -3"),
        ([*ABLATE, "--batch-size", "0"], "argument --batch-size: expected a positive integer, got 0"),
        ([*ABLATE, "--prompts", "-1"], "argument --prompts: expected a positive integer, got -1"),
        ([*ABLATE, "--images", "two"], "argument --images: expected a positive integer, got 'two'"),
    ],
)
def test_names_and_numbers(capsys, argv, message):
    assert message.format(valid=", ".join(registry.list_patches())) in one_line(capsys, argv)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_without_a_gpu(capsys, device):
    assert "no CUDA GPU is available" in one_line(capsys, ["ablate", "tiny", device, "--weights", "random"])


@pytest.fixture
def cuda_only(monkeypatch):
    """A registered patch that needs CUDA (fp8 has a place in PATCH_ORDER), whatever is registered today."""
    patch = Patch("fp8", "test double", PatchConfig, lambda sam, config, undo: None, EXACT, Requires(devices=("cuda",)))
    monkeypatch.setitem(registry._PATCHES, "fp8", patch)
    return patch


def test_a_patch_asked_for_by_name_that_cannot_run_is_an_error(capsys, cuda_only):
    line = one_line(capsys, [*ABLATE, "--patches", "sync_free,fp8"])
    assert "patch fp8 cannot run on cpu: needs device cuda, got cpu" in line


def test_inside_a_plan_the_same_patch_is_skipped_with_the_reason(cuda_only):
    plan = plans.parse({"name": "p", "steps": [{"name": "fp32"}, {"name": "fp8", "add": ["fp8"]}]})
    steps = plans.resolve(plan, "cumulative", lambda names: inputs.unavailable(names, "cpu"))
    assert [s.skip_reason for s in steps] == [None, "fp8: needs device cuda, got cpu"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("checkpoints")
    tiny = build("tiny").state_dict()
    torch.save(tiny, folder / "tiny.pth")
    torch.save({k: v for k, v in tiny.items() if k != "mask_decoder.iou_token.weight"}, folder / "short.pth")
    torch.save({"model": tiny}, folder / "wrapped.pth")
    torch.save([1, 2], folder / "list.pth")
    torch.save({"fc.weight": torch.zeros(2, 2)}, folder / "other.pth")
    (folder / "text.pth").write_text("not a checkpoint\n")
    return folder


@pytest.mark.parametrize(
    "model, name, message",
    [
        ("tiny", "missing.pth", "weights must be 'random', 'official' or a checkpoint file; not found: "),
        ("tiny", "official", "no official checkpoint for tiny; official: vit_b, vit_l, vit_h"),
        ("tiny", "text.pth", "text.pth cannot be read as a state dict (UnpicklingError)"),
        ("tiny", "list.pth", "list.pth is not a SAM state dict: it holds a list"),
        ("tiny", "wrapped.pth", "wrapped.pth is not a SAM state dict: not every value is a tensor (keys: model)"),
        ("tiny", "other.pth", "other.pth is not a SAM state dict: no key starts with image_encoder., prompt_encoder."),
        ("tiny", "short.pth", "short.pth does not fit tiny: 1 missing key(s), e.g. mask_decoder.iou_token.weight"),
        (
            "vit_b",
            "tiny.pth",
            "tiny.pth does not fit vit_b (it is tiny's): 221 shape mismatch(es), e.g. image_encoder.pos_embed "
            "[1, 16, 16, 128] vs [1, 64, 64, 768] expected; 84 missing key(s), e.g. image_encoder.blocks.6.norm1",
        ),
    ],
)
def test_checkpoints_are_checked_before_any_step(capsys, checkpoints, model, name, message):
    weights = name if name == "official" else str(checkpoints / name)
    line = one_line(capsys, ["ablate", model, "cpu", "--weights", weights, "--no-track"])
    assert message in line


def test_a_good_checkpoint_passes_in_either_format(checkpoints):
    models.check_checkpoint("tiny", checkpoints / "tiny.pth")
    if TINY_WEIGHTS.exists():
        models.check_checkpoint("tiny", TINY_WEIGHTS)  # safetensors: read from the header only


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    """A one-image COCO val2017 layout, written by the synthetic generator."""
    root = tmp_path_factory.mktemp("coco")
    annotations = write_coco(root / "set", 1, seed=0)
    (root / "annotations").mkdir()
    shutil.move(annotations, root / "annotations" / "instances_val2017.json")
    shutil.move(root / "set" / "images", root / "val2017")
    return root


@pytest.mark.parametrize(
    "damage, message",
    [
        ("no images folder", "COCO images folder not found: "),
        ("no image files", "No such file or directory: "),
        ("not JSON", "malformed COCO annotations JSON "),
        ("no annotations key", "needs 'images' and 'annotations' lists"),
        ("no segmentation", "KeyError: 'segmentation'"),
    ],
)
def test_coco_data_is_checked_before_any_step(capsys, coco, tmp_path, damage, message):
    root = shutil.copytree(coco, tmp_path / "coco")
    annotations = root / "annotations" / "instances_val2017.json"
    dataset = json.loads(annotations.read_text())
    if damage == "no images folder":
        shutil.rmtree(root / "val2017")
    elif damage == "no image files":
        for image in (root / "val2017").iterdir():
            image.unlink()
    elif damage == "not JSON":
        annotations.write_text("{")
    elif damage == "no annotations key":
        annotations.write_text(json.dumps({"images": dataset["images"]}))
    else:
        dataset["annotations"] = [{k: v for k, v in a.items() if k != "segmentation"} for a in dataset["annotations"]]
        annotations.write_text(json.dumps(dataset))
    line = one_line(capsys, [*ABLATE, "--data", f"coco:{root}"])
    assert f"COCO data in {root} is unusable: " in line and message in line


def test_plan_file_not_toml_names_file_and_line(capsys, tmp_path):
    plan = tmp_path / "p.toml"
    plan.write_text(TOML_ERROR)
    line = one_line(capsys, [*ABLATE, "--plan", str(plan)])
    assert f"{plan}: not valid TOML: " in line and "line 4" in line


def test_plan_file_bad_key_names_file_and_key(capsys, tmp_path):
    plan = tmp_path / "p.toml"
    plan.write_text('name = "p"\n[[steps]]\nname = "fp32"\n[[steps]]\nname = "b"\nadd = ["bf16"]\ntolerence = {}\n')
    assert f"{plan}: steps[1]: unknown key(s) ['tolerence']" in one_line(capsys, [*ABLATE, "--plan", str(plan)])


def test_results_folder_under_a_file(capsys, tmp_path):
    (tmp_path / "file").write_text("")
    line = one_line(capsys, [*ABLATE, "--results", str(tmp_path / "file" / "res")])
    assert f"results folder {tmp_path / 'file' / 'res'} is not writable (" in line


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_results_folder(capsys, tmp_path):
    (tmp_path / "ro").mkdir(mode=0o555)
    assert "is not writable (" in one_line(capsys, [*ABLATE, "--results", str(tmp_path / "ro")])


def test_debug_gives_the_traceback(checkpoints):
    with pytest.raises(inputs.UsageError, match="does not fit vit_b"):
        cli.main(["ablate", "vit_b", "cpu", "--weights", str(checkpoints / "tiny.pth"), "--debug"])
