// Weight-only int8 GEMM for the unembedding on x86 CPUs: weights are GGUF Q8_0 blocks (32
// int8 values q_w with one fp16 scale d_w, value = d_w * q_w: exactly the file's values),
// activations quantized at run time to int16 per block of 32 K (as int4_vnni.cpp's vnni16
// path: quantize_row16, tile16), exact integer dots, fp32 logits. ~1.06 bytes per weight read.
//
// Activations (quantize_rows): each row of x, per block g of 32 K, d_x = max|x| / 32767 (fp32)
// and q_x = round-to-nearest-even(x * (1/d_x)) saturated to [-32767, 32767] (all zero where
// d_x = 0; a NaN in the block makes d_x NaN, so the row's logits are NaN). x is thereby
// replaced by q_x * d_x, off by at most ~0.5 * d_x per element (1/65534 of the block's largest
// |x|): a logit moves by at most sum_g 0.51 * d_x,g * sum_{k in g} |w_k| beyond fp32 rounding
// (tests/decoding/test_unembed_q8.py checks that bound; on the real model's hidden states the
// logits stay within ~1e-3 of the dense fp32 product, docs/benchmarks.md section 6).
//
// Per logit (row n of W, one row of x), per group g of 32 K:
//   dot = sum over the 32 K of q_w * q_x: exact in int32 (|dot| <= 127 * 32767 * 32 = 133M
//         < 2^31), so the integer adds may go in any order;
//   acc = fma(float(dot), d_w * d_x, acc).
// float(dot) rounds where |dot| > 2^24 (16.7M: reachable), but it is correctly rounded, so the
// same integer always gives the same float: the float sequence per output is fixed whatever M
// is, whichever rows share the call and whichever vector width runs it (cvt, mul and fma are
// correctly rounded per lane). Threads split N, never K. So row i of an M-row call is bitwise
// row i alone, and the AVX2 path gives the AVX-512 path's bits.
//
// Weight layout (built in Python, decoding/model/q8_unembed.py::pack): [N/16, K/32, 544] bytes,
// per block of 16 output rows x one group of 32 K: 16 chunks of 32 bytes, chunk p (the K pair
// 2p, 2p+1) holding at byte 2j + e row j's q_w at K offset 2p + e; then the 16 rows' fp16 d_w.
// Sign-extending a chunk to int16 (vpmovsxbw) gives in 32-bit lane j row j's pair, which
// vpdpwssd (vpmaddwd on AVX2) multiplies by the pair (q_x[2p], q_x[2p+1]) broadcast as one
// int32. Per group and row: 16 vpdpwssd (the fp32-activation kernel before it issued 32 FMAs
// plus the int8 -> fp32 conversions); the 16 loads + extends are shared by a tile of rows.
//
// Two instruction sets, chosen once per process (isa(): 2, 1 or 0):
//   2  AVX-512F+BW+VNNI (and AVX2+FMA+F16C): one zmm = the 16 rows of a block, vpdpwssd;
//   1  AVX2+FMA+F16C: two ymm halves (rows 0-7, 8-15), vpmaddwd + vpaddd (the same int32);
//   0  neither: Python keeps the fp16 / fp32 unembedding.
// Both quantize x with the same AVX2 function. mm_isa (tests only) runs either path.
//
// Compiled with function-level target attributes: the file builds on any x86-64 compiler
// flags.

#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kRows = 16;    // output rows per weight block
constexpr int64_t kGroup = 32;   // K per Q8_0 block
constexpr int64_t kBlock = 544;  // bytes per (16 rows x 32 K) block: 512 of q_w, 32 of fp16 d_w
// rows of x per pass over a weight block (L1-resident; 8 measured no faster); no part of the
// float order
constexpr int kTile = 4;
constexpr int kTile2 = 2;  // the same on AVX2 (16 ymm registers)

#if defined(__x86_64__) || defined(_M_X64)
#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,f16c,fma")))
#define AVX2 __attribute__((target("avx2,f16c,fma")))

