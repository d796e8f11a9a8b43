"""What bounds a run's speed-ups, read off its own results: the encoder's share of the time, the CPU's bf16."""

from __future__ import annotations

from dataclasses import dataclass

from samrepro.results import StepResult

XEON = "https://pytorch.org/blog/genai-acceleration-intel-xeon/"


@dataclass(frozen=True)
class Limit:
    headline: str  # the fact, bold in the report
    detail: str  # what follows from it, in the report
    line: str  # the terminal's one line


def speed_limits(step_results: list[StepResult], base: StepResult | None) -> list[Limit]:
    """One Limit per bound that holds for this run; none when nothing stands out."""
    return [limit for limit in (_encoder_share(base, step_results), _emulated_bf16(step_results)) if limit]


def markdown(limit: Limit) -> str:
    return f"- **{limit.headline}** {limit.detail}"


def _encoder_share(base: StepResult | None, step_results: list[StepResult]) -> Limit | None:
    if base is None or not base.img_s or not base.encoder_ms:
        return None
    per_image = 1000.0 / base.img_s  # ms
    share = base.encoder_ms / per_image
    if share >= 0.5:
        return None
    ceiling = 1 / (1 - share)
    past = []  # each measured step past the ceiling: its name, speed-up over base, ms per image outside the encoder
    for r in step_results:
        if r is base or r.status != "ok" or not (r.img_s and r.encoder_ms):
            continue
        speedup = r.img_s / base.img_s
        if speedup > ceiling:
            past.append((r.step, speedup, 1000.0 / r.img_s - r.encoder_ms))
    detail = (
        f"in `{base.step}` ({base.encoder_ms:.1f} of {per_image:.1f} ms); the rest is the prompt encoder, the mask "
        f"decoder, upsampling and Python. Most patches speed up the encoder, so a run like this one gains at most "
        f"{ceiling:.2f}x from them even with an encoder that takes no time."
    )
    line = (
        f"the image encoder is {share:.0%} of {base.step}'s time per image: encoder patches can gain at most "
        f"{ceiling:.2f}x here"
    )
    if past:
        outside = per_image - base.encoder_ms
        steps = ", ".join(f"`{step}` {x:.2f}x ({ms:.1f} ms)" for step, x, ms in past)
        detail += (
            f" Past that bound, with their time per image outside the encoder against `{base.step}`'s "
            f"{outside:.1f} ms: {steps}. That time changed between the steps: through a patch that works outside the "
            "encoder (decoder, post-processing), or through the machine (a rerun tells which)."
        )
        line += "; past it: " + ", ".join(f"{step} {x:.2f}x" for step, x, _ in past)
        line += " (their time outside the encoder changed)"
    return Limit(f"The image encoder is {share:.0%} of the time per image", detail, line)


def _emulated_bf16(step_results: list[StepResult]) -> Limit | None:
    on_cpu = [r for r in step_results if r.device == "cpu" and "bf16" in r.patches]
    if not on_cpu or on_cpu[0].env.get("cpu_bf16") is not False:
        return None
    isa = on_cpu[0].env.get("cpu_capability") or "unknown"
    return Limit(
        "This CPU has no bf16 instructions",
        f"(neither AVX512_BF16 nor AMX_BF16; ATen's vector ISA: {isa}): bf16 matrix products run on converted "
        "values, so bf16 steps, compiled or not, are not expected to beat fp32 here. The Intel post's speed-ups were "
        f"measured with AMX on a Xeon Platinum 8480+ ({XEON}).",
        "this CPU has no bf16 instructions (AVX512_BF16, AMX): bf16 steps are not expected to beat fp32 here",
    )
