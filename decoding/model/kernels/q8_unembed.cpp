// Weight-only int8 GEMM for the unembedding on x86 CPUs: weights are GGUF Q8_0 blocks (32 int8
// values q with one fp16 scale d, value = d * q, exact in fp32), activations and logits fp32,
// fp32 accumulation. Nothing is quantized at run time: the kernel multiplies by exactly the
// file's values, reading ~1.06 bytes per weight.
//
// Per logit (row n of W, one row of x) the float sequence is fixed:
//   for each block g of 32 K:  p_j = sum over k = j, j+4, ..., j+28 of q[k] * x[k] (j = 0..3,
//   a mul then 7 fma in k order);  s = (p0 + p1) + (p2 + p3);  acc = fma(s, d_g, acc)
// whatever M is, whichever rows share the call and whichever vector width runs it (AVX-512F or
// AVX2: fma and add are correctly rounded per lane). Threads split N, never K. So row i of an
// M-row call is bitwise row i alone.
//
// Weight layout (built in Python, decoding/model/q8_unembed.py::pack): [N/16, K/32, 544]
// bytes, per block of 16 output rows x one group of 32 K: 32 x 16 int8 (byte 16k + j = row
// j's q at K offset k), then the 16 rows' fp16 d.
//
// Compiled with function-level target attributes: the file builds on any x86-64 compiler
// flags; isa() tells Python which path this CPU runs (0: none).

#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstdint>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kRows = 16;    // output rows per weight block
constexpr int64_t kGroup = 32;   // K per Q8_0 block
constexpr int64_t kBlock = 544;  // bytes per (16 rows x 32 K) block: 512 of q, 32 of fp16 d
// rows of x per pass over a weight block (L1-resident): 5, 6 or 8 measured no faster, all
// bound by 512-bit FMA throughput from 8 rows on (AMD Zen 4, 2 cores)
constexpr int kTile = 4;
// partial sums per block (k mod 4): independent FMA chains for one row; 2 was 1.4x slower
// at M=1. Part of the float order: changing it changes the bits (both ISA paths use it)
constexpr int kParts = 4;

#if defined(__x86_64__) || defined(_M_X64)
#define AVX512 __attribute__((target("avx512f,f16c,fma")))
#define AVX2 __attribute__((target("avx2,f16c,fma")))

int64_t cpu_isa() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return 2;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("f16c"))
    return 1;
  return 0;
}

// --- AVX-512F: one zmm = the 16 rows of a block -------------------------------------------
template <int R>
AVX512 inline void tile512(const uint8_t* w, int64_t groups, const float* x, int64_t k,
                           float* y, int64_t n) {
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    const uint8_t* p = w + g * kBlock;
    const float* xg = x + g * kGroup;
    __m512 part[R][kParts];
    for (int j = 0; j < kParts; ++j) {
      __m512 wv = _mm512_cvtepi32_ps(
          _mm512_cvtepi8_epi32(_mm_load_si128(reinterpret_cast<const __m128i*>(p + 16 * j))));
      for (int r = 0; r < R; ++r) part[r][j] = _mm512_mul_ps(wv, _mm512_set1_ps(xg[r * k + j]));
    }
    for (int kk = kParts; kk < kGroup; kk += kParts) {
      for (int j = 0; j < kParts; ++j) {
        __m512 wv = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
            _mm_load_si128(reinterpret_cast<const __m128i*>(p + 16 * (kk + j)))));
        for (int r = 0; r < R; ++r)
          part[r][j] = _mm512_fmadd_ps(wv, _mm512_set1_ps(xg[r * k + kk + j]), part[r][j]);
      }
    }
    __m512 d = _mm512_cvtph_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(p + 512)));
    for (int r = 0; r < R; ++r) {
      static_assert(kParts == 4, "the combination below is (p0 + p1) + (p2 + p3)");
      __m512 s = _mm512_add_ps(_mm512_add_ps(part[r][0], part[r][1]),
                               _mm512_add_ps(part[r][2], part[r][3]));
      acc[r] = _mm512_fmadd_ps(s, d, acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(y + r * n, acc[r]);
}

AVX512 void block512(const uint8_t* wb, int64_t groups, const float* x, int64_t m, int64_t k,
                     float* yb, int64_t n) {
  int64_t r = 0;
  for (; r + kTile <= m; r += kTile) tile512<kTile>(wb, groups, x + r * k, k, yb + r * n, n);
  static_assert(kTile == 4, "the rows left below are 1..3");
  const int64_t left = m - r;  // a row's bits do not depend on the tile it is in
  if (left == 3) tile512<3>(wb, groups, x + r * k, k, yb + r * n, n);
  else if (left == 2) tile512<2>(wb, groups, x + r * k, k, yb + r * n, n);
  else if (left == 1) tile512<1>(wb, groups, x + r * k, k, yb + r * n, n);
}

// --- AVX2: two ymm halves (rows 0-7, 8-15), the same per-lane operations ------------------
template <int R>
AVX2 inline void tile256(const uint8_t* w, int64_t groups, const float* x, int64_t k,
                         float* y, int64_t n) {
  for (int h = 0; h < 2; ++h) {  // each half is independent: same bits as one zmm
    __m256 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
    for (int64_t g = 0; g < groups; ++g) {
      const uint8_t* p = w + g * kBlock + 8 * h;
      const float* xg = x + g * kGroup;
      __m256 part[R][4];
      for (int j = 0; j < 4; ++j) {
        __m256 wv = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
            _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 16 * j))));
        for (int r = 0; r < R; ++r) part[r][j] = _mm256_mul_ps(wv, _mm256_set1_ps(xg[r * k + j]));
      }
      for (int kk = 4; kk < kGroup; kk += 4) {
        for (int j = 0; j < 4; ++j) {
          __m256 wv = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
              _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 16 * (kk + j)))));
          for (int r = 0; r < R; ++r)
            part[r][j] = _mm256_fmadd_ps(wv, _mm256_set1_ps(xg[r * k + kk + j]), part[r][j]);
        }
      }
      __m256 d = _mm256_cvtph_ps(
          _mm_load_si128(reinterpret_cast<const __m128i*>(w + g * kBlock + 512 + 16 * h)));
      for (int r = 0; r < R; ++r) {
        __m256 s = _mm256_add_ps(_mm256_add_ps(part[r][0], part[r][1]),
                                 _mm256_add_ps(part[r][2], part[r][3]));
        acc[r] = _mm256_fmadd_ps(s, d, acc[r]);
      }
    }
    for (int r = 0; r < R; ++r) _mm256_storeu_ps(y + r * n + 8 * h, acc[r]);
  }
}

