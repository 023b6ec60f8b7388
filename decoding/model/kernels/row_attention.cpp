// Attention of decode rows and draft-tree rows over the KV cache, one (row, KV head) at a
// time, batch-invariant by construction (decoding/model/row_attention.py). The cache holds
// fp32 or fp16 K/V (KV: float or at::Half; fp16 is widened to fp32 exactly as it is read),
// the arithmetic is fp32 either way.
//
// Each query row t attends over ITS keys, in cache order: the committed prefix [0, prefix[t])
// of its cache slot, then the cache indices extra[offsets[t] .. offsets[t+1]) (its tree
// ancestors and itself). The softmax is online (running max and sum in fp32) over those keys
// in blocks of kBlock, starting at the row's first key: the sequence of float operations of
// a row depends only on that row's query and keys, never on T, the other rows, or the
// thread count (threads split (row, KV head) pairs, never a row's keys).
//
// Three paths, chosen ONCE per process (rows_isa(), from the CPU, then the head dim):
// AVX-512, AVX2+FMA+F16C (function target attributes + a runtime check, no -march) and
// generic C++. They do not give the same bits (the vector paths' dot products are 16- or
// 8-lane partial sums and their exp a polynomial), so a process never mixes them. The
// generic path made a decode step 1.6-2.0x and a 16-sequence step 2.3-2.9x the AVX2 path's
// (both forced on an AVX-512 CPU, docs/benchmarks.md section 11). GQA: query head h reads
// KV head h / (Hq/Hkv).

#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/Parallel.h>
#include <ATen/Dispatch.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kBlock = 16;  // keys per online-softmax step (one zmm of scores)
constexpr int64_t kMaxG = 16;   // query heads per KV head
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
// Cephes' expf, shared by the vector paths: ln 2 in two parts, the polynomial's coefficients
constexpr float kExpMin = -87.3f, kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
constexpr float kExpP[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                            4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};

template <typename KV>
struct Args {
  const float* q;      // [T, Hq, D]
  const KV* k;         // the layer's keys [S, Hkv, L, D]
  const KV* v;         // values, same layout
  const int64_t* slot;     // [T]
  const int64_t* prefix;   // [T]
  const int64_t* offsets;  // [T + 1]
  const int64_t* extra;    // [E]
  float* out;          // [T, Hq, D]
  int64_t Hq, Hkv, L, D;
  float scale;
};

inline int64_t key_at(int64_t j, int64_t p, const int64_t* ex) { return j < p ? j : ex[j - p]; }

// ---- generic C++ -------------------------------------------------------------------------
template <typename KV>
void generic_pair(const Args<KV>& a, int64_t t, int64_t h) {
  const int64_t G = a.Hq / a.Hkv, D = a.D, p = a.prefix[t];
  const int64_t* ex = a.extra + a.offsets[t];
  const int64_t n = p + (a.offsets[t + 1] - a.offsets[t]);
  const int64_t base = (a.slot[t] * a.Hkv + h) * a.L;
  const float* q = a.q + (t * a.Hq + h * G) * D;
  float* o = a.out + (t * a.Hq + h * G) * D;
  float m[kMaxG], l[kMaxG], s[kMaxG][kBlock];
  for (int64_t g = 0; g < G; ++g) {
    m[g] = kNegInf;
    l[g] = 0.0f;
    std::fill(o + g * D, o + (g + 1) * D, 0.0f);  // the accumulator lives in the output
  }
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t nb = std::min(kBlock, n - b);
    for (int64_t j = 0; j < nb; ++j) {
      const KV* kp = a.k + (base + key_at(b + j, p, ex)) * D;
      for (int64_t g = 0; g < G; ++g) {
        float dot = 0.0f;
        for (int64_t d = 0; d < D; ++d) dot += q[g * D + d] * static_cast<float>(kp[d]);
        s[g][j] = dot * a.scale;
      }
    }
    for (int64_t g = 0; g < G; ++g) {
      float mn = m[g];
      for (int64_t j = 0; j < nb; ++j) mn = std::max(mn, s[g][j]);
      const float corr = m[g] == kNegInf ? 0.0f : std::exp(m[g] - mn);
      float sum = 0.0f;
      for (int64_t j = 0; j < nb; ++j) {
        s[g][j] = std::exp(s[g][j] - mn);
        sum += s[g][j];
      }
      l[g] = l[g] * corr + sum;
      m[g] = mn;
      float* acc = o + g * D;
      for (int64_t d = 0; d < D; ++d) acc[d] *= corr;
    }
    for (int64_t j = 0; j < nb; ++j) {
      const KV* vp = a.v + (base + key_at(b + j, p, ex)) * D;
      for (int64_t g = 0; g < G; ++g) {
        float* acc = o + g * D;
        const float pj = s[g][j];
        for (int64_t d = 0; d < D; ++d) acc[d] += pj * static_cast<float>(vp[d]);
      }
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    const float inv = 1.0f / l[g];
    for (int64_t d = 0; d < D; ++d) o[g * D + d] *= inv;
  }
}

