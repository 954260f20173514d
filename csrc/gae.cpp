// vrpo_fast._C: generalised advantage estimation (GAE) over [B, T] CPU buffers.
//
// No torch headers: Python passes raw data pointers (tensor.data_ptr()), sizes and element strides,
// so the inputs are read in place (zero copy) whatever their layout. Outputs are contiguous [B, T]
// buffers allocated by the caller.
//
// Semantics (per row, t = T-1 .. 0; masked tokens are transparent):
//   if mask[t] != 0:  run = r[t] + gamma * next_v - v[t] + gamma * lam * run
//                     next_v = v[t];  adv[t] = run;  ret[t] = run + v[t]
//   else:             adv[t] = ret[t] = 0   (next_v and run carried across unchanged)
// with next_v = run = 0 after the last unmasked token (terminal).
//
// Whitening (optional): mean / unbiased variance over all unmasked advantages of the batch. Each row's
// (count, mean, M2) is accumulated in float64 during the first pass (inside the SSE recursion on the
// fast path, else in a sweep over the row just written, still in cache); rows are merged in row order
// (Chan et al.), so the result does not depend on the thread count; a second sweep rescales.
//
// Arithmetic is in the input dtype (float32 like the Triton kernel and the usual PyTorch loops;
// float64 for float64), in the same operation order on every path, without FMA contraction on x86.
// Fast path (x86-64, float32, C-contiguous inputs): SSE2 over tiles of 4 rows x 4 time steps -- the
// tile is transposed so that one vector holds one time step of 4 rows, and the 4 recursions advance
// together, with validation folded into the same loads. Everything else: scalar code with several
// rows interleaved (independent dependency chains), validation in separate sweeps over each row.
#include <pybind11/pybind11.h>

#include "common.h"

#if defined(__SSE2__)
#include <emmintrin.h>
#define VRPO_GAE_SSE2 1
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <system_error>
#include <thread>
#include <type_traits>
#include <vector>

namespace py = pybind11;

