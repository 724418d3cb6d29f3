"""Candidate CPU decode product that reads LCQ indices instead of an fp16 copy of the weight.

Today a CPU LCQ layer keeps its weight dequantized to fp16 (2 bytes per weight). This benchmark times
a batch-1 product (M = 1) that keeps 4-bit indices (half a byte per weight, any bit width up to 4)
and builds each group's codebook c = S @ V - B in registers, then looks weights up with one permute
per 8 (AVX2: two permutes and a blend for 16 entries) or 16 (AVX-512) indices. It runs against the
fp16 kernel the engine uses (lcq/kernels/cpu_half.c), on SmolLM2-135M's linear shapes, weights cycled
from memory. It is an experiment, not a kernel of the package: it decides whether the engine should
keep indices on CPU (docs/kernels.md).

    python bench/cpu_lut.py [--threads 2]

Index layout: per row, K / 2 bytes; in each run of 16 indices byte i holds index i in its low nibble
and index i + 8 in its high nibble, so a byte load widened to 32-bit lanes gives 8 indices with a
mask and 8 more with a shift. S (N, G, r) and B (N, G) fp32, V (r, 16) fp32 zero-padded.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lcq.kernels import cpu_half  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "cpu-lut.json"
SHAPES = {"qkv 960x576": (960, 576), "o 576x576": (576, 576), "gate/up 3072x576": (3072, 576),
          "down 576x1536": (576, 1536)}
POOL_BYTES = 256 << 20

SOURCE = r"""
#include <immintrin.h>
#include <stdint.h>

static float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

void lut_gemv_avx2(const float *x, int K, int groups, const uint8_t *q, const float *S, const float *B,
                   const float *V, int rank, int N, float *y) {
    const int g = K / groups;
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
        const uint8_t *row = q + (int64_t)n * K / 2;
        for (int j = 0; j < groups; j++) {
            const float *s = S + ((int64_t)n * groups + j) * rank;
            __m256 lo = _mm256_set1_ps(-B[(int64_t)n * groups + j]), hi = lo;
            for (int r = 0; r < rank; r++) {
                lo = _mm256_fmadd_ps(_mm256_set1_ps(s[r]), _mm256_loadu_ps(V + r * 16), lo);
                hi = _mm256_fmadd_ps(_mm256_set1_ps(s[r]), _mm256_loadu_ps(V + r * 16 + 8), hi);
            }
            for (int k = j * g; k < (j + 1) * g; k += 16) {
                __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(row + k / 2)));
                __m256i i0 = _mm256_and_si256(v, _mm256_set1_epi32(15)), i1 = _mm256_srli_epi32(v, 4);
                __m256 w0 = _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo, i0), _mm256_permutevar8x32_ps(hi, i0),
                                             _mm256_castsi256_ps(_mm256_slli_epi32(i0, 28)));
                __m256 w1 = _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo, i1), _mm256_permutevar8x32_ps(hi, i1),
                                             _mm256_castsi256_ps(_mm256_slli_epi32(i1, 28)));
                acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k), w0, acc0);
                acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 8), w1, acc1);
            }
        }
        y[n] = hsum(_mm256_add_ps(acc0, acc1));
    }
}

