// Weight-only int4 GEMM for few rows on x86 CPUs with AVX512-VNNI (as llama.cpp's Q4_1 x Q8_1):
// activations quantized to int8 per block of 32 along K, weights 4-bit codes (0..15) with an
// fp16 scale d and min m per group of 32, y = sum_g d_w*d_x*dot(q_w, q_x) + m_w*d_x*sum(q_x).
// The integer dots are exact (vpdpbusd: u8 weights x s8 activations); the float part of
// every output is the same sequence of operations whatever M is and whichever rows share the
// pass (threads split N, never K), so each row of an M-row call is bitwise that row alone.
//
// Weight layout (built in Python, decoding/model/int4_vnni.py::pack): [N/16, K/32, 320] bytes,
// per block of 16 output rows x one group of 32 K: 4 x 64 bytes of codes, then 16 fp16 d,
// then 16 fp16 m. 64-byte vector t (t = 0..3) holds, in lane j (4 bytes), row j's K offsets
// 4t..4t+3 in the low nibbles and 4(t+4)..4(t+4)+3 in the high nibbles.
//
// Compiled with function-level target attributes: the file builds on any x86-64 compiler
// flags; has_vnni() tells Python whether this CPU may call mm().

#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <type_traits>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kRows = 16;    // output rows per weight block (one zmm of int32/fp32)
constexpr int64_t kGroup = 32;   // K per group (INT4_GROUP)
constexpr int64_t kBlock = 320;  // bytes per (16 rows x 32 K) block: codes, d, m

#if defined(__x86_64__) || defined(_M_X64)
#define VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,f16c,fma")))

bool cpu_has_vnni() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
}

// fp32 -> bf16 bits, round to nearest even (NaN kept a quiet NaN), as Tensor.to(bfloat16)
VNNI inline __m256i to_bf16(__m512 v) {
  __m512i u = _mm512_castps_si512(v);
  __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
  __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(u, _mm512_set1_epi32(0x400000)));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16));
}

template <typename T>
VNNI inline __m512 load16(const T* p);
template <>
VNNI inline __m512 load16<float>(const float* p) { return _mm512_loadu_ps(p); }
template <>
VNNI inline __m512 load16<at::BFloat16>(const at::BFloat16* p) {
  __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// One row of x -> int8 codes per block of 32 (d = max|x|/127, q = round-to-nearest-even of
// x * (1/d)), d per block and d*sum(q) per block (the min term's factor).
template <typename T>
VNNI void quantize_row(const T* x, int64_t k, int8_t* q, float* d, float* ds) {
  for (int64_t g = 0; g < k / kGroup; ++g) {
    __m512 a = load16<T>(x + g * kGroup), b = load16<T>(x + g * kGroup + 16);
    float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
    float dg = amax / 127.0f;
    float id = dg != 0.0f ? 1.0f / dg : 0.0f;
    __m512i qa = _mm512_cvtps_epi32(_mm512_mul_ps(a, _mm512_set1_ps(id)));
    __m512i qb = _mm512_cvtps_epi32(_mm512_mul_ps(b, _mm512_set1_ps(id)));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + g * kGroup), _mm512_cvtepi32_epi8(qa));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + g * kGroup + 16), _mm512_cvtepi32_epi8(qb));
    d[g] = dg;
    ds[g] = dg * static_cast<float>(_mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb)));
  }
}

