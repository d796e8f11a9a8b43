"""benchmarks/trace_breakdown.py: a profiled batch's kernels summed by kind, the largest by name and grid."""

from __future__ import annotations

import gzip
import json

import pytest
from benchmarks import trace_breakdown as tb


@pytest.mark.parametrize(
    "name, kind",
    [
        ("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_bias_TNT", "GEMM"),
        ("nvjet_sm90_qqtst_128x128_128x6_1x2_h_bz_ovscale_bias_TNT", "GEMM fp8"),
        ("_rel_pos_attention_fwd", "attention"),
        ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16", "attention"),
        ("_fp8_rows_fwd", "fp8 activation quantization"),
        ("triton_red_fused_add_clone_fp8_rows_native_layer_norm_permute", "LayerNorm, residual add, layout (fused)"),
        ("triton_poi_fused_gelu_view_5", "GELU"),
        ("void cutlass__5x_cudnn::Kernel<cutlass_tensorop_bf16_s16816fprop_optimized", "convolution"),
        ("triton_poi_fused_clone_permute_view_3", "other"),
    ],
)
def test_kernels_are_sorted_into_kinds(name, kind):
    assert tb.kind(name) == kind


def test_breakdown_sums_kinds_and_splits_a_kernel_by_grid(tmp_path, capsys):
    def kernel(name, dur, grid):
        return {"cat": "kernel", "name": name, "dur": dur, "args": {"grid": grid}}

    events = [kernel("_rel_pos_attention_fwd", 800.0, [25600, 1, 1]) for _ in range(3)]
    events += [kernel("_rel_pos_attention_fwd", 5000.0, [16384, 1, 1]), kernel("nvjet_sm90_tst_x", 2000.0, [2, 66, 1])]
    events += [{"cat": "cpu_op", "name": "aten::mm", "dur": 9e9}]  # host events are not GPU time
    trace = tmp_path / "step_01_x.trace.json.gz"
    with gzip.open(trace, "wt") as f:
        json.dump({"traceEvents": events}, f)
    tb.main([str(trace), "--top", "2"])
    out = capsys.readouterr().out
    assert out.startswith("GPU kernel time of the profiled batch: 9.4 ms, 5 kernels")
    assert "| attention | 7.4 | 78.7% | 4 |" in out and "| GEMM | 2.0 | 21.3% | 1 |" in out
    rows = [line for line in out.splitlines() if line.startswith("| `")]
    assert rows == [
        "| `_rel_pos_attention_fwd` | [16384, 1, 1] | 5.00 | 53.2% | 1 | 5000 |",
        "| `_rel_pos_attention_fwd` | [25600, 1, 1] | 2.40 | 25.5% | 3 | 800 |",
    ]


def test_a_trace_without_gpu_kernels_says_so(tmp_path):
    trace = tmp_path / "cpu.trace.json"
    trace.write_text(json.dumps({"traceEvents": [{"cat": "cpu_op", "name": "aten::mm", "dur": 5.0}]}))
    with pytest.raises(SystemExit, match="no GPU kernel events"):
        tb.main([str(trace)])