namespace {

// dtype codes shared with vrpo_fast/ops/gae.py (_VALUE_CODES / _MASK_CODES).
enum ValueCode : int { kF32 = 0, kF64 = 1 };
// kBool: torch.bool (one byte, 0/1 guaranteed: never checked); kU8: uint8 (checked for 0/1).
enum MaskCode : int { kU8 = 0, kI8 = 1, kI16 = 2, kI32 = 3, kI64 = 4, kMF32 = 5, kMF64 = 6, kBool = 7 };

// Below this many elements per thread, starting a thread costs more than it saves.
constexpr int64_t kMinElementsPerThread = 1 << 15;

struct Problem {
    const void* rewards;
    const void* values;
    const void* mask;
    void* advantages;
    void* returns;
    int64_t B, T;
    int64_t rs0, rs1, vs0, vs1, ms0, ms1;  // element strides (row, time)
    double gamma, gamma_lam;
    bool whiten, validate, check_mask, flat;
};

struct RowStats {
    double count = 0.0, mean = 0.0, m2 = 0.0;
};

struct Flags {
    bool bad_rewards = false, bad_values = false, bad_mask = false;
};

template <typename M>
inline bool mask_on(M m) { return m != M(0); }

// ---- validation: separate sweeps over a row (vectorisable; the row then sits in cache for the
// recursion), so the recursion loop itself carries no checks.
// IEEE-754 layout per float type: the same-size unsigned integer and the exponent mask (a value is
// inf or NaN exactly when its exponent bits are all ones).
template <typename V> struct FloatBits;
template <> struct FloatBits<float> { using U = uint32_t; static constexpr U kExp = 0x7f800000u; };
template <> struct FloatBits<double> { using U = uint64_t; static constexpr U kExp = 0x7ff0000000000000ull; };

template <typename V>
inline bool any_nonfinite(const V* x, int64_t n, int64_t stride) {
    using U = typename FloatBits<V>::U;
    U bad = 0;
    if (stride == 1) {  // bit test: branch-free, vectorisable
        for (int64_t t = 0; t < n; ++t) {
            U bits;
            std::memcpy(&bits, x + t, sizeof bits);
            bad |= static_cast<U>((bits & FloatBits<V>::kExp) == FloatBits<V>::kExp);
        }
    } else {
        for (int64_t t = 0; t < n; ++t) bad |= static_cast<U>(!std::isfinite(x[t * stride]));
    }
    return bad != 0;
}

template <typename M>
bool any_not_01(const M* m, int64_t n, int64_t stride) {
    uint32_t bad = 0;
    for (int64_t t = 0; t < n; ++t) {
        const M x = m[t * stride];
        bad |= static_cast<uint32_t>(x != M(0) && x != M(1));
    }
    return bad != 0;
}

template <typename V, typename M>
void validate_row(const Problem& p, int64_t b, Flags& flags) {
    flags.bad_rewards |= any_nonfinite(static_cast<const V*>(p.rewards) + b * p.rs0, p.T, p.rs1);
    flags.bad_values |= any_nonfinite(static_cast<const V*>(p.values) + b * p.vs0, p.T, p.vs1);
    if (p.check_mask) flags.bad_mask |= any_not_01(static_cast<const M*>(p.mask) + b * p.ms0, p.T, p.ms1);
}

// ---- the recursion. R rows at once: R independent chains interleaved, so the latency of one row's
// multiply-add chain hides behind the others. FLAT: every input is C-contiguous [B, T] like the
// outputs, so one index addresses all five buffers (keeps the pointers in registers).
template <typename V, typename M, int R, bool FLAT>
void gae_rows(const Problem& p, int64_t b0) {
    const V* r = static_cast<const V*>(p.rewards);
    const V* v = static_cast<const V*>(p.values);
    const M* m = static_cast<const M*>(p.mask);
    V* adv = static_cast<V*>(p.advantages);
    V* ret = static_cast<V*>(p.returns);
    const int64_t T = p.T;
    const V gamma = static_cast<V>(p.gamma), gl = static_cast<V>(p.gamma_lam);
    // Input offsets of element (row, t) are in_row[i] + t * s (FLAT: s = 1, all tensors alike).
    int64_t r_row[R], v_row[R], m_row[R], out_row[R];
    for (int i = 0; i < R; ++i) {
        out_row[i] = (b0 + i) * T;
        r_row[i] = FLAT ? out_row[i] : (b0 + i) * p.rs0;
        v_row[i] = FLAT ? out_row[i] : (b0 + i) * p.vs0;
        m_row[i] = FLAT ? out_row[i] : (b0 + i) * p.ms0;
    }
    const int64_t rs = FLAT ? 1 : p.rs1, vs = FLAT ? 1 : p.vs1, ms = FLAT ? 1 : p.ms1;

    V next_v[R], run[R];
    for (int i = 0; i < R; ++i) next_v[i] = run[i] = V(0);
    for (int64_t t = T - 1; t >= 0; --t) {
        for (int i = 0; i < R; ++i) {
            const V rt = r[r_row[i] + t * rs];
            const V vt = v[v_row[i] + t * vs];
            V a = V(0), rv = V(0);
            if (mask_on(m[m_row[i] + t * ms])) {
                run[i] = (rt + gamma * next_v[i] - vt) + gl * run[i];
                next_v[i] = vt;
                a = run[i];
                rv = run[i] + vt;
            }
            adv[out_row[i] + t] = a;
            ret[out_row[i] + t] = rv;
        }
    }
}

#ifdef VRPO_GAE_SSE2
// 4 mask entries -> 4 bytes (byte k = entry k != 0); `bad` collects entries that are not 0/1.
template <typename M>
inline uint32_t mask_bytes(const M* m, uint32_t& bad) {
    uint32_t w = 0;
    for (int k = 0; k < 4; ++k) {
        bad |= static_cast<uint32_t>(m[k] != M(0) && m[k] != M(1));
        w |= static_cast<uint32_t>(m[k] != M(0)) << (8 * k);
    }
    return w;
}

template <>
inline uint32_t mask_bytes<uint8_t>(const uint8_t* m, uint32_t& bad) {
    uint32_t w;
    std::memcpy(&w, m, sizeof w);
    bad |= w & 0xfefefefeu;  // any bit above bit 0 in any byte
    return w;
}

// One time step of 4 rows (lanes). `off`: all-ones lanes are masked (transparent). The operation
// order matches the scalar path exactly; selects are bitwise, so masked garbage never leaks in.
inline void sse_step(__m128 rt, __m128 vt, __m128 off, __m128 gamma, __m128 gl, __m128& next_v, __m128& run,
                     __m128& a, __m128& rv) {
    const __m128 cand = _mm_add_ps(_mm_sub_ps(_mm_add_ps(rt, _mm_mul_ps(gamma, next_v)), vt), _mm_mul_ps(gl, run));
    run = _mm_or_ps(_mm_and_ps(off, run), _mm_andnot_ps(off, cand));
    next_v = _mm_or_ps(_mm_and_ps(off, next_v), _mm_andnot_ps(off, vt));
    a = _mm_andnot_ps(off, run);
    rv = _mm_andnot_ps(off, _mm_add_ps(run, vt));
}

// Lanes whose float is inf or NaN (exponent all ones), as an integer mask.
inline __m128i nonfinite_lanes(__m128 x) {
    const __m128i exp_mask = _mm_set1_epi32(0x7f800000);
    return _mm_cmpeq_epi32(_mm_and_si128(_mm_castps_si128(x), exp_mask), exp_mask);
}

// Rows b0 .. b0+3 of a FLAT float32 problem (T >= 1). STATS: also each row's (count, mean, M2) for
// the whitening, accumulated in float64 inside the same loop (the recursion is latency-bound, so
// the extra adds ride along nearly free); written to stats[0..3].
template <typename M, bool VALIDATE, bool STATS>
void gae_rows4_sse(const Problem& p, int64_t b0, Flags& flags, RowStats* stats) {
    const int64_t T = p.T;
    const float* r = static_cast<const float*>(p.rewards) + b0 * T;
    const float* v = static_cast<const float*>(p.values) + b0 * T;
    const M* m = static_cast<const M*>(p.mask) + b0 * T;
    float* adv = static_cast<float*>(p.advantages) + b0 * T;
    float* ret = static_cast<float*>(p.returns) + b0 * T;
    const float gamma_s = static_cast<float>(p.gamma), gl_s = static_cast<float>(p.gamma_lam);
    const bool check_mask = VALIDATE && p.check_mask;

    // The last T % 4 steps, scalar (same operations), then the 4-step tiles down to t = 0.
    alignas(16) float nv_s[4] = {0.f, 0.f, 0.f, 0.f}, run_s[4] = {0.f, 0.f, 0.f, 0.f};
    const int64_t tiled = T & ~int64_t(3);
    bool bad_r = false, bad_v = false, bad_m = false;
    double tail_s1[4] = {0.0, 0.0, 0.0, 0.0}, tail_s2[4] = {0.0, 0.0, 0.0, 0.0};
    int64_t on_count[4] = {0, 0, 0, 0};
    for (int64_t t = T - 1; t >= tiled; --t) {
        for (int i = 0; i < 4; ++i) {
            const int64_t o = i * T + t;
            const float rt = r[o], vt = v[o];
            if (VALIDATE) {
                bad_r |= !std::isfinite(rt);
                bad_v |= !std::isfinite(vt);
                bad_m |= check_mask && m[o] != M(0) && m[o] != M(1);
            }
            float a = 0.f, rv = 0.f;
            if (mask_on(m[o])) {
                run_s[i] = (rt + gamma_s * nv_s[i] - vt) + gl_s * run_s[i];
                nv_s[i] = vt;
                a = run_s[i];
                rv = run_s[i] + vt;
                if (STATS) {
                    tail_s1[i] += static_cast<double>(a);
                    tail_s2[i] += static_cast<double>(a) * static_cast<double>(a);
                    on_count[i] += 1;
                }
            }
            adv[o] = a;
            ret[o] = rv;
        }
    }
    // Statistics: float lanes over at most kFlush tiles (64 values per lane: rounding error ~1e-6 of
    // the block sum), then added into float64 accumulators.
    constexpr int kFlush = 16;
    __m128 f1[4], f2[4];
    __m128d s1[4], s2[4];
    for (int i = 0; i < 4; ++i) {
        f1[i] = f2[i] = _mm_setzero_ps();
        s1[i] = s2[i] = _mm_setzero_pd();
    }
    int pending = 0;
    __m128i masked = _mm_setzero_si128();
    const auto flush = [&]() {
        for (int i = 0; i < 4; ++i) {
            s1[i] = _mm_add_pd(s1[i], _mm_add_pd(_mm_cvtps_pd(f1[i]), _mm_cvtps_pd(_mm_movehl_ps(f1[i], f1[i]))));
            s2[i] = _mm_add_pd(s2[i], _mm_add_pd(_mm_cvtps_pd(f2[i]), _mm_cvtps_pd(_mm_movehl_ps(f2[i], f2[i]))));
            f1[i] = f2[i] = _mm_setzero_ps();
        }
        pending = 0;
    };

    const __m128 gamma = _mm_set1_ps(gamma_s), gl = _mm_set1_ps(gl_s);
    __m128 next_v = _mm_load_ps(nv_s), run = _mm_load_ps(run_s);
    __m128i bad_rv = _mm_setzero_si128(), bad_vv = _mm_setzero_si128();
    uint32_t bad_mw = 0;
    const __m128i zero = _mm_setzero_si128();
    for (int64_t t0 = tiled - 4; t0 >= 0; t0 -= 4) {
        // Rows in, time steps out: after the transpose, rk / vk hold step t0 + k of the 4 rows.
        __m128 r0 = _mm_loadu_ps(r + t0), r1 = _mm_loadu_ps(r + T + t0);
        __m128 r2 = _mm_loadu_ps(r + 2 * T + t0), r3 = _mm_loadu_ps(r + 3 * T + t0);
        __m128 v0 = _mm_loadu_ps(v + t0), v1 = _mm_loadu_ps(v + T + t0);
        __m128 v2 = _mm_loadu_ps(v + 2 * T + t0), v3 = _mm_loadu_ps(v + 3 * T + t0);
        if (VALIDATE) {
            bad_rv = _mm_or_si128(bad_rv, _mm_or_si128(_mm_or_si128(nonfinite_lanes(r0), nonfinite_lanes(r1)),
                                                       _mm_or_si128(nonfinite_lanes(r2), nonfinite_lanes(r3))));
            bad_vv = _mm_or_si128(bad_vv, _mm_or_si128(_mm_or_si128(nonfinite_lanes(v0), nonfinite_lanes(v1)),
                                                       _mm_or_si128(nonfinite_lanes(v2), nonfinite_lanes(v3))));
        }
        _MM_TRANSPOSE4_PS(r0, r1, r2, r3);
        _MM_TRANSPOSE4_PS(v0, v1, v2, v3);
        uint32_t mbad = 0;
        const uint32_t w0 = mask_bytes(m + t0, mbad), w1 = mask_bytes(m + T + t0, mbad);
        const uint32_t w2 = mask_bytes(m + 2 * T + t0, mbad), w3 = mask_bytes(m + 3 * T + t0, mbad);
        if (check_mask) bad_mw |= mbad;
        // Byte k of lane i is 0xff where row i is masked at step t0 + k; spread byte k over the lane.
        const __m128i off_bytes = _mm_cmpeq_epi8(_mm_set_epi32(int(w3), int(w2), int(w1), int(w0)), zero);
        const __m128 off3 = _mm_castsi128_ps(_mm_srai_epi32(off_bytes, 24));
        const __m128 off2 = _mm_castsi128_ps(_mm_srai_epi32(_mm_slli_epi32(off_bytes, 8), 24));
        const __m128 off1 = _mm_castsi128_ps(_mm_srai_epi32(_mm_slli_epi32(off_bytes, 16), 24));
        const __m128 off0 = _mm_castsi128_ps(_mm_srai_epi32(_mm_slli_epi32(off_bytes, 24), 24));
        __m128 a0, a1, a2, a3, x0, x1, x2, x3;
        sse_step(r3, v3, off3, gamma, gl, next_v, run, a3, x3);
        sse_step(r2, v2, off2, gamma, gl, next_v, run, a2, x2);
        sse_step(r1, v1, off1, gamma, gl, next_v, run, a1, x1);
        sse_step(r0, v0, off0, gamma, gl, next_v, run, a0, x0);
        _MM_TRANSPOSE4_PS(a0, a1, a2, a3);
        _MM_TRANSPOSE4_PS(x0, x1, x2, x3);
        if (STATS) {
            const __m128 rows[4] = {a0, a1, a2, a3};
            for (int i = 0; i < 4; ++i) {
                f1[i] = _mm_add_ps(f1[i], rows[i]);
                f2[i] = _mm_add_ps(f2[i], _mm_mul_ps(rows[i], rows[i]));
            }
            // Masked steps per row (lane = row): each all-ones "off" lane subtracts -1.
            masked = _mm_sub_epi32(_mm_sub_epi32(masked, _mm_castps_si128(off0)), _mm_castps_si128(off1));
            masked = _mm_sub_epi32(_mm_sub_epi32(masked, _mm_castps_si128(off2)), _mm_castps_si128(off3));
            if (++pending == kFlush) flush();
        }
        _mm_storeu_ps(adv + t0, a0);
        _mm_storeu_ps(adv + T + t0, a1);
        _mm_storeu_ps(adv + 2 * T + t0, a2);
        _mm_storeu_ps(adv + 3 * T + t0, a3);
        _mm_storeu_ps(ret + t0, x0);
        _mm_storeu_ps(ret + T + t0, x1);
        _mm_storeu_ps(ret + 2 * T + t0, x2);
        _mm_storeu_ps(ret + 3 * T + t0, x3);
    }
    if (STATS) flush();
    if (STATS) {
        alignas(16) int32_t masked_steps[4];
        _mm_store_si128(reinterpret_cast<__m128i*>(masked_steps), masked);
        for (int i = 0; i < 4; ++i) on_count[i] += tiled - masked_steps[i];
        for (int i = 0; i < 4; ++i) {
            alignas(16) double a1[2], a2[2];
            _mm_store_pd(a1, s1[i]);
            _mm_store_pd(a2, s2[i]);
            const double sum = (a1[0] + a1[1]) + tail_s1[i], sq = (a2[0] + a2[1]) + tail_s2[i];
            RowStats& st = stats[i];
            st.count = static_cast<double>(on_count[i]);
            st.mean = st.count > 0.0 ? sum / st.count : 0.0;
            st.m2 = std::max(0.0, sq - sum * st.mean);
        }
    }
    if (VALIDATE) {
        flags.bad_rewards |= bad_r || _mm_movemask_epi8(bad_rv) != 0;
        flags.bad_values |= bad_v || _mm_movemask_epi8(bad_vv) != 0;
        flags.bad_mask |= bad_m || bad_mw != 0;
    }
}
#endif  // VRPO_GAE_SSE2

// (count, mean, M2 about the row mean) of a row's unmasked advantages as stored (what gets
// whitened); two sweeps over the row just written, so from cache. Four partial sums per quantity
// break the floating-point add chains (the compiler may not reassociate them itself).
template <typename V, typename M>
RowStats row_stats(const Problem& p, int64_t b) {
    const M* m = static_cast<const M*>(p.mask) + b * p.ms0;
    const V* adv = static_cast<const V*>(p.advantages) + b * p.T;
    const int64_t ms = p.ms1, T = p.T, T4 = T & ~int64_t(3);
    double sum[4] = {0.0, 0.0, 0.0, 0.0}, count[4] = {0.0, 0.0, 0.0, 0.0};
    for (int64_t t = 0; t < T4; t += 4)
        for (int k = 0; k < 4; ++k) {
            sum[k] += static_cast<double>(adv[t + k]);  // masked entries are exactly 0
            count[k] += mask_on(m[(t + k) * ms]) ? 1.0 : 0.0;
        }
    for (int64_t t = T4; t < T; ++t) {
        sum[0] += static_cast<double>(adv[t]);
        count[0] += mask_on(m[t * ms]) ? 1.0 : 0.0;
    }
    RowStats s;
    s.count = (count[0] + count[1]) + (count[2] + count[3]);
    s.mean = s.count > 0.0 ? ((sum[0] + sum[1]) + (sum[2] + sum[3])) / s.count : 0.0;
    double m2[4] = {0.0, 0.0, 0.0, 0.0};
    for (int64_t t = 0; t < T4; t += 4)
        for (int k = 0; k < 4; ++k) {
            const double d = static_cast<double>(adv[t + k]) - s.mean;
            m2[k] += mask_on(m[(t + k) * ms]) ? d * d : 0.0;
        }
    for (int64_t t = T4; t < T; ++t) {
        const double d = static_cast<double>(adv[t]) - s.mean;
        m2[0] += mask_on(m[t * ms]) ? d * d : 0.0;
    }
    s.m2 = (m2[0] + m2[1]) + (m2[2] + m2[3]);
    return s;
}

// Contiguous rows with a one-byte mask (bool / uint8, the usual case): statistics and whitening on
// 16-lane vectors (multiversioned: AVX-512 / AVX2 / baseline; common.h), one sweep each, float64
// arithmetic. The per-row moments come from the sum and the sum of squares in float64 (then merged
// across rows as above): for float32 / float64 advantages of one row that loses nothing that
// matters at the output precision.
using vrpo::vf32;
using vrpo::vi32;
using vrpo::vload;
using vrpo::vstore;
typedef double vf64x16 __attribute__((vector_size(128)));
typedef int64_t vi64x16 __attribute__((vector_size(128)));
typedef uint8_t vu8x16 __attribute__((vector_size(16)));

template <typename V>
inline vf64x16 load16_f64(const V* x) {
    if constexpr (std::is_same<V, float>::value) {
        return __builtin_convertvector(vload(x), vf64x16);
    } else {
        vf64x16 d;
        std::memcpy(&d, x, sizeof d);
        return d;
    }
}

inline vi32 load16_mask_on(const uint8_t* m) {  // -1 where the mask is on, 0 elsewhere
    vu8x16 b;
    std::memcpy(&b, m, sizeof b);
    return __builtin_convertvector(b, vi32) != 0;
}

template <typename V>
VRPO_MULTIVERSION RowStats row_stats_flat_u8(const V* adv, const uint8_t* m, int64_t T) {
    vf64x16 s1 = {}, s2 = {};
    vi32 cnt = {};
    const int64_t T16 = T & ~int64_t(15);
    for (int64_t t = 0; t < T16; t += 16) {
        const vf64x16 a = load16_f64(adv + t);  // masked entries are exactly 0
        s1 += a;
        s2 += a * a;
        cnt -= load16_mask_on(m + t);
    }
    double sum = 0.0, sq = 0.0, count = 0.0;
    for (int k = 0; k < 16; ++k) {
        sum += s1[k];
        sq += s2[k];
        count += static_cast<double>(cnt[k]);
    }
    for (int64_t t = T16; t < T; ++t) {
        const double a = static_cast<double>(adv[t]);
        sum += a;
        sq += a * a;
        count += m[t] != 0 ? 1.0 : 0.0;
    }
    RowStats r;
    r.count = count;
    r.mean = count > 0.0 ? sum / count : 0.0;
    r.m2 = std::max(0.0, sq - sum * r.mean);
    return r;
}

template <typename V>
VRPO_MULTIVERSION void whiten_flat_u8(V* adv, const uint8_t* m, int64_t T, double mean, double inv_std,
                                      double add_back) {
    int64_t t = 0;
#ifdef VRPO_GAE_SSE2
    if (std::is_same<V, float>::value) {
        float* a = reinterpret_cast<float*>(adv);
        // float32 arithmetic, (a - mean) * inv_std + add_back: the advantages are float32 already and
        // the subtraction is exact near the mean, so the error (a few ulp of the output, plus the
        // rounding of the mean) stays below the float32 recursion's own.
        const __m128 mu = _mm_set1_ps(static_cast<float>(mean)), scale = _mm_set1_ps(static_cast<float>(inv_std));
        const __m128 add = _mm_set1_ps(static_cast<float>(add_back));
        const __m128i zero = _mm_setzero_si128();
        for (; t + 16 <= T; t += 16) {
            // 16 mask bytes -> four 4-lane "on" masks (0xff bytes widened by unpacking with themselves).
            const __m128i on8 = _mm_xor_si128(_mm_cmpeq_epi8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(m + t)), zero),
                                              _mm_set1_epi8(-1));
            const __m128i on16lo = _mm_unpacklo_epi8(on8, on8), on16hi = _mm_unpackhi_epi8(on8, on8);
            const __m128i on32[4] = {_mm_unpacklo_epi16(on16lo, on16lo), _mm_unpackhi_epi16(on16lo, on16lo),
                                     _mm_unpacklo_epi16(on16hi, on16hi), _mm_unpackhi_epi16(on16hi, on16hi)};
            for (int k = 0; k < 4; ++k) {
                const __m128 w = _mm_add_ps(_mm_mul_ps(_mm_sub_ps(_mm_loadu_ps(a + t + 4 * k), mu), scale), add);
                _mm_storeu_ps(a + t + 4 * k, _mm_and_ps(w, _mm_castsi128_ps(on32[k])));
            }
        }
    }