// R rows of x against one block of 16 output rows, all groups. Each row's float sequence
// (per group: acc = fma(float(dot), d_w * d_x, acc); acc = fma(m_w, d_x*sum, acc)) is the
// same for every R, so the tiling never changes a row's bits.
template <int R, typename T>
VNNI inline void tile(const uint8_t* w, int64_t groups, const int8_t* q, int64_t k,
                      const float* d, const float* ds, T* y, int64_t n) {
  const __m512i lo4 = _mm512_set1_epi8(0x0f);
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    const uint8_t* p = w + g * kBlock;
    __m512i ws[8];
    for (int t = 0; t < 4; ++t) {
      __m512i v = _mm512_load_si512(reinterpret_cast<const void*>(p + 64 * t));
      ws[t] = _mm512_and_si512(v, lo4);
      ws[t + 4] = _mm512_and_si512(_mm512_srli_epi16(v, 4), lo4);
    }
    __m512 dw = _mm512_cvtph_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(p + 256)));
    __m512 mw = _mm512_cvtph_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(p + 288)));
    for (int r = 0; r < R; ++r) {
      const int32_t* xq = reinterpret_cast<const int32_t*>(q + r * k + g * kGroup);
      // two integer chains (exact, so how they are split never changes a bit)
      __m512i s0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), ws[0], _mm512_set1_epi32(xq[0]));
      __m512i s1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), ws[1], _mm512_set1_epi32(xq[1]));
      s0 = _mm512_dpbusd_epi32(s0, ws[2], _mm512_set1_epi32(xq[2]));
      s1 = _mm512_dpbusd_epi32(s1, ws[3], _mm512_set1_epi32(xq[3]));
      s0 = _mm512_dpbusd_epi32(s0, ws[4], _mm512_set1_epi32(xq[4]));
      s1 = _mm512_dpbusd_epi32(s1, ws[5], _mm512_set1_epi32(xq[5]));
      s0 = _mm512_dpbusd_epi32(s0, ws[6], _mm512_set1_epi32(xq[6]));
      s1 = _mm512_dpbusd_epi32(s1, ws[7], _mm512_set1_epi32(xq[7]));
      __m512 dot = _mm512_cvtepi32_ps(_mm512_add_epi32(s0, s1));
      __m512 scale = _mm512_mul_ps(dw, _mm512_set1_ps(d[r * groups + g]));
      acc[r] = _mm512_fmadd_ps(dot, scale, acc[r]);
      acc[r] = _mm512_fmadd_ps(mw, _mm512_set1_ps(ds[r * groups + g]), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) {
    if constexpr (std::is_same_v<T, float>) {
      _mm512_storeu_ps(y + r * n, acc[r]);
    } else {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + r * n), to_bf16(acc[r]));
    }
  }
}

// int16 activations (the vnni16 path): d = max|x|/32767, q = round-to-nearest-even of
// x * (1/d), saturated to s16, stored per block of 32 in the order the weights unpack to
// (kPairs16): 16 pairs of s16, pair p multiplies weight vector p of tile16.
// For 64-byte vector t (lane j = row j's 4 bytes), viewed as two 16-bit words per lane:
//   (v      ) & 0xf -> K offsets (4t,    4t+2)      pair 4t
//   (v >>  8) & 0xf -> K offsets (4t+1,  4t+3)      pair 4t+1
//   (v >>  4) & 0xf -> K offsets (4t+16, 4t+18)     pair 4t+2
//   (v >> 12)       -> K offsets (4t+17, 4t+19)     pair 4t+3
alignas(64) constexpr int16_t kPairs16[32] = {
    0, 2,  1, 3,  16, 18, 17, 19,  4, 6,  5, 7,  20, 22, 21, 23,
    8, 10, 9, 11, 24, 26, 25, 27,  12, 14, 13, 15, 28, 30, 29, 31};

template <typename T>
VNNI void quantize_row16(const T* x, int64_t k, int16_t* q, float* d, float* ds) {
  const __m512i perm = _mm512_load_si512(reinterpret_cast<const void*>(kPairs16));
  for (int64_t g = 0; g < k / kGroup; ++g) {
    __m512 a = load16<T>(x + g * kGroup), b = load16<T>(x + g * kGroup + 16);
    float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
    float dg = amax / 32767.0f;
    float id = dg != 0.0f ? 1.0f / dg : 0.0f;
    __m512i qa = _mm512_cvtps_epi32(_mm512_mul_ps(a, _mm512_set1_ps(id)));
    __m512i qb = _mm512_cvtps_epi32(_mm512_mul_ps(b, _mm512_set1_ps(id)));
    // saturate (x * (1/d) may round a hair past 32767.5) and keep the sum to what is stored
    qa = _mm512_max_epi32(_mm512_min_epi32(qa, _mm512_set1_epi32(32767)), _mm512_set1_epi32(-32767));
    qb = _mm512_max_epi32(_mm512_min_epi32(qb, _mm512_set1_epi32(32767)), _mm512_set1_epi32(-32767));
    __m512i z = _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi32_epi16(qa)),
                                   _mm512_cvtepi32_epi16(qb), 1);
    _mm512_storeu_si512(reinterpret_cast<void*>(q + g * kGroup), _mm512_permutexvar_epi16(perm, z));
    d[g] = dg;
    ds[g] = dg * static_cast<float>(_mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb)));
  }
}

