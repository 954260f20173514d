// VIB reparameterisation + per-row KL to N(0, I) over [rows, L] CPU buffers, forward and backward.
//
//   lv = clamp(logvar, lo, hi);  std = exp(lv / 2);  z = mu + std * eps
//   kl = 0.5 * sum_j (mu^2 + std^2 - lv - 1)
//   dmu = gz + gkl * mu;  dlv = [lo <= logvar <= hi] * (0.5 * gz * eps * std + 0.5 * gkl * (std^2 - 1))
//
// eps[r, j] = keyed_normal(seed, key_r, j) with key_r = row_ids[r], or the flat row index r when no
// ids are given (common.h; bit-identical to vrpo_fast.ops._random.keyed_normal; columns 2k, 2k + 1
// are the two outputs of one Box-Muller draw), so the backward
// regenerates exactly the forward's noise from the seed and nothing but mu and logvar is saved.
// Arithmetic in float32 (float64 for float64 inputs); bf16 / fp16 are read and written directly.
// NaN logvar gives NaN z and KL (clamping keeps NaN); its gradient is 0 under a clamp, like
// torch.clamp's, NaN without one. Threads over rows.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "common.h"

namespace py = pybind11;
using namespace vrpo;

namespace {

struct VibArgs {
    const void* mu;
    const void* logvar;
    const void* grad_z;    // backward; nullptr: no gradient from z
    const void* grad_kl;   // backward: [rows] in the compute dtype; nullptr: none
    const void* row_ids;   // nullptr: the flat row index is the key
    void* z;               // forward output [rows, L] (nullptr in eval)
    void* kl;              // forward output [rows], compute dtype
    void* dmu;             // backward outputs [rows, L]
    void* dlv;
    int64_t rows, L, mu_s0, lv_s0, gz_s0;
    int ids_code;          // 0: none, 1: int32, 2: int64
    uint64_t seed_hash;
    const uint64_t* col_keys;  // splitmix(k + golden) for column pairs k < (L + 1) / 2
    double lo, hi;  // no clamp: -inf, inf
    bool clamp;
};

VRPO_INLINE uint64_t row_key(const VibArgs& a, int64_t r) {
    if (a.ids_code == 1) return static_cast<uint64_t>(static_cast<int64_t>(static_cast<const int32_t*>(a.row_ids)[r]));
    if (a.ids_code == 2) return static_cast<uint64_t>(static_cast<const int64_t*>(a.row_ids)[r]);
    return static_cast<uint64_t>(r);
}

template <typename C>
VRPO_INLINE C clamp_lv(C lv, C lo, C hi) {
    lv = lv < lo ? lo : lv;  // NaN passes through (both compares false); no clamp: lo = -inf, hi = inf
    return lv > hi ? hi : lv;
}

// The row loops below are branch-free (presence of z / grad_z is a template parameter), so each
// multiversioned clone vectorises them, hash and Box-Muller included.
// eps of one row into buf[0, L): one hash and one Box-Muller draw per column pair (both outputs used).
VRPO_INLINE void row_noise(const VibArgs& a, int64_t r, float* __restrict buf) {
    const uint64_t h = hash_key(a.seed_hash, row_key(a, r));
    const uint64_t* __restrict cols = a.col_keys;
    const int64_t pairs = a.L / 2;
    for (int64_t k = 0; k < pairs; ++k) {
        float even, odd;
        keyed_normal_pair_f32(hash_combined(h, cols[k]), even, odd);
        buf[2 * k] = even;
        buf[2 * k + 1] = odd;
    }
    if (a.L & 1) buf[a.L - 1] = keyed_normal_f32(hash_combined(h, cols[pairs]), 0);
}

template <typename T, bool TRAIN>
VRPO_INLINE void vib_forward_row(const VibArgs& a, int64_t r, typename Elem<T>::C* __restrict terms,
                                 float* __restrict eps_buf) {
    using C = typename Elem<T>::C;
    const T* __restrict mu = static_cast<const T*>(a.mu) + r * a.mu_s0;
    const T* __restrict lvp = static_cast<const T*>(a.logvar) + r * a.lv_s0;
    T* __restrict z = TRAIN ? static_cast<T*>(a.z) + r * a.L : nullptr;
    if (TRAIN) row_noise(a, r, eps_buf);
    const C lo = static_cast<C>(a.lo), hi = static_cast<C>(a.hi);
    const int64_t L = a.L;
    for (int64_t j = 0; j < L; ++j) {
        const C m = Elem<T>::load(mu + j);
        const C lv = clamp_lv(Elem<T>::load(lvp + j), lo, hi);
        const C sd = exp_c<C>(lv * C(0.5));
        if (TRAIN) {
            Elem<T>::store(z + j, m + sd * static_cast<C>(eps_buf[j]));
        }
        terms[j] = ((sd * sd - lv) - C(1)) + m * m;
    }
    // Partial sums in a fixed order (thread count and batch never change a row's KL).
    constexpr int kLanes = 16;
    C acc[kLanes] = {};
    const int64_t Lv = L / kLanes * kLanes;
    for (int64_t j0 = 0; j0 < Lv; j0 += kLanes)
        for (int k = 0; k < kLanes; ++k) acc[k] += terms[j0 + k];
    for (int64_t j = Lv; j < L; ++j) acc[j - Lv] += terms[j];
    for (int w = kLanes / 2; w >= 1; w /= 2)
        for (int k = 0; k < w; ++k) acc[k] += acc[k + w];
    static_cast<C*>(a.kl)[r] = C(0.5) * acc[0];
}

template <typename T, bool HAS_GZ>
VRPO_INLINE void vib_backward_row(const VibArgs& a, int64_t r, float* __restrict eps_buf) {
    using C = typename Elem<T>::C;
    const T* __restrict mu = static_cast<const T*>(a.mu) + r * a.mu_s0;
    const T* __restrict lvp = static_cast<const T*>(a.logvar) + r * a.lv_s0;
    const T* __restrict gz = HAS_GZ ? static_cast<const T*>(a.grad_z) + r * a.gz_s0 : nullptr;
    const C g = a.grad_kl ? static_cast<const C*>(a.grad_kl)[r] : C(0);
    T* __restrict dmu = static_cast<T*>(a.dmu) + r * a.L;
    T* __restrict dlv = static_cast<T*>(a.dlv) + r * a.L;
    if (HAS_GZ) row_noise(a, r, eps_buf);
    const C lo = static_cast<C>(a.lo), hi = static_cast<C>(a.hi);
    const C half_g = C(0.5) * g;
    const bool clamp = a.clamp;
    const int64_t L = a.L;
    for (int64_t j = 0; j < L; ++j) {
        const C m = Elem<T>::load(mu + j);
        const C raw = Elem<T>::load(lvp + j);
        const C lv = clamp_lv(raw, lo, hi);
        const C sd = exp_c<C>(lv * C(0.5));
        C d = half_g * (sd * sd - C(1));
        C gzj = C(0);
        if (HAS_GZ) {
            gzj = Elem<T>::load(gz + j);
            d = d + (static_cast<C>(eps_buf[j]) * sd) * gzj * C(0.5);
        }
        // torch.clamp's gradient: it passes only where lo <= logvar <= hi, so a NaN logvar gets a
        // zero gradient when clamping (and a NaN one without).
        const bool outside = clamp & !((raw >= lo) & (raw <= hi));
        Elem<T>::store(dmu + j, gzj + g * m);
        Elem<T>::store(dlv + j, zero_if(outside, d));
    }
}

template <typename T, bool TRAIN>
VRPO_MULTIVERSION void vib_forward_rows(const VibArgs& a, int64_t lo, int64_t hi) {
    std::vector<typename Elem<T>::C> terms(static_cast<size_t>(a.L));
    std::vector<float> eps(static_cast<size_t>(a.L));
    for (int64_t r = lo; r < hi; ++r) vib_forward_row<T, TRAIN>(a, r, terms.data(), eps.data());
}

template <typename T, bool HAS_GZ>
VRPO_MULTIVERSION void vib_backward_rows(const VibArgs& a, int64_t lo, int64_t hi) {
    std::vector<float> eps(static_cast<size_t>(a.L));
    for (int64_t r = lo; r < hi; ++r) vib_backward_row<T, HAS_GZ>(a, r, eps.data());
}

template <typename T>
void run(const VibArgs& a, bool backward, int n_threads) {
    // Chunks of ~64K elements claimed dynamically (a thread on a busy core takes fewer).
    const int64_t chunk = std::max<int64_t>(1, (int64_t(1) << 16) / a.L);
    parallel_for_dynamic(a.rows, n_threads, chunk, [&](int64_t lo, int64_t hi) {
        if (backward) {
            if (a.grad_z) vib_backward_rows<T, true>(a, lo, hi);
            else vib_backward_rows<T, false>(a, lo, hi);
        } else {
            if (a.z) vib_forward_rows<T, true>(a, lo, hi);
            else vib_forward_rows<T, false>(a, lo, hi);
        }
    });
}

void dispatch(const VibArgs& a, int dtype_code, bool backward, int num_threads) {
    // >= 128K elements (~0.2 ms of work) per thread: below that, starting a thread -- and on a busy
    // machine waiting for it to be scheduled -- costs more than it saves.
    const int n_threads = clamp_threads(num_threads, a.rows * a.L, int64_t(1) << 17);
    py::gil_scoped_release release;
    const int64_t out_bytes = a.rows * a.L * (dtype_code == kFloat64 ? 8 : (dtype_code == kFloat32 ? 4 : 2));
    for (void* out : {a.z, a.dmu, a.dlv})
        if (out) advise_huge_pages(out, out_bytes);
    switch (dtype_code) {
        case kFloat32: return run<float>(a, backward, n_threads);
        case kFloat64: return run<double>(a, backward, n_threads);
        case kBFloat16: return run<BF16>(a, backward, n_threads);
        case kFloat16: return run<F16>(a, backward, n_threads);
        default: break;
    }
}

void check_common(int64_t rows, int64_t L, int dtype_code, int ids_code) {
    if (rows < 0 || L <= 0) throw py::value_error("vib: rows must be >= 0 and L > 0");
    if (dtype_code < kFloat32 || dtype_code > kFloat16)
        throw py::type_error("vib: unsupported dtype code " + std::to_string(dtype_code));
    if (ids_code < 0 || ids_code > 2) throw py::type_error("vib: unsupported row_ids code " + std::to_string(ids_code));
}

constexpr double kInf = std::numeric_limits<double>::infinity();

// The mixed key of each column pair (keyed_normal hashes the last key c as c >> 1).
std::vector<uint64_t> column_keys(int64_t L) {
    std::vector<uint64_t> keys(static_cast<size_t>((L + 1) / 2));
    for (int64_t k = 0; k < (L + 1) / 2; ++k) keys[k] = splitmix(static_cast<uint64_t>(k) + kGolden);
    return keys;
}

void vib_forward(uintptr_t mu, uintptr_t logvar, uintptr_t row_ids, uintptr_t z, uintptr_t kl, int64_t rows, int64_t L,
                 int64_t mu_s0, int64_t lv_s0, int dtype_code, int ids_code, uint64_t seed, bool training, double lo,
                 double hi, bool clamp, int num_threads) {
    check_common(rows, L, dtype_code, ids_code);
    if (rows == 0) return;
    if (!mu || !logvar || !kl || (training && !z) || (ids_code && !row_ids)) throw py::value_error("vib_forward: null pointer");
    const std::vector<uint64_t> keys = column_keys(L);
    VibArgs a{reinterpret_cast<const void*>(mu), reinterpret_cast<const void*>(logvar), nullptr, nullptr,
              reinterpret_cast<const void*>(row_ids), training ? reinterpret_cast<void*>(z) : nullptr,
              reinterpret_cast<void*>(kl), nullptr, nullptr, rows, L, mu_s0, lv_s0, 0, ids_code, hash_seed(seed),
              keys.data(), clamp ? lo : -kInf, clamp ? hi : kInf, clamp};
    dispatch(a, dtype_code, false, num_threads);
}

void vib_backward(uintptr_t mu, uintptr_t logvar, uintptr_t row_ids, uintptr_t grad_z, uintptr_t grad_kl, uintptr_t dmu,
                  uintptr_t dlv, int64_t rows, int64_t L, int64_t mu_s0, int64_t lv_s0, int64_t gz_s0, int dtype_code,
                  int ids_code, uint64_t seed, double lo, double hi, bool clamp, int num_threads) {
    check_common(rows, L, dtype_code, ids_code);
    if (rows == 0) return;
    if (!mu || !logvar || !dmu || !dlv || (ids_code && !row_ids)) throw py::value_error("vib_backward: null pointer");
    const std::vector<uint64_t> keys = column_keys(L);
    VibArgs a{reinterpret_cast<const void*>(mu), reinterpret_cast<const void*>(logvar),
              reinterpret_cast<const void*>(grad_z), reinterpret_cast<const void*>(grad_kl),
              reinterpret_cast<const void*>(row_ids), nullptr, nullptr, reinterpret_cast<void*>(dmu),
              reinterpret_cast<void*>(dlv), rows, L, mu_s0, lv_s0, gz_s0, ids_code, hash_seed(seed), keys.data(),
              clamp ? lo : -kInf, clamp ? hi : kInf, clamp};
    dispatch(a, dtype_code, true, num_threads);
}

// keyed_normal(seed, keys[i], cols[j]) (float32 values) into a [n_keys, n_cols] float64 output: the C++ stream itself,
// for tests against vrpo_fast.ops._random.keyed_normal.
void keyed_normal_2d(uintptr_t keys, uintptr_t out, int64_t n_keys, int64_t n_cols, uint64_t seed) {
    const int64_t* k = reinterpret_cast<const int64_t*>(keys);
    double* o = reinterpret_cast<double*>(out);
    const uint64_t hs = hash_seed(seed);
    const std::vector<uint64_t> cols = column_keys(n_cols);
    for (int64_t i = 0; i < n_keys; ++i) {
        const uint64_t h = hash_key(hs, static_cast<uint64_t>(k[i]));
        for (int64_t j = 0; j < n_cols; ++j)
            o[i * n_cols + j] = keyed_normal_f32(hash_combined(h, cols[j >> 1]), static_cast<uint64_t>(j));
    }
}

// Convert n elements between dtype codes (tests of the in-register conversions against torch).
void convert(uintptr_t src, int src_code, uintptr_t dst, int dst_code, int64_t n) {
    if (src_code != kFloat32 && dst_code != kFloat32) throw py::value_error("convert: one side must be float32");
    const void* s = reinterpret_cast<const void*>(src);
    void* d = reinterpret_cast<void*>(dst);
    for (int64_t i = 0; i < n; ++i) {
        float x = 0.f;
        switch (src_code) {
            case kFloat32: x = static_cast<const float*>(s)[i]; break;
            case kBFloat16: x = Elem<BF16>::load(static_cast<const BF16*>(s) + i); break;
            case kFloat16: x = Elem<F16>::load(static_cast<const F16*>(s) + i); break;
            default: throw py::value_error("convert: unsupported source code");
        }
        switch (dst_code) {
            case kFloat32: static_cast<float*>(d)[i] = x; break;
            case kBFloat16: Elem<BF16>::store(static_cast<BF16*>(d) + i, x); break;
            case kFloat16: Elem<F16>::store(static_cast<F16*>(d) + i, x); break;
            default: throw py::value_error("convert: unsupported destination code");
        }
    }
}

}  // namespace

