"""`ring_attn.aot` reads a compiled schedule: which ring transfers a kernel hides. Checked here on
hand-written scheduled HLO in the compilers' own syntax, so it runs without the `aot` extra."""

from ring_attn import aot

RING = 'metadata={op_name="jit(f)/shard_map/ring_hop/ppermute"}'
OTHER = 'metadata={op_name="jit(f)/shard_map/ppermute"}'
TRITON = 'custom_call_target="__gpu$xla.gpu.triton"'

SCHEDULE = f"""HloModule jit_f, is_scheduled=true

%branch (p: f32[8]) -> f32[8] {{
  %p = f32[8]{{0}} parameter(0)
  ROOT %kernel.2 = f32[8]{{0}} custom-call(%p), {TRITON}
}}

%body (s: (f32[8], f32[8])) -> (f32[8], f32[8]) {{
  %s = (f32[8]{{0}}, f32[8]{{0}}) parameter(0)
  %k = f32[8]{{0}} get-tuple-element(%s), index=0
  %cp-start.1 = (f32[8]{{0}}, f32[8]{{0}}) collective-permute-start(%k), source_target_pairs={{{{0,1}},{{1,0}}}}, {RING}
  %cond = f32[8]{{0}} conditional(%pred, %k, %k), true_computation=%branch, false_computation=%branch
  %cp-done.1 = f32[8]{{0}} collective-permute-done(%cp-start.1), {RING}
  %cp-start.2 = (f32[8]{{0}}, f32[8]{{0}}) collective-permute-start(%k), source_target_pairs={{{{0,1}},{{1,0}}}}, {RING}
  %cp-done.2 = f32[8]{{0}} collective-permute-done(%cp-start.2), {RING}
  ROOT %t = (f32[8]{{0}}, f32[8]{{0}}) tuple(%cp-done.1, %cond)
}}

ENTRY %main (a: f32[8]) -> f32[8] {{
  %a = f32[8]{{0}} parameter(0)
  %reorder = f32[8]{{0}} collective-permute(%a), source_target_pairs={{{{0,1}},{{1,0}}}}, {OTHER}
  %sync = f32[8]{{0}} collective-permute(%a), source_target_pairs={{{{0,1}},{{1,0}}}}, {RING}
  %cp-start.3 = (f32[8]{{0}}, f32[8]{{0}}) collective-permute-start(%a), source_target_pairs={{{{0,1}},{{1,0}}}}, {RING}
  %kernel.1 = f32[8]{{0}} custom-call(%a), {TRITON}
  %cp-done.3 = f32[8]{{0}} collective-permute-done(%cp-start.3), {RING}
  %w = (f32[8]{{0}}, f32[8]{{0}}) while(%init), condition=%cond_c, body=%body
  ROOT %out = f32[8]{{0}} add(%kernel.1, %cp-done.3)
}}
"""


def test_a_transfer_is_hidden_only_while_a_kernel_runs():
    transfers = {t.name: t for t in aot.ring_transfers(SCHEDULE)}
    assert set(transfers) == {"cp-start.1", "cp-start.2", "cp-start.3", "sync"}  # the reorder is not the ring's
    assert transfers["cp-start.1"].hidden and "cond" in transfers["cp-start.1"].why  # a step's conditional
    assert transfers["cp-start.3"].hidden and "kernel.1" in transfers["cp-start.3"].why
    assert not transfers["cp-start.2"].hidden  # nothing runs between its start and done
    assert not transfers["sync"].hidden and transfers["sync"].why == "synchronous collective-permute"
    assert [t.name for t in aot.exposed(list(transfers.values()))] == ["cp-start.2", "sync"]


def test_kernels_and_host_callbacks_are_counted():
    assert aot.kernels(SCHEDULE) == {"triton": 2}
    assert aot.host_callbacks(SCHEDULE) == []
    callback = SCHEDULE.replace(TRITON, 'custom_call_target="xla_ffi_python_cpu_callback"', 1)
    assert aot.host_callbacks(callback) == ["kernel.2"]


def test_cuda_kernels_are_read_from_the_thunk_sequence(tmp_path):
    (tmp_path / "module_0001.jit_f.thunk_sequence.txt").write_text(
        "027: kCustomKernel      [prev=025 (2)  | next=028 (1) ] ring_attn_fwd grid: [32, 1, 8] threads: "
        "[256, 1, 1]  shared_memory: 98304 bytes\n"
        "028: kCustomKernel      [prev=027 (1)  | next=030 (2) ] ring_attn_fwd__1 grid: [32, 1, 8] threads: "
        "[256, 1, 1]  shared_memory: 98304 bytes\n"
        "029: kCustomKernel      [source        | next=030 (1) ] loop_add_fusion grid: [1, 1, 1] threads: "
        "[6, 1, 1]  shared_memory: 0 bytes\n"
    )
    [kernel] = aot.cuda_kernels(str(tmp_path), prefix="ring_attn")
    assert kernel == aot.CudaKernel("ring_attn_fwd", (32, 1, 8), (256, 1, 1), 98304)
