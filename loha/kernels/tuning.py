"""Dispatch thresholds, as data. Each number says how it was measured.

CPU figures come from `python bench/apply.py --tune` on the reference machine:
a 2-core AMD EPYC (Zen 5, AVX-512) VM with 24 GB, torch 2.13 (MKL 2024.2 sgemm,
OpenMP), medians of interleaved repetitions. Re-run that command on another
machine and edit the numbers; nothing else has to change.

GPU figures could not be measured (no GPU was available when they were set): they
are the design's starting point, and `bench/apply.py --tune` prints the measured
crossovers on a CUDA machine so they can be replaced by data.
"""

import torch

# ---- CPU ----------------------------------------------------------------------------

# Elements of W per row tile. Each tile computes two fp32 (rows × K) products in a
# per-thread scratch (3 × this many fp32 when W is fp16/bf16), adds them into W and
# moves on, so the products are still in cache when they are used.
# --tune: MEASURE-ME
CPU_TILE_ELEMS = 1 << 18

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
# ns per element of W (products+addcmul / Khatri–Rao), R1·R2 = 1, 4, 9, 16, 25:
#   fp32: 0.47/0.24  0.62/0.33  0.67/0.53  0.71/0.71  0.76/0.92
#   fp16: 0.62/0.34  0.86/0.36  0.92/0.47  0.91/0.66  0.95/0.93   (bf16 as fp16)
CPU_KR_MAX_RANK_PRODUCT = {torch.float32: 9, torch.float16: 16, torch.bfloat16: 16}

# The two products: oneDNN's linear with a fused "mul" post-op (the op torch's CPU
# compiler emits; AVX-512 kernels, one pass less) against MKL's two sgemm + addcmul_.
# One thread, W 640×K, thread CPU ns per element of W (MKL / oneDNN):
#   fp32 R8:  K320 0.67/0.63  K1280 0.87/0.76  K2880 0.83/0.82  K5760 0.83/0.72  K11520 0.88/0.80  K23040 0.86/0.92
#   fp32 R16: K320 0.97/0.69  K1280 1.02/0.71  K2880 1.09/0.73  K5760 1.12/0.84  K11520 1.21/0.94  K23040 1.33/1.18
#   fp32 R32: K320 1.60/1.02  K2880 1.75/1.03  K11520 2.09/1.27  R64: K320 2.99/1.53  K11520 4.11/2.12
#   fp16 R8:  K320 0.74/0.71  K1280 0.82/0.73  K2880 0.78/0.74  K5760 0.85/0.80  K11520 0.96/0.93  K23040 0.94/1.06
#   fp16 R16: K320 1.10/0.87  K1280 1.10/0.86  K2880 1.13/0.89  K5760 1.22/0.96  K11520 1.32/1.06  K23040 1.41/1.23
# Whole SD1.5 LoHa, 2 workers: fp32 0.405 -> 0.372 s, fp16 0.478 -> 0.444 s.
# MKL is kept only where it won: ranks up to this and K at least this.
CPU_ONEDNN_MKL_MAX_RANK = 8
CPU_ONEDNN_MKL_MIN_K = 16384

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

# Elements per row tile for the pure-torch fallback on CUDA (no Triton).
CUDA_TILE_ELEMS = 1 << 22  # 48 MiB of fp32 scratch per call