// As tile(), with s16 x s16 -> s32 dots (vpdpwssd, 2 K per lane per instruction): the
// weights widened to 16-bit lanes (0..15), |q_x| <= 32767, 32 products per group: |dot| <=
// 15.7M, exact in int32 and in the fp32 conversion (< 2^24). Same float sequence per row.
template <int R, typename T>
VNNI inline void tile16(const uint8_t* w, int64_t groups, const int16_t* q, int64_t k,
                        const float* d, const float* ds, T* y, int64_t n) {
  const __m512i lo4 = _mm512_set1_epi16(0x0f);
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    const uint8_t* p = w + g * kBlock;
    __m512i ws[16];
    for (int t = 0; t < 4; ++t) {
      __m512i v = _mm512_load_si512(reinterpret_cast<const void*>(p + 64 * t));
      ws[4 * t] = _mm512_and_si512(v, lo4);
      ws[4 * t + 1] = _mm512_and_si512(_mm512_srli_epi16(v, 8), lo4);
      ws[4 * t + 2] = _mm512_and_si512(_mm512_srli_epi16(v, 4), lo4);
      ws[4 * t + 3] = _mm512_srli_epi16(v, 12);
    }
    __m512 dw = _mm512_cvtph_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(p + 256)));
    __m512 mw = _mm512_cvtph_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(p + 288)));
    for (int r = 0; r < R; ++r) {
      const int32_t* xq = reinterpret_cast<const int32_t*>(q + r * k + g * kGroup);
      // two integer chains (exact, so how they are split never changes a bit)
      __m512i s0 = _mm512_dpwssd_epi32(_mm512_setzero_si512(), ws[0], _mm512_set1_epi32(xq[0]));
      __m512i s1 = _mm512_dpwssd_epi32(_mm512_setzero_si512(), ws[1], _mm512_set1_epi32(xq[1]));
      for (int i = 2; i < 16; i += 2) {
        s0 = _mm512_dpwssd_epi32(s0, ws[i], _mm512_set1_epi32(xq[i]));
        s1 = _mm512_dpwssd_epi32(s1, ws[i + 1], _mm512_set1_epi32(xq[i + 1]));
      }
      __m512 dot = _mm512_cvtepi32_ps(_mm512_add_epi32(s0, s1));
      __m512 scale = _mm512_mul_ps(dw, _mm512_set1_ps(d[r * groups + g]));
      acc[r] = _mm512_fmadd_ps(dot, scale, acc[r]);
      acc[r] = _mm512_fmadd_ps(mw, _mm512_set1_ps(ds[r * groups + g]), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) {
    if constexpr (std::is_same_v<T, float>) {
      _mm512_storeu_ps(y + r * n, acc[r]);
    } else {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + r * n), to_bf16(acc[r]));
    }
  }
}

constexpr int kTile = 4;  // rows of x per pass over a weight block

// One weight block (16 output rows) against all M rows: 4-row tiles, then the remainder.
template <typename Q, typename T>
VNNI inline void block_rows(const uint8_t* wb, int64_t groups, const Q* q, int64_t k,
                            const float* d, const float* ds, T* yb, int64_t m, int64_t n) {
  auto run = [&](auto rows, int64_t r) {
    constexpr int R = decltype(rows)::value;
    if constexpr (std::is_same_v<Q, int8_t>)
      tile<R, T>(wb, groups, q + r * k, k, d + r * groups, ds + r * groups, yb + r * n, n);
    else
      tile16<R, T>(wb, groups, q + r * k, k, d + r * groups, ds + r * groups, yb + r * n, n);
  };
  int64_t r = 0;
  for (; r + kTile <= m; r += kTile) run(std::integral_constant<int, kTile>{}, r);
  const int64_t left = m - r;
  if (left == 3) run(std::integral_constant<int, 3>{}, r);
  else if (left == 2) run(std::integral_constant<int, 2>{}, r);
  else if (left == 1) run(std::integral_constant<int, 1>{}, r);
}