// ---- AVX-512 -----------------------------------------------------------------------------
#if defined(__x86_64__) || defined(_M_X64)
#define AVX512 __attribute__((target("avx512f,avx512dq,fma")))

bool cpu_has_avx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq");
}

// exp for x <= 0 (Cephes' expf: 2^n * P(r), r = x - n ln2 in two parts), ~1 ulp; x below
// -87.3 gives ~1e-38 (the caller zeroes the lanes past a block's keys itself)
AVX512 inline __m512 exp_ps(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(kExpMin));
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Hi), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Lo), r);
  __m512 y = _mm512_set1_ps(kExpP[0]);
  for (int i = 1; i < 6; ++i) y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(kExpP[i]));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(y, n);
}

// 16 cache values as fp32 (fp16: widened exactly)
AVX512 inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
AVX512 inline __m512 load16(const at::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
AVX512 inline __m512 load16(const at::BFloat16* p) {  // exact: bf16 is fp32's top half
  __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}

// 16 fp32 values stored in T, rounded as static_cast<T>(float) rounds: to nearest even
// (fp16 through F16C; bf16 as c10::BFloat16 does it, NaN as 0x7FC0)
AVX512 inline void store16(float* p, __m512 x) { _mm512_storeu_ps(p, x); }
AVX512 inline void store16(at::Half* p, __m512 x) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                      _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
AVX512 inline void store16(at::BFloat16* p, __m512 x) {
  const __m512i u = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));
}

template <typename To, typename From>
AVX512 void convert_avx512(To* dst, const From* src, int64_t n) {  // n: a multiple of 16
  for (int64_t i = 0; i < n; i += 16) store16(dst + i, load16(src + i));
}

// The 16 horizontal sums of x[0..15] in one vector: lane j = the sum of x[j]'s 16 lanes,
// paired exactly as GCC's _mm512_reduce_add_ps pairs them (lanes i and i+8, then i and i+4,
// i and i+2, i and i+1), so each sum has the bits of reducing x[j] alone; 30 shuffles and
// 15 adds instead of 16 reductions of 7 dependent steps each. The slots hold the keys
// transposed (slot s = key 4(s%4) + s/4): the shuffles put slot s's sum in lane
// 4(s%4) + s/4, so key j lands in lane j. Use slot_of(j) to fill them.
constexpr int slot_of(int j) { return 4 * (j % 4) + j / 4; }

