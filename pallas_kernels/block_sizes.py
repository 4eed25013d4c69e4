"""Block sizes of the per-shard attention kernels, and how defaults adapt to a shard's length."""

import dataclasses

# Preferred tile edge when the caller gives none (best of 128-512 on CPU at L=8192, ring of 8);
# the largest divisor of the length up to it is used.
DEFAULT_BLOCK = 256


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes along the query (`block_q`) and key (`block_kv`) axes of one shard.

    `*_dkv` are the tiles of the backward kernel (None: the forward's). Each must divide the
    lengths it tiles; with `layout="zigzag"` that is half the local shard.
    """

    block_q: int = DEFAULT_BLOCK
    block_kv: int = DEFAULT_BLOCK
    block_q_dkv: int | None = None
    block_kv_dkv: int | None = None

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is None and field.name.endswith("_dkv"):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"BlockSizes.{field.name} must be a positive int, got {value!r}")

    @classmethod
    def get_default(cls):
        return cls()

    @property
    def backward(self):
        """The tiles the backward kernel uses, as `(block_q, block_kv)`."""
        return (self.block_q_dkv or self.block_q, self.block_kv_dkv or self.block_kv)


def _largest_divisor_up_to(length, preferred):
    best = max(d for d in range(1, min(length, preferred) + 1) if length % d == 0)
    # A tiny tile costs more in loop overhead than it saves in skipped work: take the whole length.
    return best if best * 8 >= min(length, preferred) else length


def fit_block_sizes(block_sizes, T, S):
    """A `BlockSizes` with every field set for a `[T] x [S]` tile grid.

    `None` picks the largest divisors of T and S up to `DEFAULT_BLOCK`; given sizes must divide.
    """
    if block_sizes is None:
        bq = _largest_divisor_up_to(T, DEFAULT_BLOCK)
        bk = _largest_divisor_up_to(S, DEFAULT_BLOCK)
        return BlockSizes(bq, bk, bq, bk)
    bq_dkv, bk_dkv = block_sizes.backward
    for name, block, length, length_name in (
        ("block_q", block_sizes.block_q, T, "T"),
        ("block_kv", block_sizes.block_kv, S, "S"),
        ("block_q_dkv", bq_dkv, T, "T"),
        ("block_kv_dkv", bk_dkv, S, "S"),
    ):
        if length % block:
            raise ValueError(
                f"{length_name}={length} (the local length each kernel call tiles) must be "
                f"divisible by {name}={block}"
            )
    return BlockSizes(block_sizes.block_q, block_sizes.block_kv, bq_dkv, bk_dkv)
