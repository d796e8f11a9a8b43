"""The peer side-by-side script (benchmarks/peer_*.py): checkout loader, workload, measuring loop, tables on the CPU."""

from __future__ import annotations

import pickle
import sys
from pathlib import Path

import pytest
import torch
from benchmarks import peer_saf as saf
from benchmarks import peer_side_by_side as peer
from benchmarks import peer_tables as tables

from samrepro.data import noise_samples

CPU = torch.device("cpu")


def fake_checkout(root, package: str, marker: str):
    """A checkout with `package` (which imports itself absolutely, as SAF does) and a top-level `setup.py`."""
    (root / package).mkdir(parents=True)
    (root / package / "__init__.py").write_text(f"from {package}.inner import MARKER\n")
    (root / package / "inner.py").write_text(f"MARKER = {marker!r}\n")
    (root / "setup.py").write_text("raise RuntimeError('never imported')\n")
    return root


@pytest.fixture
def clean_modules():
    names = ("fake_saf", "fake_saf.inner")
    yield names
    for name in names:
        sys.modules.pop(name, None)


def test_import_checkout_loads_from_the_checkout_and_leaves_sys_path(tmp_path, clean_modules):
    root = fake_checkout(tmp_path / "saf", "fake_saf", "checkout")
    before = list(sys.path)
    module = saf.import_checkout(root, "fake_saf")
    assert module.MARKER == "checkout"
    assert sys.path == before  # the checkout's own setup.py, experiments/, test/ cannot shadow anything
    assert saf.import_checkout(root, "fake_saf") is module  # a second call reuses it


def test_import_checkout_refuses_a_copy_from_elsewhere(tmp_path, clean_modules):
    other = fake_checkout(tmp_path / "site", "fake_saf", "installed")
    saf.import_checkout(other, "fake_saf")  # stands for an installed copy imported earlier
    with pytest.raises(ImportError, match="not from the checkout"):
        saf.import_checkout(fake_checkout(tmp_path / "saf", "fake_saf", "checkout"), "fake_saf")
    with pytest.raises(FileNotFoundError, match="has no fake_saf"):
        saf.import_checkout(tmp_path / "empty", "fake_saf")


def test_checkout_info_fingerprints_the_package(tmp_path):
    root = fake_checkout(tmp_path / "saf", "fake_saf", "a")
    first = saf.checkout_info(root, "fake_saf")
    assert first["commit"] is None  # no .git of its own
    (root / "fake_saf" / "inner.py").write_text("MARKER = 'b'\n")
    assert saf.checkout_info(root, "fake_saf")["package_sha256"] != first["package_sha256"]


def test_parse_args_fills_compile_mode_and_decoder_defaults():
    args = peer.parse_args(["--model", "vit_b", "--out", "x.json", "--contenders", "samrepro,official"])
    assert args.contenders == ["official", "samrepro"]  # the reference runs first
    compile_config = {"mode": "max-autotune", "persistent_rows": peer.PERSISTENT_ROWS}
    assert args.samrepro_configs == {"compile": compile_config, "bf16": {"decoder": "float16"}}
    args = peer.parse_args(
        [
            "--model",
            "vit_b",
            "--out",
            "x",
            "--contenders",
            "samrepro",
            "--samrepro-configs",
            '{"bf16": {"decoder": "bfloat16"}}',
        ]
    )
    assert args.samrepro_configs["bf16"] == {"decoder": "bfloat16"}  # an explicit decoder wins
    args = peer.parse_args(
        ["--model", "vit_b", "--out", "x.json", "--contenders", "official", "--compile-mode", "reduce-overhead"]
        + ["--samrepro-configs", '{"compile": {"mode": "default"}}']
    )
    assert args.samrepro_configs == {"compile": {"mode": "default"}}  # an explicit config wins
    args = peer.parse_args(["--model", "vit_b", "--out", "x", "--contenders", "official", "--compile-mode", "none"])
    assert args.samrepro_configs == {}  # samrepro does not run: its compile patch is not configured
    with pytest.raises(SystemExit):
        peer.parse_args(["--model", "vit_b", "--out", "x.json"])  # saf without --saf-dir
    with pytest.raises(SystemExit):
        peer.parse_args(["--model", "vit_b", "--out", "x.json", "--contenders", "samrepro", "--compile-mode", "none"])