AVX512 inline __m512 sums16(const __m512* x) {
  __m512 w[8], z[4], y[2];
  for (int k = 0; k < 8; ++k)  // lanes i, i+8
    w[k] = _mm512_add_ps(_mm512_shuffle_f32x4(x[2 * k], x[2 * k + 1], 0x44),
                         _mm512_shuffle_f32x4(x[2 * k], x[2 * k + 1], 0xEE));
  for (int k = 0; k < 4; ++k)  // i, i+4
    z[k] = _mm512_add_ps(_mm512_shuffle_f32x4(w[2 * k], w[2 * k + 1], 0x88),
                         _mm512_shuffle_f32x4(w[2 * k], w[2 * k + 1], 0xDD));
  for (int k = 0; k < 2; ++k)  // i, i+2
    y[k] = _mm512_add_ps(_mm512_shuffle_ps(z[2 * k], z[2 * k + 1], 0x44),
                         _mm512_shuffle_ps(z[2 * k], z[2 * k + 1], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_ps(y[0], y[1], 0x88),  // i, i+1
                       _mm512_shuffle_ps(y[0], y[1], 0xDD));
}

// GC: the query heads per KV head when known at compile time (0: read from a), so that the
// per-head accumulators live in registers instead of a stack array indexed at run time
template <int NV, int GC, typename KV>  // D = 16 * NV
AVX512 void avx512_pair(const Args<KV>& a, int64_t t, int64_t h) {
  constexpr int64_t D = 16 * NV;
  const int64_t G = GC ? GC : a.Hq / a.Hkv, p = a.prefix[t];
  const int64_t* ex = a.extra + a.offsets[t];
  const int64_t n = p + (a.offsets[t + 1] - a.offsets[t]);
  const int64_t base = (a.slot[t] * a.Hkv + h) * a.L;
  const float* q = a.q + (t * a.Hq + h * G) * D;
  float* o = a.out + (t * a.Hq + h * G) * D;
  __m512 acc[kMaxG][NV];
  float m[kMaxG], l[kMaxG];
  alignas(64) float s[kMaxG][kBlock];
  alignas(64) float kb[kBlock][D];  // the block's keys as fp32, read once per query head
  for (int64_t g = 0; g < G; ++g) {
    m[g] = kNegInf;
    l[g] = 0.0f;
    for (int i = 0; i < NV; ++i) acc[g][i] = _mm512_setzero_ps();
  }
  const __m512 scale = _mm512_set1_ps(a.scale);
  // Software-pipelined by one block: block b's scores (and their softmax) are computed
  // before block b-1's values are summed, so the softmax's long dependent chain (horizontal
  // max, exp, horizontal sum) overlaps the next block's dot products instead of stalling
  // the value sums that need it. Each row's float operations and their order per
  // accumulator are the same as one block at a time: same bits.
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  __m512 sv[kMaxG];
  for (int64_t bi = 0; bi <= blocks; ++bi) {
    if (bi < blocks) {  // the scores of block bi
      const int64_t b = bi * kBlock, nb = std::min(kBlock, n - b);
      const __mmask16 valid = static_cast<__mmask16>((1u << nb) - 1u);
      for (int64_t j = 0; j < nb; ++j) {
        const KV* kp = a.k + (base + key_at(b + j, p, ex)) * D;
        for (int i = 0; i < NV; ++i) _mm512_store_ps(kb[j] + 16 * i, load16(kp + 16 * i));
      }
      for (int64_t g = 0; g < G; ++g) {
        __m512 qv[NV], x[kBlock];
        for (int i = 0; i < NV; ++i) qv[i] = _mm512_loadu_ps(q + g * D + 16 * i);
        for (int j = 0; j < kBlock; ++j) {  // keys past nb: zeros, masked below
          __m512 dot = _mm512_setzero_ps();
          if (j < nb) {
            dot = _mm512_mul_ps(qv[0], _mm512_load_ps(kb[j]));
            for (int i = 1; i < NV; ++i)
              dot = _mm512_fmadd_ps(qv[i], _mm512_load_ps(kb[j] + 16 * i), dot);
          }
          x[slot_of(j)] = dot;
        }
        sv[g] = _mm512_mul_ps(_mm512_mask_mov_ps(_mm512_set1_ps(kNegInf), valid, sums16(x)), scale);
      }
    }
    if (bi > 0) {  // the values of block bi-1, weighted by its softmax in s
      const int64_t b = (bi - 1) * kBlock, nb = std::min(kBlock, n - b);
      for (int64_t j = 0; j < nb; ++j) {
        const KV* vp = a.v + (base + key_at(b + j, p, ex)) * D;
        __m512 vr[NV];
        for (int i = 0; i < NV; ++i) vr[i] = load16(vp + 16 * i);
        for (int64_t g = 0; g < G; ++g) {
          const __m512 pj = _mm512_set1_ps(s[g][j]);
          for (int i = 0; i < NV; ++i) acc[g][i] = _mm512_fmadd_ps(pj, vr[i], acc[g][i]);
        }
      }
    }
    if (bi < blocks) {  // block bi's softmax: s, the running max and sum, the rescale
      const int64_t nb = std::min(kBlock, n - bi * kBlock);
      const __mmask16 valid = static_cast<__mmask16>((1u << nb) - 1u);
      for (int64_t g = 0; g < G; ++g) {
        const float mn = std::max(m[g], _mm512_reduce_max_ps(sv[g]));
        __m512 pv = _mm512_maskz_mov_ps(valid, exp_ps(_mm512_sub_ps(sv[g], _mm512_set1_ps(mn))));
        if (mn == m[g]) {
          // the max did not move (most blocks): exp(0) = 1 exactly and x * 1 = x, so the
          // rescale is skipped with the same bits, and with it a libm call that makes the
          // compiler spill every live zmm register
          l[g] += _mm512_reduce_add_ps(pv);
        } else {
          const float corr = m[g] == kNegInf ? 0.0f : std::exp(m[g] - mn);
          l[g] = l[g] * corr + _mm512_reduce_add_ps(pv);
          const __m512 c = _mm512_set1_ps(corr);
          for (int i = 0; i < NV; ++i) acc[g][i] = _mm512_mul_ps(acc[g][i], c);
        }
        m[g] = mn;
        _mm512_store_ps(s[g], pv);
      }
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    const __m512 inv = _mm512_set1_ps(1.0f / l[g]);
    for (int i = 0; i < NV; ++i) _mm512_storeu_ps(o + g * D + 16 * i, _mm512_mul_ps(acc[g][i], inv));
  }
}
// the common GQA group sizes compiled with G fixed (same float sequence either way)
template <int NV, typename KV>
AVX512 void avx512_heads(const Args<KV>& a, int64_t t, int64_t h) {
  switch (a.Hq / a.Hkv) {
    case 1: return avx512_pair<NV, 1, KV>(a, t, h);
    case 2: return avx512_pair<NV, 2, KV>(a, t, h);
    case 3: return avx512_pair<NV, 3, KV>(a, t, h);
    case 4: return avx512_pair<NV, 4, KV>(a, t, h);
    case 8: return avx512_pair<NV, 8, KV>(a, t, h);
    default: return avx512_pair<NV, 0, KV>(a, t, h);
  }
}
#else
bool cpu_has_avx512() { return false; }
#endif

// ---- AVX2 (+FMA, F16C): CPUs without AVX-512 ------------------------------------------------
// The AVX-512 path's algorithm at 8 lanes: a block of kBlock keys is two vectors of scores,
// each key's dot a D/8-lane partial sum reduced by sums8; exp is the same polynomial with 2^n
// built from the exponent bits (no vscalefps). Not pipelined across blocks. Its own bits (not
// the AVX-512 path's), the same for a row whatever else is in the pass.
#if defined(__x86_64__) || defined(_M_X64)
#define AVX2F __attribute__((target("avx2,fma,f16c")))

bool cpu_has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
}

// exp for x <= 0 as exp_ps; x >= -87.3 keeps n >= -126, so 2^n is a normal float
AVX2F inline __m256 exp8(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(kExpMin));
  __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(kLog2e)),
                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Hi), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Lo), r);
  __m256 y = _mm256_set1_ps(kExpP[0]);
  for (int i = 1; i < 6; ++i) y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(kExpP[i]));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

