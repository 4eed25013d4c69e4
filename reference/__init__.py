"""Slow, obviously correct implementations that the tests and benchmarks judge the product by.

Nothing in the product imports this package: it depends on jax and numpy only.
"""

from reference.attention import MASK_VALUE, attention, attention_with_lse, merge_partials, visible_pairs
from reference.feedforward import swiglu

__all__ = ["MASK_VALUE", "attention", "attention_with_lse", "merge_partials", "swiglu", "visible_pairs"]