def test_contenders_on_tiny(monkeypatch):
    """The whole loop on the tiny model: the reference agrees with itself, bf16 nearly, SAF is skipped on CPU."""
    monkeypatch.delenv("SEGMENT_ANYTHING_FAST_USE_FLASH_4", raising=False)
    args = peer.parse_args(
        ["--model", "vit_b", "--out", "x.json", "--device", "cpu", "--saf-dir", ".", "--batch-size", "2"]
        + ["--warmup", "1", "--samrepro-patches", "bf16"]
    )
    args.model = "tiny"
    samples = noise_samples(3, 2, seed=0, side=256)
    ref_record, ref = peer.run_contender("official", samples, args, CPU)
    record, masks = peer.run_contender("samrepro", samples, args, CPU)
    assert ref_record["status"] == record["status"] == "ok" and record["patches"] == ["bf16"]
    assert record["configs"]["bf16"]["coords_fp32"] is True  # every field recorded, defaults included
    assert ref_record["images"] == 3 and len(ref) == 3 and ref[0].shape == (2, 256, 256)
    assert peer.agreement(ref, ref) == 1.0 and 0.5 < peer.agreement(ref, masks) <= 1.0
    saf_record, none = peer.run_contender("saf", samples, args, CPU)
    assert saf_record["status"] == "skipped" and "CUDA only" in saf_record["reason"] and none is None
    text = tables.table([ref_record | {"miou_agreement": 1.0}, saf_record])
    assert "| official |" in text and "| saf | – |" in text


def test_latency_mode_clicks_one_prompt_at_a_time_on_tiny():
    """--latency: batch 1, every prompt decoded alone; the clicked masks are those of the batched workload (the
    fp32 model is deterministic on the CPU), and the stats say which percentile is which."""
    args = peer.parse_args(["--model", "vit_b", "--out", "x.json", "--device", "cpu", "--contenders", "official"]
                           + ["--latency", "--warmup", "1", "--batch-size", "4"])  # fmt: skip
    assert args.batch_size == 1
    args.model = "tiny"
    samples = noise_samples(3, 2, seed=0, side=256)
    record, clicked = peer.run_contender("official", samples, args, CPU)
    assert record["status"] == "ok" and record["images"] == 3 and record["clicks"] == 6
    assert 0 < record["encoder_p50_ms"] <= record["encoder_p90_ms"]
    assert 0 < record["click_p50_ms"] <= record["click_p90_ms"]
    assert record["encoder_p50_ms"] < record["first_mask_p50_ms"] <= record["first_mask_p90_ms"]
    args.latency = False
    _, batched = peer.run_contender("official", samples, args, CPU)
    assert [m.shape for m in clicked] == [(2, 256, 256)] * 3
    assert peer.agreement(batched, clicked) == 1.0
    text = tables.latency_table([record | {"miou_agreement": 1.0}])
    assert text.splitlines()[2].startswith("| official | ") and "1.0000 | ok |" in text


def test_saf_keeps_its_configs_dir_and_the_others_get_a_temporary_cwd(tmp_path):
    keep = tmp_path / "saf_configs"
    args = peer.parse_args(["--model", "vit_b", "--out", "x", "--saf-dir", ".", "--saf-configs-dir", str(keep)])
    assert args.saf_configs_dir == keep.resolve()
    with peer.contender_cwd("saf", args) as cwd:
        (cwd / saf.FLASH_4_CONFIGS).write_bytes(b"stands for flash_4's pickle")
    assert (keep / saf.FLASH_4_CONFIGS).is_file()  # outlives the run, for the next one
    with peer.contender_cwd("official", args) as cwd:
        temporary = Path(cwd)
        assert temporary.is_dir() and temporary != keep
    assert not temporary.exists()  # removed after the contender
    args.saf_configs_dir = None
    with peer.contender_cwd("saf", args) as cwd:
        assert Path(cwd) != keep


def test_flash_4_choices_reads_saf_pickle_by_query_shape(tmp_path, monkeypatch):
    """The launch per query shape from a pickle laid out as flash_4 writes it (input shapes, then strides)."""
    monkeypatch.chdir(tmp_path)
    assert saf.flash_4_choices() == {}
    q = torch.Size([16, 12, 4096, 64])
    table = {(q, q, q, torch.Size([16, 12, 4096, 128]), (3145728, 262144, 64, 1)): (64, 64, 4, 4)}
    table[(torch.Size([1, 16, 4096, 128]), q, (1, 2))] = (128, 64, 8, 3)
    (tmp_path / saf.FLASH_4_CONFIGS).write_bytes(pickle.dumps(table))
    assert saf.flash_4_choices() == {"16 x 12 x 4096 x 64": [64, 64, 4, 4], "1 x 16 x 4096 x 128": [128, 64, 8, 3]}