AVX2F inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
AVX2F inline __m256 load8(const at::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// lane j = the sum of x[j]'s 8 lanes (hadd pairs, then the two 128-bit halves)
AVX2F inline __m256 sums8(const __m256* x) {
  const __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(x[0], x[1]), _mm256_hadd_ps(x[2], x[3]));
  const __m256 b = _mm256_hadd_ps(_mm256_hadd_ps(x[4], x[5]), _mm256_hadd_ps(x[6], x[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
}

AVX2F inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

AVX2F inline float hmax8(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}

template <int NV, int GC, typename KV>  // D = 8 * NV
AVX2F void avx2_pair(const Args<KV>& a, int64_t t, int64_t h) {
  constexpr int64_t D = 8 * NV;
  const int64_t G = GC ? GC : a.Hq / a.Hkv, p = a.prefix[t];
  const int64_t* ex = a.extra + a.offsets[t];
  const int64_t n = p + (a.offsets[t + 1] - a.offsets[t]);
  const int64_t base = (a.slot[t] * a.Hkv + h) * a.L;
  const float* q = a.q + (t * a.Hq + h * G) * D;
  float* o = a.out + (t * a.Hq + h * G) * D;
  __m256 acc[kMaxG][NV];
  float m[kMaxG], l[kMaxG];
  alignas(32) float s[kMaxG][kBlock];
  alignas(32) float kb[kBlock][D];  // the block's keys as fp32, read once per query head
  for (int64_t g = 0; g < G; ++g) {
    m[g] = kNegInf;
    l[g] = 0.0f;
    for (int i = 0; i < NV; ++i) acc[g][i] = _mm256_setzero_ps();
  }
  const __m256 scale = _mm256_set1_ps(a.scale), ninf = _mm256_set1_ps(kNegInf);
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t nb = std::min(kBlock, n - b);
    for (int64_t j = 0; j < nb; ++j) {
      const KV* kp = a.k + (base + key_at(b + j, p, ex)) * D;
      for (int i = 0; i < NV; ++i) _mm256_store_ps(kb[j] + 8 * i, load8(kp + 8 * i));
    }
    for (int64_t j = nb; j < kBlock; ++j)  // the last block: keys past nb dot to 0, masked
      for (int i = 0; i < NV; ++i) _mm256_store_ps(kb[j] + 8 * i, _mm256_setzero_ps());
    // lanes of keys past nb: -inf scores, then zero weights
    const __m256 valid[2] = {
        _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(nb)), lane)),
        _mm256_castsi256_ps(
            _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(nb) - 8), lane))};
    for (int64_t g = 0; g < G; ++g) {
      __m256 sv[2];
      for (int half = 0; half < 2; ++half) {
        // the 8 keys' dots as 8 independent chains, each key's own sequence (mul, then
        // fma over i in order) as before: the same bits, not one key's FMA latency at a time
        const float (*kh)[D] = kb + 8 * half;
        __m256 x[8];
        const __m256 q0 = _mm256_loadu_ps(q + g * D);
        for (int j = 0; j < 8; ++j) x[j] = _mm256_mul_ps(q0, _mm256_load_ps(kh[j]));
        for (int i = 1; i < NV; ++i) {
          const __m256 qi = _mm256_loadu_ps(q + g * D + 8 * i);
          for (int j = 0; j < 8; ++j) x[j] = _mm256_fmadd_ps(qi, _mm256_load_ps(kh[j] + 8 * i), x[j]);
        }
        sv[half] = _mm256_blendv_ps(ninf, _mm256_mul_ps(sums8(x), scale), valid[half]);
      }
      const float mn = std::max(m[g], hmax8(_mm256_max_ps(sv[0], sv[1])));
      const __m256 mv = _mm256_set1_ps(mn);
      const __m256 p0 = _mm256_and_ps(valid[0], exp8(_mm256_sub_ps(sv[0], mv)));
      const __m256 p1 = _mm256_and_ps(valid[1], exp8(_mm256_sub_ps(sv[1], mv)));
      const float sum = hsum8(_mm256_add_ps(p0, p1));
      if (mn == m[g]) {  // the max did not move: no rescale (x * 1 = x, same bits)
        l[g] += sum;
      } else {
        const float corr = m[g] == kNegInf ? 0.0f : std::exp(m[g] - mn);
        l[g] = l[g] * corr + sum;
        const __m256 c = _mm256_set1_ps(corr);
        for (int i = 0; i < NV; ++i) acc[g][i] = _mm256_mul_ps(acc[g][i], c);
      }
      m[g] = mn;
      _mm256_store_ps(s[g], p0);
      _mm256_store_ps(s[g] + 8, p1);
    }
    for (int64_t j = 0; j < nb; ++j) {
      const KV* vp = a.v + (base + key_at(b + j, p, ex)) * D;
      __m256 vr[NV];
      for (int i = 0; i < NV; ++i) vr[i] = load8(vp + 8 * i);
      for (int64_t g = 0; g < G; ++g) {
        const __m256 pj = _mm256_set1_ps(s[g][j]);
        for (int i = 0; i < NV; ++i) acc[g][i] = _mm256_fmadd_ps(pj, vr[i], acc[g][i]);
      }
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    const __m256 inv = _mm256_set1_ps(1.0f / l[g]);
    for (int i = 0; i < NV; ++i) _mm256_storeu_ps(o + g * D + 8 * i, _mm256_mul_ps(acc[g][i], inv));
  }
}
template <int NV, typename KV>
AVX2F void avx2_heads(const Args<KV>& a, int64_t t, int64_t h) {
  switch (a.Hq / a.Hkv) {
    case 1: return avx2_pair<NV, 1, KV>(a, t, h);
    case 2: return avx2_pair<NV, 2, KV>(a, t, h);
    case 3: return avx2_pair<NV, 3, KV>(a, t, h);
    case 4: return avx2_pair<NV, 4, KV>(a, t, h);
    default: return avx2_pair<NV, 0, KV>(a, t, h);
  }
}
#else
bool cpu_has_avx2() { return false; }
#endif