#endif
    for (; t < T; ++t) {  // the same arithmetic as the vector body (float32 for float32)
        using A = typename std::conditional<std::is_same<V, float>::value, float, double>::type;
        const A w = (static_cast<A>(adv[t]) - static_cast<A>(mean)) * static_cast<A>(inv_std) + static_cast<A>(add_back);
        adv[t] = m[t] != 0 ? static_cast<V>(w) : V(0);
    }
}

// Rows [lo, hi): validation, recursion (groups of kInterleave rows when FLAT), statistics.
constexpr int kInterleave = 4;

template <typename V, typename M>
void gae_row_range(const Problem& p, int64_t lo, int64_t hi, RowStats* stats, Flags& flags) {
    int64_t b = lo;
    while (b < hi) {
        const int64_t n = p.flat ? std::min<int64_t>(kInterleave, hi - b) : 1;
#ifdef VRPO_GAE_SSE2
        if (std::is_same<V, float>::value && n == 4) {
            if (stats != nullptr) {
                if (p.validate) gae_rows4_sse<M, true, true>(p, b, flags, stats + b);
                else gae_rows4_sse<M, false, true>(p, b, flags, stats + b);
            } else {
                if (p.validate) gae_rows4_sse<M, true, false>(p, b, flags, nullptr);
                else gae_rows4_sse<M, false, false>(p, b, flags, nullptr);
            }
            b += n;
            continue;
        }
#endif
        {
            if (p.validate)
                for (int64_t i = 0; i < n; ++i) validate_row<V, M>(p, b + i, flags);
            if (n == kInterleave)
                gae_rows<V, M, kInterleave, true>(p, b);
            else if (p.flat)
                for (int64_t i = 0; i < n; ++i) gae_rows<V, M, 1, true>(p, b + i);
            else
                gae_rows<V, M, 1, false>(p, b);
        }
        if (stats != nullptr)
            for (int64_t i = 0; i < n; ++i) {
                if (std::is_same<M, uint8_t>::value && p.ms1 == 1)
                    stats[b + i] = row_stats_flat_u8<V>(static_cast<const V*>(p.advantages) + (b + i) * p.T,
                                                        reinterpret_cast<const uint8_t*>(p.mask) + (b + i) * p.ms0, p.T);
                else
                    stats[b + i] = row_stats<V, M>(p, b + i);
            }
        b += n;
    }
}