int64_t cpu_isa() {
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("f16c");
  if (avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni"))
    return 2;
  return avx2 ? 1 : 0;
}

// --- activations: one function for both paths, so both get the same codes and scales ------
AVX2 inline __m256 abs8(__m256 v) {
  return _mm256_castsi256_ps(
      _mm256_and_si256(_mm256_castps_si256(v), _mm256_set1_epi32(0x7fffffff)));
}

// Rows of x [M, K] -> int16 codes [M, K] (the K order of x) and d_x [M, K/32].
AVX2 void quantize_rows(const float* x, int64_t m, int64_t k, int16_t* q, float* d) {
  const __m256i hi = _mm256_set1_epi32(32767), lo = _mm256_set1_epi32(-32767);
  const int64_t groups = k / kGroup;
  for (int64_t r = 0; r < m; ++r) {
    for (int64_t g = 0; g < groups; ++g) {
      const float* xg = x + r * k + g * kGroup;
      __m256 v[4] = {_mm256_loadu_ps(xg), _mm256_loadu_ps(xg + 8), _mm256_loadu_ps(xg + 16),
                     _mm256_loadu_ps(xg + 24)};
      // the |x| are >= 0 (no -0.0 left), so the max is order-independent; NaN is found apart
      __m256 mx = _mm256_max_ps(_mm256_max_ps(abs8(v[0]), abs8(v[1])),
                                _mm256_max_ps(abs8(v[2]), abs8(v[3])));
      __m128 m4 = _mm_max_ps(_mm256_extractf128_ps(mx, 1), _mm256_castps256_ps128(mx));
      m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
      m4 = _mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1));
      const int nan = _mm256_movemask_ps(_mm256_or_ps(_mm256_cmp_ps(v[0], v[1], _CMP_UNORD_Q),
                                                      _mm256_cmp_ps(v[2], v[3], _CMP_UNORD_Q)));
      const float dg = nan ? std::numeric_limits<float>::quiet_NaN()
                           : _mm_cvtss_f32(m4) / 32767.0f;
      const float id = dg != 0.0f ? 1.0f / dg : 0.0f;
      __m256i c[4];
      for (int i = 0; i < 4; ++i) {  // round to nearest even (MXCSR's default), saturate
        c[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], _mm256_set1_ps(id)));
        c[i] = _mm256_max_epi32(_mm256_min_epi32(c[i], hi), lo);
      }
      // packs interleaves 128-bit lanes: quadwords (c0 lo, c1 lo, c0 hi, c1 hi) -> 0, 2, 1, 3
      __m256i q01 = _mm256_permute4x64_epi64(_mm256_packs_epi32(c[0], c[1]), 0xD8);
      __m256i q23 = _mm256_permute4x64_epi64(_mm256_packs_epi32(c[2], c[3]), 0xD8);
      int16_t* qg = q + r * k + g * kGroup;
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(qg), q01);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(qg + 16), q23);
      d[r * groups + g] = dg;
    }
  }
}

// --- AVX-512: one zmm = the 16 rows of a block ---------------------------------------------
// s + vpdpwssd(w, the int32 at p broadcast): the broadcast folded into the instruction
// ({1to16}), which GCC does not do from _mm512_set1_epi32 (a separate vpbroadcastd each)
AVX512 inline __m512i dpwssd_bcast(__m512i s, __m512i w, const int32_t* p) {
  asm("vpdpwssd %2%{1to16%}, %1, %0" : "+v"(s) : "v"(w), "m"(*p));
  return s;
}

