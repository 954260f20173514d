// Shared pieces of the vrpo_fast._C sources (no torch headers anywhere).
#pragma once

#include <pybind11/pybind11.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <system_error>
#include <thread>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace vrpo {

// Function multiversioning: the hot row loops are compiled for AVX-512 (x86-64-v4), AVX2 + FMA
// (x86-64-v3) and the baseline, and the loader picks one for the CPU at hand (GCC/Clang ifunc,
// Linux x86-64 only; elsewhere the baseline build is the only one). Arithmetic is never contracted
// into FMAs (-ffp-contract=off in setup.py), so every clone rounds exactly like the scalar code.
#if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__)) && \
    !defined(VRPO_NO_MULTIVERSION)
#define VRPO_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define VRPO_MULTIVERSION
#endif

#if defined(__GNUC__) || defined(__clang__)
#define VRPO_INLINE inline __attribute__((always_inline))
#else
#define VRPO_INLINE inline
#endif

// ---- element types (codes shared with the Python side: vrpo_fast/ops/_cpu_ext.py) ----
enum DtypeCode : int { kFloat32 = 0, kFloat64 = 1, kBFloat16 = 2, kFloat16 = 3 };

VRPO_INLINE uint32_t f32_bits(float x) { uint32_t u; std::memcpy(&u, &x, 4); return u; }
VRPO_INLINE float bits_f32(uint32_t u) { float x; std::memcpy(&x, &u, 4); return x; }
VRPO_INLINE uint64_t f64_bits(double x) { uint64_t u; std::memcpy(&u, &x, 8); return u; }
VRPO_INLINE double bits_f64(uint64_t u) { double x; std::memcpy(&x, &u, 8); return x; }

// Half-precision <-> float32 in integer/float registers (branch-free, so loops over them vectorise);
// exact widening, round-to-nearest-even narrowing, NaN kept NaN, overflow to inf -- like torch's .to().
VRPO_INLINE float bf16_to_f32(uint16_t h) { return bits_f32(static_cast<uint32_t>(h) << 16); }
VRPO_INLINE uint16_t f32_to_bf16(float x) {
    const uint32_t u = f32_bits(x);
    const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    const bool nan = (u & 0x7fffffffu) > 0x7f800000u;
    return static_cast<uint16_t>(nan ? ((u >> 16) | 0x40u) : rounded);
}
VRPO_INLINE float f16_to_f32(uint16_t h) {
    const uint32_t em = h & 0x7fffu, sign = static_cast<uint32_t>(h & 0x8000u) << 16;
    // em << 13 has the half's exponent in the float's exponent field, biased by 15 instead of 127:
    // one exact multiply by 2^112 rebiases normals and turns half subnormals into float normals.
    const float finite = bits_f32(em << 13) * 0x1p112f;
    const uint32_t mag = em >= 0x7c00u ? ((em << 13) | 0x7f800000u) : f32_bits(finite);
    return bits_f32(mag | sign);
}
VRPO_INLINE uint16_t f32_to_f16(float x) {
    const uint32_t u = f32_bits(x), sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
    // Normal halves: rebias the exponent and round the 13 dropped mantissa bits to nearest even.
    const uint32_t normal = (a + ((15u - 127u) << 23) + 0xfffu + ((a >> 13) & 1u)) >> 13;
    // Below 2^-14 (half subnormals): adding 0.5 aligns the value to the half subnormal ulp (2^-24),
    // so the FPU's own rounding is round-to-nearest-even; the offset from 0.5 is the half's bits.
    const uint32_t sub = f32_bits(bits_f32(a) + 0.5f) - f32_bits(0.5f);
    uint32_t h = a < 0x38800000u ? sub : normal;
    h = a >= 0x477ff000u ? 0x7c00u : h;  // rounds to >= 65520: inf
    h = a > 0x7f800000u ? 0x7e00u : h;   // NaN
    return static_cast<uint16_t>(h | sign);
}

// x, or +0 where `zero` (bit masking: no select on a store, so the loop still vectorises).
VRPO_INLINE float zero_if(bool zero, float x) { return bits_f32(f32_bits(x) & (static_cast<uint32_t>(zero) - 1u)); }
VRPO_INLINE double zero_if(bool zero, double x) { return bits_f64(f64_bits(x) & (static_cast<uint64_t>(zero) - 1u)); }