template <typename V, typename M>
void whiten_row(const Problem& p, int64_t b, double mean, double inv_std, double add_back) {
    const M* m = static_cast<const M*>(p.mask) + b * p.ms0;
    V* adv = static_cast<V*>(p.advantages) + b * p.T;
    const int64_t ms = p.ms1;
    for (int64_t t = 0; t < p.T; ++t) {
        const double w = (static_cast<double>(adv[t]) - mean) * inv_std + add_back;
        adv[t] = mask_on(m[t * ms]) ? static_cast<V>(w) : V(0);
    }
}

// Run fn(row_begin, row_end, thread_index) over [0, B) on n_threads threads (inline when 1).
template <typename Fn>
void parallel_rows(int64_t B, int n_threads, Fn fn) {
    if (n_threads <= 1) {
        fn(int64_t(0), B, 0);
        return;
    }
    std::vector<std::thread> workers;
    workers.reserve(n_threads - 1);
    // Slices in whole groups of kInterleave rows.
    const int64_t per = ((B + n_threads - 1) / n_threads + kInterleave - 1) / kInterleave * kInterleave;
    int started = 1;
    try {
        for (; started < n_threads; ++started) {
            const int64_t lo = std::min(B, started * per), hi = std::min(B, (started + 1) * per);
            const int i = started;
            workers.emplace_back([=, &fn] { fn(lo, hi, i); });
        }
    } catch (const std::system_error&) {
        // Could not start another thread: the calling thread does the remaining slices itself.
    }
    for (int i = started; i < n_threads; ++i) fn(std::min(B, i * per), std::min(B, (i + 1) * per), i);
    fn(int64_t(0), std::min(B, per), 0);  // the calling thread takes the first slice
    for (auto& w : workers) w.join();
}