// Q: int8_t (vpdpbusd, activations in int8) or int16_t (vpdpwssd, activations in int16)
template <typename Q, typename T>
VNNI void mm_impl(const T* x, const uint8_t* w, T* y, int64_t m, int64_t n, int64_t k) {
  const int64_t groups = k / kGroup;
  at::Tensor qbuf = at::empty({m * k}, std::is_same_v<Q, int8_t> ? at::kChar : at::kShort);
  at::Tensor fbuf = at::empty({2 * m * groups}, at::kFloat);
  Q* q = static_cast<Q*>(qbuf.data_ptr());
  float* d = fbuf.data_ptr<float>();
  float* ds = d + m * groups;
  at::parallel_for(0, m, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      if constexpr (std::is_same_v<Q, int8_t>)
        quantize_row<T>(x + r * k, k, q + r * k, d + r * groups, ds + r * groups);
      else
        quantize_row16<T>(x + r * k, k, q + r * k, d + r * groups, ds + r * groups);
    }
  });
  at::parallel_for(0, n / kRows, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      block_rows<Q, T>(w + b * groups * kBlock, groups, q, k, d, ds, y + b * kRows, m, n);
  });
}

#else  // not x86-64: Python never calls mm() here (has_vnni() is false)

bool cpu_has_vnni() { return false; }

#endif

// act_bits: 8 (int8 activations, vpdpbusd) or 16 (int16 activations, vpdpwssd); the same
// packed weights serve both.
at::Tensor mm_bits(const at::Tensor& x, const at::Tensor& packed, int64_t n, int64_t act_bits) {
  TORCH_CHECK(cpu_has_vnni(), "int4_vnni: this CPU lacks AVX512-VNNI");
  TORCH_CHECK(act_bits == 8 || act_bits == 16, "int4_vnni: act_bits must be 8 or 16");
  TORCH_CHECK(x.dim() == 2 && x.device().is_cpu(), "int4_vnni: x must be a 2-D CPU tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "int4_vnni: x must be float32 or bfloat16");
  const int64_t m = x.size(0), k = x.size(1);
  TORCH_CHECK(k % kGroup == 0 && n % kRows == 0, "int4_vnni: needs K % 32 == 0 and N % 16 == 0");
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous() &&
                  packed.numel() == (n / kRows) * (k / kGroup) * kBlock,
              "int4_vnni: packed weight does not match N, K");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(packed.data_ptr()) % 64 == 0,
              "int4_vnni: packed weight must be 64-byte aligned");
  at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty({m, n}, x.options());
#if defined(__x86_64__) || defined(_M_X64)
  if (m > 0) {
    const uint8_t* w = packed.data_ptr<uint8_t>();
    const bool f32 = x.scalar_type() == at::kFloat;
    if (act_bits == 8 && f32)
      mm_impl<int8_t, float>(xc.data_ptr<float>(), w, y.data_ptr<float>(), m, n, k);
    else if (act_bits == 8)
      mm_impl<int8_t, at::BFloat16>(xc.data_ptr<at::BFloat16>(), w,
                                    y.data_ptr<at::BFloat16>(), m, n, k);
    else if (f32)
      mm_impl<int16_t, float>(xc.data_ptr<float>(), w, y.data_ptr<float>(), m, n, k);
    else
      mm_impl<int16_t, at::BFloat16>(xc.data_ptr<at::BFloat16>(), w,
                                     y.data_ptr<at::BFloat16>(), m, n, k);
  }
#endif
  return y;
}

at::Tensor mm(const at::Tensor& x, const at::Tensor& packed, int64_t n) {
  return mm_bits(x, packed, n, 8);
}

at::Tensor mm16(const at::Tensor& x, const at::Tensor& packed, int64_t n) {
  return mm_bits(x, packed, n, 16);
}

bool has_vnni() { return cpu_has_vnni(); }

}  // namespace

TORCH_LIBRARY(mtpserve_int4, lib) {
  lib.def("mm(Tensor x, Tensor packed, int n) -> Tensor");
  lib.def("mm16(Tensor x, Tensor packed, int n) -> Tensor");
  lib.def("has_vnni() -> bool", &has_vnni);
}

TORCH_LIBRARY_IMPL(mtpserve_int4, CPU, lib) {
  lib.impl("mm", &mm);
  lib.impl("mm16", &mm16);
}