// The path of this process: decided once (the CPU), then per head dim (the model's):
// 2 AVX-512, 1 AVX2, 0 generic C++. MTPSERVE_ROWS_GENERIC (any value) forces the generic
// path, MTPSERVE_ROWS_AVX2 the AVX2 one where AVX-512 is there (to test them on AVX-512 CPUs).
int rows_isa() {
  static const int isa = std::getenv("MTPSERVE_ROWS_GENERIC") != nullptr ? 0
                         : cpu_has_avx512() && std::getenv("MTPSERVE_ROWS_AVX2") == nullptr ? 2
                         : cpu_has_avx2() ? 1 : 0;
  return isa;
}

bool avx512_here() { return rows_isa() == 2; }

bool vector_path(int64_t D) { return rows_isa() > 0 && (D == 32 || D == 64 || D == 128); }

// dst[i] = static_cast<To>(static_cast<float>(src[i])) for i < n, the same bits either way
// (the widening is exact; both narrowings round to nearest even); vectorized where it can
template <typename To, typename From>
void convert(To* dst, const From* src, int64_t n) {
#if defined(__x86_64__) || defined(_M_X64)
  constexpr bool lanes = !std::is_same_v<To, double> && !std::is_same_v<From, double>;
  if constexpr (lanes)
    if (avx512_here() && n % 16 == 0) return convert_avx512(dst, src, n);
#endif
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<To>(static_cast<float>(src[i]));
}

template <typename KV>
void run_pair(const Args<KV>& a, int64_t t, int64_t h) {
#if defined(__x86_64__) || defined(_M_X64)
  if (vector_path(a.D)) {
    if (rows_isa() == 2) {
      if (a.D == 64) return avx512_heads<4, KV>(a, t, h);
      if (a.D == 128) return avx512_heads<8, KV>(a, t, h);
      return avx512_heads<2, KV>(a, t, h);
    }
    if (a.D == 64) return avx2_heads<8, KV>(a, t, h);
    if (a.D == 128) return avx2_heads<16, KV>(a, t, h);
    return avx2_heads<4, KV>(a, t, h);
  }
#endif
  generic_pair(a, t, h);
}

// Bounds of a row layout (a bad one must not read outside the cache): -> the keys of all
// rows together
int64_t check_layout(int64_t T, int64_t S, int64_t L, const at::Tensor& slot,
                     const at::Tensor& prefix, const at::Tensor& offsets,
                     const at::Tensor& extra) {
  for (const at::Tensor* x : {&slot, &prefix, &offsets, &extra})
    TORCH_CHECK(x->device().is_cpu() && x->scalar_type() == at::kLong && x->is_contiguous() &&
                    x->dim() == 1,
                "row_attention: the layout tensors must be contiguous int64 CPU vectors");
  TORCH_CHECK(slot.numel() == T && prefix.numel() == T && offsets.numel() == T + 1,
              "row_attention: the layout does not match T");
  const int64_t* pre = prefix.data_ptr<int64_t>();
  const int64_t* off = offsets.data_ptr<int64_t>();
  const int64_t* sl = slot.data_ptr<int64_t>();
  const int64_t* ex = extra.data_ptr<int64_t>();
  int64_t keys = 0;
  for (int64_t t = 0; t < T; ++t) {
    const int64_t n = pre[t] + off[t + 1] - off[t];
    TORCH_CHECK(n > 0 && pre[t] >= 0 && pre[t] <= L && sl[t] >= 0 && sl[t] < S &&
                    off[t] <= off[t + 1] && off[t + 1] <= extra.numel(),
                "row_attention: row ", t, " has no keys or indexes outside the cache");
    for (int64_t i = off[t]; i < off[t + 1]; ++i)
      TORCH_CHECK(ex[i] >= 0 && ex[i] < L, "row_attention: key index outside the cache");
    keys += n;
  }
  return keys;
}

