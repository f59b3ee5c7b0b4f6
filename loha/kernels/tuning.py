"""Dispatch thresholds, as data. Each number says how it was measured.

CPU figures come from `python bench/apply.py --tune` on the reference machine:
a 2-core AMD EPYC (Zen 5, AVX-512) VM with 24 GB, torch 2.13 (MKL 2024.2 sgemm,
OpenMP), medians of interleaved repetitions. Re-run that command on another
machine and edit the numbers; nothing else has to change.

GPU figures could not be measured (no GPU was available when they were set): they
are the design's starting point. `bench/apply.py --tune --cuda` (part of `bench/gpu.sh`)
prints the measured tiles and crossovers on a CUDA machine, and the values they suggest
here, so they can be replaced by data.
"""

import torch

# ---- CPU ----------------------------------------------------------------------------

# Elements of W per row tile. Each tile computes its fp32 products (rows × K) and adds
# them into W while they are still in cache (L2 2 MiB per core, L3 32 MiB shared here).
# Smaller tiles pay more per-call overhead (oneDNN's fused linear costs ~13 µs a call,
# MKL's sgemm ~1 µs); bigger ones spill the cache. --tune, whole SD1.5 LoHa, process
# CPU seconds (fp32 / fp16): 2^16 1.30/1.46, 2^17 0.99/1.02, 2^18 0.74/0.82,
# 2^19 0.67/0.73, 2^20 0.70/0.83, 2^21 0.89/1.13.
CPU_TILE_ELEMS = 1 << 19

# Below this many elements in one call, the work runs in the calling thread with
# torch's own intra-op threads: handing tiles to the worker threads costs ~50-100 µs.
# Above it the workers win, and by far when other processes compete for the cores
# (OpenMP teams then wait on descheduled threads). --tune, rank-16 fp32 layer, ms
# (caller / workers), machine under load: 1e5 elements 0.061/0.155, 4.1e5 0.249/0.438,
# 1.6e6 13.5/1.15.
CPU_PARALLEL_MIN_ELEMS = 1 << 19

# The Khatri–Rao form W.addmm_(a1•a2, b1∗b2) does 2·R1·R2 flops per element against
# 2·(R1+R2) for the two products, but it is one MKL call that reads and writes W once.
# It is used when R1·R2 <= this value. --tune, one thread, W 1280×11520, thread CPU
# ns per element of W (Khatri–Rao / MKL products), R1·R2 = 1, 4, 9, 16, 25, 36:
#   fp32: 0.22/0.40  0.35/0.49  0.44/0.54  0.61/0.65  0.72/0.68  0.96/0.70
#   fp16: 0.28/0.49  0.31/0.73  0.41/0.73  0.53/0.74  0.75/0.79  0.96/0.80
#   bf16: 0.29/0.50  0.32/0.69  0.41/0.73  0.56/0.75  0.77/0.79  0.99/0.83
# (an earlier run, as MKL / Khatri–Rao: fp32 16: 0.71/0.71, 25: 0.76/0.92; fp16 25: 0.95/0.93)
CPU_KR_MAX_RANK_PRODUCT = {torch.float32: 16, torch.float16: 25, torch.bfloat16: 25}

# The two products: oneDNN's linear with a fused "mul" post-op (the op torch's CPU
# compiler emits; AVX-512 kernels, one pass less) against MKL's two sgemm + addcmul_.
# One thread, W 640×K, thread CPU ns per element of W (MKL / oneDNN):
#   fp32 R8:  K320 0.67/0.63  K1280 0.87/0.76  K2880 0.83/0.82  K5760 0.83/0.72  K11520 0.88/0.80  K23040 0.86/0.92
#   fp32 R16: K320 0.97/0.69  K1280 1.02/0.71  K2880 1.09/0.73  K5760 1.12/0.84  K11520 1.21/0.94  K23040 1.33/1.18
#   fp32 R32: K320 1.60/1.02  K2880 1.75/1.03  K11520 2.09/1.27  R64: K320 2.99/1.53  K11520 4.11/2.12
#   fp16 R8:  K320 0.74/0.71  K1280 0.82/0.73  K2880 0.78/0.74  K5760 0.85/0.80  K11520 0.96/0.93  K23040 0.94/1.06
#   fp16 R16: K320 1.10/0.87  K1280 1.10/0.86  K2880 1.13/0.89  K5760 1.22/0.96  K11520 1.32/1.06  K23040 1.41/1.23
# Whole SD1.5 LoHa, 2 workers: fp32 0.405 -> 0.372 s, fp16 0.478 -> 0.444 s.
# Below rank 8 oneDNN loses (W 1280×11520, MKL / oneDNN: fp32 R5 0.68/1.19, R6
# 0.70/1.13; fp16 R5 0.79/0.97). MKL is kept for ranks below CPU_ONEDNN_MIN_RANK, and
# for ranks up to CPU_ONEDNN_MKL_MAX_RANK when K is at least CPU_ONEDNN_MKL_MIN_K.
CPU_ONEDNN_MIN_RANK = 8
CPU_ONEDNN_MKL_MAX_RANK = 8
CPU_ONEDNN_MKL_MIN_K = 16384