template <typename T> struct Elem;  // storage type -> compute type conversions
template <> struct Elem<float> {
    using C = float;
    static VRPO_INLINE float load(const float* p) { return *p; }
    static VRPO_INLINE void store(float* p, float v) { *p = v; }
};
template <> struct Elem<double> {
    using C = double;
    static VRPO_INLINE double load(const double* p) { return *p; }
    static VRPO_INLINE void store(double* p, double v) { *p = v; }
};
struct BF16 { uint16_t bits; };
struct F16 { uint16_t bits; };
template <> struct Elem<BF16> {
    using C = float;
    static VRPO_INLINE float load(const BF16* p) { return bf16_to_f32(p->bits); }
    static VRPO_INLINE void store(BF16* p, float v) { p->bits = f32_to_bf16(v); }
};
template <> struct Elem<F16> {
    using C = float;
    static VRPO_INLINE float load(const F16* p) { return f16_to_f32(p->bits); }
    static VRPO_INLINE void store(F16* p, float v) { p->bits = f32_to_f16(v); }
};

// exp() from basic IEEE operations (so that vectorised loop bodies and their scalar tails round
// alike, and the compiler can vectorise it): x = n ln2 + r, |r| <= ln2 / 2, exp(r) by a polynomial,
// 2^n by building the exponent bits. NaN propagates; large |x| saturates to 0 / inf.
VRPO_INLINE float exp_f32(float x) {
    x = x < -104.0f ? -104.0f : x;  // NaN compares false and passes through
    x = x > 89.0f ? 89.0f : x;
    const float shifter = 0x1.8p23f;  // adding it rounds to an integer (round-to-nearest)
    const float t = x * 0x1.715476p+0f + shifter;
    const float kf = t - shifter;
    const float r = (x - kf * 0x1.63p-1f) - kf * -2.12194440e-4f;  // Cody-Waite: k * ln2 in two parts
    float p = 0x1.a01a02p-13f;  // 1/7! .. 1/2!: Taylor, |error| < 2 ulp on |r| <= ln2 / 2
    p = p * r + 0x1.6c16c2p-10f;
    p = p * r + 0x1.111112p-7f;
    p = p * r + 0x1.555556p-5f;
    p = p * r + 0x1.555556p-3f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    // 2^k in two factors so k down to -150 (results into the subnormal range) stays representable.
    const int32_t k = static_cast<int32_t>(f32_bits(t) - f32_bits(shifter));  // = kf, no UB for NaN
    const int32_t k1 = k >> 1, k2 = k - k1;
    return p * bits_f32(static_cast<uint32_t>(k1 + 127) << 23) * bits_f32(static_cast<uint32_t>(k2 + 127) << 23);
}

VRPO_INLINE double exp_f64(double x) {
    x = x < -746.0 ? -746.0 : x;
    x = x > 710.0 ? 710.0 : x;
    const double shifter = 0x1.8p52;
    const double t = x * 0x1.71547652b82fep+0 + shifter;
    const double kf = t - shifter;
    const double r = (x - kf * 0x1.62e42fee00000p-1) - kf * 0x1.a39ef35793c76p-33;
    double p = 1.0 / 479001600.0;  // 1/12! .. 1/2!
    p = p * r + 1.0 / 39916800.0;
    p = p * r + 1.0 / 3628800.0;
    p = p * r + 1.0 / 362880.0;
    p = p * r + 1.0 / 40320.0;
    p = p * r + 1.0 / 5040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    const int64_t k = static_cast<int64_t>(f64_bits(t) - f64_bits(shifter));
    const int64_t k1 = k >> 1, k2 = k - k1;
    return p * bits_f64(static_cast<uint64_t>(k1 + 1023) << 52) * bits_f64(static_cast<uint64_t>(k2 + 1023) << 52);
}

template <typename C> VRPO_INLINE C exp_c(C x);
template <> VRPO_INLINE float exp_c<float>(float x) { return exp_f32(x); }
template <> VRPO_INLINE double exp_c<double>(double x) { return exp_f64(x); }

// ---- 16-lane float32 vectors (GCC/Clang vector extensions): each multiversioned clone lowers them
// to its own ISA (one AVX-512 register, two AVX2 registers, four SSE2 registers), so the hot loops
// are vectorised by construction rather than by the auto-vectoriser's judgement.
constexpr int kVec = 16;
typedef float vf32 __attribute__((vector_size(64)));
typedef int32_t vi32 __attribute__((vector_size(64)));
typedef uint32_t vu32 __attribute__((vector_size(64)));
typedef uint16_t vu16 __attribute__((vector_size(32)));