template <typename V, typename M>
Flags run_gae(const Problem& p, int n_threads, bool shift_mean) {
    std::vector<RowStats> stats(p.whiten ? p.B : 0);
    std::vector<Flags> flags(n_threads);
    parallel_rows(p.B, n_threads, [&](int64_t lo, int64_t hi, int tid) {
        Flags f;
        gae_row_range<V, M>(p, lo, hi, p.whiten ? stats.data() : nullptr, f);
        flags[tid] = f;
    });
    Flags all;
    for (const Flags& f : flags) {
        all.bad_rewards |= f.bad_rewards;
        all.bad_values |= f.bad_values;
        all.bad_mask |= f.bad_mask;
    }
    if (!p.whiten || all.bad_rewards || all.bad_values || all.bad_mask) return all;

    // Merge per-row moments in row order (deterministic for any thread count).
    double n = 0.0, mean = 0.0, m2 = 0.0;
    for (const RowStats& s : stats) {
        if (s.count == 0.0) continue;
        const double n_new = n + s.count;
        const double delta = s.mean - mean;
        mean += delta * (s.count / n_new);
        m2 += s.m2 + delta * delta * (n * s.count / n_new);
        n = n_new;
    }
    if (n == 0.0) return all;  // every position masked: advantages are already all zero
    const double var = m2 / std::max(n - 1.0, 1.0);  // unbiased (Bessel), as TRL / verl
    const double inv_std = 1.0 / std::sqrt(var + 1e-8);
    const double add_back = shift_mean ? 0.0 : mean;
    parallel_rows(p.B, n_threads, [&](int64_t lo, int64_t hi, int) {
        // Last-written rows first: they are the ones still in this core's cache from the first pass.
        for (int64_t b = hi - 1; b >= lo; --b) {
            if (std::is_same<M, uint8_t>::value && p.ms1 == 1)
                whiten_flat_u8<V>(static_cast<V*>(p.advantages) + b * p.T,
                                  reinterpret_cast<const uint8_t*>(p.mask) + b * p.ms0, p.T, mean, inv_std, add_back);
            else
                whiten_row<V, M>(p, b, mean, inv_std, add_back);
        }
    });
    return all;
}