// All T rows of a checked layout: threads split (row, KV head) pairs; small passes stay on
// the calling thread (a fork costs more than the work: below ~110 keys of 9 heads x 64
// here). One decode row over 512 keys: 31 -> 23 us on 2 threads (AMD Zen 4), its 3 pairs
// split 2 + 1. Either way each pair is computed the same.
template <typename KV>
void attend(const Args<KV>& a, int64_t T, int64_t keys) {
  const int64_t pairs = T * a.Hkv;
  const int64_t work = keys * a.Hq * a.D;
  const int64_t grain = work < (1 << 16) ? pairs : 1;
  at::parallel_for(0, pairs, grain, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) run_pair(a, i / a.Hkv, i % a.Hkv);
  });
}

at::Tensor row_attention(const at::Tensor& q, const at::Tensor& kv, const at::Tensor& slot,
                         const at::Tensor& prefix, const at::Tensor& offsets,
                         const at::Tensor& extra, double scale) {
  TORCH_CHECK(q.device().is_cpu() && q.scalar_type() == at::kFloat && q.dim() == 3,
              "row_attention: q must be a [T, Hq, D] float32 CPU tensor");
  TORCH_CHECK((kv.scalar_type() == at::kFloat || kv.scalar_type() == at::kHalf) &&
                  kv.dim() == 5 && kv.size(0) == 2 && kv.is_contiguous(),
              "row_attention: kv must be one layer's contiguous [2, S, Hkv, L, D] float32 "
              "or float16");
  const int64_t T = q.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t S = kv.size(1), Hkv = kv.size(2), L = kv.size(3);
  TORCH_CHECK(kv.size(4) == D && Hq % Hkv == 0 && Hq / Hkv <= kMaxG,
              "row_attention: head dims do not match");
  const int64_t keys = check_layout(T, S, L, slot, prefix, offsets, extra);
  at::Tensor qc = q.contiguous();
  at::Tensor out = at::empty({T, Hq, D}, q.options());
  auto run = [&](auto* kp) {
    using KV = std::remove_const_t<std::remove_pointer_t<decltype(kp)>>;
    Args<KV> a{qc.data_ptr<float>(), kp, kp + S * Hkv * L * D, slot.data_ptr<int64_t>(),
               prefix.data_ptr<int64_t>(), offsets.data_ptr<int64_t>(),
               extra.data_ptr<int64_t>(), out.data_ptr<float>(), Hq, Hkv, L, D,
               static_cast<float>(scale)};
    attend(a, T, keys);
  };
  if (kv.scalar_type() == at::kHalf) run(kv.data_ptr<at::Half>());
  else run(kv.data_ptr<float>());
  return out;
}

// The step's new keys and values, [T, Hkv, D] each, written into one layer's cache
// [2, S, Hkv, L, D] at (store_slot[t], :, store_pos[t]): the write the attention then
// reads, done here so a layer costs one op call instead of a stack, a cast and an index_put.
at::Tensor write_row_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               at::Tensor& kv, const at::Tensor& store_slot,
                               const at::Tensor& store_pos, const at::Tensor& slot,
                               const at::Tensor& prefix, const at::Tensor& offsets,
                               const at::Tensor& extra, double scale) {
  TORCH_CHECK((kv.scalar_type() == at::kFloat || kv.scalar_type() == at::kHalf) &&
                  kv.dim() == 5 && kv.size(0) == 2 && kv.is_contiguous(),
              "write_row_attention: kv must be one layer's contiguous [2, S, Hkv, L, D] "
              "float32 or float16");
  const int64_t T = q.size(0), S = kv.size(1), Hkv = kv.size(2), L = kv.size(3),
                D = kv.size(4);
  for (const at::Tensor* x : {&k, &v})
    TORCH_CHECK(x->device().is_cpu() && x->dim() == 3 && x->size(0) == T &&
                    x->size(1) == Hkv && x->size(2) == D,
                "write_row_attention: k and v must be [T, Hkv, D] CPU tensors");
  for (const at::Tensor* x : {&store_slot, &store_pos})
    TORCH_CHECK(x->scalar_type() == at::kLong && x->is_contiguous() && x->numel() == T,
                "write_row_attention: store_slot/store_pos must be int64 [T]");
  // in the cache's dtype first: rounded to fp16 as KVCache.write's .to() rounds (to nearest even)
  const at::Tensor kc = k.to(kv.scalar_type()).contiguous();
  const at::Tensor vc = v.to(kv.scalar_type()).contiguous();
  const int64_t* ss = store_slot.data_ptr<int64_t>();
  const int64_t* sp = store_pos.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t)
    TORCH_CHECK(ss[t] >= 0 && ss[t] < S && sp[t] >= 0 && sp[t] < L,
                "write_row_attention: row ", t, " stores outside the cache");
  auto store = [&](auto* kp, const auto* ks, const auto* vs) {
    auto* vp = kp + S * Hkv * L * D;
    for (int64_t t = 0; t < T; ++t) {
      for (int64_t h = 0; h < Hkv; ++h) {
        const int64_t dst = ((ss[t] * Hkv + h) * L + sp[t]) * D, src = (t * Hkv + h) * D;
        std::copy(ks + src, ks + src + D, kp + dst);
        std::copy(vs + src, vs + src + D, vp + dst);
      }
    }
  };
  if (kv.scalar_type() == at::kHalf)
    store(kv.data_ptr<at::Half>(), kc.data_ptr<at::Half>(), vc.data_ptr<at::Half>());
  else
    store(kv.data_ptr<float>(), kc.data_ptr<float>(), vc.data_ptr<float>());
  return row_attention(q, kv, slot, prefix, offsets, extra, scale);
}