void register_vib(py::module_& m) {
    m.def("vib_forward", &vib_forward,
          "VIB forward over [rows, L] buffers (last dim contiguous, row strides given): z (contiguous, input "
          "dtype; skipped unless training) and kl [rows] (float32, float64 for float64). dtype_code: 0 f32, "
          "1 f64, 2 bf16, 3 f16; ids_code: 0 none (flat row index is the key), 1 int32, 2 int64. Releases the GIL.",
          py::arg("mu"), py::arg("logvar"), py::arg("row_ids"), py::arg("z"), py::arg("kl"), py::arg("rows"),
          py::arg("L"), py::arg("mu_s0"), py::arg("lv_s0"), py::arg("dtype_code"), py::arg("ids_code"), py::arg("seed"),
          py::arg("training"), py::arg("lo"), py::arg("hi"), py::arg("clamp"), py::arg("num_threads"));
    m.def("vib_backward", &vib_backward,
          "VIB backward: dmu, dlv (contiguous, input dtype) from grad_z (input dtype, last dim contiguous, row "
          "stride gz_s0; 0 = none) and grad_kl ([rows] contiguous in the compute dtype; 0 = none); eps is "
          "regenerated from the seed. Releases the GIL.",
          py::arg("mu"), py::arg("logvar"), py::arg("row_ids"), py::arg("grad_z"), py::arg("grad_kl"), py::arg("dmu"),
          py::arg("dlv"), py::arg("rows"), py::arg("L"), py::arg("mu_s0"), py::arg("lv_s0"), py::arg("gz_s0"),
          py::arg("dtype_code"), py::arg("ids_code"), py::arg("seed"), py::arg("lo"), py::arg("hi"), py::arg("clamp"),
          py::arg("num_threads"));
    m.def("keyed_normal_2d", &keyed_normal_2d, "float64 keyed_normal(seed, keys[i], j) into out [n_keys, n_cols]",
          py::arg("keys"), py::arg("out"), py::arg("n_keys"), py::arg("n_cols"), py::arg("seed"));
    m.def("convert", &convert, "convert n elements between dtype codes (one side float32); for tests",
          py::arg("src"), py::arg("src_code"), py::arg("dst"), py::arg("dst_code"), py::arg("n"));
    m.attr("VIB_ABI_VERSION") = 1;
}
