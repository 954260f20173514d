// Per-token log-prob of the label and entropy of softmax(logits / T) over [N, V] CPU buffers,
// forward and backward, reading fp32 / bf16 / fp16 logits directly (converted in registers).
//
// Forward, per row, x = logits * (1 / T), in blocks of kBlock entries: the block is scaled into an
// L1-resident buffer while its max is taken; the running max m, S = sum exp(x - m) and
// W = sum exp(x - m) (x - m) are rescaled when m grows (S' = r S, W' = r (W + d S), r = exp(d),
// d = m_old - m_new), then exp over the buffered block adds to them. So the logits are read from
// memory once. lse = m + log S, logp = (x_label - m) - log S, H = log S - W / S.
// Backward, per row: d/dx = (p (c_lin logp + c_const) + [j == label] g_lp / T) with
// logp = x - lse, p = exp(logp), c_const = -(g_lp + g_H H) / T, c_lin = -g_H / T; one read of the
// logits, one write of the gradient (which may be the logits buffer itself).
// Ignored tokens (label == ignore_index) give 0 outputs and a zero gradient row (lse is still
// computed; a row of only -inf has lse = -inf and NaN log-prob / entropy). -inf logits give
// p = 0 (their (x - m) is clamped to -1e3 before it multiplies p, so 0 * -inf never makes NaN);
// NaN logits give NaN outputs. Inner loops are branch-free and vectorise in each multiversioned
// clone (AVX-512 / AVX2 / baseline, common.h). Threads over rows; GIL released.
#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>

#include "common.h"

namespace py = pybind11;
using namespace vrpo;

