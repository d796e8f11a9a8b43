"""The AMG workload's pieces: mask matching, the tolerance rule, workload options, and what refuses bad input."""

from __future__ import annotations

import numpy as np
import pytest

from samrepro import ablation, amg, cli, workloads
from samrepro.amg_compare import MIN_GATED_MASKS, AmgOutputs, deviation, matched_ious, ungated
from samrepro.gates import check
from samrepro.inputs import UsageError, unavailable
from samrepro.metrics import check_tolerance
from samrepro.patch import Tolerance, amg_bound
from samrepro.plans import parse
from samrepro.registry import get_patch
from tests.test_cli import run


def box(y0: int, y1: int, x0: int, x1: int, h: int = 40, w: int = 50) -> dict:
    mask = np.zeros((h, w), dtype=bool)
    mask[y0:y1, x0:x1] = True
    return amg.to_rle(mask)


def outputs(*images: list[dict]) -> AmgOutputs:
    import torch

    return AmgOutputs(list(images), torch.ones(1, 4, 2, 2))


def test_each_fp32_mask_is_matched_to_its_best_iou():
    a, b, c = box(0, 10, 0, 10), box(20, 30, 20, 40), box(0, 10, 5, 10)  # c is half of a
    assert matched_ious([a, b], [b, a]).tolist() == [1.0, 1.0]  # order does not matter
    assert matched_ious([a, b], [c]).tolist() == [0.5, 0.0]  # b is lost: its nearest mask does not overlap it
    assert matched_ious([a], []).tolist() == [0.0] and matched_ious([], [a]).size == 0


def test_deviation_pools_masks_over_images_and_counts_what_changed():
    a, b, c = box(0, 10, 0, 10), box(20, 30, 20, 40), box(0, 10, 5, 10)
    measured = deviation(outputs([a, b], [a]), outputs([c], [a, b, c]))
    assert measured["amg_matched_miou"] == pytest.approx((0.5 + 0.0 + 1.0) / 3)
    assert measured["amg_match_share"] == pytest.approx(2 / 3)  # a twice (0.5 counts), b never
    assert measured["amg_mask_count_diff"] == pytest.approx(((1 - 2) + (3 - 1)) / 2)
    none = deviation(outputs([], []), outputs([a], []))
    assert none["amg_matched_miou"] is None and none["amg_match_share"] is None  # nothing to match: not gated


def test_matched_measures_are_gated_only_over_enough_fp32_masks():
    """Half the fp32 masks lost: below MIN_GATED_MASKS masks the gate shows it and passes on the SQNR (random ViT
    weights keep a handful of masks, each near a threshold); from MIN_GATED_MASKS on it fails both bounds."""
    a, far = box(0, 10, 0, 10), box(30, 40, 40, 50)

    def lost_half(n: int) -> dict:
        ref = [[a] for _ in range(n)]  # one fp32 mask per image
        out = [[a] if i % 2 else [far] for i in range(n)]
        return deviation(outputs(*ref), outputs(*out))

    few, enough = lost_half(MIN_GATED_MASKS - 1), lost_half(MIN_GATED_MASKS)
    assert few["amg_fp32_masks"] == MIN_GATED_MASKS - 1 and few["amg_match_share"] < 0.5
    assert check(few, [get_patch("bf16")])[1] == []
    assert f"kept {MIN_GATED_MASKS - 1} masks over 9 images, fewer than" in ungated(few, 9)
    violations = check(enough, [get_patch("bf16")])[1]
    assert [v.split(" =")[0] for v in violations] == ["amg_matched_miou", "amg_match_share"]
    assert ungated(enough, 10) is None
    assert ungated(deviation(outputs([]), outputs([a])), 1).startswith("the fp32 step kept no mask")
    broken_sqnr = few | {"embedding_sqnr_db": 5.0}  # the SQNR stays gated below the mask count
    assert [v.split(" =")[0] for v in check(broken_sqnr, [get_patch("bf16")])[1]] == ["embedding_sqnr_db"]


def test_rle_round_trips_through_the_baseline_state():
    ref = outputs([box(0, 10, 0, 10)])
    again = AmgOutputs.from_state(ref.state())
    assert deviation(ref, again)["amg_matched_miou"] == 1.0 and again.masks == ref.masks


def test_undeclared_amg_bounds_allow_twice_the_point_prompt_loss():
    assert Tolerance().amg_matched_miou_min == 1.0  # exact patches stay exact
    bf16 = get_patch("bf16").tolerance
    assert bf16.amg_matched_miou_min == bf16.amg_match_share_min == pytest.approx(1 - 2 * 0.07)
    assert amg_bound(0.4) == 0.0  # never below 0
    declared = Tolerance(agreement_miou_min=0.93, amg_matched_miou_min=0.97)  # a declared bound wins
    assert declared.amg_matched_miou_min == 0.97 and declared.amg_match_share_min == pytest.approx(0.86)
    both = declared.compose(Tolerance(agreement_miou_min=0.99))
    assert both.amg_matched_miou_min == pytest.approx(0.95) and both.amg_match_share_min == pytest.approx(0.84)
    with pytest.raises(ValueError, match="amg_match_share_min"):
        Tolerance(amg_match_share_min=1.5)