int64_t isa() { return rows_isa(); }

// ---- the compiled forward's attention op (decoding/model/step_attention.py) ---------------
// A compiled step calls step_attention once per layer. For a step the row kernel takes whole
// (decode and tree rows only), step_context installs the step's cache and row layout here
// ONCE, so those calls run no Python: write, attend, and zeros for the padding rows of a
// one-row step. Any other step (prefill chunks, groups, SDPA) leaves it unset and each call
// goes to mtpserve::cached_attention, the Python op that reads the step's metadata.
struct StepRows {
  bool active = false;
  at::Tensor kv;  // the whole cache [layers, 2, S, Hkv, L, D]
  at::Tensor store_slot, store_pos, slot, prefix, offsets, extra;
  int64_t rows = 0;  // real rows: the op's inputs may have more (padding), which it skips
  int64_t keys = 0;  // of all rows (the layout is checked once, here, for every layer)
};
// Set and cleared around one compiled call by the engine's thread, as step_attention.py's
// _STEP (the metadata cannot be a graph input: its shapes change every step).
StepRows g_step;
int64_t g_cpp_calls = 0;  // layer calls step_attention took itself (tests read it)

void set_step_rows(const at::Tensor& kv, const at::Tensor& store_slot,
                   const at::Tensor& store_pos, const at::Tensor& slot,
                   const at::Tensor& prefix, const at::Tensor& offsets,
                   const at::Tensor& extra, int64_t rows) {
  TORCH_CHECK(kv.device().is_cpu() && kv.dim() == 6 && kv.size(1) == 2 && kv.is_contiguous() &&
                  (kv.scalar_type() == at::kFloat || kv.scalar_type() == at::kHalf),
              "set_step_rows: kv must be the whole contiguous [layers, 2, S, Hkv, L, D] "
              "float32 or float16 cache");
  TORCH_CHECK(rows > 0 && slot.numel() == rows && store_slot.numel() == rows &&
                  store_pos.numel() == rows,
              "set_step_rows: the layout must have one entry per real row");
  const int64_t S = kv.size(2), L = kv.size(4);
  const int64_t keys = check_layout(rows, S, L, slot, prefix, offsets, extra);
  for (const at::Tensor* x : {&store_slot, &store_pos})
    TORCH_CHECK(x->scalar_type() == at::kLong && x->is_contiguous(),
                "set_step_rows: store_slot/store_pos must be contiguous int64");
  const int64_t* ss = store_slot.data_ptr<int64_t>();
  const int64_t* sp = store_pos.data_ptr<int64_t>();
  for (int64_t t = 0; t < rows; ++t)
    TORCH_CHECK(ss[t] >= 0 && ss[t] < S && sp[t] >= 0 && sp[t] < L,
                "set_step_rows: row ", t, " stores outside the cache");
  g_step = StepRows{true, kv, store_slot, store_pos, slot, prefix, offsets, extra, rows, keys};
}

void clear_step_rows() { g_step = StepRows{}; }

int64_t step_rows_calls() { return g_cpp_calls; }

