"""Expert shapes of real models, for replay and probe.

Every routed expert is a SwiGLU FFN: w1 (gate) and w3 (up) of shape (ffn, hidden), w2 (down)
of shape (hidden, ffn). One expert is stored as one contiguous buffer [w1; w3; w2], so one load
is one copy of ``3 x hidden x ffn x bytes_per_element`` bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

from simcache.errors import SimcacheError


@dataclass(frozen=True)
class Preset:
    name: str
    hidden: int
    ffn: int
    num_layers: int
    num_experts: int
    top_k: int
    source: str = ""

    def expert_elements(self) -> int:
        return 3 * self.hidden * self.ffn

    def expert_bytes(self, dtype_bytes: int = 2) -> int:
        return self.expert_elements() * dtype_bytes


PRESETS = {
    p.name: p
    for p in (
        Preset("mixtral-8x7b", 4096, 14336, 32, 8, 2, "mistralai/Mixtral-8x7B-v0.1"),
        Preset("qwen-moe", 2048, 1408, 24, 60, 4, "Qwen/Qwen1.5-MoE-A2.7B"),
        Preset("deepseek-v2-lite", 2048, 1408, 26, 64, 6, "deepseek-ai/DeepSeek-V2-Lite (routed experts)"),
        Preset("olmoe", 2048, 1024, 16, 64, 8, "allenai/OLMoE-1B-7B-0924"),
        Preset("gpt-oss", 2880, 2880, 24, 32, 4, "openai/gpt-oss-20b (as SwiGLU, unquantised)"),
        Preset("qwen3-30b-a3b", 2048, 768, 48, 128, 8, "Qwen/Qwen3-30B-A3B"),
        Preset("deepseek-v3", 7168, 2048, 58, 256, 8, "deepseek-ai/DeepSeek-V3 (routed experts, 58 MoE layers)"),
        Preset("gpt-oss-120b", 2880, 2880, 36, 128, 4, "openai/gpt-oss-120b (as SwiGLU)"),
        Preset("mixtral-8x22b", 6144, 16384, 56, 8, 2, "mistralai/Mixtral-8x22B-v0.1"),
    )
}

PRESET_NAMES = tuple(PRESETS)


def resolve(name: str | None, hidden: int | None = None, ffn: int | None = None,
            num_experts: int | None = None) -> Preset:
    """A named preset, or ``custom`` shapes from ``hidden`` and ``ffn``."""
    if name in (None, "custom"):
        if not hidden or not ffn:
            raise SimcacheError("a custom preset needs --hidden and --ffn")
        if hidden <= 0 or ffn <= 0:
            raise SimcacheError("--hidden and --ffn must be positive")
        return Preset("custom", int(hidden), int(ffn), 1 << 30, num_experts or 0, 0)
    if name not in PRESETS:
        raise SimcacheError(f"unknown preset '{name}' (choose from {', '.join(PRESETS)}, custom)")
    return PRESETS[name]
