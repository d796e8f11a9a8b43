"""One module per optimization; importing this package registers them all."""

import samrepro.patches.amg_postprocess
import samrepro.patches.batched_decoder
import samrepro.patches.best_mask_only
import samrepro.patches.bf16
import samrepro.patches.channels_last
import samrepro.patches.compile
import samrepro.patches.compile_decoder
import samrepro.patches.flex_attn
import samrepro.patches.fold_attn
import samrepro.patches.fp8
import samrepro.patches.fp8_fused
import samrepro.patches.gelu_epilogue
import samrepro.patches.int8_dynamic
import samrepro.patches.patch_embed_gemm
import samrepro.patches.sdpa
import samrepro.patches.sparse24
import samrepro.patches.sync_free
import samrepro.patches.triton_attn  # noqa: F401
