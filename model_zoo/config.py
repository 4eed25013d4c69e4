"""`LWMConfig`: the LLaMA architecture as the Large World Model uses it, with its released presets."""

import dataclasses
import math

from ring_attn.context import STRATEGIES

REMAT_POLICIES = ("none", "full", "dots")
# LWM's vision vocabulary: 8192 VQGAN codes, then <eof> and <eov>, and 254 more reserved (8448 rows,
# as LWM's checkpoints have them). A smaller VQGAN uses the first of the code rows.
VQGAN_CODES = 8192
EOF_TOKEN = 8192  # end of frame
EOV_TOKEN = 8193  # end of vision
VISION_VOCAB = 8448


def check_positive_ints(obj, *names):
    """ValueError naming `type(obj).name` and its value unless each field is a positive int."""
    for name in names:
        value = getattr(obj, name)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{type(obj).__name__}.{name} must be a positive int, got {value!r}")


@dataclasses.dataclass(frozen=True)
class LWMConfig:
    """Hyper-parameters of the LLaMA decoder. Derived values are properties.

    `vision=True` adds LWM's vision vocabulary (8192 VQGAN codes, <eof>, <eov>, reserved rows) with its own
    embedding table and output head; a per-token mask chooses the table.
    """

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    rms_norm_eps: float = 1e-6
    rope_theta: float = 5e7
    max_position_embeddings: int = 1_048_576
    vision: bool = False
    remat: str = "full"  # what the layer scan keeps for the backward: none / full (recompute) / dots
    ffn_chunk: int | None = None  # tokens per feedforward chunk; None: the kernel's default
    attention_impl: str = "auto"  # the ring_attn kernel backend
    ring_layout: str = "contiguous"  # how the sequence lies on the "sp" ring
    # how attention spreads over the sequence axes (ring_attn.context_attention's strategy)
    attention_strategy: str = "ring"
    # Gemma 2's attention logit soft-cap c: scores become c * tanh(score / c); None: no cap
    attn_logit_soft_cap: float | None = None
    # gpt-oss's attention sinks: one learned logit per layer and query head in every softmax
    attention_sinks: bool = False

    def __post_init__(self):
        check_positive_ints(self, "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                            "num_kv_heads", "max_position_embeddings")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} must be divisible by num_heads={self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} must be divisible by num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if not self.rope_theta > 1:
            raise ValueError(f"rope_theta must be > 1, got {self.rope_theta!r}")
        if not 0 < self.rms_norm_eps < 1:
            raise ValueError(f"rms_norm_eps must be in (0, 1), got {self.rms_norm_eps!r}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat must be one of {REMAT_POLICIES}, got {self.remat!r}")
        if self.ring_layout not in ("contiguous", "zigzag"):
            raise ValueError(f"ring_layout must be 'contiguous' or 'zigzag', got {self.ring_layout!r}")
        cap = self.attn_logit_soft_cap
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, (int, float)) or not 0 < cap < math.inf):
            raise ValueError(f"attn_logit_soft_cap must be a positive finite number or None, got {cap!r}")
        if not isinstance(self.attention_sinks, bool):
            raise ValueError(f"attention_sinks must be a bool, got {self.attention_sinks!r}")
        if self.attention_strategy not in STRATEGIES:
            raise ValueError(f"attention_strategy must be one of {STRATEGIES}, got {self.attention_strategy!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def vision_vocab_size(self) -> int:
        return VISION_VOCAB if self.vision else 0

    @property
    def num_params(self) -> int:
        D, F, H = self.hidden_size, self.intermediate_size, self.head_dim
        attn = D * H * (2 * self.num_heads + 2 * self.num_kv_heads)
        layer = attn + 3 * D * F + 2 * D + (self.num_heads if self.attention_sinks else 0)
        vocab = self.vocab_size + self.vision_vocab_size
        return self.num_layers * layer + 2 * vocab * D + D

    def replace(self, **overrides) -> "LWMConfig":
        """A copy with `overrides`; an unknown field is an error that lists the known ones."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown LWMConfig field(s) {unknown}; known fields: {sorted(known)}")
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "LWMConfig":
        return cls().replace(**values)


# LLaMA-2 7B as LWM-Text-1M: untied embeddings, rope_theta 5e7 over 1,048,576 positions.
LWM_7B = LWMConfig()
# LWM's earlier progressive-context stages (each one's theta and context).
LWM_7B_32K = LWM_7B.replace(rope_theta=1e6, max_position_embeddings=32_768)
LWM_7B_128K = LWM_7B.replace(rope_theta=1e7, max_position_embeddings=131_072)
LWM_7B_256K = LWM_7B.replace(rope_theta=1e7, max_position_embeddings=262_144)
LWM_7B_512K = LWM_7B.replace(rope_theta=2.5e7, max_position_embeddings=524_288)
LWM_7B_1M = LWM_7B
# Small enough to train on CPU; the vocabulary is the shipped tokenizer's.
TINY = LWMConfig(
    vocab_size=1024,
    hidden_size=128,
    intermediate_size=384,
    num_layers=4,
    num_heads=4,
    num_kv_heads=4,
    rope_theta=1e4,
    max_position_embeddings=2048,
    remat="none",
)

PRESETS = {
    "tiny": TINY,
    "lwm-7b": LWM_7B,
    "lwm-7b-32k": LWM_7B_32K,
    "lwm-7b-128k": LWM_7B_128K,
    "lwm-7b-256k": LWM_7B_256K,
    "lwm-7b-512k": LWM_7B_512K,
    "lwm-7b-1m": LWM_7B_1M,
}


def preset(name: str) -> LWMConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
    return PRESETS[name]