namespace {

constexpr int64_t kBlock = 2048;  // entries per block: 8 KiB of fp32, stays in L1
constexpr int kLanes = 16;        // partial sums per accumulator (one AVX-512 register of fp32)
constexpr float kNegClamp = -1.0e3f;

struct FwdArgs {
    const void* logits;
    const int64_t* labels;
    float* logprobs;
    float* entropy;  // nullptr: not computed
    float* lse;
    int64_t N, V, row_stride;
    float inv_t;
    int64_t ignore_index;
};

struct BwdArgs {
    const void* logits;
    const int64_t* labels;
    const float* lse;
    const float* entropy;   // nullptr when grad_h is
    const float* grad_lp;   // nullptr: zeros
    const float* grad_h;    // nullptr: zeros
    void* out;
    int64_t N, V, in_stride, out_stride;
    float inv_t;
    int64_t ignore_index;
};

// Scale a block into buf and return its max (NaN entries are skipped by the max, but reach the sums).
template <typename T>
VRPO_INLINE float load_block(const T* x, int64_t n, float inv_t, float* __restrict buf) {
    const float ninf = -std::numeric_limits<float>::infinity();
    vf32 mx = vsplat(ninf);
    const int64_t nv = n / kVec * kVec;
    for (int64_t j = 0; j < nv; j += kVec) {
        const vf32 v = VElem<T>::load(x + j) * inv_t;
        vstore(buf + j, v);
        mx = vmax(v, mx);
    }
    float m = ninf;
    for (int k = 0; k < kVec; ++k) m = mx[k] > m ? mx[k] : m;
    for (int64_t j = nv; j < n; ++j) {
        const float v = Elem<T>::load(x + j) * inv_t;
        buf[j] = v;
        m = v > m ? v : m;
    }
    return m;
}

// sum exp(buf - m) and (with ENT) sum exp(buf - m) * max(buf - m, -1e3): float lanes, then double.
template <bool ENT>
VRPO_INLINE void exp_sums(const float* __restrict buf, int64_t n, float m, double& s_out, double& w_out) {
    vf32 s = {}, w = {};
    const int64_t nv = n / kVec * kVec;
    for (int64_t j = 0; j < nv; j += kVec) {
        const vf32 t = vload(buf + j) - m;
        const vf32 e = vexp(t);
        s += e;
        if (ENT) w += e * (t < kNegClamp ? vsplat(kNegClamp) : t);
    }
    double ss = 0.0, ww = 0.0;
    for (int k = 0; k < kVec; ++k) {
        ss += s[k];
        ww += w[k];
    }
    for (int64_t j = nv; j < n; ++j) {
        const float t = buf[j] - m;
        const float e = exp_f32(t);
        ss += e;
        if (ENT) ww += e * (t < kNegClamp ? kNegClamp : t);
    }
    s_out = ss;
    w_out = ww;
}

template <typename T, bool ENT>
VRPO_INLINE void forward_row(const FwdArgs& a, int64_t r, float* __restrict buf) {
    const T* x = static_cast<const T*>(a.logits) + r * a.row_stride;
    const int64_t label = a.labels[r];
    const bool valid = label != a.ignore_index;
    const float ninf = -std::numeric_limits<float>::infinity();
    float m = ninf;
    double S = 0.0, W = 0.0;
    for (int64_t j0 = 0; j0 < a.V; j0 += kBlock) {
        const int64_t n = std::min(kBlock, a.V - j0);
        const float bm = load_block<T>(x + j0, n, a.inv_t, buf);
        if (bm == ninf) {
            // Every entry -inf (or NaN: then the sums must still see it).
            bool any_nan = false;
            for (int64_t j = 0; j < n; ++j) any_nan |= buf[j] != buf[j];
            if (!any_nan) continue;
        }
        if (bm > m) {
            if (m != ninf) {
                const double d = static_cast<double>(m) - static_cast<double>(bm);
                const double rs = std::exp(d);
                W = rs * (W + d * S);
                S = rs * S;
            }
            m = bm;
        }
        double sb, wb;
        exp_sums<ENT>(buf, n, m == ninf ? 0.0f : m, sb, wb);
        S += sb;
        W += wb;
    }
    double lp = 0.0, h = 0.0, lse;
    if (m == ninf) {
        // Every logit -inf (e.g. a vocabulary slice under a masking bias): lse = -inf (so slices
        // merge), log-prob and entropy NaN, as on the torch path.
        lse = -std::numeric_limits<double>::infinity();
        lp = h = std::numeric_limits<double>::quiet_NaN();
    } else {
        const double log_s = std::log(S);
        lse = static_cast<double>(m) + log_s;
        if (valid) {
            const double x_label = static_cast<double>(Elem<T>::load(x + label) * a.inv_t);
            lp = (x_label - static_cast<double>(m)) - log_s;
            h = log_s - W / S;
        }
    }
    if (!valid) lp = h = 0.0;
    a.logprobs[r] = static_cast<float>(lp);
    if (ENT) a.entropy[r] = static_cast<float>(h);
    a.lse[r] = static_cast<float>(lse);
}

template <typename T, bool ENT>
VRPO_MULTIVERSION void forward_rows(const FwdArgs& a, int64_t lo, int64_t hi) {
    alignas(64) float buf[kBlock];
    for (int64_t r = lo; r < hi; ++r) forward_row<T, ENT>(a, r, buf);
}

// One gradient row. INPLACE: `out` is the logits buffer itself (same pointer for reads and writes).
template <bool ENT>
VRPO_INLINE float grad_scalar(float x, float inv_t, float lse, float c_lin, float c_const) {
    const float logp = x * inv_t - lse;
    const float p = exp_f32(logp);
    return ENT ? p * ((logp < kNegClamp ? kNegClamp : logp) * c_lin + c_const) : p * c_const;
}

template <typename Tin, typename Tout, bool INPLACE, bool ENT>
VRPO_INLINE void backward_row(const BwdArgs& a, int64_t r) {
    Tout* out = static_cast<Tout*>(a.out) + r * a.out_stride;
    const Tin* x = INPLACE ? reinterpret_cast<const Tin*>(out) : static_cast<const Tin*>(a.logits) + r * a.in_stride;
    const int64_t label = a.labels[r];
    const int64_t V = a.V, nv = V / kVec * kVec;
    if (label == a.ignore_index) {
        for (int64_t j = 0; j < nv; j += kVec) VElem<Tout>::store(out + j, vf32{});
        for (int64_t j = nv; j < V; ++j) Elem<Tout>::store(out + j, 0.0f);
        return;
    }
    const float inv_t = a.inv_t;
    const float g_lp = a.grad_lp ? a.grad_lp[r] : 0.0f;
    const float g_h = ENT ? a.grad_h[r] : 0.0f;
    const float c_const = ENT ? -g_lp * inv_t - g_h * a.entropy[r] * inv_t : -g_lp * inv_t;
    const float c_lin = -g_h * inv_t;
    const float g_label = g_lp * inv_t;
    const float lse = a.lse[r];
    // The label's own entry is fixed up after its vector is written (one add in fp32, rounded once).
    float label_grad = 0.0f;
    for (int64_t j = 0; j < nv; j += kVec) {
        const vf32 logp = VElem<Tin>::load(x + j) * inv_t - lse;
        const vf32 p = vexp(logp);
        vf32 d;
        if (ENT)
            d = p * ((logp < kNegClamp ? vsplat(kNegClamp) : logp) * c_lin + c_const);
        else
            d = p * c_const;
        if (label >= j && label < j + kVec) {
            label_grad = d[label - j] + g_label;
            d[label - j] = label_grad;
        }
        VElem<Tout>::store(out + j, d);
    }
    for (int64_t j = nv; j < V; ++j) {
        float d = grad_scalar<ENT>(Elem<Tin>::load(x + j), inv_t, lse, c_lin, c_const);
        if (j == label) d = d + g_label;
        Elem<Tout>::store(out + j, d);
    }
    (void)label_grad;
}

template <typename Tin, typename Tout, bool INPLACE, bool ENT>
VRPO_MULTIVERSION void backward_rows(const BwdArgs& a, int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) backward_row<Tin, Tout, INPLACE, ENT>(a, r);
}

