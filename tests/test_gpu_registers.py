"""Registers, spills and occupancy of every GPU attention kernel the ring compiles for 8 H100s.

Deviceless, like tests/test_aot.py (the `aot` extra and JAX_PLATFORMS=cpu; skips otherwise): the
ring's forward + backward program at 8K tokens a device, causal zigzag, bf16, the shipped block
sizes, q/k and v head dims 64/64, 128/128 and MLA's 192/128, for the Triton and the Mosaic GPU
kernels. Registers come from the shipped cubins, spills from `ptxas -v` replaying their PTX, which
must reproduce the cubins' registers and stack frame (`ring_attn.gpu_resources`). No kernel may
spill, except those in SPILLS_ALLOWED, each with its reason and its bytes pinned so that growth
fails. The table is printed (`bench/gpu_registers.py` writes the same with every case).
"""

import functools
import tempfile

import pytest
from test_aot import CASES, missing, ring_program

from ring_attn import gpu_resources


def _why_skip():
    if (why := missing()) is not None:
        return why
    try:
        gpu_resources.ptxas()
    except FileNotFoundError as e:
        return str(e)
    return None


needs_compilers = pytest.mark.skipif(_why_skip() is not None, reason=str(_why_skip()))

FAMILIES = {"triton": "pallas_triton", "mosaic_gpu": "pallas_mgpu"}
HEAD_DIMS = {"64/64": (64, 64), "128/128": (128, 128), "192/128": (192, 128)}
PASSES = ("forward", "dq", "dk/dv")

TWO_CONSUMERS = ("two consumer warpgroups and the producer make 384 threads, which caps a thread at 168 "
                 "registers; one consumer warpgroup (256 threads) compiles without spills")
# (kernels, head dims, pass) -> (why it spills, most spill-store bytes, most spill-load bytes) over
# the program's variants of that kernel.
SPILLS_ALLOWED = {
    ("mosaic_gpu", "64/64", "dq"): (
        f"{TWO_CONSUMERS}; so do 64-key tiles instead of 128 (block_kv_dkv=64)", 192, 188),
    ("mosaic_gpu", "64/64", "dk/dv"): (TWO_CONSUMERS, 124, 96),
    ("mosaic_gpu", "128/128", "forward"): (TWO_CONSUMERS, 28, 28),
    ("mosaic_gpu", "192/128", "forward"): (TWO_CONSUMERS, 60, 60),
    ("mosaic_gpu", "128/128", "dk/dv"): (
        "one consumer warpgroup holds the dk and dv [64, 128] float32 accumulators (128 registers a "
        "thread) beside S^T, P^T and dP^T [64, 64]: past the 255-register cap, whatever the block sizes "
        "(the tiles are fixed at 64 rows)", 492, 476),
    ("mosaic_gpu", "192/128", "dk/dv"): (
        "as at 128/128, with dk [64, 192]: past the 255-register cap whatever the block sizes", 1040, 1040),
}


@functools.cache
def _kernels(family, head_dims):
    options = dict(CASES["causal_zigzag"], head_dims=HEAD_DIMS[head_dims])
    fn, args = ring_program("h100:8", FAMILIES[family], options, backward=True)
    with tempfile.TemporaryDirectory() as dump:
        compiled = gpu_resources.compile_for_resources(fn, args, dump)
        return gpu_resources.by_pass(gpu_resources.kernel_resources(compiled, dump))


@needs_compilers
@pytest.mark.parametrize("head_dims", list(HEAD_DIMS))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_kernels_do_not_spill(family, head_dims):
    passes = _kernels(family, head_dims)
    assert tuple(passes) == PASSES, f"passes compiled: {list(passes)}"
    for pass_, variants in passes.items():
        differ = [k.name for k in variants if not k.replay_matches_binary]
        assert not differ, f"ptxas's replay of {differ} does not give the shipped cubin's registers and frame"
        stores, loads = max(k.spill_stores for k in variants), max(k.spill_loads for k in variants)
        allowed = SPILLS_ALLOWED.get((family, head_dims, pass_))
        if allowed is None:
            assert stores == loads == 0, f"{family} {pass_} at {head_dims} spills {stores} / {loads} bytes"
        else:
            why, most_stores, most_loads = allowed
            assert stores or loads, f"{family} {pass_} at {head_dims} no longer spills: drop it from SPILLS_ALLOWED"
            assert stores <= most_stores and loads <= most_loads, (
                f"{family} {pass_} at {head_dims} spills {stores} / {loads} bytes, more than the "
                f"{most_stores} / {most_loads} allowed ({why})")


@needs_compilers
def test_table(capsys):
    groups = [({"kernels": family, "q/k, v head dims": head_dims, "pass": pass_}, variants)
              for head_dims in HEAD_DIMS for family in FAMILIES
              for pass_, variants in _kernels(family, head_dims).items()]
    with capsys.disabled():
        print("\n" + gpu_resources.markdown_table(groups))
    assert len(groups) == len(FAMILIES) * len(HEAD_DIMS) * len(PASSES)


@pytest.mark.parametrize(("registers", "threads", "shared_memory", "blocks", "warps", "limited_by"), [
    (154, 256, 99_328, 1, 8, ("registers",)),  # 5,120 registers a warp: 40,960 a block
    (128, 128, 0, 4, 16, ("registers",)),
    (32, 64, 0, 32, 64, ("registers", "threads", "blocks")),
    (64, 128, 50_176, 4, 16, ("shared_memory",)),  # 228 KiB hold 4 blocks of 49 KiB
    (255, 384, 0, 0, 0, ("registers",)),  # more registers than an SM has: cannot launch
])
def test_occupancy_counts_as_cudas_calculator(registers, threads, shared_memory, blocks, warps, limited_by):
    found = gpu_resources.occupancy(registers, threads, shared_memory)
    assert (found.blocks_per_sm, found.warps_per_sm, found.limited_by) == (blocks, warps, limited_by)