def test_amg_workload_times_each_generate_call_and_matches_masks_on_tiny(monkeypatch):
    """--workload amg: the official generator over the official and the patched model, its masks matched to the
    official ones; SAF's generator is skipped on the CPU for the reason its model is."""
    monkeypatch.delenv("SEGMENT_ANYTHING_FAST_USE_FLASH_4", raising=False)
    amg_args = ["--model", "vit_b", "--out", "x.json", "--device", "cpu", "--saf-dir", ".", "--workload", "amg"]
    assert peer.parse_args(amg_args).samrepro_patches == peer.AMG_STACK.split(",")
    args = peer.parse_args(
        amg_args
        + ["--points-per-side", "4", "--warmup", "1", "--samrepro-patches", "bf16,amg_postprocess"]
        + ["--samrepro-points-per-batch", "8"]
    )
    args.model = "tiny"
    samples = noise_samples(2, 1, seed=0, side=256)
    ref_record, ref = peer.run_contender("official", samples, args, CPU)
    record, masks = peer.run_contender("samrepro", samples, args, CPU)
    assert ref_record["status"] == record["status"] == "ok"
    assert ref_record["images"] == 2 and ref_record["prompts_per_image"] == 16 and len(ref) == len(masks) == 2
    assert ref_record["amg_settings"]["pred_iou_thresh"] == 0.7  # the tiny model's filters
    assert (ref_record["amg_settings"]["points_per_batch"], record["amg_settings"]["points_per_batch"]) == (64, 8)
    assert ref_record["latency_p50_ms"] <= ref_record["latency_p90_ms"]
    assert peer.mask_deviation(ref, ref)["amg_mask_count_diff"] == 0
    saf_record, none = peer.run_contender("saf", samples, args, CPU)
    assert saf_record["status"] == "skipped" and "CUDA only" in saf_record["reason"] and none is None
    text = tables.amg_table([ref_record, record | peer.mask_deviation(ref, masks), saf_record])
    assert text.splitlines()[2].startswith("| official | ") and "| saf | – |" in text
    with pytest.raises(SystemExit):
        peer.parse_args(
            ["--model", "vit_b", "--out", "x", "--contenders", "official", "--workload", "amg", "--latency"]
        )


def test_both_stacks_run_in_one_run_each_with_its_own_configs():
    """By default samrepro (BEST, weights changed) and samrepro-keep (KEEP_WEIGHTS) both run; a config is handed to
    the stack that has its patch, and a config for a patch in no running stack is refused."""
    args = peer.parse_args(["--model", "vit_b", "--out", "x", "--saf-dir", "."]
                           + ["--samrepro-configs", '{"fp8_fused": {"fast_accum": false}}'])  # fmt: skip
    assert args.contenders == ["official", "saf", "samrepro", "samrepro-keep"]
    assert args.stacks == {"samrepro": peer.BEST.split(","), "samrepro-keep": peer.KEEP_WEIGHTS.split(",")}
    assert "fp8_fused" in args.stacks["samrepro"] and "gelu_epilogue" in args.stacks["samrepro-keep"]
    amg_args = peer.parse_args(["--model", "vit_b", "--out", "x", "--saf-dir", ".", "--workload", "amg"])
    assert amg_args.contenders == ["official", "saf", "samrepro"]
    with pytest.raises(SystemExit):
        peer.parse_args(["--model", "vit_b", "--out", "x", "--contenders", "official,samrepro-keep"]
                        + ["--samrepro-configs", '{"fp8_fused": {}}'])  # fmt: skip


def test_keep_stack_gets_only_its_own_configs(monkeypatch):
    """The samrepro-keep contender on tiny: its record names its own stack; a config of the other stack's patch
    (fp8_fused) does not reach it."""
    args = peer.parse_args(
        ["--model", "vit_b", "--out", "x.json", "--device", "cpu", "--contenders", "samrepro,samrepro-keep"]
        + ["--warmup", "1", "--batch-size", "2", "--samrepro-patches", "bf16,fp8_fused", "--keep-patches", "bf16"]
        + ["--samrepro-configs", '{"fp8_fused": {"fast_accum": false}}']
    )
    args.model = "tiny"
    samples = noise_samples(2, 1, seed=0, side=256)
    record, masks = peer.run_contender("samrepro-keep", samples, args, CPU)
    assert record["status"] == "ok" and record["patches"] == ["bf16"] and list(record["configs"]) == ["bf16"]
    skipped, _ = peer.run_contender("samrepro", samples, args, CPU)
    assert skipped["status"] == "skipped" and "cuda" in skipped["reason"]
