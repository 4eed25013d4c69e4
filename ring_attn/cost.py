"""FLOP counts of attention by the FlashAttention convention (matmuls only, 2 FLOPs per MAC)."""


def attention_flops(B, N, T, S, H, causal=False, *, backward=False):
    """FLOPs of attention of T queries over S keys: forward 4·B·N·T·S·H, halved when causal
    (the diagonal block counted at half); the backward is 2.5x the forward."""
    forward = 4 * B * N * T * S * H
    if causal:
        forward //= 2
    return int(forward * 2.5) if backward else forward