constexpr int64_t kMinElementsPerThread = 1 << 16;

// Rows per claimed chunk: ~1 MiB of fp32 logits, so claims are rare but a slowed thread costs little.
inline int64_t rows_per_chunk(int64_t V) { return std::max<int64_t>(1, (int64_t(1) << 18) / std::max<int64_t>(V, 1)); }

template <typename T>
void run_forward(const FwdArgs& a, int n_threads) {
    parallel_for_dynamic(a.N, n_threads, rows_per_chunk(a.V), [&](int64_t lo, int64_t hi) {
        if (a.entropy)
            forward_rows<T, true>(a, lo, hi);
        else
            forward_rows<T, false>(a, lo, hi);
    });
}

template <typename T>
void run_backward(const BwdArgs& a, bool inplace, int n_threads) {
    const bool ent = a.grad_h != nullptr;
    parallel_for_dynamic(a.N, n_threads, rows_per_chunk(a.V), [&](int64_t lo, int64_t hi) {
        if (inplace) {
            if (ent) backward_rows<T, T, true, true>(a, lo, hi);
            else backward_rows<T, T, true, false>(a, lo, hi);
        } else {
            if (ent) backward_rows<T, T, false, true>(a, lo, hi);
            else backward_rows<T, T, false, false>(a, lo, hi);
        }
    });
}

void check_dtype(int code, const char* what) {
    if (code != kFloat32 && code != kBFloat16 && code != kFloat16)
        throw py::type_error(std::string(what) + ": unsupported dtype code " + std::to_string(code) +
                             " (float32, bfloat16, float16)");
}

void token_stats_forward(uintptr_t logits, uintptr_t labels, uintptr_t logprobs, uintptr_t entropy, uintptr_t lse,
                         int64_t N, int64_t V, int64_t row_stride, int dtype_code, double inv_temperature,
                         int64_t ignore_index, int num_threads) {
    check_dtype(dtype_code, "token_stats_forward");
    if (N < 0 || V <= 0) throw py::value_error("token_stats_forward: N must be >= 0 and V > 0");
    if (N == 0) return;
    if (!logits || !labels || !logprobs || !lse) throw py::value_error("token_stats_forward: null pointer");
    FwdArgs a{reinterpret_cast<const void*>(logits), reinterpret_cast<const int64_t*>(labels),
              reinterpret_cast<float*>(logprobs), reinterpret_cast<float*>(entropy), reinterpret_cast<float*>(lse),
              N, V, row_stride, static_cast<float>(inv_temperature), ignore_index};
    const int n_threads = std::min<int>(clamp_threads(num_threads, N * V, kMinElementsPerThread),
                                        static_cast<int>(std::min<int64_t>(N, 1 << 20)));
    py::gil_scoped_release release;
    switch (dtype_code) {
        case kFloat32: return run_forward<float>(a, n_threads);
        case kBFloat16: return run_forward<BF16>(a, n_threads);
        default: return run_forward<F16>(a, n_threads);
    }
}