at::Tensor step_attention(const at::Tensor& q_in, const at::Tensor& k_in,
                          const at::Tensor& v_in, int64_t layer, double scale) {
  if (!g_step.active) {
    static auto python_op =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("mtpserve::cached_attention", "")
            .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                              double)>();
    return python_op.call(q_in, k_in, v_in, layer, scale);
  }
  const StepRows& s = g_step;
  ++g_cpp_calls;
  const at::Tensor& q = q_in;  // checked as given; heads() below may copy
  TORCH_CHECK(q.dim() == 3 && s.rows <= q.size(0) && layer >= 0 && layer < s.kv.size(0),
              "step_attention: the step has ", s.rows, " rows and ", s.kv.size(0),
              " layers; got q of shape ", q.sizes(), " for layer ", layer);
  const int64_t n = s.rows, padded = q.size(0);
  const int64_t Hq = q.size(1), D = q.size(2), S = s.kv.size(2), Hkv = s.kv.size(3),
                L = s.kv.size(4);
  TORCH_CHECK(s.kv.size(5) == D && Hq % Hkv == 0 && Hq / Hkv <= kMaxG && k_in.dim() == 3 &&
                  v_in.dim() == 3 && k_in.size(0) == padded && v_in.size(0) == padded &&
                  k_in.size(1) == Hkv && v_in.size(1) == Hkv && k_in.size(2) == D &&
                  v_in.size(2) == D,
              "step_attention: q, k, v do not match the cache's heads");
  // No ATen op between here and the output (a decode layer's work is ~10 us; each op's
  // dispatch and allocation cost 1-3): q widened to fp32, k and v rounded to the cache's
  // dtype and the output to q's by convert(), as Tensor.to() does.
  thread_local std::vector<float> qbuf, obuf;
  qbuf.resize(n * Hq * D);
  obuf.resize(n * Hq * D);
  // a row's heads one after another, as the graph's views of its projections are (rows
  // may be strided); anything else is copied first
  auto heads = [D](const at::Tensor& x) {
    return x.stride(2) == 1 && x.stride(1) == D ? x : x.contiguous();
  };
  const at::Tensor qh = heads(q_in), k = heads(k_in), v = heads(v_in);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "step_q", [&] {
    for (int64_t t = 0; t < n; ++t)
      convert(qbuf.data() + t * Hq * D, qh.data_ptr<scalar_t>() + t * qh.stride(0), Hq * D);
  });
  const int64_t* ss = s.store_slot.data_ptr<int64_t>();
  const int64_t* sp = s.store_pos.data_ptr<int64_t>();
  auto run = [&](auto* cache) {
    using KV = std::remove_pointer_t<decltype(cache)>;
    KV* kp = cache + layer * 2 * S * Hkv * L * D;
    KV* vp = kp + S * Hkv * L * D;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, k.scalar_type(), "step_kv", [&] {
      TORCH_CHECK(v.scalar_type() == k.scalar_type(), "step_attention: k and v dtypes differ");
      for (int64_t t = 0; t < n; ++t)
        for (int64_t h = 0; h < Hkv; ++h) {
          const int64_t dst = ((ss[t] * Hkv + h) * L + sp[t]) * D;
          convert(kp + dst, k.data_ptr<scalar_t>() + t * k.stride(0) + h * D, D);
          convert(vp + dst, v.data_ptr<scalar_t>() + t * v.stride(0) + h * D, D);
        }
    });
    Args<KV> a{qbuf.data(), kp, vp, s.slot.data_ptr<int64_t>(), s.prefix.data_ptr<int64_t>(),
               s.offsets.data_ptr<int64_t>(), s.extra.data_ptr<int64_t>(), obuf.data(), Hq,
               Hkv, L, D, static_cast<float>(scale)};
    attend(a, n, s.keys);
  };
  if (s.kv.scalar_type() == at::kHalf) run(s.kv.data_ptr<at::Half>());
  else run(s.kv.data_ptr<float>());
  // in q's dtype, padding rows zero
  at::Tensor out = at::empty({padded, Hq, D}, q.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "step_out", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    convert(o, obuf.data(), n * Hq * D);
    std::fill(o + n * Hq * D, o + padded * Hq * D, static_cast<scalar_t>(0.0f));
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(mtpserve_rows, lib) {
  lib.def("row_attention(Tensor q, Tensor kv, Tensor slot, Tensor prefix, Tensor offsets, "
          "Tensor extra, float scale) -> Tensor");
  lib.def("write_row_attention(Tensor q, Tensor k, Tensor v, Tensor(a!) kv, Tensor store_slot, "
          "Tensor store_pos, Tensor slot, Tensor prefix, Tensor offsets, Tensor extra, "
          "float scale) -> Tensor");
  lib.def("isa() -> int", &isa);
  lib.def("step_attention(Tensor q, Tensor k, Tensor v, int layer, float scale) -> Tensor");
  lib.def("set_step_rows(Tensor kv, Tensor store_slot, Tensor store_pos, Tensor slot, "
          "Tensor prefix, Tensor offsets, Tensor extra, int rows) -> ()", &set_step_rows);
  lib.def("clear_step_rows() -> ()", &clear_step_rows);
  lib.def("step_rows_calls() -> int", &step_rows_calls);
}

TORCH_LIBRARY_IMPL(mtpserve_rows, CPU, lib) {
  lib.impl("row_attention", &row_attention);
  lib.impl("write_row_attention", &write_row_attention);
  lib.impl("step_attention", &step_attention);
}
