#!/usr/bin/env bash
# Runs a chosen set of the GPU scripts in one device call, each under its own time limit, and leaves every JSON and
# log in one tarball (the device tool returns at most 8 files):
#   OUT=/some/dir bash bench/gpu_all.sh compile qlora variants init multi check train
# Names: check (gpu_check --skip-big), check_persistent (gpu_check --only persistent: the large-M paths that compute
# the rank-r product inside the persistent GEMMs, and those modes forced at odd shapes), multi (gpu_multi_lora, targets grid + sweep + demo), multi_check (its checks
# and the demo only), multi_full (full grid, no sweep), multi_shard (bench_multi_lora's full grid, the shard
# MULTI_SHARD=I/N of it, MULTI_LIMIT seconds; JSON after every shape), multi_missing (the shapes that
# results/multi_lora_full.json lists as missing), multi_tokens (the full grid's shapes with MULTI_TOKENS tokens,
# default 64, re-measured to merge after the shards), compile, compile_late (its last two cases), host
# (profile_host), linear (bench_lora_linear --quick), prof (profile_lora at
# p=0.1 and 0), persistent (exp_persistent: GEMM variants, shrink/dA/dB/dX-term timings at M=8192), profc (profile_compile:
# the compiled training step against eager, p=0 and 0.1), nf4dec (exp_nf4_decode: NF4 decode checks, GEMV tile sweep,
# dequantize timings; NF4DEC_ARGS=--no-sweep skips the sweep), nf4rows (exp_nf4_rows: the one-row NF4
# GEMV on the FMA units, checks and a tile sweep; NF4ROWS_ARGS=--no-sweep), pdl (exp_pdl: PDL producer/consumer pairs, checks and
# timings on and off), multik (exp_multi_kernels: each multi-LoRA kernel alone per tile, then end-to-end candidates),
# multip (exp_multi_prefill: kernel profile per shape, end-to-end configs, cuBLAS with beta 1; MULTIP_ARGS picks
# shapes and configs), mrows (exp_multi_rows: the decode "rows" kernels against the segment ones, checks, graph
# replays with a new mix, kernel times; MROWS_ARGS picks shapes and configs, MROWS_LIMIT seconds), skinny
# (exp_skinny_gemm: plain Triton GEMMs at 16-4096 rows against cuBLAS, TMA / swap / split K / row tiles; SKINNY_ARGS),
# linear_mid (bench_lora_linear at the mid-size prefill cases, LINEAR_CASES), midrows (exp_mid_rows: forward and dX tiles at 65-2048 rows under graphs; MIDROWS_ARGS), splitrows (exp_split_rows: the single-adapter forward's xa modes at 65-512 rows under graphs; SPLITROWS_ARGS), gaps
# (probe_multi_gaps: a graphed multi-LoRA call's idle time between its kernels; GAPS_ARGS), inline
# (exp_inline_shrink: the shrink inside the persistent GEMM against a shrink launch, checks and timings), stages
# (exp_inline_stages: that shrink's pipeline depth, and dA / dB's partial sums in one launch), dist (gpu_distributed on 2 GPUs, kind nvidia-h200-x2), qlora, variants, init, train (bench_train_step),
# profvar (profile_variants: kernel / host / wall time per DoRA, VeRA, LoRA step), compile_variants (gpu_compile's
# variants_compiled case alone: DoRA, VeRA and QLoRA under inductor), probestep (probe_step_host: where a LoRA / DoRA /
# VeRA step's host time goes), doraker (exp_dora_kernels: DoRA's norm and column-scale kernels by tile), wsgemm
# (exp_ws_gemm: warp specialization on Hopper), dprod (exp_dropout_producer), dxterm (exp_dx_term_in_ab: dX's dropout term in
# dA's programs against its own pass), probedora (probe_dora_train: DoRA / LoRA training against PEFT's on the GPU, same init and batches),
# nf4deq (exp_nf4_dequant: the dequantize kernel's tile sweep, checked bit for bit), probefwd (probe_fwd_paths: the issue-2 forward by launcher / functional / module, paired and do_bench),
# dectl (probe_decode_timeline: the single-adapter forward's kernels and their timeline under a graph; DECTL_ROWS),
# exps (issue 6's experiments A, B and C at their large, GPU sizes: examples/exp_init.py, exp_rank.py,
# exp_variants.py --size large), train_big (bf16 adapters at TRAIN_BATCH sequences, default 8: a GPU-bound step; TRAIN_ARGS adds options to both), pytest (the CPU suite's tests on the GPU,
# PYTEST_ARGS picks them, PYTEST_LIMIT seconds). bitsandbytes wheels in .whl/ are installed
# first when present (the device image lacks it). A summary line per script is printed last.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out}
mkdir -p "$OUT/logs"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
SUMMARY=()
step() {  # step NAME SECONDS CMD...
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout --signal=INT --kill-after=15 "$limit" "$@" >"$OUT/logs/$name.log" 2>&1
  local rc=$?
  SUMMARY+=("$(printf '%-10s rc=%-3s %4ss  %s' "$name" "$rc" "$((SECONDS - t0))" "$(tail -n 1 "$OUT/logs/$name.log" | cut -c1-150)")")
}
for name in "$@"; do
  case $name in
    check) step check 330 python3 bench/gpu_check.py --skip-big --out "$OUT/logs" ;;
    check_persistent) step check_persistent 150 python3 bench/gpu_check.py --only persistent --out "$OUT/logs" ;;
    multi) step multi 300 python3 bench/gpu_multi_lora.py "$OUT/logs" --grid targets --demo ;;
    multi_check) step multi_check 200 python3 bench/gpu_multi_lora.py "$OUT/logs" --no-sweep --grid none --demo ;;
    multi_full) step multi_full 420 python3 bench/gpu_multi_lora.py "$OUT/logs" --grid full --no-sweep ;;
    multi_shard) step multi_shard ${MULTI_LIMIT:-400} python3 bench/bench_multi_lora.py --grid full \
      --shard "${MULTI_SHARD:-1/2}" --out "$OUT/logs" ;;
    multi_tokens) step multi_tokens ${MULTI_LIMIT:-400} python3 bench/bench_multi_lora.py --grid full \
      --tokens "${MULTI_TOKENS:-64}" --out "$OUT/logs" ;;
    multi_missing) step multi_missing ${MULTI_LIMIT:-400} python3 bench/bench_multi_lora.py --grid full \
      --missing bench/results/multi_lora_full.json --out "$OUT/logs" ;;
    compile_late) step compile_late 150 python3 bench/gpu_compile.py --out "$OUT/logs" \
      --only reduce_overhead,checkpoint_compiled ;;
    host) step host 120 python3 bench/profile_host.py --out "$OUT/logs" ;;
    linear) step linear 330 python3 bench/bench_lora_linear.py --quick --out "$OUT/logs" ;;
    linear_mid) step linear_mid ${LINEAR_LIMIT:-240} python3 bench/bench_lora_linear.py \
      --cases "${LINEAR_CASES:-prefill-512x,prefill-2048x}" --out "$OUT/logs" ;;
    prof) step prof 120 bash -c "python3 bench/profile_lora.py --p 0.1 && python3 bench/profile_lora.py --p 0" ;;
    profc) step profc 240 bash -c "python3 bench/profile_compile.py --p 0 && python3 bench/profile_compile.py --p 0.1" ;;
    pdl) step pdl 330 python3 bench/exp_pdl.py --out "$OUT/logs" ${PDL_ARGS:-} ;;
    nf4dec) step nf4dec 300 python3 bench/exp_nf4_decode.py --out "$OUT/logs" ${NF4DEC_ARGS:-} ;;
    nf4rows) step nf4rows 480 python3 bench/exp_nf4_rows.py --out "$OUT/logs" ${NF4ROWS_ARGS:-} ;;
    persistent) step persistent 200 python3 bench/exp_persistent.py --out "$OUT/logs" --shapes 1 ;;
    dist) step dist 200 torchrun --standalone --nproc_per_node 2 bench/gpu_distributed.py --out "$OUT/logs" ;;
    compile) step compile 170 python3 bench/gpu_compile.py --out "$OUT/logs" ;;
    qlora) step qlora 260 python3 bench/gpu_qlora.py --out "$OUT/logs" ;;
    variants) step variants 180 python3 bench/gpu_variants.py --out "$OUT/logs" ;;
    init) step init 100 python3 bench/gpu_init_embedding.py --out "$OUT/logs" ;;
    train) step train 200 python3 bench/bench_train_step.py --out "$OUT/logs" --max-seconds 150 ${TRAIN_ARGS:-} ;;
    train_big) step train_big 260 python3 bench/bench_train_step.py --out "$OUT/logs/big" --batch "${TRAIN_BATCH:-8}" \
      --adapter-dtypes bf16 --max-seconds 200 ${TRAIN_ARGS:-} ;;
    exps) step exps 300 bash -c "python3 examples/exp_init.py --size large --dtype bf16 --out $OUT/logs/exps \
      && python3 examples/exp_rank.py --size large --dtype bf16 --out $OUT/logs/exps \
      && python3 examples/exp_variants.py --size large --out $OUT/logs/exps" ;;
    profvar) step profvar 150 python3 bench/profile_variants.py ;;
    probestep) step probestep 150 python3 bench/probe_step_host.py --out "$OUT/logs" ;;
    dxterm) step dxterm 200 python3 bench/exp_dx_term_in_ab.py --out "$OUT/logs" ;;
    dxepi) step dxepi 240 python3 bench/exp_dx_dropout_epilogue.py --out "$OUT/logs" ;;
    inldrop) step inldrop 240 python3 bench/exp_inline_dropout.py --out "$OUT/logs" ;;
    compstep) step compstep 400 python3 bench/exp_compile_step.py --out "$OUT/logs" ;;
    dprod) step dprod 200 python3 bench/exp_dropout_producer.py --out "$OUT/logs" ;;
    wsgemm) step wsgemm 240 python3 bench/exp_ws_gemm.py --out "$OUT/logs" ${WSGEMM_ARGS:-} ;;
    doraker) step doraker 200 python3 bench/exp_dora_kernels.py --out "$OUT/logs" ;;
    compile_variants) step compile_variants 200 python3 bench/gpu_compile.py --out "$OUT/logs" --only variants_compiled ;;
    nf4deq) step nf4deq 150 python3 bench/exp_nf4_dequant.py --out "$OUT/logs" ;;
    probedora) step probedora 200 python3 bench/probe_dora_train.py --out "$OUT/logs" ;;
    probefwd) step probefwd 150 python3 bench/probe_fwd_paths.py --out "$OUT/logs" ;;
    dectl) step dectl 120 python3 bench/probe_decode_timeline.py --out "$OUT/logs" --rows "${DECTL_ROWS:-1,16}" ;;
    multik) step multik 300 python3 bench/exp_multi_kernels.py --out "$OUT/logs" ;;
    multip) step multip 200 python3 bench/exp_multi_prefill.py --out "$OUT/logs" ${MULTIP_ARGS:-} ;;
    mrows) step mrows ${MROWS_LIMIT:-330} python3 bench/exp_multi_rows.py --out "$OUT/logs" ${MROWS_ARGS:-} ;;
    skinny) step skinny ${SKINNY_LIMIT:-400} python3 bench/exp_skinny_gemm.py --out "$OUT/logs" ${SKINNY_ARGS:-} ;;
    splitrows) step splitrows ${SPLITROWS_LIMIT:-240} python3 bench/exp_split_rows.py --out "$OUT/logs" ${SPLITROWS_ARGS:-} ;;
    midrows) step midrows ${MIDROWS_LIMIT:-480} python3 bench/exp_mid_rows.py --out "$OUT/logs" ${MIDROWS_ARGS:-} ;;
    gaps) step gaps 200 python3 bench/probe_multi_gaps.py --out "$OUT/logs" ${GAPS_ARGS:-} ;;
    inline) step inline 300 python3 bench/exp_inline_shrink.py --out "$OUT/logs" ${INLINE_ARGS:-} ;;
    stages) step stages 400 python3 bench/exp_inline_stages.py --out "$OUT/logs" ${STAGES_ARGS:-} ;;
    pytest) step pytest ${PYTEST_LIMIT:-240} python3 -m pytest -q -x -p no:cacheprovider ${PYTEST_ARGS:-tests} ;;
    *) echo "unknown step $name" >&2 ;;
  esac
done
tar -czf "$OUT/gpu_all.tgz" -C "$OUT" logs && rm -rf "$OUT/logs"
printf '%s\n' "${SUMMARY[@]}"
