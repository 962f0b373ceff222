#!/usr/bin/env bash
# Everything a lent GPU machine (the device tool) should run, in as few calls as possible.
#
# Here, once per checkout (fills .gpu/, which .git/info/exclude keeps out of git):
#     bash scripts/gpu_session.sh prepare
# Then each stage is one device call, with `carry: [".gpu"]`, writing its logs and JSON to $OUT.
# A session's device time (15 min, the machine's start included: ~30 s on 2026-12-04) holds a
# few calls, so the first call is `targets`: the issue's four figures and a correctness check in
# one go; the others go deeper when there is time left.
#     bash scripts/gpu_session.sh targets   # ~5 min (its steps' limits add up to 14): each kernel once at the models' shapes
#                                           # (check_gpu_kernels.py, attention under several launches),
#                                           # the whole-model kernel-path tests on CUDA, random 7B
#                                           # Q4_K_M (make_random_gguf.py, seconds) through bench_run.py:
#                                           # decode tok/s + peak VRAM (1024x1024, 4k context), a decode
#                                           # token split into host / graph / kernels (profile_decode.py),
#                                           # the 2530x1000 image's vision time split into parts, ops and
#                                           # kernels (profile_vision.py), a 1396-token prompt's parts and
#                                           # kernels (profile_prefill.py), Q4_K/Q6_K GEMV bandwidth
#                                           # (bench_kernels.py --quick). Failures end steps early; run it
#                                           # with the time the session has left: what finished comes back
#     bash scripts/gpu_session.sh followup  # ~6 min, after changes to what `targets` timed: the kernel
#                                           # tests those changes touch on CUDA (int8 GEMVs, decode
#                                           # inputs, rmsnorm / rope, the whole-model kernel path);
#                                           # decode with QVL_INT8_GEMV=1 (profile_decode), its logits
#                                           # against the float GEMVs' (int8_logits), the int8 Q4_K /
#                                           # Q6_K GEMVs against the float ones; the vision and decode
#                                           # splits; the vision tower streamed from host memory
#                                           # (profile_vision --stream); bench_run (decode tok/s, VRAM),
#                                           # and again with expandable segments (whole-device VRAM);
#                                           # a prompt with half the 7B's layers on the CPU, offloaded
#                                           # (copies a layer ahead, or in turn) or not, the copies'
#                                           # stream ordering (test_copy_ahead), the offloaded layers' KV
#                                           # mirrors converted on CUDA (test_offload_kv), and prefill through dequantize + cuBLAS
#                                           # (QVL_DEQUANT_GEMM=1; profile_prefill.py), a run-time LoRA
#                                           # adapter's decode cost (bench_lora.py), a token's draw
#                                           # from logits on the GPU (bench_sampling.py --device cuda),
#                                           # self-speculative decoding (bench_speculative.py --device cuda),
#                                           # a draft model's (bench_draft_model.py --device cuda)
#     bash scripts/gpu_session.sh kernels   # tests/kernels compiled on CUDA (each shape compiles: minutes)
#     bash scripts/gpu_session.sh bench     # scripts/bench_kernels.py (then its --low-bit GEMVs)
#     bash scripts/gpu_session.sh sweep     # GEMV / GEMM launch parameters (bench_kernels.py --sweep)
#     bash scripts/gpu_session.sh e2e       # random 7B Q4_K_M -> scripts/bench_run.py (three images/contexts;
#                                           # then scripts/bench_chat.py;
#                                           # what finishes inside the call's 600 s comes back)
# The device image has torch and triton; gguf travels as a wheel, the Qwen tokenizer files for
# the random checkpoint from ../shared (which does not travel).
set -uo pipefail
stage=${1:?stage: prepare, targets, followup, kernels, bench, sweep or e2e}
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"

if [ "$stage" = prepare ]; then
    grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
    tok=.gpu/shared/fixtures/tiny-qwen2.5-vl/hf  # the tests' QVL_SHARED there, and the random 7B's tokenizer
    rm -rf .gpu/tokenizer; mkdir -p .gpu/whl "$tok"
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .gpu/whl gguf==0.19.0 || exit 1
    for f in tokenizer.json tokenizer_config.json chat_template.json preprocessor_config.json generation_config.json; do
        cp "../shared/fixtures/tiny-qwen2.5-vl/hf/$f" "$tok/" || exit 1
    done
    du -sh .gpu
    exit 0
fi

out=${OUT:-/tmp/gpu-out}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl || exit 1
mkdir -p /tmp/pkg && ln -sfn "$repo" /tmp/pkg/qvl  # the repository root is the package
export PYTHONPATH=/tmp/pkg:/tmp/site PYTHONUNBUFFERED=1 QVL_SHARED="$repo/.gpu/shared"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.txt" 2>&1
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" >> "$out/gpu.txt"

