// Weight-only int4 GEMM for few rows on x86 CPUs with AVX512-VNNI, or AVX2 for int16
// activations (as llama.cpp's Q4_1 x Q8_1): activations quantized to int8 (or int16, mm16,
// kPairs16 below) per block of 32 along K, weights 4-bit codes (0..15) with an fp16 scale d
// and min m per group of 32, y = sum_g d_w*d_x*dot(q_w, q_x) + m_w*d_x*sum(q_x).
// The integer dots are exact (vpdpbusd: u8 weights x s8 activations; vpdpwssd or vpmaddwd:
// s16 x s16); the float part of every output is the same sequence of operations whatever M
// is and whichever rows share the pass (threads split N, never K), so each row of an M-row
// call is bitwise that row alone.
//
// Weight layout (built in Python, decoding/model/int4_vnni.py::pack): [N/16, K/32, 320] bytes,
// per block of 16 output rows x one group of 32 K: 4 x 64 bytes of codes, then 16 fp16 d,
// then 16 fp16 m. 64-byte vector t (t = 0..3) holds, in lane j (4 bytes), row j's K offsets
// 4t..4t+3 in the low nibbles and 4(t+4)..4(t+4)+3 in the high nibbles.
//
// Two instruction sets, chosen once per process (isa(): 2, 1 or 0):
//   2  AVX512-VNNI: mm (int8 activations, vpdpbusd) and mm16 (int16 activations, vpdpwssd)
//      on one zmm = the 16 rows of a weight block;
//   1  AVX2+FMA+F16C: mm16 only, the 16 rows as two ymm halves, the dots with vpmaddwd
//      (s16 x s16 -> s32 pairs, exact like vpdpwssd) and then exactly tile16's per-lane
//      float sequence, so its results are BITWISE those of isa 2 (tile16_avx2);
//   0  neither: Python keeps PyTorch's kernel.
// MTPSERVE_INT4_AVX2 (any value) makes an AVX-512 process run as an AVX2-only CPU would
// (isa 1: mm16 on AVX2, no mm), to test that path on AVX-512 machines; mm16_isa (tests
// only) runs either path in one process.
//
// Compiled with function-level target attributes: the file builds on any x86-64 compiler
// flags.

#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <cstdlib>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kRows = 16;    // output rows per weight block (one zmm, two ymm on AVX2)
constexpr int64_t kGroup = 32;   // K per group (INT4_GROUP)
constexpr int64_t kBlock = 320;  // bytes per (16 rows x 32 K) block: codes, d, m

#if defined(__x86_64__) || defined(_M_X64)
#define VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,f16c,fma")))
#define AVX2 __attribute__((target("avx2,fma,f16c")))

// What this CPU can run: 2 (AVX512-VNNI), 1 (AVX2+FMA+F16C), 0 (neither)
int64_t cpu_isa() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni") &&
      __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    return 2;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("f16c"))
    return 1;
  return 0;
}

// The max over 8 lanes as _mm512_reduce_max_ps finishes it (GCC's order), written out so
// that both paths take the max in the same order whatever the compiler's headers do (max
// is order-independent except for NaN, whose propagation depends on the operand order)
AVX2 inline float hmax8(__m256 t3) {
  __m128 t6 = _mm_max_ps(_mm256_extractf128_ps(t3, 1), _mm256_castps256_ps128(t3));
  __m128 t8 = _mm_max_ps(t6, _mm_shuffle_ps(t6, t6, _MM_SHUFFLE(1, 0, 3, 2)));
  __m128 t10 = _mm_max_ps(t8, _mm_shuffle_ps(t8, t8, _MM_SHUFFLE(0, 1, 0, 1)));
  return _mm_cvtss_f32(t10);
}

