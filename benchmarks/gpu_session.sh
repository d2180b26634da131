#!/usr/bin/env bash
# One device-tool call for the GPU work that is still open: run from the repository root on the
# GPU machine (`run` with `bash benchmarks/gpu_session.sh STEP...`, default: every step). Each step
# has its own time limit so one slow step leaves time for the rest; logs go under $OUT (or
# ./gpu_logs), the tail of each is printed. Wheels carried in .whl/ (torchao, for the anchor rows of
# issue 14) are installed first.
set -u
export PYTHONUNBUFFERED=1
LOGS=${OUT:-gpu_logs}
mkdir -p "$LOGS"
python3 -m pip install -q --no-deps --no-build-isolation --no-index . > "$LOGS/install.log" 2>&1 || tail -3 "$LOGS/install.log"
if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl >> "$LOGS/install.log" 2>&1 \
    && export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,clocks.sm,memory.used --format=csv,noheader

step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s)"
  local start=$SECONDS
  timeout "$limit" "$@" > "$LOGS/$name.log" 2>&1
  echo "   exit $? after $((SECONDS - start)) s"; grep -E "^\||passed|failed|Error|SWEEP|CSR-CUDA|BSR-CUDA|^##|^  " "$LOGS/$name.log" | tail -40
}

steps=${*:-"triton resnet ffn csr_sweep csr_table minilm models"}
for s in $steps; do
  case $s in
    # Triton kernels compiled for the GPU (correctness first). `-P`: the installed package, not the
    # checkout's sparsec/ folder (which lacks the sparsec.runtime/passes/codegen mapping)
    triton) step triton_tests 400 env SPARSEC_TEST_GPU=1 python3 -P -m pytest -q -x tests/test_triton_kernels.py -p no:cacheprovider ;;
    # Why the sliced ResNet-50-style model is slower than Inductor (issue 15): capture alone, slicing
    # alone, the full pipeline with both sides' kernels
    resnet)
      step resnet_analyze 100 python3 benchmarks/channel_slice.py --only ResNet --passes analyze
      step resnet_slice 100 python3 benchmarks/channel_slice.py --only ResNet --passes analyze,channel-slice
      step resnet_full 150 python3 benchmarks/channel_slice.py --only ResNet --profile ;;
    # The ResNet rows alone (default mode: host-bound on cuDNN's launch path; CUDA graphs)
    resnet_rows) step resnet_rows 200 python3 benchmarks/channel_slice.py --only ResNet ;;
    # Where the host's time of a CUDA-graph decode call goes, sparsec beside Inductor (issue 14: case (a)
    # is host-bound on a slow host)
    host_a) step host_a 300 python3 benchmarks/profile_decode.py --case a --tokens 1 16 --host ;;
    host_a1) step host_a1 150 python3 benchmarks/profile_decode.py --case a --tokens 1 --host ;;
    # The decode rows of every case with CUDA graphs (against Inductor's)
    decode_all) step decode_all 330 python3 benchmarks/models.py --skip-other --shapes decode1,decode16 ;;
    # sparsec's CUDA-graph runtime (runtime/cuda_graphs.py) on the GPU, and the whole-model tests in
    # reduce-overhead mode
    graph_tests) step graph_tests 300 env SPARSEC_TEST_GPU=1 python3 -P -m pytest -q tests/test_cuda_graphs.py \
                   tests/test_select_kernels.py tests/test_semi_structured.py tests/test_conv_epilogue.py -k "graph or mode" -p no:cacheprovider ;;
    # The CUDA C++ CSR kernel (NVRTC) for unstructured weights at 1-16 tokens: its tests on the GPU, then
    # against the Triton CSR kernel and cuBLAS with its configs swept (issue 5's unstructured cells)
    csr_cuda)
      step csr_cuda_tests 200 env SPARSEC_TEST_GPU=1 python3 -P -m pytest -q -x tests/test_cuda_kernels.py -p no:cacheprovider
      step csr_cuda_sweep 250 python3 benchmarks/kernels.py --csr-cuda --tokens 1 4 16 ;;
    # The CUDA C++ block-sparse kernel for 1-16 tokens: its tests on the GPU, then against the Triton decode
    # kernel and cuBLAS with WARPS and UNROLL swept (issue 5's block cells at 1 and 16 tokens)
    bsr_cuda)
      step bsr_cuda_tests 200 env SPARSEC_TEST_GPU=1 python3 -P -m pytest -q -x tests/test_cuda_kernels.py -k bsr_small_m -p no:cacheprovider
      step bsr_cuda_sweep 250 python3 benchmarks/kernels.py --bsr-cuda --tokens 1 4 16 ;;
    # What programmatic dependent launch gives the CUDA C++ BSR kernel: issue 14's decode rows of cases a and b
    # without it and with it, twice in turn (run-to-run spread is a few percent)
    cuda_pdl_ab)
      for i in 1 2; do for pdl in never auto; do
        step cuda_pdl_${i}_$pdl 140 python3 benchmarks/models.py --skip-other --only a,b --shapes decode1,decode16 --cuda-pdl $pdl
      done; done ;;
    graph_runtime_tests) step graph_runtime_tests 150 env SPARSEC_TEST_GPU=1 python3 -P -m pytest -q tests/test_cuda_graphs.py -p no:cacheprovider ;;
    # The 64x64-pruned weights also packed in 128x64 and 128x128 blocks at many tokens: checks the L2-bytes-a-flop
    # model of the many-token kernel's limit (prefill (b), issue 5's 50% cells), which predicts no gain at 50%
    tall_blocks) step tall_blocks 300 python3 benchmarks/kernels.py --patterns block50,block90 --table-tokens 256 2048 4096 \
                   --tall-blocks 128x64,128x128 --rep 10 ;;
    # Where the decode time goes in case (a) (issue 14), and the BSR config sweeps (issue 5): the
    # stack's decode shapes at 1 and 16 tokens, the weights at 256 and 4096
    profile_a) step profile_a 200 python3 benchmarks/profile_decode.py --case a --tokens 1 16 ;;
    # sparsec's side alone at 16 sequences (CUDA graphs: the input copy and the output clone among the kernels)
    profile_a16) step profile_a16 120 python3 benchmarks/profile_decode.py --case a --tokens 16 --skip-inductor ;;
    # the same at 16 tokens with one non-zero block a step (the Tensor Core decode kernel before its STEPS table)
    profile_a_step1) step profile_a_step1 150 python3 benchmarks/profile_decode.py --case a --tokens 16 --steps 1 1 --skip-inductor ;;
    bsr_tests) step bsr_tests 240 env SPARSEC_TEST_GPU=1 python3 -P -m pytest -q -x tests/test_triton_kernels.py -k "bsr or op_3d" -p no:cacheprovider ;;
    bsr_sweep_small) step bsr_sweep_small 330 python3 benchmarks/kernels.py --sweep --tokens 1 16 ;;
    # The kernels of this session's changes on the GPU: block-sparse (several blocks per step) and 2:4
    kernel_tests) step kernel_tests 240 env SPARSEC_TEST_GPU=1 python3 -P -m pytest -q -x tests/test_triton_kernels.py \
                    tests/test_semi_structured.py -k "bsr or op_3d or semi or two_four or float64" -p no:cacheprovider ;;
    # 2:4 through cuSPARSELt against cuBLAS and torch's 2:4 (the cost model's figures)
    sweep_2_4) step sweep_2_4 60 python3 benchmarks/kernels.py --sweep-2-4 --tokens 16 256 2048 4096 --rep 10 ;;
    # The decode kernel's Tensor Core configs with 6-14 pipeline stages (Triton 3.6 keeps (stages - 2) / 2
    # buffers of its loop), at 1 and 16 tokens; every config checked against float64 before it is timed
    deep_stages) step deep_stages 420 python3 benchmarks/kernels.py --sweep --deep-stages --tokens 16 1 --patterns block90,block50 ;;
    # The block-sparse rows of issue 5's table, then decode (a) and (b) again, with CUDA graphs
    # (the gated gate/up kernel's deep configs at 50% first, its 90% ones beside them)
    block_tables)
      step deep_gated 120 python3 benchmarks/kernels.py --sweep --deep-stages --tokens 16 1 --patterns block50,block90 --weights 22016x4096
      step decode_ab 200 python3 benchmarks/models.py --skip-other --shapes decode1,decode16 --only a,b
      step kernels_block 150 python3 benchmarks/kernels.py --patterns block90,block50 --rep 10 ;;
    bsr_sweep_large) step bsr_sweep_large 500 python3 benchmarks/kernels.py --sweep --tokens 256 4096 ;;
    # The Triton CSR kernel (issue 5): config sweep, then the unstructured rows of the kernel table
    csr_sweep) step csr_sweep 150 python3 benchmarks/kernels.py --sweep-csr ;;
    # The CSR kernel alone: its GPU tests, and the sweep at one and 16 tokens
    csr_quick)
      step csr_tests 60 env SPARSEC_TEST_GPU=1 python3 -P -m pytest -q -x tests/test_triton_kernels.py -k csr -p no:cacheprovider
      step csr_sweep 70 python3 benchmarks/kernels.py --sweep-csr --tokens 1 16 ;;
    # The CSR kernel at one token with 1-4 warps and whole rows a pass (is it latency-bound?); its GPU tests first
    csr_whole_rows)
      step csr_tests 90 env SPARSEC_TEST_GPU=1 python3 -P -m pytest -q -x tests/test_triton_kernels.py -k csr -p no:cacheprovider
      step csr_whole_rows 150 python3 benchmarks/kernels.py --sweep-csr --csr-whole-rows --tokens 1 ;;
    # The CSR kernel at 16 and 64 tokens
    csr_tokens) step csr_tokens 200 python3 benchmarks/kernels.py --sweep-csr --tokens 16 64 ;;
    csr_table_m1) step kernels_unstr_m1 120 python3 benchmarks/kernels.py --patterns unstr90,unstr50 --table-tokens 1 --rep 20 ;;
    csr_table) step kernels_unstr 200 python3 benchmarks/kernels.py --patterns unstr90,unstr50 --rep 20 ;;
    # co-permute's effect on kernel time with the real MiniLM weights (issue 7; the file is made on
    # the CPU: permute_minilm.py --sparsity 0.9 --tiles 16 64 --save gpu_inputs/minilm90.safetensors)
    minilm) step minilm 60 python3 benchmarks/permute_minilm.py --time gpu_inputs/minilm90.safetensors ;;
    # The FFN rows, with and without CUDA graphs (issue 15)
    ffn) step ffn 150 python3 benchmarks/channel_slice.py --only SwiGLU ;;
    # Issue 14's tables (the longest step)
    models) for shape in decode16 decode1 prefill; do
              step "models_$shape" 200 python3 benchmarks/models.py --skip-other --shapes $shape
            done ;;
    # The BERT 2:4 and ResNet 50%-channel rows of issue 14 alone; decode also without CUDA graphs
    models_other) step models_other 240 python3 benchmarks/models.py --shapes none ;;
    # the same with Inductor's kernels in sparsec's graphs always launched with PDL (what PDL costs these models)
    models_other_pdl) step models_other_pdl 240 python3 benchmarks/models.py --shapes none --inductor-pdl always ;;
    # The gated kernel's 5-stage config (bsr_large_m.LARGE_M_CONFIGS): GPU tests, then the prefill table;
    # gated_sweep: the sweep at 2048 tokens over the prefill weights (a register cap among its configs)
    gated_stages)
      step large_tests 200 env SPARSEC_TEST_GPU=1 python3 -P -m pytest -q -x tests/test_triton_kernels.py \
        -k "gated or large or op_3d" -p no:cacheprovider
      step models_prefill 260 python3 benchmarks/models.py --skip-other --shapes prefill ;;
    gated_sweep)
      step sweep_prefill 200 python3 benchmarks/kernels.py --sweep --tokens 2048 --patterns block90 \
        --weights 12288x4096,4096x4096,4096x11008,22016x4096
      step sweep_prefill_50 100 python3 benchmarks/kernels.py --sweep --tokens 2048 --patterns block50 --weights 22016x4096 ;;
    # The many-token kernel's tiles through tensor descriptors (TMA): its GPU tests, then the prefill and
    # issue 5 weights' configs with and without them (each checked against float64 first)
    tma_sweep)
      step tma_tests 200 env SPARSEC_TEST_GPU=1 python3 -P -m pytest -q -x tests/test_triton_kernels.py \
        -k "tensor_descriptor or large or gated" -p no:cacheprovider
      step tma_sweep 330 python3 benchmarks/kernels.py --sweep --tma --tokens 2048 4096 --patterns block90 \
        --weights 12288x4096,4096x4096,4096x11008,22016x4096,11008x4096 ;;
    # Each FFN launch inside the compiled prefill graph (the gated and down launches share a kernel name) and
    # the configs Inductor timed for them; the kernel tests of the final code; prefill (a) and (c)
    ffn_launches)
      step kernel_tests 150 env SPARSEC_TEST_GPU=1 python3 -P -m pytest -q -x tests/test_triton_kernels.py \
        -k "shapes or epilogue_dtypes or op_3d or tensor_descriptor" -p no:cacheprovider
      step profile_c_launches 150 python3 benchmarks/profile_decode.py --case c --tokens 2048 --prefill \
        --mode default --skip-inductor --log-autotune
      grep -A6 "Benchmark all input configs for bsr" "$LOGS/profile_c_launches.log" | cut -c1-220 | head -40
      step models_prefill_ac 120 python3 benchmarks/models.py --skip-other --shapes prefill --only a,c ;;
    # Prefill's host time: Inductor launching the traced sparse kernels through its static launcher
    # (experimental upstream) against Triton's Python launcher, twice in turn; outputs checked against eager
    static_launch)
      for round in 1 2; do
        step "prefill_static_$round" 90 env TORCHINDUCTOR_STATIC_LAUNCH_USER_DEFINED_TRITON_KERNELS=1 \
          python3 benchmarks/models.py --skip-other --shapes prefill --only a,c
        step "prefill_python_$round" 90 python3 benchmarks/models.py --skip-other --shapes prefill --only a,c
      done ;;
    # Decode of cases (a) and (e) alone (a quick check of the decode path, PDL included)
    decode_ae) step decode_ae 240 python3 benchmarks/models.py --skip-other --shapes decode1,decode16 --only a,e ;;
    models_all_modes) step models_all_modes 400 python3 benchmarks/models.py --skip-other --all-modes --shapes decode1,decode16 ;;
    # prefill with each side timed alone after 3 s of its own calls (the GPU's clock settles per load)
    prefill_steady) step prefill_steady 280 python3 benchmarks/models.py --skip-other --shapes prefill --only a,c,e --timing steady ;;
    models_decode16|models_decode1|models_prefill)
      step "$s" 220 python3 benchmarks/models.py --skip-other --shapes "${s#models_}" ;;
    # Issue 14's tables with torchao's rows beside sparsec's (its wheel carried in .whl/): decode for the
    # cases whose kernels changed (a-d), prefill for all
    ao_decode1|ao_decode16)
      step "$s" 250 python3 benchmarks/models.py --skip-other --shapes "${s#ao_}" --only a,b,c,d --impls sparsec,torchao ;;
    # 2:4 at prefill: as the cost model picks (dense), and with the relayout copy unpriced (2:4 runs)
    prefill_2_4)
      step prefill_2_4 120 python3 benchmarks/models.py --skip-other --shapes prefill --only d,e
      step prefill_2_4_unpriced 120 python3 benchmarks/models.py --skip-other --shapes prefill --only d --unpriced-relayout ;;
    # Issue 14's decode table, every case, with torchao's rows (decode1 and decode16 in one run)
    ao_decode) step ao_decode 520 python3 benchmarks/models.py --skip-other --shapes decode1,decode16 --impls sparsec,torchao ;;
    ao_prefill) step ao_prefill 300 python3 benchmarks/models.py --skip-other --shapes prefill --impls sparsec,torchao ;;
    # Case (a) at decode timed as before (do_bench: an L2 flush, then one call), beside the default
    # back-to-back timing of models_decode1/16
    decode_flush) step decode_flush 200 python3 benchmarks/models.py --skip-other --shapes decode1,decode16 --only a --timing flush ;;
    # ResNet-50 bottlenecks: convolutions against their pointwise kernels, and cuDNN's fused epilogues
    conv_epilogue) step conv_epilogue 150 python3 benchmarks/conv_epilogue.py ;;
    # ResNet/BERT rows with the fused convolutions in the default mode too (the op's host path is cheaper
    # since runtime.ops.host_op): does fusing now pay without CUDA graphs?
    models_other_fuse_default) step models_other_fuse_default 240 python3 benchmarks/models.py --shapes none --fuse-conv-always ;;
    conv_tests) step conv_tests 200 env SPARSEC_TEST_GPU=1 python3 -P -m pytest -q -x tests/test_conv_epilogue.py -p no:cacheprovider ;;
    # The decode kernel at one token with and without the next step loaded ahead (PREFETCH)
    bsr_sweep_m1) step bsr_sweep_m1 330 python3 benchmarks/kernels.py --sweep --tokens 1 ;;
    bsr_sweep_m1_90) step bsr_sweep_m1_90 200 python3 benchmarks/kernels.py --sweep --tokens 1 --patterns block90 ;;
    # A few tokens without tl.dot (the step shrinks as the token tile grows, so the accumulator keeps its size)
    bsr_sweep_m4) step bsr_sweep_m4 150 python3 benchmarks/kernels.py --sweep --tokens 4 --patterns block90 ;;
    # The scale line on this GPU: cuBLAS over 1/10 (a, c) or 1/2 (b) of each pruned linear's columns
    line_decode) step line_decode 300 python3 benchmarks/models.py --skip-other --shapes decode1,decode16 --only a,b,c --impls line ;;
    line_prefill) step line_prefill 200 python3 benchmarks/models.py --skip-other --shapes prefill --only a,b,c --impls line ;;
    # The decode kernel at 16 tokens (Tensor Core path)
    bsr_sweep_m16) step bsr_sweep_m16 300 python3 benchmarks/kernels.py --sweep --tokens 16 ;;
    # Issue 5's block-sparse cells at few tokens (the decode kernel's table)
    kernels_decode) step kernels_decode 200 python3 benchmarks/kernels.py --patterns block90,block50 --table-tokens 1 16 --rep 20 ;;
    # The decode kernel's default configs on the GPU at 1-17 tokens (2-8 tokens: the step shrinks with the token tile)
    decode_tests) step decode_tests 150 env SPARSEC_TEST_GPU=1 python3 -P -m pytest -q -x tests/test_triton_kernels.py \
                    -k "bsr_kernels_shapes or op_3d or broadcast_table or blocks_per_step" -p no:cacheprovider ;;
    # The decode kernel's slabs over token tiles against the large-M kernel at 128-512 tokens
    sweep_mid) step sweep_mid 300 python3 benchmarks/kernels.py --sweep --tokens 256
               step sweep_mid_512 150 python3 benchmarks/kernels.py --sweep --tokens 128 512 --weights 11008x4096,4096x11008 ;;
    # The decode kernel at 128 and 256 tokens (bsr_small_m.serves): GPU tests, the table's cells; the
    # decode kernel's slabs with several blocks a step against bsr_large_m at prefill
    mid_tokens)
      step mid_tests 150 env SPARSEC_TEST_GPU=1 python3 -P -m pytest -q -x tests/test_triton_kernels.py \
        -k "bsr_kernels_shapes or op_3d" -p no:cacheprovider
      step kernels_mid 150 python3 benchmarks/kernels.py --patterns block90,block50 --table-tokens 128 256 --rep 20
      step sweep_2048 200 python3 benchmarks/kernels.py --sweep --tokens 2048 --patterns block50 \
        --weights 11008x4096,4096x11008,4096x4096 ;;
    # What bounds bsr_large_m at prefill: Nsight Compute on one launch beside cuBLAS's (needs a machine
    # whose runtime lets ncu read the counters, device/KINDS.md); the times alone otherwise
    ncu_large) step ncu_large 240 ncu --clock-control none -k regex:"bsr_large_m|gemm|sm90|nvjet" --launch-skip 2 \
                 --launch-count 2 --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats \
                 python3 benchmarks/profile_kernel.py --kernel bsr_large_m --weight 11008x4096 --pattern block50 --tokens 2048 ;;
    # Why the gated SwiGLU kernel (22016x4096 stacked gate/up) ran its blocks ~25% slower than the plain
    # 22016-row one at 2048 tokens (twelfth session: 215 registers, 2 programs a SM): Nsight Compute on the plain
    # 11008- and 22016-row weights and the gated one, uncapped and capped (RUN: weight, epilogue, register cap)
    ncu_gated)
      for run in "11008x4096 none 0" "22016x4096 none 0" "22016x4096 swiglu 0" "22016x4096 swiglu 168"; do
        set -- $run
        cfg="{\"BLOCK_M\": 128, \"num_warps\": 4, \"num_stages\": 5, \"maxnreg\": $3}"
        step "ncu_${1}_${2}_${3}" 100 ncu --clock-control none -k regex:"bsr_large_m" --launch-skip 1 --launch-count 1 \
          --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats --section Occupancy \
          --section LaunchStats python3 benchmarks/profile_kernel.py --kernel bsr_large_m --weight $1 --pattern block90 \
          --tokens 2048 --act $2 --config "$cfg"
      done ;;
    # The decode kernel's Tensor Core configs at 16 and 64 tokens ("default" is the table's choice), then
    # case (a)-(c)'s decode16 rows
    decode_configs)
      step decode_configs_sweep 300 python3 benchmarks/kernels.py --sweep --tokens 16 64 --patterns block90,block50
      step decode_configs_models 250 python3 benchmarks/models.py --skip-other --shapes decode16 --only a,b,c ;;
    # Does the decode kernel wait on its longest rows? The sweep at 16 tokens on random 90% blocks and on the
    # same density with every block row holding as many blocks (rowblock90)
    balance) step balance 200 python3 benchmarks/kernels.py --sweep --tokens 16 --patterns block90,rowblock90 ;;
    # Which graphs survive the CUDA AOTInductor route: plain torch, a minimal triton_op, sparsec's BSR launches
    aoti_cuda) step aoti_cuda 500 python3 benchmarks/aoti_cuda.py --log "$LOGS/aoti_children.log" ;;
    # AOTInductor over the gated many-token launch, x's tiles through pointers and through tensor descriptors
    # (global scratch); the .pt2 loaded in a child process, only compiled where a plain nn.Linear's .pt2 does not load
    # (on the GPU machine's torch 2.11.0+cu130 every CUDA .pt2 crashed in _load_aoti: aoti_cuda, sixteenth session)
    aoti_tma) step aoti_tma 300 env SPARSEC_TEST_GPU=1 python3 -P -m pytest -q -rs tests/test_export.py \
                -k "gated_many_token" -p no:cacheprovider ;;
    # What bounds the decode kernel at 16 tokens (case (a)'s four weights after fuse-linears): Nsight Compute
    # on one launch each, beside cuBLAS over a dense weight of the same bytes (RUN: weight, epilogue, config)
    ncu_decode)
      for run in "22016x4096 swiglu {}" "22016x4096 none {}" "12288x4096 none {}" "4096x4096 none {}" \
                 "4096x11008 none {}"; do
        set -- $run
        step "ncu_decode_${1}_${2}" 100 ncu --clock-control none -k regex:"bsr_small_m|gemm|gemv|nvjet|sm90" \
          --launch-skip 2 --launch-count 2 --section SpeedOfLight --section MemoryWorkloadAnalysis \
          --section WarpStateStats --section Occupancy --section LaunchStats --section SchedulerStats \
          python3 benchmarks/profile_kernel.py --kernel bsr_small_m --weight $1 --pattern block90 --tokens 16 \
          --act $2 --config "$3" --dense-same-bytes
      done ;;
    # What bounds the CSR kernel at one token (latency chain, L1 gathers or bandwidth), its best swept config
    ncu_csr) step ncu_csr 240 ncu --clock-control none -k regex:"csr_kernel|gemv|gemm|nvjet" --launch-skip 2 \
               --launch-count 2 --section SpeedOfLight --section MemoryWorkloadAnalysis --section MemoryWorkloadAnalysis_Tables \
               --section WarpStateStats --section Occupancy --section LaunchStats \
               python3 benchmarks/profile_kernel.py --kernel csr --weight 11008x4096 --pattern unstr90 --tokens 1 \
               --config '{"ROWS": 1, "CHUNK": 512, "num_warps": 2}' ;;
    # What bounds the CUDA C++ CSR kernel (shared-memory conflicts, staging x, the load chain): 1, 4 and 16
    # tokens with the launcher's choice, 16 tokens in two 8-token tiles
    ncu_csr_cuda)
      set -- 1 '{}' 4 '{}' 16 '{}' 16 '{"MT": 8, "UNROLL": 2, "BLOCKS_PER_SM": 2}'
      while [ $# -gt 0 ]; do
        step "ncu_csr_cuda_$1_${#2}" 100 ncu --clock-control none -k regex:"csr_small_m" --launch-skip 1 --launch-count 1 \
          --section SpeedOfLight --section MemoryWorkloadAnalysis --section MemoryWorkloadAnalysis_Tables \
          --section WarpStateStats --section Occupancy --section LaunchStats --section SchedulerStats \
          python3 benchmarks/profile_kernel.py --kernel csr_cuda --weight 11008x4096 --pattern unstr90 --tokens $1 \
          --config "$2"
        shift 2
      done ;;
    # Where the ResNet-50-style row's time goes under CUDA graphs, kernel by kernel, both sides
    resnet_profile) step resnet_profile 240 python3 benchmarks/profile_decode.py --model resnet ;;
    # Dense prefill (case e, default mode), kernel by kernel on both sides: where sparsec's graph is slower
    prefill_e_profile) step prefill_e_profile 200 python3 benchmarks/profile_decode.py --case e --tokens 2048 --prefill --mode default ;;
    bert_profile) step bert_profile 240 python3 benchmarks/profile_decode.py --model bert ;;
    # Dynamic batch with the CUDA kernels: graphs compiled over nine batch sizes, outputs against eager
    dynamic_batch) step dynamic_batch 200 env SPARSEC_TEST_GPU=1 python3 -P -m pytest -q -x tests/test_select_kernels.py \
                     -k "dynamic_batch" -p no:cacheprovider ;;
    # The bitmap kernel with several K tiles a step (and the next loaded ahead): GPU tests, then the sweep
    bitmap_sweep)
      step bitmap_tests 100 env SPARSEC_TEST_GPU=1 python3 -P -m pytest -q -x tests/test_triton_kernels.py \
        -k "bitmap" -p no:cacheprovider
      step bitmap_sweep 200 python3 benchmarks/kernels.py --sweep-bitmap --tokens 1 16 --patterns unstr90 \
        --weights 11008x4096,4096x11008 ;;
    # Issue 14's case (a) and (e) compiled for a dynamic batch (the sparse layers through their opaque op)
    # in the default mode and with CUDA graphs, against Inductor compiled the same way
    models_dynamic) step models_dynamic 300 python3 benchmarks/models.py --skip-other --all-modes --dynamic \
                      --shapes decode1,decode16,prefill --only a,e ;;
    # Programmatic dependent launch in a CUDA graph: case (a)'s decode kernels and norms, with and without
    pdl_chain) step pdl_chain 200 python3 benchmarks/pdl_chain.py --tokens 1 16 ;;
    # PDL and the bitmap table on the GPU: kernel chains against serial launches, a reduce-overhead model
    pdl_tests)
      step pdl_kernel_tests 200 env SPARSEC_TEST_GPU=1 python3 -P -m pytest -q -x tests/test_triton_kernels.py \
        -k "pdl or bitmap" -p no:cacheprovider
      step pdl_model_tests 120 env SPARSEC_TEST_GPU=1 python3 -P -m pytest -q -x tests/test_select_kernels.py \
        -k "pdl" -p no:cacheprovider ;;
    # Case (a) and (e) at decode in both modes (static shapes)
    models_decode_modes) step models_decode_modes 300 python3 benchmarks/models.py --skip-other --all-modes \
                           --shapes decode1,decode16 --only a,e ;;
    # Case (a) at decode with CUDA graphs (PDL on both kinds of kernels), then compiled for a dynamic batch
    pdl_decode)
      step pdl_decode 150 python3 benchmarks/models.py --skip-other --shapes decode1,decode16 --only a
      step dynamic_decode 200 python3 benchmarks/models.py --skip-other --all-modes --dynamic --shapes decode1,decode16 \
        --only a ;;
    # Issue 14's decode table (every case, CUDA graphs), then case (a) compiled for a dynamic batch at 16
    # tokens (both modes) and at prefill
    final_decode)
      step dynamic_tests 150 env SPARSEC_TEST_GPU=1 python3 -P -m pytest -q -x tests/test_select_kernels.py \
        -k "dynamic_batch_on_cuda" -p no:cacheprovider
      step final_decode 200 python3 benchmarks/models.py --skip-other --shapes decode1,decode16
      step dynamic_a 240 python3 benchmarks/models.py --skip-other --all-modes --dynamic --shapes decode16,prefill \
        --only a ;;
    # Issue 5's whole table (every pattern, 1 to 4096 tokens)
    kernels_table) step kernels_table 420 python3 benchmarks/kernels.py --rep 20 ;;
    *) echo "unknown step $s" ;;
  esac
done