AVX2 void block256(const uint8_t* wb, int64_t groups, const float* x, int64_t m, int64_t k,
                   float* yb, int64_t n) {
  int64_t r = 0;
  for (; r + 2 <= m; r += 2) tile256<2>(wb, groups, x + r * k, k, yb + r * n, n);
  if (m - r == 1) tile256<1>(wb, groups, x + r * k, k, yb + r * n, n);
}

#else  // not x86-64: Python never calls mm() here (isa() is 0)

int64_t cpu_isa() { return 0; }

#endif

at::Tensor mm(const at::Tensor& x, const at::Tensor& packed, int64_t n) {
  const int64_t isa = cpu_isa();
  TORCH_CHECK(isa > 0, "q8_unembed: this CPU has neither AVX-512F nor AVX2+FMA+F16C");
  TORCH_CHECK(x.dim() == 2 && x.device().is_cpu() && x.scalar_type() == at::kFloat,
              "q8_unembed: x must be a 2-D float32 CPU tensor");
  const int64_t m = x.size(0), k = x.size(1);
  TORCH_CHECK(k % kGroup == 0 && n % kRows == 0 && n > 0,
              "q8_unembed: needs K % 32 == 0 and N % 16 == 0");
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous() &&
                  packed.numel() == (n / kRows) * (k / kGroup) * kBlock,
              "q8_unembed: packed weight does not match N, K");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(packed.data_ptr()) % 64 == 0,
              "q8_unembed: packed weight must be 64-byte aligned");
  at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty({m, n}, x.options());
#if defined(__x86_64__) || defined(_M_X64)
  if (m > 0) {
    const float* xp = xc.data_ptr<float>();
    const uint8_t* w = packed.data_ptr<uint8_t>();
    float* yp = y.data_ptr<float>();
    const int64_t groups = k / kGroup;
    at::parallel_for(0, n / kRows, 16, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        if (isa == 2) block512(w + b * groups * kBlock, groups, xp, m, k, yp + b * kRows, n);
        else block256(w + b * groups * kBlock, groups, xp, m, k, yp + b * kRows, n);
      }
    });
  }
#endif
  return y;
}

at::Tensor mm_isa(const at::Tensor& x, const at::Tensor& packed, int64_t n, int64_t isa) {
  // tests: force the AVX2 path (isa 1) on an AVX-512 CPU to compare the two
  TORCH_CHECK(isa >= 1 && isa <= cpu_isa(), "q8_unembed: this CPU cannot run isa ", isa);
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.size(1) % kGroup == 0 &&
                  n % kRows == 0 && packed.numel() == (n / kRows) * (x.size(1) / kGroup) * kBlock,
              "q8_unembed: bad shapes");
#if defined(__x86_64__) || defined(_M_X64)
  if (isa == 2) return mm(x, packed, n);
  at::Tensor xc = x.contiguous();
  const int64_t m = x.size(0), k = x.size(1), groups = k / kGroup;
  at::Tensor y = at::empty({m, n}, x.options());
  for (int64_t b = 0; b < n / kRows; ++b)
    block256(packed.data_ptr<uint8_t>() + b * groups * kBlock, groups, xc.data_ptr<float>(), m, k,
             y.data_ptr<float>() + b * kRows, n);
  return y;
#else
  return x;
#endif
}

int64_t isa() { return cpu_isa(); }

}  // namespace

TORCH_LIBRARY(mtpserve_q8, lib) {
  lib.def("mm(Tensor x, Tensor packed, int n) -> Tensor");
  lib.def("mm_isa(Tensor x, Tensor packed, int n, int isa) -> Tensor");
  lib.def("isa() -> int", &isa);
}

TORCH_LIBRARY_IMPL(mtpserve_q8, CPU, lib) {
  lib.impl("mm", &mm);
  lib.impl("mm_isa", &mm_isa);
}