AVX2 inline int32_t hadd8(__m256i v) {  // integer: any order gives the same sum
  __m128i s = _mm_add_epi32(_mm256_extracti128_si256(v, 1), _mm256_castsi256_si128(v));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm_cvtsi128_si32(s);
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

// s + vpdpwssd / vpdpbusd (w, the int32 at p broadcast to 16 lanes), the broadcast folded
// into the instruction ({1to16}): GCC emits a separate vpbroadcastd for _mm512_set1_epi32
// (measured: 0.81-0.87x tile16's time from 4 rows with the fold, docs/benchmarks.md section 6)
VNNI inline __m512i dpwssd_bcast(__m512i s, __m512i w, const int32_t* p) {
  asm("vpdpwssd %2%{1to16%}, %1, %0" : "+v"(s) : "v"(w), "m"(*p));
  return s;
}

VNNI inline __m512i dpbusd_bcast(__m512i s, __m512i w, const int32_t* p) {
  asm("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(s) : "v"(w), "m"(*p));
  return s;
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
// A thread reads its weight blocks' bytes in order, 320 per group; the loads of a group
// ask for the lines kPrefetch bytes (8 groups) ahead: the hardware streamers restart at
// every 4 KiB page, and the trunk's ~60 MB do not stay in cache between steps. Measured
// (Emerald Rapids, benchmarks/int4_kernel_ab.py): 0.85-0.90x the kernel's time at 1-2 rows,
// 0.87-0.97x at 4-64; 640, 1280 and 5120 bytes ahead gained less. No effect on results.
// The AVX2 path on a real AVX2-only CPU (Zen 3): 0.82-0.83x at 1 row, 0.96-0.97x at 2, but
// 1.05-1.17x at 8-16 rows where it is bound by its dot instructions: it prefetches in tiles
// of 1-2 rows only (tile16_avx2).
constexpr int64_t kPrefetch = 2560;
inline void prefetch_group(const uint8_t* p) {  // SSE: any x86-64 target
  for (int64_t c = 0; c < kBlock; c += 64)
    _mm_prefetch(reinterpret_cast<const char*>(p + kPrefetch + c), _MM_HINT_T0);
}

template <int R, typename T>
VNNI inline void tile(const uint8_t* w, int64_t groups, const int8_t* q, int64_t k,
                      const float* d, const float* ds, T* y, int64_t n) {
  const __m512i lo4 = _mm512_set1_epi8(0x0f);
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    const uint8_t* p = w + g * kBlock;
    prefetch_group(p);
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
      __m512i s0 = dpbusd_bcast(_mm512_setzero_si512(), ws[0], xq);
      __m512i s1 = dpbusd_bcast(_mm512_setzero_si512(), ws[1], xq + 1);
      for (int i = 2; i < 8; i += 2) {
        s0 = dpbusd_bcast(s0, ws[i], xq + i);
        s1 = dpbusd_bcast(s1, ws[i + 1], xq + i + 1);
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
    __m512 mx = _mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b));
    // = _mm512_reduce_max_ps(mx) in a fixed order, shared with quantize_row16_avx2
    __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(mx), 1));
    float amax = hmax8(_mm256_max_ps(hi, _mm512_castps512_ps256(mx)));
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
// Each 64-byte code vector is unpacked once and serves all R rows before the next (4 weight
// registers live, not 16), so a tile of 8 rows fits the 32 zmm registers and shares the
// unpacking between twice the rows of a 4-row tile: 0.74-0.79x the time of the former 4-row
// tile (all 16 unpacked weight vectors live) from 8 rows on, 0.87x at 4, the same at 1
// (benchmarks/int4_kernel_ab.py, docs/benchmarks.md section 6). C integer chains per row
// keep enough vpdpwssd in flight for its latency (2 up to 4 rows, 1 beyond: R chains).
template <int R, typename T>
VNNI inline void tile16(const uint8_t* w, int64_t groups, const int16_t* q, int64_t k,
                        const float* d, const float* ds, T* y, int64_t n) {
  constexpr int C = R <= 4 ? 2 : 1;
  const __m512i lo4 = _mm512_set1_epi16(0x0f);
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    const uint8_t* p = w + g * kBlock;
    prefetch_group(p);
    __m512i s[R][C];
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < C; ++c) s[r][c] = _mm512_setzero_si512();
    for (int t = 0; t < 4; ++t) {
      __m512i v = _mm512_load_si512(reinterpret_cast<const void*>(p + 64 * t));
      __m512i ws[4] = {_mm512_and_si512(v, lo4),
                       _mm512_and_si512(_mm512_srli_epi16(v, 8), lo4),
                       _mm512_and_si512(_mm512_srli_epi16(v, 4), lo4),
                       _mm512_srli_epi16(v, 12)};
      for (int r = 0; r < R; ++r) {
        const int32_t* xq = reinterpret_cast<const int32_t*>(q + r * k + g * kGroup) + 4 * t;
        for (int i = 0; i < 4; ++i)  // exact integer sums: the split never changes a bit
          s[r][i % C] = dpwssd_bcast(s[r][i % C], ws[i], xq + i);
      }
    }
    __m512 dw = _mm512_cvtph_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(p + 256)));
    __m512 mw = _mm512_cvtph_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(p + 288)));
    for (int r = 0; r < R; ++r) {
      __m512i si = C == 2 ? _mm512_add_epi32(s[r][0], s[r][C - 1]) : s[r][0];
      __m512 dot = _mm512_cvtepi32_ps(si);
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

constexpr int kTile = 4;    // rows of x per pass over a weight block: tile (int8), AVX2
// ... tile16 (AVX-512 int16): 6, 8, 10 and 12 measured within ~7% of each other (8 rows
// and up); 8 keeps every live value in a register
constexpr int kTile16 = 8;

// run(std::integral_constant<int, R>) for R = left (1..Max), one instantiation per size
template <int Max, typename Run>
inline void run_rows(int64_t left, Run&& run) {
  if constexpr (Max >= 1) {
    if (left == Max) run(std::integral_constant<int, Max>{});
    else run_rows<Max - 1>(left, run);
  }
}

// One weight block (16 output rows) against all M rows: tiles of kTile (int8) or kTile16
// (int16) rows, then the remainder as one smaller tile.
template <typename Q, typename T>
VNNI void block_rows(const uint8_t* wb, int64_t groups, const Q* q, int64_t k,
                     const float* d, const float* ds, T* yb, int64_t m, int64_t n) {
  constexpr int full = std::is_same_v<Q, int8_t> ? kTile : kTile16;
  int64_t r = 0;
  auto run = [&](auto rows) {
    constexpr int R = decltype(rows)::value;
    if constexpr (std::is_same_v<Q, int8_t>)
      tile<R, T>(wb, groups, q + r * k, k, d + r * groups, ds + r * groups, yb + r * n, n);
    else
      tile16<R, T>(wb, groups, q + r * k, k, d + r * groups, ds + r * groups, yb + r * n, n);
  };
  for (; r + full <= m; r += full) run(std::integral_constant<int, full>{});
  run_rows<full - 1>(m - r, run);
}

// --- AVX2+FMA+F16C: int16 activations only, bitwise the vnni16 path above -----------------
// A ymm holds 8 of a block's 16 rows (half h: rows 8h..8h+7, bytes 32h..32h+31 of each
// 64-byte code vector, fp16 d and m 16h..16h+15 bytes into theirs); every per-lane step is
// the zmm step of the AVX-512 functions on those lanes. Measured (Zen 4, forced AVX2):
// 1.15-1.35x the AVX-512 vnni16 time at 1-16 rows (docs/benchmarks.md section 6).

template <typename T>
AVX2 inline __m256 load8(const T* p);
template <>
AVX2 inline __m256 load8<float>(const float* p) { return _mm256_loadu_ps(p); }
template <>
AVX2 inline __m256 load8<at::BFloat16>(const at::BFloat16* p) {
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

// to_bf16 on 8 lanes
AVX2 inline __m128i to_bf16_8(__m256 v) {
  __m256i u = _mm256_castps_si256(v);
  __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)));
  __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_or_si256(u, _mm256_set1_epi32(0x400000)), nan);
  r = _mm256_srli_epi32(r, 16);  // 0..0xffff: packus keeps it as is
  return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}