template <typename V>
Flags dispatch_mask(const Problem& p, int mask_code, int n_threads, bool shift_mean) {
    switch (mask_code) {
        case kBool:
        case kU8: return run_gae<V, uint8_t>(p, n_threads, shift_mean);
        case kI8: return run_gae<V, int8_t>(p, n_threads, shift_mean);
        case kI16: return run_gae<V, int16_t>(p, n_threads, shift_mean);
        case kI32: return run_gae<V, int32_t>(p, n_threads, shift_mean);
        case kI64: return run_gae<V, int64_t>(p, n_threads, shift_mean);
        case kMF32: return run_gae<V, float>(p, n_threads, shift_mean);
        case kMF64: return run_gae<V, double>(p, n_threads, shift_mean);
        default: throw py::type_error("gae_forward: unsupported mask dtype code " + std::to_string(mask_code));
    }
}

void gae_forward(uintptr_t rewards, uintptr_t values, uintptr_t mask, uintptr_t advantages, uintptr_t returns,
                 int64_t B, int64_t T, int64_t rs0, int64_t rs1, int64_t vs0, int64_t vs1, int64_t ms0, int64_t ms1,
                 int value_code, int mask_code, double gamma, double lam, bool whiten, bool shift_mean,
                 bool validate, int num_threads) {
    if (B < 0 || T < 0) throw py::value_error("gae_forward: negative size");
    if (!(gamma >= 0.0 && gamma <= 1.0)) throw py::value_error("gamma must be in [0, 1]");
    if (!(lam >= 0.0 && lam <= 1.0)) throw py::value_error("lam must be in [0, 1]");
    if (value_code != kF32 && value_code != kF64)
        throw py::type_error("gae_forward: unsupported value dtype code " + std::to_string(value_code));
    if (B == 0 || T == 0) return;
    if (!rewards || !values || !mask || !advantages || !returns) throw py::value_error("gae_forward: null pointer");

    // Strides of size-1 dimensions are arbitrary in torch; they never matter here.
    const auto row_major = [&](int64_t s0, int64_t s1) { return (T == 1 || s1 == 1) && (B == 1 || s0 == T); };
    const bool flat = row_major(rs0, rs1) && row_major(vs0, vs1) && row_major(ms0, ms1);
    Problem p{reinterpret_cast<const void*>(rewards), reinterpret_cast<const void*>(values),
              reinterpret_cast<const void*>(mask),    reinterpret_cast<void*>(advantages),
              reinterpret_cast<void*>(returns),       B, T, rs0, rs1, vs0, vs1, ms0, ms1,
              gamma, gamma * lam, whiten, validate, validate && mask_code != kBool, flat};

    // Threads: as requested, but never more than rows, nor more than one per kMinElementsPerThread.
    const int64_t by_work = std::max<int64_t>(1, (B * T) / kMinElementsPerThread);
    const int n_threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>({num_threads, B, by_work})));

    Flags flags;
    {
        py::gil_scoped_release release;
        flags = value_code == kF32 ? dispatch_mask<float>(p, mask_code, n_threads, shift_mean)
                                   : dispatch_mask<double>(p, mask_code, n_threads, shift_mean);
    }
    if (flags.bad_rewards) throw py::value_error("rewards contains NaN or inf");
    if (flags.bad_values) throw py::value_error("values contains NaN or inf");
    if (flags.bad_mask) throw py::value_error("mask must contain only 0 and 1 (or be a bool tensor)");
}

}  // namespace

void register_gae(py::module_& m) {
    m.def("gae_forward", &gae_forward,
          "GAE over [B, T] buffers given by address and element strides; writes contiguous advantages/returns.\n"
          "value_code: 0 float32, 1 float64. mask_code: 0 uint8, 1 int8, 2 int16, 3 int32, 4 int64,\n"
          "5 float32, 6 float64, 7 bool. Releases the GIL; with validate, raises ValueError on NaN/inf in\n"
          "rewards/values or a mask entry other than 0/1.",
          py::arg("rewards"), py::arg("values"), py::arg("mask"), py::arg("advantages"), py::arg("returns"),
          py::arg("B"), py::arg("T"), py::arg("rs0"), py::arg("rs1"), py::arg("vs0"), py::arg("vs1"), py::arg("ms0"),
          py::arg("ms1"), py::arg("value_code"), py::arg("mask_code"), py::arg("gamma"), py::arg("lam"),
          py::arg("whiten"), py::arg("shift_mean"), py::arg("validate"), py::arg("num_threads"));
    m.attr("GAE_ABI_VERSION") = 1;
}