void token_stats_backward(uintptr_t logits, uintptr_t labels, uintptr_t lse, uintptr_t entropy, uintptr_t grad_lp,
                          uintptr_t grad_h, uintptr_t out, int64_t N, int64_t V, int64_t in_stride, int64_t out_stride,
                          int dtype_code, double inv_temperature, int64_t ignore_index, int num_threads) {
    check_dtype(dtype_code, "token_stats_backward");
    if (N < 0 || V <= 0) throw py::value_error("token_stats_backward: N must be >= 0 and V > 0");
    if (N == 0) return;
    if (!logits || !labels || !lse || !out || (grad_h && !entropy))
        throw py::value_error("token_stats_backward: null pointer");
    const bool inplace = logits == out;
    if (inplace && in_stride != out_stride)
        throw py::value_error("token_stats_backward: in-place needs equal row strides");
    BwdArgs a{reinterpret_cast<const void*>(logits), reinterpret_cast<const int64_t*>(labels),
              reinterpret_cast<const float*>(lse), reinterpret_cast<const float*>(entropy),
              reinterpret_cast<const float*>(grad_lp), reinterpret_cast<const float*>(grad_h),
              reinterpret_cast<void*>(out), N, V, in_stride, out_stride, static_cast<float>(inv_temperature),
              ignore_index};
    const int n_threads = std::min<int>(clamp_threads(num_threads, N * V, kMinElementsPerThread),
                                        static_cast<int>(std::min<int64_t>(N, 1 << 20)));
    py::gil_scoped_release release;
    if (!inplace) advise_huge_pages(reinterpret_cast<void*>(out), N * out_stride * (dtype_code == kFloat32 ? 4 : 2));
    switch (dtype_code) {
        case kFloat32: return run_backward<float>(a, inplace, n_threads);
        case kBFloat16: return run_backward<BF16>(a, inplace, n_threads);
        default: return run_backward<F16>(a, inplace, n_threads);
    }
}

}  // namespace

void register_token_stats(py::module_& m) {
    m.def("token_stats_forward", &token_stats_forward,
          "Per-row label log-prob, entropy (entropy=0: skipped) and logsumexp of logits/T over [N, V] "
          "(last dim contiguous, row stride given; labels int64 [N]; outputs float32 [N]). dtype_code: 0 f32, "
          "2 bf16, 3 f16. Releases the GIL.",
          py::arg("logits"), py::arg("labels"), py::arg("logprobs"), py::arg("entropy"), py::arg("lse"), py::arg("N"),
          py::arg("V"), py::arg("row_stride"), py::arg("dtype_code"), py::arg("inv_temperature"),
          py::arg("ignore_index"), py::arg("num_threads"));
    m.def("token_stats_backward", &token_stats_backward,
          "d loss / d logits into out [N, V] (logits dtype; out == logits: in place) from the saved lse / "
          "entropy and float32 [N] grads (0 = none). Releases the GIL.",
          py::arg("logits"), py::arg("labels"), py::arg("lse"), py::arg("entropy"), py::arg("grad_lp"),
          py::arg("grad_h"), py::arg("out"), py::arg("N"), py::arg("V"), py::arg("in_stride"), py::arg("out_stride"),
          py::arg("dtype_code"), py::arg("inv_temperature"), py::arg("ignore_index"), py::arg("num_threads"));
    m.attr("TOKEN_STATS_ABI_VERSION") = 1;
}