AVX2 inline __m256 abs8(__m256 v) {  // as _mm512_abs_ps: clear the sign bit
  return _mm256_castsi256_ps(
      _mm256_and_si256(_mm256_castps_si256(v), _mm256_set1_epi32(0x7fffffff)));
}

// quantize_row16 with 4 ymm per block of 32 (a = x[0..15] = a0|a1, b = x[16..31] = b0|b1):
// the same products, conversion (round to nearest even), saturation, max (hmax8 of the same
// 8 lanes) and integer sum, so the same codes, d and d*sum bit for bit.
template <typename T>
AVX2 void quantize_row16_avx2(const T* x, int64_t k, int16_t* q, float* d, float* ds) {
  const __m256i hi = _mm256_set1_epi32(32767), lo = _mm256_set1_epi32(-32767);
  alignas(32) int32_t c[kGroup];
  for (int64_t g = 0; g < k / kGroup; ++g) {
    const T* xg = x + g * kGroup;
    __m256 v[4] = {load8<T>(xg), load8<T>(xg + 8), load8<T>(xg + 16), load8<T>(xg + 24)};
    // zmm max(|a|, |b|) is (max(|a0|,|b0|) | max(|a1|,|b1|)); its reduction starts with
    // max(high half, low half)
    float amax = hmax8(_mm256_max_ps(_mm256_max_ps(abs8(v[1]), abs8(v[3])),
                                     _mm256_max_ps(abs8(v[0]), abs8(v[2]))));
    float dg = amax / 32767.0f;
    float id = dg != 0.0f ? 1.0f / dg : 0.0f;
    __m256i sum = _mm256_setzero_si256();
    for (int i = 0; i < 4; ++i) {
      __m256i qi = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], _mm256_set1_ps(id)));
      qi = _mm256_max_epi32(_mm256_min_epi32(qi, hi), lo);
      sum = _mm256_add_epi32(sum, qi);
      _mm256_store_si256(reinterpret_cast<__m256i*>(c + 8 * i), qi);
    }
    int16_t* qg = q + g * kGroup;  // the kPairs16 order (O(K) per row: scalar is enough)
    for (int i = 0; i < kGroup; ++i) qg[i] = static_cast<int16_t>(c[kPairs16[i]]);
    d[g] = dg;
    ds[g] = dg * static_cast<float>(hadd8(sum));
  }
}