__attribute__((target("avx512f,avx512dq"))) void lut_gemv_avx512(const float *x, int K, int groups, const uint8_t *q,
                                                                 const float *S, const float *B, const float *V,
                                                                 int rank, int N, float *y) {
    const int g = K / groups;
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
        const uint8_t *row = q + (int64_t)n * K / 2;
        for (int j = 0; j < groups; j++) {
            const float *s = S + ((int64_t)n * groups + j) * rank;
            __m512 codebook = _mm512_set1_ps(-B[(int64_t)n * groups + j]);
            for (int r = 0; r < rank; r++)
                codebook = _mm512_fmadd_ps(_mm512_set1_ps(s[r]), _mm512_loadu_ps(V + r * 16), codebook);
            for (int k = j * g; k < (j + 1) * g; k += 32) {
                /* 16 bytes: indices k..k+7 | k+8..k+15 in bytes 0-7, k+16..k+23 | k+24..k+31 in bytes 8-15 */
                __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(row + k / 2)));
                __m512 low = _mm512_permutexvar_ps(_mm512_and_si512(v, _mm512_set1_epi32(15)), codebook);
                __m512 high = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), codebook);
                __m512 x_low = _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_loadu_ps(x + k)),
                                                  _mm256_loadu_ps(x + k + 16), 1);
                __m512 x_high = _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_loadu_ps(x + k + 8)),
                                                   _mm256_loadu_ps(x + k + 24), 1);
                acc0 = _mm512_fmadd_ps(x_low, low, acc0);
                acc1 = _mm512_fmadd_ps(x_high, high, acc1);
            }
        }
        y[n] = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
    }
}
"""


def build(folder: Path) -> ctypes.CDLL:
    source, library = folder / "lut.c", folder / "lut.so"
    source.write_text(SOURCE)
    subprocess.run(["cc", "-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC", str(source), "-o",
                    str(library)], check=True, capture_output=True, text=True)
    lib = ctypes.CDLL(str(library))
    p, i = ctypes.c_void_p, ctypes.c_int
    for function in (lib.lut_gemv_avx2, lib.lut_gemv_avx512):
        function.argtypes = [p, i, i, p, p, p, p, i, i, p]
    return lib


def random_layer(n: int, k: int, bits: int, rank: int, group: int):
    """(dense fp32 weight, packed indices, S, B, V) of a random layer in the layout above."""
    groups = k // group
    indices = torch.randint(0, 1 << bits, (n, k), dtype=torch.uint8)
    s, b = torch.randn(n, groups, rank), torch.randn(n, groups)
    v = torch.zeros(rank, 16)
    v[:, : 1 << bits] = torch.randn(rank, 1 << bits)
    codebooks = torch.einsum("ngr,rl->ngl", s, v) - b[..., None]
    weight = torch.gather(codebooks, 2, indices.view(n, groups, group).long()).view(n, k)
    runs = indices.view(n, k // 16, 16)
    packed = (runs[..., :8] | (runs[..., 8:] << 4)).contiguous().view(n, k // 2)
    return weight, packed, s.contiguous(), b.contiguous(), v.contiguous()


def best_ms(call, layers: list, repeats: int = 5) -> float:
    for layer in layers:
        call(layer)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for layer in layers:
            call(layer)
        best = min(best, (time.perf_counter() - start) / len(layers))
    return best * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("flags")), [])
    if not cpu_half.enabled():
        raise SystemExit("the fp16 CPU kernel does not run here (see lcq/kernels/cpu_half.py)")
    forms = ["avx2"] + (["avx512"] if {"avx512f", "avx512dq"} <= set(flags) else [])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        lib = build(Path(tmp))
        for name, (n, k) in SHAPES.items():
            for bits, rank, group in ((4, 2, 64), (2, 2, 64), (4, 4, 64)):
                layers = [random_layer(n, k, bits, rank, group) for _ in range(max(2, POOL_BYTES // (n * k * 2)))]
                x = torch.randn(1, k)
                y = torch.empty(n)
                row = {"shape": name, "bits": bits, "rank": rank, "group_size": group}
                halves = [layer[0].half() for layer in layers]
                row["fp16_kernel_ms"] = round(best_ms(lambda h: cpu_half.half_linear(x, h), halves), 4)
                for form in forms:
                    function = getattr(lib, f"lut_gemv_{form}")

                    def call(layer, function=function):
                        _, packed, s, b, v = layer
                        function(x.data_ptr(), k, k // group, packed.data_ptr(), s.data_ptr(), b.data_ptr(),
                                 v.data_ptr(), rank, n, y.data_ptr())

                    call(layers[0])
                    reference = (x.double() @ layers[0][0].double().t())[0]
                    error = ((y.double() - reference).norm() / reference.norm()).item()
                    if error > 1e-5:
                        raise SystemExit(f"{form} disagrees with the dense product: relative error {error:.1e}")
                    row[f"lut_{form}_ms"] = round(best_ms(call, layers), 4)
                rows.append(row)
                print(" ".join(f"{key}={value}" for key, value in row.items()), flush=True)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    record = {"device": f"cpu: {cpu}, {os.cpu_count()} cores, flags: {' '.join(f for f in flags if 'avx' in f)}",
              "threads": args.threads, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "versions": {"python": platform.python_version(), "torch": torch.__version__},
              "command": f"python bench/cpu_lut.py --threads {args.threads}", "batch_rows": 1,
              "index_bytes_per_weight": 0.5, "fp16_bytes_per_weight": 2, "rows": rows}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.output.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(args.output)
    print(f"written {args.output}")


if __name__ == "__main__":
    main()
