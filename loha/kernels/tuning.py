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