// tile16 on two ymm halves (h = 0: rows 0-7, 1: rows 8-15), both in one pass over the group
// (each activation broadcast serves both: 1.2-1.7x faster here than a pass per half). The dots:
// vpmaddwd gives, per 32-bit lane, w_lo*x_lo + w_hi*x_hi exactly as one vpdpwssd step, and
// the 16 steps are summed in int32 (exact: any order); then per group the same
// acc = fma(float(dot), d_w * d_x, acc); acc = fma(m_w, d_x*sum, acc) on each half's lanes.
template <int R, typename T>
AVX2 inline void tile16_avx2(const uint8_t* w, int64_t groups, const int16_t* q, int64_t k,
                             const float* d, const float* ds, T* y, int64_t n) {
  const __m256i lo4 = _mm256_set1_epi16(0x0f);
  __m256 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    const uint8_t* p = w + g * kBlock;
    if constexpr (R <= 2) prefetch_group(p);
    __m256i s[R][2];
    for (int r = 0; r < R; ++r) s[r][0] = s[r][1] = _mm256_setzero_si256();
    for (int t = 0; t < 4; ++t) {
      __m256i v0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(p + 64 * t));
      __m256i v1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(p + 64 * t + 32));
      // as tile16's ws[4t..4t+3]: pairs 4t..4t+3 (kPairs16), rows 0-7 and 8-15
      __m256i ws0[4] = {_mm256_and_si256(v0, lo4),
                        _mm256_and_si256(_mm256_srli_epi16(v0, 8), lo4),
                        _mm256_and_si256(_mm256_srli_epi16(v0, 4), lo4),
                        _mm256_srli_epi16(v0, 12)};
      __m256i ws1[4] = {_mm256_and_si256(v1, lo4),
                        _mm256_and_si256(_mm256_srli_epi16(v1, 8), lo4),
                        _mm256_and_si256(_mm256_srli_epi16(v1, 4), lo4),
                        _mm256_srli_epi16(v1, 12)};
      for (int r = 0; r < R; ++r) {
        const int32_t* xq = reinterpret_cast<const int32_t*>(q + r * k + g * kGroup) + 4 * t;
        for (int i = 0; i < 4; ++i) {
          __m256i b = _mm256_set1_epi32(xq[i]);
          s[r][0] = _mm256_add_epi32(s[r][0], _mm256_madd_epi16(ws0[i], b));
          s[r][1] = _mm256_add_epi32(s[r][1], _mm256_madd_epi16(ws1[i], b));
        }
      }
    }
    for (int h = 0; h < 2; ++h) {
      const __m128i* dm = reinterpret_cast<const __m128i*>(p + 256 + 16 * h);
      __m256 dw = _mm256_cvtph_ps(_mm_load_si128(dm));
      __m256 mw = _mm256_cvtph_ps(_mm_load_si128(dm + 2));  // 32 bytes on: m
      for (int r = 0; r < R; ++r) {
        __m256 dot = _mm256_cvtepi32_ps(s[r][h]);
        __m256 scale = _mm256_mul_ps(dw, _mm256_set1_ps(d[r * groups + g]));
        acc[r][h] = _mm256_fmadd_ps(dot, scale, acc[r][h]);
        acc[r][h] = _mm256_fmadd_ps(mw, _mm256_set1_ps(ds[r * groups + g]), acc[r][h]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int h = 0; h < 2; ++h) {
      if constexpr (std::is_same_v<T, float>) {
        _mm256_storeu_ps(y + r * n + 8 * h, acc[r][h]);
      } else {
        _mm_storeu_si128(reinterpret_cast<__m128i*>(y + r * n + 8 * h), to_bf16_8(acc[r][h]));
      }
    }
}

template <typename T>
AVX2 void block_rows16_avx2(const uint8_t* wb, int64_t groups, const int16_t* q, int64_t k,
                            const float* d, const float* ds, T* yb, int64_t m, int64_t n) {
  int64_t r = 0;
  auto run = [&](auto rows) {
    constexpr int R = decltype(rows)::value;
    tile16_avx2<R, T>(wb, groups, q + r * k, k, d + r * groups, ds + r * groups, yb + r * n, n);
  };
  for (; r + kTile <= m; r += kTile) run(std::integral_constant<int, kTile>{});
  run_rows<kTile - 1>(m - r, run);
}

// Q: int8_t (vpdpbusd, activations in int8) or int16_t (vpdpwssd, activations in int16);
// isa 2 or 1 (int16 only). No target attribute here: this runs on AVX2-only CPUs too, and
// calls the path's (never inlined) target functions.
template <typename Q, typename T>
void mm_impl(const T* x, const uint8_t* w, T* y, int64_t m, int64_t n, int64_t k, int64_t isa) {
  static_assert(std::is_same_v<Q, int8_t> || std::is_same_v<Q, int16_t>);
  const int64_t groups = k / kGroup;
  // the quantized rows in the calling thread's own buffers: an allocation per call (two
  // of them, 120 calls a decode step) cost more than the quantization at one row
  thread_local std::vector<Q> qbuf;
  thread_local std::vector<float> fbuf;
  qbuf.resize(m * k);
  fbuf.resize(2 * m * groups);
  Q* q = qbuf.data();
  float* d = fbuf.data();
  float* ds = d + m * groups;
  at::parallel_for(0, m, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      if constexpr (std::is_same_v<Q, int8_t>)
        quantize_row<T>(x + r * k, k, q + r * k, d + r * groups, ds + r * groups);
      else if (isa == 2)
        quantize_row16<T>(x + r * k, k, q + r * k, d + r * groups, ds + r * groups);
      else
        quantize_row16_avx2<T>(x + r * k, k, q + r * k, d + r * groups, ds + r * groups);
    }
  });
  at::parallel_for(0, n / kRows, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      if constexpr (std::is_same_v<Q, int8_t>)
        block_rows<Q, T>(w + b * groups * kBlock, groups, q, k, d, ds, y + b * kRows, m, n);
      else if (isa == 2)
        block_rows<Q, T>(w + b * groups * kBlock, groups, q, k, d, ds, y + b * kRows, m, n);
      else
        block_rows16_avx2<T>(w + b * groups * kBlock, groups, q, k, d, ds, y + b * kRows, m, n);
    }
  });
}