# The optional native tile (native.c, built on first use when a C compiler exists): both
# products in registers, one pass over W. --tune, one thread, W 1280×11520, thread CPU
# ns per element (Khatri–Rao / native), R1·R2 = 1, 4, 9, 16:
#   fp32: 0.39/0.34  0.51/0.27  0.55/0.32  0.61/0.34
#   fp16: 0.28/0.13  0.30/0.14  0.39/0.15  0.66/0.19
#   bf16: 0.42/0.20  0.36/0.22  0.45/0.19  0.56/0.20
# and against the torch tiles at rank 16 (1280×1280): fp32 0.33 vs 0.71 (oneDNN).
# Whole SD1.5 LoHa, 2 workers: fp32 0.372 -> 0.20 s, fp16 0.444 -> 0.145 s.
# So it takes every LoHa it can; the Khatri–Rao form never wins against it.
CPU_NATIVE = True
CPU_NATIVE_KR_MAX_RANK_PRODUCT = {torch.float32: 0, torch.float16: 0, torch.bfloat16: 0}

# ---- bypass (kernels/bypass.py) ----------------------------------------------------

# Building one element of W' = W + ΔW (read W, the LoHa tile, hand it to the GEMM) costs
# about as much time as this many multiply-adds of the layer's own GEMM. A bypass builds
# W' and runs one product when its thin pairs would cost more than that (R1·R2·(K+O) per
# position against this times O·K per call); beside a layer it cannot read, it rebuilds
# ΔW in tiles when that beats the pairs. `python bench/bypass.py --tune`, one thread's
# CPU time, fp32, tiles of 2^23 (merged − plain per element / plain per MAC): W 320×320
# R16 4096 tokens 102, 1280×1280 R16 256 tokens 53, 1280×11520 R8 256 tokens 60,
# 640×5760 R8 1024 tokens 52 (build ≈ 1.2–1.6 ns per element, GEMM ≈ 21–25 ps per MAC).
# CUDA: not measured (no GPU); the same order is assumed.
BYPASS_BUILD_MACS_PER_ELEMENT = {"cpu": 64.0, "cuda": 64.0}

# Elements of W' per row tile in a bypass forward. Each tile is consumed by one GEMM or
# convolution call: narrow tiles make slow calls (fewer output channels per call) and
# a concatenation. --tune-tiles of bench/bypass.py, one thread, ms (plain layer / tiles
# of 2^19, 2^21, 2^23, 2^25): 640×5760 at 1024 tokens 81.8 / 138.6, 109.2, 86.4, 85.6;
# 1280×11520 at 256 tokens 85.6 / 190.1, 122.1, 109.7, 104.1; 1280×1280 at 1024 tokens
# 39.7 / 62.6, 45.7, 43.6, 46.9. 2^23 fp32 elements is 32 MiB of scratch per thread.
BYPASS_TILE_ELEMS = 1 << 23

# ---- CUDA ---------------------------------------------------------------------------

# Not measured yet (see the module docstring). Triton handles every rank; the
# Khatri–Rao addmm_ (cuBLAS) is kept for fp32 weights at rank products up to this.
CUDA_KR_MAX_RANK_PRODUCT = {torch.float32: 1, torch.float16: 0, torch.bfloat16: 0}

# Triton tile and launch shape. Not timed (no GPU); chosen by register use, from
# compiling the kernel ahead of time for sm_90 with Triton 3.9's ptxas (cuobjdump
# -res-usage), fp16 W, padded rank 16, tf32x3: 64×64/8 warps 107 registers (two blocks,
# 16 warps per SM), 32×64/4 108, 64×128/8 186 (one block per SM), 32×128/4 185;
# padded rank 32: 148, rank 64: 204. `--tune` on a GPU sweeps these by time.
TRITON_BLOCK_M = 64
TRITON_BLOCK_N = 64
TRITON_NUM_WARPS = 8
# fp32 products on tensor cores via three TF32 passes (error ~1e-6 relative to ΔW,
# far below one fp16/bf16 ulp and within the fp32 tolerance); "ieee" is exact FMA.
TRITON_PRECISION = "tf32x3"

# The fused bypass kernel (triton_bypass.py): a BLOCK_T × BLOCK_O tile of the output per
# program, K in steps of BLOCK_K. Not timed (no GPU): the usual GEMM tile of Triton's
# tutorials. `bench/bypass.py --tune --cuda` (part of `bench/gpu.sh`) times a handful of
# tiles per dtype on SD1.5 and SDXL layers at their token counts and prints the values for here.
TRITON_BYPASS_BLOCK_T = 64
TRITON_BYPASS_BLOCK_O = 64
TRITON_BYPASS_BLOCK_K = 32

# Elements per row tile for the pure-torch fallback on CUDA (no Triton).
CUDA_TILE_ELEMS = 1 << 22  # 48 MiB of fp32 scratch per call