VRPO_INLINE vf32 vsplat(float x) { return vf32{} + x; }
VRPO_INLINE vf32 vload(const float* p) { vf32 v; std::memcpy(&v, p, sizeof v); return v; }
VRPO_INLINE void vstore(float* p, vf32 v) { std::memcpy(p, &v, sizeof v); }
VRPO_INLINE vf32 vmax(vf32 a, vf32 b) { return a > b ? a : b; }  // NaN in a: b

// The scalar formulas above, lane by lane, in the same operation order.
VRPO_INLINE vf32 vexp(vf32 x) {
    x = x < -104.0f ? vsplat(-104.0f) : x;
    x = x > 89.0f ? vsplat(89.0f) : x;
    const vf32 shifter = vsplat(0x1.8p23f);
    const vf32 t = x * 0x1.715476p+0f + shifter;
    const vf32 kf = t - shifter;
    const vf32 r = (x - kf * 0x1.63p-1f) - kf * -2.12194440e-4f;
    vf32 p = vsplat(0x1.a01a02p-13f);
    p = p * r + 0x1.6c16c2p-10f;
    p = p * r + 0x1.111112p-7f;
    p = p * r + 0x1.555556p-5f;
    p = p * r + 0x1.555556p-3f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    const vi32 k = reinterpret_cast<vi32>(reinterpret_cast<vu32>(t) - f32_bits(0x1.8p23f));
    const vi32 k1 = k >> 1, k2 = k - k1;
    return p * reinterpret_cast<vf32>((k1 + 127) << 23) * reinterpret_cast<vf32>((k2 + 127) << 23);
}

template <typename T> struct VElem;
template <> struct VElem<float> {
    static VRPO_INLINE vf32 load(const float* p) { return vload(p); }
    static VRPO_INLINE void store(float* p, vf32 v) { vstore(p, v); }
};
template <> struct VElem<BF16> {
    static VRPO_INLINE vf32 load(const BF16* p) {
        vu16 h;
        std::memcpy(&h, p, sizeof h);
        return reinterpret_cast<vf32>(__builtin_convertvector(h, vu32) << 16);
    }
    static VRPO_INLINE void store(BF16* p, vf32 v) {
        const vu32 u = reinterpret_cast<vu32>(v);
        const vu32 rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
        const vu32 out = (u & 0x7fffffffu) > 0x7f800000u ? ((u >> 16) | 0x40u) : rounded;
        const vu16 h = __builtin_convertvector(out, vu16);
        std::memcpy(p, &h, sizeof h);
    }
};
template <> struct VElem<F16> {
    static VRPO_INLINE vf32 load(const F16* p) {
        vu16 h16;
        std::memcpy(&h16, p, sizeof h16);
        const vu32 h = __builtin_convertvector(h16, vu32);
        const vu32 em = h & 0x7fffu, sign = (h & 0x8000u) << 16;
        const vf32 finite = reinterpret_cast<vf32>(em << 13) * 0x1p112f;
        const vu32 mag = em >= 0x7c00u ? ((em << 13) | 0x7f800000u) : reinterpret_cast<vu32>(finite);
        return reinterpret_cast<vf32>(mag | sign);
    }
    static VRPO_INLINE void store(F16* p, vf32 v) {
        const vu32 u = reinterpret_cast<vu32>(v), sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
        const vu32 normal = (a + ((15u - 127u) << 23) + 0xfffu + ((a >> 13) & 1u)) >> 13;
        const vu32 sub = reinterpret_cast<vu32>(reinterpret_cast<vf32>(a) + 0.5f) - f32_bits(0.5f);
        vu32 h = a < 0x38800000u ? sub : normal;
        h = a >= 0x477ff000u ? vu32{} + 0x7c00u : h;
        h = a > 0x7f800000u ? vu32{} + 0x7e00u : h;
        const vu16 out = __builtin_convertvector(h | sign, vu16);
        std::memcpy(p, &out, sizeof out);
    }
};

// ---- keyed noise: the C++ twin of vrpo_fast/ops/_random.py (keyed_hash / keyed_normal) ----
constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ull;
VRPO_INLINE uint64_t splitmix(uint64_t x) {
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}
VRPO_INLINE uint64_t hash_seed(uint64_t seed) { return splitmix(seed * kGolden + kGolden); }
VRPO_INLINE uint64_t hash_key(uint64_t h, uint64_t key) { return splitmix(h ^ splitmix(key + kGolden)); }
// keyed_hash(seed, k1, k2) = hash_combined(hash_key(hash_seed(seed), k1), splitmix(k2 + kGolden)).
VRPO_INLINE uint64_t hash_combined(uint64_t h, uint64_t mixed_key) { return splitmix(h ^ mixed_key); }