#else  // not x86-64: Python never calls mm() here (isa() is 0)

int64_t cpu_isa() { return 0; }

#endif

// The path of this process, decided once: the CPU's, or 1 on an AVX-512 CPU where
// MTPSERVE_INT4_AVX2 is set (any value), so tests can run the AVX2 path there.
int64_t active_isa() {
  static const int64_t isa = [] {
    const int64_t c = cpu_isa();
    return c == 2 && std::getenv("MTPSERVE_INT4_AVX2") != nullptr ? int64_t{1} : c;
  }();
  return isa;
}

// The leading rows of x that are real in this thread's passes (0: all of them). A compiled
// graph runs a one-row step as two rows (model/compiled.py); the padding row's product is
// dropped, and at two rows the AVX2 path does twice the vpmaddwd work of one (1.45x the
// trunk's pass on an AVX2-only Zen 3). Set around one graph call (int4_vnni.live_rows);
// each row's result is the same whatever rows share the pass, so the real ones keep
// their bits; the rest of the output is zero.
thread_local int64_t t_live_rows = 0;

void set_live_rows(int64_t n) {
  TORCH_CHECK(n >= 0, "int4_vnni: live rows must be >= 0");
  t_live_rows = n;
}

// act_bits: 8 (int8 activations, vpdpbusd: isa 2 only) or 16 (int16 activations, vpdpwssd on
// isa 2, vpmaddwd on isa 1); the same packed weights serve both.
at::Tensor mm_run(const at::Tensor& x, const at::Tensor& packed, int64_t n, int64_t act_bits,
                  int64_t isa) {
  TORCH_CHECK(act_bits == 8 || act_bits == 16, "int4_vnni: act_bits must be 8 or 16");
  TORCH_CHECK(isa >= 1 && isa <= cpu_isa(), "int4_vnni: this CPU cannot run isa ", isa,
              " (2: AVX512-VNNI, 1: AVX2+FMA+F16C)");
  TORCH_CHECK(act_bits == 16 || isa == 2,
              "int4_vnni: int8 activations (mm, --int4-kernel vnni) need AVX512-VNNI; this "
              "process runs the AVX2 path (int16 activations, mm16) only");
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
  const int64_t live = t_live_rows > 0 && t_live_rows < m ? t_live_rows : m;
  if (live < m) y.narrow(0, live, m - live).zero_();
#if defined(__x86_64__) || defined(_M_X64)
  if (m > 0) {
    const uint8_t* w = packed.data_ptr<uint8_t>();
    const bool f32 = x.scalar_type() == at::kFloat;
    if (act_bits == 8 && f32)
      mm_impl<int8_t, float>(xc.data_ptr<float>(), w, y.data_ptr<float>(), live, n, k, isa);
    else if (act_bits == 8)
      mm_impl<int8_t, at::BFloat16>(xc.data_ptr<at::BFloat16>(), w,
                                    y.data_ptr<at::BFloat16>(), live, n, k, isa);
    else if (f32)
      mm_impl<int16_t, float>(xc.data_ptr<float>(), w, y.data_ptr<float>(), live, n, k, isa);
    else
      mm_impl<int16_t, at::BFloat16>(xc.data_ptr<at::BFloat16>(), w,
                                     y.data_ptr<at::BFloat16>(), live, n, k, isa);
  }
#endif
  return y;
}

