"""The dimensions of the token mixers other than Llama's attention, as ModelConfig carries them."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LatentDims:
    """DeepSeek's multi-head latent attention (MLA: DeepSeek-V2 and V3, Moonlight, GLM-4.7-Flash): every head's
    key and value come from one normed latent of kv_rank values per token (kv_b_proj), beside a rotated key
    part all heads share; the queries come from q_proj, or through a latent of q_rank values first."""

    kv_rank: int  # kv_lora_rank
    q_rank: int  # q_lora_rank, 0 where the queries take one q_proj
    nope_dim: int  # qk_nope_head_dim: a query or key head's dimensions without rotary embedding
    rope_dim: int  # qk_rope_head_dim: its rotated ones
    value_dim: int  # v_head_dim


@dataclass(frozen=True)
class LinearDims:
    """Qwen3.5's linear attention (Gated DeltaNet): per token a short causal convolution over the projected
    queries, keys and values, then a recurrent state per value head (head_k_dim x head_v_dim) decayed and
    updated by the delta rule, read by the queries; key heads serve num_v_heads / num_k_heads value heads."""

    num_k_heads: int
    num_v_heads: int
    head_k_dim: int
    head_v_dim: int
    conv_kernel: int

    @property
    def conv_dim(self) -> int:
        """Channels of the convolution: the queries', keys' and values' widths."""
        return 2 * self.num_k_heads * self.head_k_dim + self.num_v_heads * self.head_v_dim


@dataclass(frozen=True)
class MambaDims:
    """Mamba-2's state space layer (Granite 4.0-H): per token a short causal convolution over the projected
    inputs x and the shared B and C, then per head a state (state_dim x head_dim) decayed by exp(dt A) and
    added B (dt x)^T, read by C, plus D x; B and C are shared by num_heads / groups heads each. Its outputs
    are gated by silu(z) and (but Falcon-H1's, by default) RMS-normed per group."""

    num_heads: int
    head_dim: int
    state_dim: int
    groups: int
    conv_kernel: int
    time_step_limit: tuple[float, float]  # dt clamped to it
    # The outputs' norm per group: "gated" of the outputs times silu(z) (Granite 4.0-H, Nemotron-H), "before_gate"
    # of the outputs, then times silu(z), or "none": the outputs times silu(z) alone (Falcon-H1's options)
    norm: str = "gated"
    conv_bias: bool = True

    @property
    def inner(self) -> int:
        """The width of x, of the gate z, and of the output."""
        return self.num_heads * self.head_dim

    @property
    def conv_dim(self) -> int:
        """Channels of the convolution: x's, B's and C's widths."""
        return self.inner + 2 * self.groups * self.state_dim


@dataclass(frozen=True)
class ShortConvDims:
    """LFM2's short convolution: in_proj gives each token B, C and x; B x passes a causal convolution of kernel
    taps per channel (with a bias where bias), whose output times C goes to out_proj."""

    kernel: int
    bias: bool