// N(0, 1) from a 64-bit hash: Box-Muller on two 23-bit uniforms, in float32 from +, -, *, / and
// exact bit manipulation only, in exactly the order of _random.keyed_normal, so both give the same
// bits on every machine (libm / SLEEF / vendor log, cos and sqrt differ in the last bit between
// implementations). The uniforms carry 23 bits, so float32 keeps all the information there is.
//
// One hash gives both Box-Muller outputs: `even` = radius cos(2 pi u2), `odd` = radius sin(2 pi u2)
// (independent standard normals); keyed_normal(seed, ..., c) is the even one of the hash of
// (seed, ..., c >> 1) when c is even, the odd one when c is odd.
VRPO_INLINE void keyed_normal_pair_f32(uint64_t h, float& even, float& odd) {
    const uint32_t b1 = static_cast<uint32_t>(h >> 41), b2 = static_cast<uint32_t>(h >> 17) & 0x7FFFFFu;
    // u = (2 b + 1) 2^-24 = (b + 1/2) 2^-23, exact in float32 (2 b + 1 < 2^24).
    const float u1 = static_cast<float>(static_cast<int32_t>(2u * b1 + 1u)) * 0x1p-24f;
    const float u2 = static_cast<float>(static_cast<int32_t>(2u * b2 + 1u)) * 0x1p-24f;
    // log(u1): u1 = f 2^e with f in [sqrt(1/2), sqrt(2)); log f = 2 atanh(s), s = (f - 1) / (f + 1).
    const uint32_t ub = f32_bits(u1);
    float f = bits_f32((ub & 0x007FFFFFu) | 0x3F000000u);  // [0.5, 1), like frexp
    int32_t e = static_cast<int32_t>(ub >> 23) - 126;
    const bool low = f < 0x1.6a09e6p-1f;
    f = low ? f * 2.0f : f;
    e = low ? e - 1 : e;
    const float s = (f - 1.0f) / (f + 1.0f), s2 = s * s;
    float p = 0x1.745d18p-4f;
    p = p * s2 + 0x1.c71c72p-4f;
    p = p * s2 + 0x1.24924ap-3f;
    p = p * s2 + 0x1.99999ap-3f;
    p = p * s2 + 0x1.555556p-2f;
    p = p * s2 + 1.0f;
    const float log_u1 = (2.0f * s) * p + static_cast<float>(e) * 0x1.62e430p-1f;
    // sqrt(-2 log u1): 1/sqrt by an exponent-halving bit estimate and 3 Newton steps
    // y <- y (1.5 - x/2 y^2) (no divisions), times x.
    const float r2 = -2.0f * log_u1, half_r2 = 0.5f * r2;
    float y = bits_f32(0x5F3759DFu - (f32_bits(r2) >> 1));
    y = y * (1.5f - half_r2 * y * y);
    y = y * (1.5f - half_r2 * y * y);
    y = y * (1.5f - half_r2 * y * y);
    const float radius = r2 * y;
    // cos(2 pi u2) = cos(q pi / 2 + theta): q = round(4 u2) (never a tie), theta = 2 pi (u2 - q / 4),
    // |theta| <= pi / 4 (u2 - q / 4 is exact).
    const uint32_t q = (b2 + (1u << 20)) >> 21;
    const float theta = (u2 - static_cast<float>(static_cast<int32_t>(q)) * 0.25f) * 0x1.921fb6p+2f;
    const float t2 = theta * theta;
    float c = -0x1.27e4fcp-22f;
    c = c * t2 + 0x1.a01a02p-16f;
    c = c * t2 + -0x1.6c16c2p-10f;
    c = c * t2 + 0x1.555556p-5f;
    c = c * t2 + -0.5f;
    c = c * t2 + 1.0f;
    float sn = -0x1.ae6456p-26f;
    sn = sn * t2 + 0x1.71de3ap-19f;
    sn = sn * t2 + -0x1.a01a02p-13f;
    sn = sn * t2 + 0x1.111112p-7f;
    sn = sn * t2 + -0x1.555556p-3f;
    sn = sn * t2 + 1.0f;
    sn = sn * theta;
    // cos(q pi/2 + theta), quadrant 0: cos, 1: -sin, 2: -cos, 3: sin; sin(q pi/2 + theta): sin, cos,
    // -sin, -cos (select, then flip the sign bit: no branches).
    const bool swap = (q & 1u) != 0;
    const float cs = swap ? sn : c, ss = swap ? c : sn;
    const uint32_t neg_cos = ((q + 1u) >> 1) & 1u;  // q = 1, 2
    const uint32_t neg_sin = (q >> 1) & 1u;         // q = 2, 3
    even = radius * bits_f32(f32_bits(cs) ^ (neg_cos << 31));
    odd = radius * bits_f32(f32_bits(ss) ^ (neg_sin << 31));
}

