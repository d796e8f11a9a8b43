"""Hand-written Triton kernels; each is imported by the patch that installs it, never at package import."""

# Launches per kernel path in this process, e.g. {"rel_pos_attention.triton": 96}, for StepResult.kernel_paths.
# Counted in each custom op's Python implementation, which runs on every eager or torch.compile'd call; CUDA-graph
# replays run no Python, so under max-autotune only the warm-up and recording launches are counted.
# Weight patches fix each layer's path when applied and count layers there instead, under keys ending in ".layers":
# "int8_dynamic.layers", "fp8.layers", "fp8_fused.layers", "sparse24.{cusparselt,cutlass,masked}.layers".
# "rel_pos_attention.triton.stepped_down" counts the launches whose table launch was stepped down to fit the GPU's
# shared memory, "rel_pos_attention.triton.over_limit" those where nothing fit the estimate (the smallest ran).
COUNTERS: dict[str, int] = {}