at::Tensor mm(const at::Tensor& x, const at::Tensor& packed, int64_t n) {
  return mm_run(x, packed, n, 8, active_isa());
}

at::Tensor mm16(const at::Tensor& x, const at::Tensor& packed, int64_t n) {
  return mm_run(x, packed, n, 16, active_isa());
}

// tests: mm16 on a given path (2 or 1, up to what the CPU runs) in one process
at::Tensor mm16_isa(const at::Tensor& x, const at::Tensor& packed, int64_t n, int64_t isa) {
  return mm_run(x, packed, n, 16, isa);
}

int64_t isa() { return active_isa(); }

}  // namespace

TORCH_LIBRARY(mtpserve_int4, lib) {
  lib.def("mm(Tensor x, Tensor packed, int n) -> Tensor");
  lib.def("mm16(Tensor x, Tensor packed, int n) -> Tensor");
  lib.def("mm16_isa(Tensor x, Tensor packed, int n, int isa) -> Tensor");
  lib.def("isa() -> int", &isa);
  lib.def("set_live_rows(int n) -> ()", &set_live_rows);
}

TORCH_LIBRARY_IMPL(mtpserve_int4, CPU, lib) {
  lib.impl("mm", &mm);
  lib.impl("mm16", &mm16);
  lib.impl("mm16_isa", &mm16_isa);
}