VRPO_INLINE float keyed_normal_f32(uint64_t h_pair, uint64_t c) {
    float even, odd;
    keyed_normal_pair_f32(h_pair, even, odd);
    return (c & 1u) ? odd : even;
}

// A fresh output buffer (an N x V gradient, a VIB z) is usually untouched memory: first-touch page
// faults on 4 KiB pages can cost more than the kernel itself (torch's CPU allocator leaves transparent huge pages off unless
// THP_MEM_ALLOC_ENABLE is set). Asking for huge pages on the 2 MiB-aligned interior of a large output
// turns ~500 faults per MiB into one. A hint only: ignored where unsupported.
inline void advise_huge_pages(void* p, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    constexpr uintptr_t kHuge = uintptr_t(1) << 21;
    if (bytes < int64_t(8) << 20) return;
    const uintptr_t begin = (reinterpret_cast<uintptr_t>(p) + kHuge - 1) & ~(kHuge - 1);
    const uintptr_t end = (reinterpret_cast<uintptr_t>(p) + static_cast<uintptr_t>(bytes)) & ~(kHuge - 1);
    if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
    (void)p;
    (void)bytes;
#endif
}

// Run fn(begin, end, thread_index) over [0, n) split into n_threads contiguous slices whose sizes
// are multiples of `multiple` (except the last); the calling thread takes the first slice. If the
// OS refuses a thread, the caller runs the remaining slices itself.
template <typename Fn>
void parallel_for(int64_t n, int n_threads, int64_t multiple, Fn&& fn) {
    if (n_threads <= 1 || n <= multiple) {
        fn(int64_t(0), n, 0);
        return;
    }
    const int64_t per = ((n + n_threads - 1) / n_threads + multiple - 1) / multiple * multiple;
    std::vector<std::thread> workers;
    workers.reserve(n_threads - 1);
    int started = 1;
    try {
        for (; started < n_threads; ++started) {
            const int64_t lo = std::min(n, started * per), hi = std::min(n, (started + 1) * per);
            const int i = started;
            workers.emplace_back([=, &fn] { fn(lo, hi, i); });
        }
    } catch (const std::system_error&) {
    }
    for (int i = started; i < n_threads; ++i) fn(std::min(n, i * per), std::min(n, (i + 1) * per), i);
    fn(int64_t(0), std::min(n, per), 0);
    for (auto& w : workers) w.join();
}

// Run fn(begin, end) over [0, n) in chunks of `chunk` claimed from a shared counter by n_threads
// threads (the caller is one of them): on a shared machine a thread whose core is busy simply claims
// fewer chunks instead of holding everyone up. fn must be independent per index (no per-thread state).
template <typename Fn>
void parallel_for_dynamic(int64_t n, int n_threads, int64_t chunk, Fn&& fn) {
    chunk = std::max<int64_t>(1, chunk);
    if (n_threads <= 1 || n <= chunk) {
        fn(int64_t(0), n);
        return;
    }
    std::atomic<int64_t> next{0};
    const auto work = [&]() {
        for (;;) {
            const int64_t lo = next.fetch_add(chunk, std::memory_order_relaxed);
            if (lo >= n) return;
            fn(lo, std::min(n, lo + chunk));
        }
    };
    std::vector<std::thread> workers;
    workers.reserve(n_threads - 1);
    try {
        for (int i = 1; i < n_threads; ++i) workers.emplace_back(work);
    } catch (const std::system_error&) {
        // Fewer threads: the others (and the caller) take the remaining chunks.
    }
    work();
    for (auto& w : workers) w.join();
}

// Threads for `work` units when one thread should get at least `min_per_thread` of them.
inline int clamp_threads(int requested, int64_t work, int64_t min_per_thread) {
    const int64_t by_work = std::max<int64_t>(1, work / std::max<int64_t>(1, min_per_thread));
    return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(requested, by_work)));
}

}  // namespace vrpo

void register_gae(pybind11::module_& m);
void register_vib(pybind11::module_& m);
void register_token_stats(pybind11::module_& m);