random_7b() {  # the GGUF pair qvl-convert would write for Qwen2.5-VL-7B at Q4_K_M, random blocks
    [ -f /tmp/q7b-q4_k_m.gguf ] || timeout 120 python3 scripts/make_random_gguf.py qwen2.5-vl-7b \
        /tmp/q7b-q4_k_m.gguf --type q4_k_m --tokenizer .gpu/shared/fixtures/tiny-qwen2.5-vl/hf
}

pick_attention() {  # the first attention launch that ran right on this GPU, when the defaults did not
    grep -q '"case": "attention vision d80 bf16 default", "ok": true' "$out/check.jsonl" && \
        grep -q '"case": "attention text d128 GQA 28/4 causal bf16 default", "ok": true' "$out/check.jsonl" && return
    for l in 64x64w8:64,64,8,1 32x32w4:32,32,4,1 64x64w4s2:64,64,4,2 128x64w8:128,64,8,1; do
        if grep -q "\"case\": \"attention vision d80 bf16 ${l%%:*}\", \"ok\": true" "$out/check.jsonl" && \
           grep -q "\"case\": \"attention text d128 GQA 28/4 causal bf16 ${l%%:*}\", \"ok\": true" "$out/check.jsonl"; then
            export QVL_ATTENTION_LAUNCH=${l#*:}; echo "attention launch: $QVL_ATTENTION_LAUNCH"; return
        fi
    done
    echo "no attention launch ran right"
}

profiles() {
    # where a decode token's time goes: host parts, the graph's replay, device time per kernel
    timeout 90 python3 scripts/profile_decode.py /tmp/q7b-q4_k_m.gguf --device cuda --tokens 64 \
        > "$out/profile-decode.json" 2>&1
    cat "$out/profile-decode.json"
    # the issue's vision image: the tower's median over 3 encodes, its parts, device time per op and kernel
    timeout 100 python3 scripts/profile_vision.py /tmp/q7b-q4_k_m.gguf --device cuda --size 2530x1000 \
        > "$out/profile-vision.json" 2>&1
    cat "$out/profile-vision.json"
    # a 1396-token prompt (a 1024x1024 image's): its parts and device time per kernel
    timeout 90 python3 scripts/profile_prefill.py /tmp/q7b-q4_k_m.gguf --device cuda --tokens 1396 \
        > "$out/profile-prefill.json" 2>&1
    head -c 2500 "$out/profile-prefill.json"
}

case "$stage" in
targets)
    # each kernel once, each in its own process (an illegal address poisons a process)
    timeout 150 python3 scripts/check_gpu_kernels.py > "$out/check.jsonl"
    cat "$out/check.jsonl"
    pick_attention
    timeout 110 python3 -m pytest -q -x -p no:cacheprovider tests/kernels/test_model_kernel_path.py 2>&1 \
        | tee "$out/model-kernel-path.log" | tail -15
    random_7b || exit 1
    # the first run compiles every kernel of the model (Triton's cache serves the later ones)
    timeout 200 python3 scripts/bench_run.py /tmp/q7b-q4_k_m.gguf --device cuda --tokens 64 --size 1024 --ctx 4096 \
        > "$out/run-1024-ctx4096.json" 2>&1
    cat "$out/run-1024-ctx4096.json"
    profiles
    timeout 90 python3 scripts/bench_kernels.py --quick > "$out/bench-quick.json"
    cat "$out/bench-quick.json"
    ;;
