"""What bounds a run's speed-ups, read off its own results: the encoder's share of the time, the CPU's bf16."""

from __future__ import annotations

from samrepro.results import StepResult

XEON = "https://pytorch.org/blog/genai-acceleration-intel-xeon/"


def speed_limits(step_results: list[StepResult], base: StepResult | None) -> list[str]:
    """Markdown bullets, one per limit that holds for this run; none when nothing stands out."""
    return [line for line in (_encoder_share(base), _emulated_bf16(step_results)) if line]


def _encoder_share(base: StepResult | None) -> str | None:
    if base is None or not base.img_s or not base.encoder_ms:
        return None
    per_image = 1000.0 / base.img_s  # ms
    share = base.encoder_ms / per_image
    if share >= 0.5:
        return None
    return (
        f"- **The image encoder is {share:.0%} of the time per image** in `{base.step}` ({base.encoder_ms:.1f} of "
        f"{per_image:.1f} ms); the rest is the prompt encoder, the mask decoder, upsampling and Python. Most "
        f"patches speed up the encoder, so a run like this one gains at most {1 / (1 - share):.2f}x from them even "
        "with an encoder that takes no time."
    )


def _emulated_bf16(step_results: list[StepResult]) -> str | None:
    on_cpu = [r for r in step_results if r.device == "cpu" and "bf16" in r.patches]
    if not on_cpu or on_cpu[0].env.get("cpu_bf16") is not False:
        return None
    isa = on_cpu[0].env.get("cpu_capability") or "unknown"
    return (
        f"- **This CPU has no bf16 instructions** (neither AVX512_BF16 nor AMX_BF16; ATen's vector ISA: {isa}): "
        "bf16 matrix products run on converted values, so bf16 steps, compiled or not, are not expected to beat "
        f"fp32 here. The Intel post's speed-ups were measured with AMX on a Xeon Platinum 8480+ ({XEON})."
    )