def test_amg_measures_are_gated_and_point_measures_absent_are_not():
    tol = Tolerance(agreement_miou_min=0.95)  # AMG bounds 0.9
    measured = {"amg_matched_miou": 0.95, "amg_match_share": 0.85, "miou_agreement": None}
    assert check_tolerance(measured, tol) == ["amg_match_share = 0.85, needs >= 0.9"]


def test_workload_settings_are_resolved_with_every_default():
    assert workloads.resolve("points", "vit_b", {}) == {"name": "points"}
    vit = workloads.resolve("amg", "vit_h", {"points_per_side": 8})
    assert vit == {"name": "amg", "points_per_side": 8, "points_per_batch": 64, "crop_n_layers": 0,
                   "pred_iou_thresh": 0.88, "stability_score_thresh": 0.95}  # fmt: skip
    assert workloads.resolve("amg", "tiny", {})["stability_score_thresh"] == 0.7  # tiny's filters (amg.py says why)
    with pytest.raises(ValueError, match="--points-per-side not taken by --workload points"):
        workloads.resolve("points", "tiny", {"points_per_side": 8})
    with pytest.raises(ValueError, match="--crop-n-layers must be an integer >= 0"):
        workloads.resolve("amg", "tiny", {"crop_n_layers": -1})


def test_cli_names_the_registered_workloads():
    assert cli.WORKLOADS == workloads.NAMES and cli.AMG_OPTIONS == tuple(amg.OPTIONS)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--workload", "amg", "--batch-size", "4"], "--batch-size applies to the points workload"),
        (["--workload", "amg", "--prompts", "2"], "--prompts applies to the points workload"),
        (["--points-per-side", "4"], "--points-per-side not taken by --workload points"),
        (["--workload", "amg", "--crop-n-layers", "-1"], "expected an integer >= 0, got -1"),
        (["--workload", "amg", "--patches", "best_mask_only"], "cannot run with --workload amg"),
        (["--workload", "everything"], "invalid choice: 'everything'"),
    ],
)
def test_bad_amg_input_one_line_exit_2(capsys, argv, message):
    code, out, err = run(capsys, "ablate", "tiny", "cpu", "--weights", "random", *argv)
    assert code == 2 and out == "" and err.count("\n") == 1 and message in err, err


def test_amg_plan_skips_patches_that_cannot_serve_it_and_keys_its_results_apart(tmp_path):
    assert "best_mask_only" in unavailable(["best_mask_only"], "cpu", "amg")
    assert unavailable(["best_mask_only"], "cpu", "points") is None
    plan = parse({"name": "p", "steps": [{"name": "fp32"}, {"name": "b", "add": ["best_mask_only"]}]})
    args = dict(plan=plan, images=2, weights="random", results_dir=tmp_path)
    amg_run = ablation.prepare("tiny", "cpu", workload="amg", workload_options={"points_per_side": 4}, **args)
    points = ablation.prepare("tiny", "cpu", **args)
    assert "best_mask_only (workload amg): the automatic mask generator reads all 3" in amg_run.steps[1].skip_reason
    assert points.steps[1].skip_reason is None
    assert amg_run.setup["batch_size"] == 1 and points.setup["batch_size"] == 2  # lowered to the image count
    keys = [ablation.step_spec(tmp_path, ab.steps[0], ab.setup, False).key() for ab in (amg_run, points)]
    assert keys[0] != keys[1] and keys[0]["workload"]["points_per_side"] == 4  # another workload is never kept
    with pytest.raises(UsageError):
        ablation.prepare("tiny", "cpu", workload="amg", batch_size=4, **args)


def test_default_plan_and_folder_of_the_amg_workload():
    assert ablation.default_plan("cpu", "amg") == ablation.default_plan("cuda", "amg") == "amg"
    workload = workloads.resolve("amg", "tiny", {"points_per_side": 8})
    folder = ablation.default_results_dir("tiny", "cpu", "amg", "cumulative", 1, workload)
    assert folder.name == "tiny-cpu-amg-cumulative-amg-pps8"
    assert ablation.default_results_dir("tiny", "cpu", "cpu", "cumulative", 8).name == "tiny-cpu-cpu-cumulative-bs8"


def test_point_prompt_plan_bounds_do_not_gate_amg():
    plan = parse({"name": "p", "steps": [{"name": "fp32"}], "calibrated": {"models": ["tiny"]}})
    amg_setup = {"model": "tiny", "workload": {"name": "amg"}}
    assert "calibrated on workload points, this run has amg" in plan.bounds_apply(amg_setup)
    assert plan.bounds_apply({"model": "tiny", "workload": {"name": "points"}}) is None
    for_amg = parse({"name": "p", "steps": [{"name": "fp32"}], "calibrated": {"workload": "amg"}})
    assert for_amg.bounds_apply(amg_setup) is None