followup)
    # the kernel qvl-run tries before it uses Triton (kernels/probe.py): None is what should print
    timeout 60 python3 -c "import torch; from qvl.kernels import probe; print('probe:', probe.failure(torch.device('cuda')))" \
        2>&1 | tee "$out/probe.txt"
    # the activation counts (real allocations on CUDA) before the whole-model tests, which grew
    # (Qwen2-VL, a video, sampling) and take the rest of the time limit
    timeout 200 python3 -m pytest -q --maxfail=3 -p no:cacheprovider tests/kernels/test_qgemv_q8.py \
        tests/kernels/test_decode_inputs.py tests/kernels/test_rmsnorm_rope.py tests/kernels/test_vision_stream.py \
        tests/kernels/test_activation_memory.py tests/kernels/test_model_kernel_path.py 2>&1 \
        | tee "$out/tests.log" | tail -15
    random_7b || exit 1
    # the issue's figures first (decode tok/s and peak VRAM at a 4k context, after the 3584-row
    # GEMVs' splits and the greedy step queued ahead), then with expandable segments (whole-device VRAM)
    timeout 120 python3 scripts/bench_run.py /tmp/q7b-q4_k_m.gguf --device cuda --tokens 64 --size 1024 --ctx 4096 \
        > "$out/run-1024-ctx4096.json" 2>&1
    cat "$out/run-1024-ctx4096.json"
    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True timeout 90 python3 scripts/bench_run.py /tmp/q7b-q4_k_m.gguf \
        --device cuda --tokens 64 --size 1024 --ctx 4096 > "$out/run-expandable.json" 2>&1
    cat "$out/run-expandable.json"
    # qvl bench's llama-bench table for the same file (pp512, tg128, img1024x1024; 2 runs each)
    timeout 90 python3 -c "import sys; from qvl.runtime.entry import qvl; sys.argv = ['qvl', 'bench', \
        '/tmp/q7b-q4_k_m.gguf', '-r', '2']; qvl()" > "$out/qvl-bench.md" 2>&1
    cat "$out/qvl-bench.md"
    # the Q4_K / Q6_K GEMVs on int8 activations (kernels/qgemv_q8.py; x's int8 form written by what
    # wrote x): decode end to end, and what they do to the logits (random weights: no real model travels)
    QVL_INT8_GEMV=1 timeout 70 python3 scripts/profile_decode.py /tmp/q7b-q4_k_m.gguf --device cuda \
        --tokens 64 > "$out/profile-decode-int8.json" 2>&1
    head -c 1500 "$out/profile-decode-int8.json"
    timeout 50 python3 scripts/int8_logits.py /tmp/q7b-q4_k_m.gguf --device cuda --steps 32 \
        > "$out/int8-logits.json" 2>&1
    tail -c 600 "$out/int8-logits.json"
    timeout 60 python3 scripts/bench_kernels.py --int8 > "$out/int8.json" 2>&1
    cat "$out/int8.json"
    # on CUDA: the prompt offload's groups (real streams, page-locked copies), and the dequantize +
    # cuBLAS route's float32 output (torch.mm's out_dtype)
    timeout 120 python3 -m pytest -q -p no:cacheprovider tests/runtime/test_copy_ahead.py \
        tests/runtime/test_offload_kv.py tests/kernels/test_prefill_offload.py 2>&1 \
        | tee "$out/tests-offload.log" | tail -5
    timeout 60 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_dequant.py \
        -k "prefill_goes_through and (Q4_K or Q6_K)" 2>&1 | tee "$out/tests-dequant.log" | tail -5
    # format="json" / a schema with the tiny model on the GPU (logits on the device, the grammar on the host)
    timeout 60 python3 -m pytest -q -p no:cacheprovider tests/runtime/test_json_format.py \
        tests/runtime/test_json_schema.py -k "model or qvl_run" 2>&1 | tee "$out/tests-format.log" | tail -5
    profiles
    # the same prompt with prefill's GEMMs dequantized to bf16 slabs and multiplied by cuBLAS (kernels/dequant.py)
    QVL_DEQUANT_GEMM=1 timeout 70 python3 scripts/profile_prefill.py /tmp/q7b-q4_k_m.gguf --device cuda \
        --tokens 1396 > "$out/profile-prefill-dequant.json" 2>&1
    head -c 2500 "$out/profile-prefill-dequant.json"
    # the vision tower streamed from host memory (runtime/vision_stream.py): what the copies add to an encode
    for size in 2530x1000 1024x1024; do
        timeout 60 python3 scripts/profile_vision.py /tmp/q7b-q4_k_m.gguf --device cuda --size $size --stream \
            > "$out/profile-vision-stream-$size.json" 2>&1
        grep -E '"(encode_s_median|encode_s_runs|streamed|streamed_host_mib|model_allocated_gib|encode_peak_over_rest_gib|planned_peak_gib|peak_over_planned)"' \
            "$out/profile-vision-stream-$size.json"
    done
    # half the 7B's layers on the CPU: a 1396-token prompt with each CPU layer copied to the GPU for it
    # (decoder.prefill_offload: once for the prompt), then read on the CPU
    timeout 100 python3 scripts/profile_prefill.py /tmp/q7b-q4_k_m.gguf --device cuda --tokens 1396 \
        --gpu-layers 14 > "$out/prefill-half-offload.json" 2>&1
    head -c 1200 "$out/prefill-half-offload.json"
    # the same with each copy made in turn, not while the layer before runs (runtime/copy_ahead.py)
    QVL_COPY_IN_TURN=1 timeout 100 python3 scripts/profile_prefill.py /tmp/q7b-q4_k_m.gguf --device cuda \
        --tokens 1396 --gpu-layers 14 > "$out/prefill-half-offload-in-turn.json" 2>&1
    head -c 1200 "$out/prefill-half-offload-in-turn.json"
    timeout 150 python3 scripts/profile_prefill.py /tmp/q7b-q4_k_m.gguf --device cuda --tokens 1396 \
        --gpu-layers 14 --no-prefill-offload --runs 1 > "$out/prefill-half-cpu.json" 2>&1
    head -c 1200 "$out/prefill-half-cpu.json"
    # a run-time LoRA adapter (rank 16, every text matrix) against none: decode tok/s in turns
    timeout 120 python3 scripts/bench_lora.py /tmp/q7b-q4_k_m.gguf --rank 16 --tokens 64 --rounds 2 \
        > "$out/bench-lora.json" 2>&1
    tail -c 800 "$out/bench-lora.json"
    # a sampled token's draw (llama.cpp's: its running sum on the device) over logits on the GPU
    timeout 60 python3 scripts/bench_sampling.py --device cuda --repeat 20 > "$out/bench-sampling.txt" 2>&1
    tail -c 1500 "$out/bench-sampling.txt"
    # --spec-type ngram-simple: a pass's cost by its tokens, an answer that repeats, drafts refused
    timeout 90 python3 scripts/bench_speculative.py /tmp/q7b-q4_k_m.gguf --device cuda --rounds 2 \
        --json "$out/bench-speculative.json" > "$out/bench-speculative.txt" 2>&1
    tail -c 1500 "$out/bench-speculative.txt"
    # --spec-draft-model: a 0.5B-shaped random draft for the 7B (its pass's cost against the 7B's, the
    # speedup by acceptance those give, answers with guesses all refused / all taken)
    timeout 40 python3 scripts/bench_draft_model.py --make /tmp/bd --tokenizer .gpu/shared/fixtures/tiny-qwen2.5-vl/hf \
        > /dev/null 2>&1
    timeout 90 python3 scripts/bench_draft_model.py /tmp/q7b-q4_k_m.gguf /tmp/bd/draft.gguf --device cuda \
        --rounds 2 --json "$out/bench-draft-model.json" > "$out/bench-draft-model.txt" 2>&1
    tail -c 1500 "$out/bench-draft-model.txt"
    ;;