// The weight lines kPrefetch bytes ahead of the group being read, as int4_vnni.cpp does:
// a thread streams its blocks in order, the streamers restart at every 4 KiB page and the
// 28 MB of codes do not stay in cache between steps. Measured (Emerald Rapids,
// benchmarks/q8_kernel_ab.py): 0.81-0.82x the time at 1 row, 0.57-0.69x at 2-4, 0.90-0.96x
// at 16; 4 and 16 groups ahead no better. No effect on results. The AVX2 path (Zen 3):
// 0.87-0.90x at 1-4 rows, 0.91-0.96x at 8-16.
constexpr int64_t kPrefetch = 4352;  // 8 groups
inline void prefetch_group(const uint8_t* p) {  // SSE: any x86-64 target
  for (int64_t c = 0; c < kBlock; c += 64)
    _mm_prefetch(reinterpret_cast<const char*>(p + kPrefetch + c), _MM_HINT_T0);
}

template <int R>
AVX512 inline void tile512(const uint8_t* w, int64_t groups, const int16_t* q, int64_t k,
                           const float* d, float* y, int64_t n) {
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    const uint8_t* p = w + g * kBlock;
    prefetch_group(p);
    // two integer chains per row (exact: how the sum is split never changes a bit; 4 or 8
    // chains for 1-2 rows measured no faster)
    __m512i s0[R], s1[R];
    for (int r = 0; r < R; ++r) s0[r] = s1[r] = _mm512_setzero_si512();
    for (int t = 0; t < 16; t += 2) {
      __m512i w0 = _mm512_cvtepi8_epi16(
          _mm256_load_si256(reinterpret_cast<const __m256i*>(p + 32 * t)));
      __m512i w1 = _mm512_cvtepi8_epi16(
          _mm256_load_si256(reinterpret_cast<const __m256i*>(p + 32 * (t + 1))));
      for (int r = 0; r < R; ++r) {
        const int32_t* xq = reinterpret_cast<const int32_t*>(q + r * k + g * kGroup) + t;
        s0[r] = dpwssd_bcast(s0[r], w0, xq);
        s1[r] = dpwssd_bcast(s1[r], w1, xq + 1);
      }
    }
    __m512 dw = _mm512_cvtph_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(p + 512)));
    for (int r = 0; r < R; ++r) {
      __m512 dot = _mm512_cvtepi32_ps(_mm512_add_epi32(s0[r], s1[r]));
      __m512 scale = _mm512_mul_ps(dw, _mm512_set1_ps(d[r * groups + g]));
      acc[r] = _mm512_fmadd_ps(dot, scale, acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(y + r * n, acc[r]);
}

AVX512 void block512(const uint8_t* wb, int64_t groups, const int16_t* q, const float* d,
                     int64_t m, int64_t k, float* yb, int64_t n) {
  auto run = [&](auto rows, int64_t r) {
    constexpr int R = decltype(rows)::value;
    tile512<R>(wb, groups, q + r * k, k, d + r * groups, yb + r * n, n);
  };
  int64_t r = 0;  // a row's bits do not depend on the tile it is in
  for (; r + kTile <= m; r += kTile) run(std::integral_constant<int, kTile>{}, r);
  static_assert(kTile == 4, "the rows left below are 1..3");
  const int64_t left = m - r;
  if (left == 3) run(std::integral_constant<int, 3>{}, r);
  else if (left == 2) run(std::integral_constant<int, 2>{}, r);
  else if (left == 1) run(std::integral_constant<int, 1>{}, r);
}

// --- AVX2: two ymm halves (rows 0-7: bytes 0-15 of each chunk, 8-15: bytes 16-31), both in one
// pass over the group; vpmaddwd gives per 32-bit lane w_lo*x_lo + w_hi*x_hi exactly as one
// vpdpwssd step, then tile512's per-lane float steps ------------------------------------------
template <int R>
AVX2 inline void tile256(const uint8_t* w, int64_t groups, const int16_t* q, int64_t k,
                         const float* d, float* y, int64_t n) {
  __m256 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    const uint8_t* p = w + g * kBlock;
    prefetch_group(p);
    __m256i s[R][2];
    for (int r = 0; r < R; ++r) s[r][0] = s[r][1] = _mm256_setzero_si256();
    for (int t = 0; t < 16; ++t) {
      const __m128i* c = reinterpret_cast<const __m128i*>(p + 32 * t);
      __m256i w0 = _mm256_cvtepi8_epi16(_mm_load_si128(c));
      __m256i w1 = _mm256_cvtepi8_epi16(_mm_load_si128(c + 1));
      for (int r = 0; r < R; ++r) {
        __m256i b = _mm256_set1_epi32(reinterpret_cast<const int32_t*>(q + r * k + g * kGroup)[t]);
        s[r][0] = _mm256_add_epi32(s[r][0], _mm256_madd_epi16(w0, b));
        s[r][1] = _mm256_add_epi32(s[r][1], _mm256_madd_epi16(w1, b));
      }
    }
    for (int h = 0; h < 2; ++h) {
      __m256 dw = _mm256_cvtph_ps(_mm_load_si128(reinterpret_cast<const __m128i*>(p + 512 + 16 * h)));
      for (int r = 0; r < R; ++r) {
        __m256 dot = _mm256_cvtepi32_ps(s[r][h]);
        __m256 scale = _mm256_mul_ps(dw, _mm256_set1_ps(d[r * groups + g]));
        acc[r][h] = _mm256_fmadd_ps(dot, scale, acc[r][h]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int h = 0; h < 2; ++h) _mm256_storeu_ps(y + r * n + 8 * h, acc[r][h]);
}

AVX2 void block256(const uint8_t* wb, int64_t groups, const int16_t* q, const float* d,
                   int64_t m, int64_t k, float* yb, int64_t n) {
  int64_t r = 0;
  for (; r + kTile2 <= m; r += kTile2)
    tile256<kTile2>(wb, groups, q + r * k, k, d + r * groups, yb + r * n, n);
  static_assert(kTile2 == 2, "the row left below is 1");
  if (m - r == 1) tile256<1>(wb, groups, q + r * k, k, d + r * groups, yb + r * n, n);
}

#else  // not x86-64: Python never calls mm() here (isa() is 0)

int64_t cpu_isa() { return 0; }

#endif

int64_t active_isa() {
  static const int64_t isa = cpu_isa();  // once per process
  return isa;
}

at::Tensor mm_run(const at::Tensor& x, const at::Tensor& packed, int64_t n, int64_t isa) {
  TORCH_CHECK(isa >= 1 && isa <= cpu_isa(), "q8_unembed: this CPU cannot run isa ", isa,
              " (2: AVX-512F+BW+VNNI, 1: AVX2+FMA+F16C)");
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
    const int64_t groups = k / kGroup;
    thread_local std::vector<int16_t> qbuf;  // the caller's own: no allocation a call
    thread_local std::vector<float> dbuf;
    qbuf.resize(m * k);
    dbuf.resize(m * groups);
    int16_t* q = qbuf.data();
    float* d = dbuf.data();
    quantize_rows(xc.data_ptr<float>(), m, k, q, d);  // O(M K): serial is enough
    const uint8_t* w = packed.data_ptr<uint8_t>();
    float* yp = y.data_ptr<float>();
    at::parallel_for(0, n / kRows, 16, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        if (isa == 2) block512(w + b * groups * kBlock, groups, q, d, m, k, yp + b * kRows, n);
        else block256(w + b * groups * kBlock, groups, q, d, m, k, yp + b * kRows, n);
      }
    });
  }
#endif
  return y;
}

at::Tensor mm(const at::Tensor& x, const at::Tensor& packed, int64_t n) {
  const int64_t isa = active_isa();
  TORCH_CHECK(isa > 0, "q8_unembed: this CPU has neither AVX-512 (F, BW, VNNI) nor AVX2+FMA+F16C");
  return mm_run(x, packed, n, isa);
}

// tests: a given path (2 or 1, up to what the CPU runs) in one process, e.g. the AVX2 path
// on an AVX-512 CPU to compare the two
at::Tensor mm_isa(const at::Tensor& x, const at::Tensor& packed, int64_t n, int64_t isa) {
  return mm_run(x, packed, n, isa);
}

int64_t isa() { return active_isa(); }

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