kernels)
    # the cross-compile and launch-count tests compile for GPUs on the CPU: CI runs them, not the GPU's time
    timeout 560 python3 -m pytest -q -p no:cacheprovider tests/kernels --ignore=tests/kernels/test_cross_compile.py \
        --ignore=tests/kernels/test_decode_launches.py 2>&1 | tee "$out/kernel-tests.log" | tail -30
    ;;
bench)
    timeout 420 python3 scripts/bench_kernels.py > "$out/bench-kernels.json" 2> "$out/bench-kernels.err"
    tail -5 "$out/bench-kernels.err"; head -c 3000 "$out/bench-kernels.json"
    timeout 140 python3 scripts/bench_kernels.py --low-bit > "$out/bench-low-bit.json" 2> "$out/bench-low-bit.err"
    tail -5 "$out/bench-low-bit.err"; head -c 2000 "$out/bench-low-bit.json"
    ;;
sweep)
    timeout 500 python3 scripts/bench_kernels.py --sweep > "$out/bench-sweep.json" 2> "$out/bench-sweep.err"
    tail -5 "$out/bench-sweep.err"; head -c 6000 "$out/bench-sweep.json"
    ;;
e2e)
    random_7b || exit 1
    # the issue's targets first (decode tok/s and peak VRAM with a 1024x1024 image and a 4k
    # context, then the 2530x1000 image's vision time), should the call run out of time
    for args in "--size 1024 --ctx 4096" "--size 2530x1000 --tokens 8" "--size 1008"; do
        name=$(echo "$args" | tr -c 'a-z0-9\n' '_')
        timeout 200 python3 scripts/bench_run.py /tmp/q7b-q4_k_m.gguf --device cuda --tokens 64 $args \
            > "$out/bench-run$name.json" 2>&1
        cat "$out/bench-run$name.json"
    done
    # a chat's second turn about a picture, with and without prompt reuse (turn 1 compiles)
    timeout 150 python3 scripts/bench_chat.py /tmp/q7b-q4_k_m.gguf --device cuda --size 1008 \
        > "$out/bench-chat.json" 2>&1
    cat "$out/bench-chat.json"
    ;;
*)
    echo "unknown stage $stage"; exit 2
    ;;
esac
