// The chunk loop of the memory on CPU, forward and backward, one (batch, head) row at a time with
// its states in cache, the rows over OpenMP threads, the products by MKL's GEMM as torch's CPU
// wheel exports it (sgemm_ / dgemm_ in libtorch_cpu.so). Both entry points compute each chunk's
// coefficients from the gates (Coefs). First the linear memory (the math of triton_linear.py,
// itself step.chunk_step / backward.chunk_backward at depth 1): the general MLP code below also
// runs depth 1, exactly, but 4-12% slower (measured side by side at the layer, study and
// quickstart sizes), so the linear memory keeps its own.
//
// Layout: q, k, v, y (B, K, C, D); the gates lr (B, K, slots, C), log eta and log(1 - alpha)
// (B, K, C); states (B, i, o); the chunk-start states (B, K, i, o).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include <omp.h>
#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
#endif

extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*, const float*, const int*,
            const float*, const int*, const float*, float*, const int*);
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*, const double*, const int*,
            const double*, const int*, const double*, double*, const int*);
}

namespace {

void gemm(const char* ta, const char* tb, int m, int n, int k, float alpha, const float* a, int lda, const float* b,
          int ldb, float beta, float* c, int ldc) {
    sgemm_(ta, tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}
void gemm(const char* ta, const char* tb, int m, int n, int k, double alpha, const double* a, int lda, const double* b,
          int ldb, double beta, double* c, int ldc) {
    dgemm_(ta, tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}

// Denormals flushed to zero (FTZ) and read as zero (DAZ) while a thread runs the memory loops,
// its own mode restored after. A chunk's coefficients are products of up to C gates (N_t, G_t,
// m_t of Coefs): at chunk 64 with momentum gates ~0.25 they reach 1e-39, below float32's
// smallest normal, and every product they enter ran on microcode assists. On an Intel Xeon
// the float32 MLP memory at the layer benchmark's size took 3x longer with them (GEMMs that
// accumulate into C at 4-7 flops a cycle, against 21-41 flushed: docs/benchmarks.md); AMD's
// cores pay far less, which is why the earlier figures did not show it. A value below 1.2e-38
// (2.2e-308 in float64) is dropped, far under the tests' tolerances. Elsewhere than x86: no-op.
struct FlushDenormals {
#if defined(__x86_64__) || defined(__i386__)
    unsigned saved = _mm_getcsr();
    FlushDenormals() { _mm_setcsr(saved | 0x8040u); }  // FTZ (bit 15) | DAZ (bit 6)
    ~FlushDenormals() { _mm_setcsr(saved); }
#endif
};

// row(b) for b < B over `threads` OpenMP threads, each thread with denormals flushed: the memory
// loops' one parallel region
template <typename F>
void over_rows(int B, int threads, F&& row) {
#pragma omp parallel num_threads(threads)
    {
        FlushDenormals flushed;
#pragma omp for schedule(static)
        for (int b = 0; b < B; ++b) row(b);
    }
}

// row(i, mine) for i < rows over `threads` OpenMP threads, each thread adding into its own
// zeroed `size` sums (mine); the sums, added up in thread order (the same for a thread count
// whatever the schedule). The gradients of parameters every row shares (conv taps, norm gain).
template <typename T, typename F>
std::vector<T> rows_summing(long rows, int threads, long size, F&& row) {
    std::vector<T> part(threads * size, T(0)), sums(size, T(0));
#pragma omp parallel num_threads(threads)
    {
        T* mine = part.data() + omp_get_thread_num() * size;
#pragma omp for schedule(static)
        for (long i = 0; i < rows; ++i) row(i, mine);
    }
    for (int th = 0; th < threads; ++th)
        for (long e = 0; e < size; ++e) sums[e] += part[th * size + e];
    return sums;
}

// Small products in the kernel's own loops. Below ~8K multiply-adds an MKL call costs more than
// its arithmetic (0.2-0.6 us a call, whatever the size): the quickstart's 8 x 16 x 64 and 8 x 64 x 8
// products ran 1.4-4x faster here, while from ~16K on MKL's packed kernels win (docs/benchmarks.md).
// GCC vector extensions: AVX-512's 64-byte registers where -march=native targets them, else 32
// bytes (AVX2's, or the compiler's lowering), and half vectors for a row's tail. Both dtypes
// take this code, so the float64 tests against naive check it.
#ifdef __AVX512F__
constexpr int kVecBytes = 64;
#else
constexpr int kVecBytes = 32;
#endif
template <typename T>
struct Lanes;
template <>
struct Lanes<float> {
    typedef float V __attribute__((vector_size(kVecBytes)));
    typedef float H __attribute__((vector_size(kVecBytes / 2)));
};
template <>
struct Lanes<double> {
    typedef double V __attribute__((vector_size(kVecBytes)));
    typedef double H __attribute__((vector_size(kVecBytes / 2)));
};

template <typename T>
using Vec = typename Lanes<T>::V;
template <typename T>
using Half = typename Lanes<T>::H;
template <typename T>
constexpr int kW = sizeof(Vec<T>) / sizeof(T);

template <typename T, typename V = Vec<T>>
inline V vload(const T* p) {
    V r;
    std::memcpy(&r, p, sizeof r);
    return r;
}
template <typename T, typename V>
inline void vstore(T* p, V x) {
    std::memcpy(p, &x, sizeof x);
}

constexpr long kSmallProduct = 8192;  // m n k at most: the kernel's own loops; above: MKL
// A B (neither transposed) with 8-row register blocks of AVX-512 vectors: up to 32K multiply-adds
// (the quickstart's 8 x 64 x 64) the own loops ran 1.2-1.7x faster than MKL; 16 x 128 x 16 was
// even and 16 x 128 x 32 0.87x (docs/benchmarks.md). AVX2 has 16 registers: 4-row blocks, 8K.
constexpr long kSmallAB = kVecBytes == 64 ? 32768 : kSmallProduct;
constexpr int kRowBlock = kVecBytes == 64 ? 8 : 4;
// A B^T through a transposed copy of B and the A B loops below, where the product has at most
// kTransposedColumns columns and kTransposedProduct multiply-adds (or is small), B at most
// kTransposedFloats values. MKL ran A B^T with few rows at 15-45% of its A B rate (16 x 32 x 128:
// 22 GFLOP/s). With the tiled `transpose`, 8-64 x 16-64 x 64-256 ran 1.1-3.5x faster than MKL,
// and 16 x {16, 32} x 128 2.2x faster than dot products of B's rows, which had taken them since
// 2026-12-07. With 128 columns, or from 2^19 multiply-adds (64 x 64 x 256: 13 against 27 us),
// MKL stayed ahead (docs/benchmarks.md).
constexpr int kTransposedColumns = 64;
constexpr long kTransposedProduct = 1L << 18;
constexpr long kTransposedFloats = 16384;

// R rows of C (from row i0) = alpha A' B + beta C, A'(i, p) = A[i, p] (A[p, i] if ta), B (k x n)
// row-major: per p, R broadcasts of A' times NV vectors of B's row p, accumulated in registers.
template <typename T, typename V, int R, int NV>
inline void rows_times(bool ta, int m, int n, int k, const T* A, const T* B, T* C, T beta, T alpha, int i0, int j) {
    constexpr int W = sizeof(V) / sizeof(T);
    const long si = ta ? 1 : k, sp = ta ? m : 1;
    V acc[R][NV] = {};
    for (int p = 0; p < k; ++p) {
        V b[NV];
        for (int h = 0; h < NV; ++h) b[h] = vload<T, V>(B + (long)p * n + j + h * W);
        for (int r = 0; r < R; ++r) {
            const T a = A[(i0 + r) * si + p * sp];
            for (int h = 0; h < NV; ++h) acc[r][h] += a * b[h];
        }
    }
    for (int r = 0; r < R; ++r)
        for (int h = 0; h < NV; ++h) {
            T* c = C + (long)(i0 + r) * n + j + h * W;
            V out = alpha * acc[r][h];
            if (beta != 0) out += beta * vload<T, V>(c);  // beta 0 never reads C (BLAS: it may be garbage)
            vstore(c, out);
        }
}

template <typename T, int R>
inline void rows_all(bool ta, int m, int n, int k, const T* A, const T* B, T* C, T beta, T alpha, int i0) {
    constexpr int W = kW<T>;
    const long si = ta ? 1 : k, sp = ta ? m : 1;
    int j = 0;
    for (; j + 2 * W <= n; j += 2 * W) rows_times<T, Vec<T>, R, 2>(ta, m, n, k, A, B, C, beta, alpha, i0, j);
    for (; j + W <= n; j += W) rows_times<T, Vec<T>, R, 1>(ta, m, n, k, A, B, C, beta, alpha, i0, j);
    for (; j + W / 2 <= n; j += W / 2) rows_times<T, Half<T>, R, 1>(ta, m, n, k, A, B, C, beta, alpha, i0, j);
    for (; j < n; ++j)
        for (int r = 0; r < R; ++r) {
            T s = 0;
            for (int p = 0; p < k; ++p) s += A[(i0 + r) * si + p * sp] * B[(long)p * n + j];
            T* c = C + (long)(i0 + r) * n + j;
            *c = alpha * s + (beta != 0 ? beta * *c : T(0));
        }
}

template <typename T>
void small_mm(bool ta, int m, int n, int k, const T* A, const T* B, T* C, T beta, T alpha) {
    int i = 0;
    for (; i + kRowBlock <= m; i += kRowBlock) rows_all<T, kRowBlock>(ta, m, n, k, A, B, C, beta, alpha, i);
    for (; i + 4 <= m; i += 4) rows_all<T, 4>(ta, m, n, k, A, B, C, beta, alpha, i);
    for (; i < m; ++i) rows_all<T, 1>(ta, m, n, k, A, B, C, beta, alpha, i);
}

// bt (k x n) = B^T for B (n x k) row-major. By 8 x 8 tiles in registers where the compiler has
// __builtin_shufflevector (GCC 12+, clang): three rounds of interleaving rows i and i + 4 (a
// perfect shuffle) transpose a tile. Moving one value per load and store, the copy had been a
// tenth of the MLP op at the quickstart's sizes (perf: mm's own samples), whose A B^T products
// have 8 rows against 8-64 rows of 16 or 64; tiled, that op ran 1.10-1.18x faster (depth 3 / 2,
// alternated, docs/benchmarks.md), the study size's even.
template <typename T>
struct Tile {
    typedef T V __attribute__((vector_size(8 * sizeof(T))));  // one row of a tile: 8 values
};
template <typename T>
void transpose(int n, int k, const T* B, T* bt) {
    int n8 = 0, k8 = 0;
#if defined(__clang__) || __GNUC__ >= 12
    using V = typename Tile<T>::V;
    n8 = n - n % 8, k8 = k - k % 8;
    for (int j = 0; j < n8; j += 8)
        for (int p = 0; p < k8; p += 8) {
            V r[8], t[8];
            for (int i = 0; i < 8; ++i) r[i] = vload<T, V>(B + (long)(j + i) * k + p);
            for (int round = 0; round < 3; ++round) {
                for (int i = 0; i < 4; ++i) {
                    t[2 * i] = __builtin_shufflevector(r[i], r[i + 4], 0, 8, 1, 9, 2, 10, 3, 11);
                    t[2 * i + 1] = __builtin_shufflevector(r[i], r[i + 4], 4, 12, 5, 13, 6, 14, 7, 15);
                }
                for (int i = 0; i < 8; ++i) r[i] = t[i];
            }
            for (int i = 0; i < 8; ++i) vstore(bt + (long)(p + i) * n + j, r[i]);
        }
#endif
    for (int j = 0; j < n; ++j)  // what the tiles left: the last k % 8 columns, the last n % 8 rows
        for (int p = j < n8 ? k8 : 0; p < k; ++p) bt[(long)p * n + j] = B[(long)j * k + p];
}

// Row-major C (m x n) = alpha op(A) op(B) + beta C, with op(A) (m x k), op(B) (k x n), rows
// contiguous (A is m x k, or k x m when transposed; likewise B). MKL: column-major GEMM on the
// transposes, C^T = op(B)^T op(A)^T.
template <typename T>
void mm(bool ta, bool tb, int m, int n, int k, const T* A, const T* B, T* C, T beta = 0, T alpha = 1) {
    const long size = (long)m * n * k;
    if (!tb && size <= (ta ? kSmallProduct : kSmallAB)) return small_mm(ta, m, n, k, A, B, C, beta, alpha);
    const bool few_columns = n <= kTransposedColumns && size <= kTransposedProduct;
    if (tb && !ta && (few_columns || size <= kSmallProduct) && (long)n * k <= kTransposedFloats) {
        thread_local std::vector<T> bt;  // per thread: rows run in OpenMP threads
        bt.resize((long)n * k);
        transpose(n, k, B, bt.data());
        return small_mm(false, m, n, k, A, bt.data(), C, beta, alpha);
    }
    const int lda = ta ? m : k, ldb = tb ? k : n;
    gemm(tb ? "T" : "N", ta ? "T" : "N", n, m, k, alpha, B, ldb, A, lda, beta, C, n);
}

// (the reductions here and below are `omp simd reduction`s: without it the compiler keeps the
// sums in order, one lane at a time, and they were the backward's hottest loops)
template <typename T>
T dot(const T* x, const T* y, long n) {
    T s = 0;
#pragma omp simd reduction(+ : s)
    for (long i = 0; i < n; ++i) s += x[i] * y[i];
    return s;
}

struct Flags {
    int K, C, D;
    bool has_S, has_P, cap_on, residual;
    double cap;
};

// A chunk's coefficients from its gates (coefficients.py's definitions, computed here by their
// recurrences over the chunk's tokens t, every factor in (0, 1]: a_t = 1 - alpha_t, e_t = eta_t):
//   beta_t = a_t beta_{t-1},  m_t = e_t m_{t-1}  (beta_{-1} = m_{-1} = 1)
//   N_t = e_t N_{t-1} - theta_t 1_t  (rows of -N),  G_t = a_t G_{t-1} + N_t  (rows of -G),
//   f_t = a_t f_{t-1} + m_t
// and their backward, the same recurrences in reverse.
template <typename T>
struct Coefs {
    int C;
    std::vector<T> a, e, beta, m, f, N, G;  // N, G: (C, C) rows
    explicit Coefs(int c) : C(c), a(c), e(c), beta(c), m(c), f(c), N(c * c), G(c * c) {}

    void compute(const T* lr, const T* log_eta, const T* log_keep, bool has_eta) {
        T pb = 1, pm = 1, pf = 0;
        for (int t = 0; t < C; ++t) {
            a[t] = log_keep ? std::exp(log_keep[t]) : T(1);
            e[t] = has_eta ? std::exp(log_eta[t]) : T(0);
            beta[t] = pb = a[t] * pb;
            m[t] = pm = e[t] * pm;
            f[t] = pf = a[t] * pf + m[t];
            T *Nt = N.data() + t * C, *Gt = G.data() + t * C;
            for (int j = 0; j < C; ++j) {
                const T np = t ? N[(t - 1) * C + j] : T(0), gp = t ? G[(t - 1) * C + j] : T(0);
                Nt[j] = e[t] * np - (j == t ? lr[t] : T(0));
                Gt[j] = a[t] * gp + Nt[j];
            }
        }
    }

    // upstream gradients: of beta, f, G (every row), and of the last row's g (= G_{C-1}) and
    // n (= N_{C-1}), beta_last, f_last, m_last; out: d lr, d log_eta, d log_keep (C each)
    void backward(const T* dbeta, const T* df, const T* dG, const T* dgl, const T* dnl, T dbl, T dfl, T dml,
                  bool has_eta, T* dlr, T* dlog_eta, T* dlog_keep) const {
        std::vector<T> gG(C, T(0)), gN(C, T(0));
        T gf = 0, gm = 0, gb = 0;
        for (int t = C - 1; t >= 0; --t) {
            const T an = t + 1 < C ? a[t + 1] : T(0), en = t + 1 < C ? e[t + 1] : T(0);
            const bool last = t == C - 1;
            for (int j = 0; j < C; ++j) {
                gG[j] = dG[t * C + j] + (last ? dgl[j] : T(0)) + an * gG[j];
                gN[j] = (last && has_eta ? dnl[j] : T(0)) + gG[j] + en * gN[j];
            }
            gf = (has_eta ? df[t] + (last ? dfl : T(0)) : T(0)) + an * gf;
            gm = (last && has_eta ? dml : T(0)) + gf + en * gm;
            gb = dbeta[t] + (last ? dbl : T(0)) + an * gb;
            T da = gb * (t ? beta[t - 1] : T(1)) + gf * (t ? f[t - 1] : T(0));
            T de = gm * (t ? m[t - 1] : T(1));
            if (t) {
                da += dot(gG.data(), G.data() + (t - 1) * C, C);
                de += dot(gN.data(), N.data() + (t - 1) * C, C);
            }
            dlr[t] = -gN[t];
            if (dlog_keep) dlog_keep[t] = da * a[t];
            if (has_eta) dlog_eta[t] = de * e[t];
        }
    }
};

// D = 2 r (k M [+ k] - v), r = min(1, cap |err|^2 / (theta |k|^2 |2 err|^2)): into Dl (C x D), r (C)
template <typename T>
void deltas(const Flags& f, const T* kj, const T* vj, const T* M, const T* theta, T* Dl, T* r) {
    const int C = f.C, D = f.D;
    mm<T>(false, false, C, D, D, kj, M, Dl);  // err = k M
    for (int c = 0; c < C; ++c) {
        T* e = Dl + c * D;
        for (int d = 0; d < D; ++d) e[d] += (f.residual ? kj[c * D + d] : T(0)) - vj[c * D + d];
        T rc = 1;
        if (f.cap_on) {
            const T ee = dot(e, e, D), curv = theta[c] * dot(kj + c * D, kj + c * D, D) * 4 * ee;
            rc = std::min<T>(T(f.cap) * ee / std::max<T>(curv, T(1e-30)), T(1));
        }
        r[c] = rc;
        for (int d = 0; d < D; ++d) e[d] *= 2 * rc;
    }
}

template <typename T>
void forward_row(const Flags& f, int b, const T* q, const T* k, const T* v, const T* lr, const T* log_eta,
                 const T* log_keep, const T* M0, const T* S0, const T* P, T* y, T* M_out, T* S_out, T* M_st,
                 T* S_st) {
    const int K = f.K, C = f.C, D = f.D, DD = D * D;
    std::vector<T> M(M0 + b * DD, M0 + (b + 1) * DD), S(DD, T(0)), Dl(C * D), r(C), t(C * C), x(C * D), w(C * D);
    Coefs<T> co(C);
    if (f.has_S) std::copy(S0 + b * DD, S0 + (b + 1) * DD, S.begin());
    const T* Pm = f.has_P ? P + b * DD : nullptr;
    for (int j = 0; j < K; ++j) {
        const long cs = (long)b * K + j, rows = cs * C * D;
        std::copy(M.begin(), M.end(), M_st + cs * DD);
        if (f.has_S) std::copy(S.begin(), S.end(), S_st + cs * DD);
        const T *qj = q + rows, *kj = k + rows, *vj = v + rows;
        co.compute(lr + cs * C, f.has_S ? log_eta + cs * C : nullptr, log_keep ? log_keep + cs * C : nullptr, f.has_S);
        const T *Gj = co.G.data(), *bt = co.beta.data(), *fv = co.f.data();
        const T *gl = co.G.data() + (C - 1) * C, *nl = co.N.data() + (C - 1) * C;
        deltas(f, kj, vj, M.data(), lr + cs * C, Dl.data(), r.data());
        // the read: y = (G o q k^T) D + beta o qM + (1 - beta) o qP + f o qS [+ q]
        mm<T>(false, true, C, C, D, qj, kj, t.data());
        for (int i = 0; i < C * C; ++i) t[i] *= Gj[i];
        T* yj = y + rows;
        mm<T>(false, false, C, D, C, t.data(), Dl.data(), yj);
        mm<T>(false, false, C, D, D, qj, M.data(), x.data());
        for (int c = 0; c < C; ++c)
            for (int d = 0; d < D; ++d) yj[c * D + d] += bt[c] * x[c * D + d] + (f.residual ? qj[c * D + d] : T(0));
        if (f.has_P) {
            mm<T>(false, false, C, D, D, qj, Pm, x.data());
            for (int c = 0; c < C; ++c)
                for (int d = 0; d < D; ++d) yj[c * D + d] += (1 - bt[c]) * x[c * D + d];
        }
        if (f.has_S) {
            mm<T>(false, false, C, D, D, qj, S.data(), x.data());
            for (int c = 0; c < C; ++c)
                for (int d = 0; d < D; ++d) yj[c * D + d] += fv[c] * x[c * D + d];
        }
        // the state: M' = bl M + (1 - bl) P + fl S + k^T (g o D),  S' = ml S + k^T (n o D)
        const T bl = co.beta[C - 1], fl = co.f[C - 1];
        for (int i = 0; i < DD; ++i)
            M[i] = bl * M[i] + (f.has_P ? (1 - bl) * Pm[i] : T(0)) + (f.has_S ? fl * S[i] : T(0));
        for (int c = 0; c < C; ++c)
            for (int d = 0; d < D; ++d) w[c * D + d] = gl[c] * Dl[c * D + d];
        mm<T>(true, false, D, D, C, kj, w.data(), M.data(), T(1));
        if (f.has_S) {
            const T ml = co.m[C - 1];
            for (int i = 0; i < DD; ++i) S[i] *= ml;
            for (int c = 0; c < C; ++c)
                for (int d = 0; d < D; ++d) w[c * D + d] = nl[c] * Dl[c * D + d];
            mm<T>(true, false, D, D, C, kj, w.data(), S.data(), T(1));
        }
    }
    std::copy(M.begin(), M.end(), M_out + b * DD);
    if (f.has_S) std::copy(S.begin(), S.end(), S_out + b * DD);
}

template <typename T>
void backward_row(const Flags& f, int b, const T* q, const T* k, const T* v, const T* lr, const T* log_eta,
                  const T* log_keep, const T* P, const T* M_st, const T* S_st, const T* dy, const T* dM_end,
                  const T* dS_end, T* dq, T* dk, T* dv, T* dlr, T* dlog_eta, T* dlog_keep, T* dM0, T* dS0, T* dP) {
    const int K = f.K, C = f.C, D = f.D, DD = D * D, CD = C * D;
    std::vector<T> dM(dM_end + b * DD, dM_end + (b + 1) * DD), dS(DD, T(0)), dPm(DD, T(0)), gM(DD), gS(DD);
    std::vector<T> Dl(CD), r(C), t(C * C), gt(C * C), h(CD), dD(CD), w(CD), up(CD), xs(CD), dgt(C * C);
    if (f.has_S) std::copy(dS_end + b * DD, dS_end + (b + 1) * DD, dS.begin());
    const T* Pm = f.has_P ? P + b * DD : nullptr;
    Coefs<T> co(C);
    // the coefficients' gradients of one chunk (then taken to the gates by Coefs::backward)
    std::vector<T> dbeta(C), df(C), dG(C * C), dg_last(C), dn_last(C);
    T dbeta_last = 0, df_last = 0, dm_last = 0;
    for (int j = K - 1; j >= 0; --j) {
        const long cs = (long)b * K + j, rows = cs * C * D;
        const T *M = M_st + cs * DD, *S = f.has_S ? S_st + cs * DD : nullptr;
        const T *qj = q + rows, *kj = k + rows, *vj = v + rows, *dyj = dy + rows;
        const T *le = f.has_S ? log_eta + cs * C : nullptr, *lk = log_keep ? log_keep + cs * C : nullptr;
        co.compute(lr + cs * C, le, lk, f.has_S);
        const T *Gj = co.G.data(), *bt = co.beta.data(), *fv = co.f.data();
        const T *gl = co.G.data() + (C - 1) * C, *nl = co.N.data() + (C - 1) * C;
        T *dqj = dq + rows, *dkj = dk + rows, *dvj = dv + rows;
        deltas(f, kj, vj, M, lr + cs * C, Dl.data(), r.data());
        mm<T>(false, true, C, C, D, qj, kj, t.data());
        // 1. the end-of-chunk state
        const T bl = co.beta[C - 1];
        T dbl = 0;
#pragma omp simd reduction(+ : dbl)
        for (int i = 0; i < DD; ++i) {
            gM[i] = bl * dM[i];
            dbl += dM[i] * (M[i] - (f.has_P ? Pm[i] : T(0)));
            if (f.has_P) dPm[i] += (1 - bl) * dM[i];
        }
        dbeta_last = dbl;
        mm<T>(false, false, C, D, D, kj, dM.data(), h.data());  // hm = k dM
        for (int c = 0; c < C; ++c) {
            dg_last[c] = dot(Dl.data() + c * D, h.data() + c * D, D);
            for (int d = 0; d < D; ++d) {
                dD[c * D + d] = gl[c] * h[c * D + d];
                w[c * D + d] = gl[c] * Dl[c * D + d];
            }
        }
        mm<T>(false, true, C, D, D, w.data(), dM.data(), dkj);  // dk = (g o D) dM^T
        if (f.has_S) {
            const T fl = co.f[C - 1], ml = co.m[C - 1];
            T dfl = 0, dml = 0;
#pragma omp simd reduction(+ : dfl, dml)
            for (int i = 0; i < DD; ++i) {
                gS[i] = fl * dM[i] + ml * dS[i];
                dfl += dM[i] * S[i];
                dml += dS[i] * S[i];
            }
            df_last = dfl;
            dm_last = dml;
            mm<T>(false, false, C, D, D, kj, dS.data(), h.data());  // hs = k dS
            for (int c = 0; c < C; ++c) {
                dn_last[c] = dot(Dl.data() + c * D, h.data() + c * D, D);
                for (int d = 0; d < D; ++d) {
                    dD[c * D + d] += nl[c] * h[c * D + d];
                    w[c * D + d] = nl[c] * Dl[c * D + d];
                }
            }
            mm<T>(false, true, C, D, D, w.data(), dS.data(), dkj, T(1));
        }
        // 2. the read, dz = dy: z = (G o t) D + beta o qM + (1 - beta) o qP + f o qS
        mm<T>(false, false, C, D, D, qj, M, up.data());  // qM
        if (f.has_P) mm<T>(false, false, C, D, D, qj, Pm, up.data(), T(1), T(-1));  // qM - qP
        for (int c = 0; c < C; ++c) {
            dbeta[c] = dot(dyj + c * D, up.data() + c * D, D);
            for (int d = 0; d < D; ++d) w[c * D + d] = bt[c] * dyj[c * D + d];  // bdz
        }
        mm<T>(true, false, D, D, C, qj, w.data(), gM.data(), T(1));  // gM += q^T bdz
        mm<T>(false, true, C, D, D, w.data(), M, dqj);                // dq = bdz M^T
        if (f.has_P) {
            for (int i = 0; i < CD; ++i) w[i] = dyj[i] - w[i];  // (1 - beta) dz
            mm<T>(true, false, D, D, C, qj, w.data(), dPm.data(), T(1));
            mm<T>(false, true, C, D, D, w.data(), Pm, dqj, T(1));
        }
        if (f.has_S) {
            mm<T>(false, false, C, D, D, qj, S, xs.data());
            for (int c = 0; c < C; ++c) {
                df[c] = dot(dyj + c * D, xs.data() + c * D, D);
                for (int d = 0; d < D; ++d) w[c * D + d] = fv[c] * dyj[c * D + d];  // fdz
            }
            mm<T>(true, false, D, D, C, qj, w.data(), gS.data(), T(1));
            mm<T>(false, true, C, D, D, w.data(), S, dqj, T(1));
        }
        for (int i = 0; i < C * C; ++i) gt[i] = Gj[i] * t[i];
        mm<T>(true, false, C, D, C, gt.data(), dyj, dD.data(), T(1));  // dD += (G o t)^T dz
        mm<T>(false, true, C, C, D, dyj, Dl.data(), dgt.data());      // d loss / d (G o t)
        for (int i = 0; i < C * C; ++i) {
            dG[i] = dgt[i] * t[i];
            dgt[i] *= Gj[i];  // dt
        }
        mm<T>(false, false, C, D, C, dgt.data(), kj, dqj, T(1));  // dq += dt k
        mm<T>(true, false, C, D, C, dgt.data(), qj, dkj, T(1));   // dk += dt^T q
        if (f.residual)
            for (int i = 0; i < CD; ++i) dqj[i] += dyj[i];
        // 3. the inner backward: D = 2 r (kM [+ k] - v)
        for (int c = 0; c < C; ++c)
            for (int d = 0; d < D; ++d) dD[c * D + d] *= 2 * r[c];  // de
        mm<T>(true, false, D, D, C, kj, dD.data(), gM.data(), T(1));
        mm<T>(false, true, C, D, D, dD.data(), M, dkj, T(1));
        for (int i = 0; i < CD; ++i) {
            if (f.residual) dkj[i] += dD[i];
            dvj[i] = -dD[i];
        }
        co.backward(dbeta.data(), df.data(), dG.data(), dg_last.data(), dn_last.data(), dbeta_last, df_last, dm_last,
                    f.has_S, dlr + cs * C, f.has_S ? dlog_eta + cs * C : nullptr, lk ? dlog_keep + cs * C : nullptr);
        std::swap(dM, gM);
        if (f.has_S) std::swap(dS, gS);
    }
    std::copy(dM.begin(), dM.end(), dM0 + b * DD);
    if (f.has_S) std::copy(dS.begin(), dS.end(), dS0 + b * DD);
    if (f.has_P) std::copy(dPm.begin(), dPm.end(), dP + b * DD);
}

template <typename T>
void forward(int B, const Flags& f, void** p, int threads) {
    auto a = [&](int i) { return static_cast<T*>(p[i]); };
    over_rows(B, threads, [&](int b) {
        forward_row<T>(f, b, a(0), a(1), a(2), a(3), a(4), a(5), a(6), a(7), a(8), a(9), a(10), a(11), a(12), a(13));
    });
}

template <typename T>
void backward(int B, const Flags& f, void** p, int threads) {
    auto a = [&](int i) { return static_cast<T*>(p[i]); };
    over_rows(B, threads, [&](int b) {
        backward_row<T>(f, b, a(0), a(1), a(2), a(3), a(4), a(5), a(6), a(7), a(8), a(9), a(10), a(11), a(12), a(13),
                        a(14), a(15), a(16), a(17), a(18), a(19), a(20));
    });
}


// ---------------------------------------------------------------------------------------------
// The MLP memory of any depth L >= 2: f(x) = act(... act(x M_0) ...) M_{L-1} [+ x], the math of
// step.chunk_step and backward.chunk_backward for one row, written out per layer (names as
// there: a_l the keys' input of layer l, z_l its pre-activation, D_l the capped deltas,
// carried_l = D_{l+1} M_{l+1}^T; the read path's x_l, zr_l, t_l = x_l a_l^T, xm / xp / xs =
// x_l M_l / P_l / S_l). Each layer l reads its coefficients from gate slot min(l, slots - 1).

struct MlpFlags {
    int K, C, L, slots;
    const int* w;  // widths w_0 .. w_L (w_0 = w_L = the head dim)
    bool has_S, has_P, cap_on, residual, silu;
    double cap;
};

// act, act' and act'' of z at once (one erf and one exp for GELU, one exp for SiLU)
template <typename T>
void act_all(bool silu, T z, T& a0, T& a1, T& a2) {
    if (silu) {
        const T s = 1 / (1 + std::exp(-z));
        a0 = z * s;
        a1 = s * (1 + z * (1 - s));
        a2 = s * (1 - s) * (2 + z * (1 - 2 * s));
        return;
    }
    const T E = std::erf(z * T(0.7071067811865476)), phi = std::exp(T(-0.5) * z * z) * T(0.3989422804014327);
    a0 = T(0.5) * z * (1 + E);
    a1 = T(0.5) * (1 + E) + z * phi;
    a2 = phi * (2 - z * z);
}

// float32: exp by range reduction to [-ln2/2, ln2/2] (Cody-Waite) and a degree-7 Taylor
// polynomial (relative error < 1e-7 on [-87, 88], clamped outside); libm's expf and erff are
// scalar calls here, 13x slower per element, and were a quarter of the MLP kernel's time. Written
// once for V = float and V = Vec<float> (8 or 16 lanes): `omp simd` over the scalar form left it scalar
// (perf: vmulss / vfmadd...ss, a fifth of the op at the quickstart's size), so act_rows<float>
// runs the vector form (full vectors, then a half vector) and the scalar one only for a row's
// last values.
template <typename V>
struct IntOf {
    using type = int32_t;
};
template <>
struct IntOf<Vec<float>> {
    typedef int32_t type __attribute__((vector_size(kVecBytes)));
};
template <>
struct IntOf<Half<float>> {
    typedef int32_t type __attribute__((vector_size(kVecBytes / 2)));
};
inline int32_t to_int(float x) { return static_cast<int32_t>(x); }
inline IntOf<Vec<float>>::type to_int(Vec<float> x) { return __builtin_convertvector(x, IntOf<Vec<float>>::type); }
inline IntOf<Half<float>>::type to_int(Half<float> x) { return __builtin_convertvector(x, IntOf<Half<float>>::type); }
template <typename V>
inline V splat(float c) {
    return V{} + c;
}

template <typename V>
inline V fast_exp(V x) {
    const V lo = splat<V>(-87.0f), hi = splat<V>(88.0f);
    x = x < lo ? lo : x;
    x = x > hi ? hi : x;
    const V n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
    const V r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
    V p = splat<V>(1.0f / 5040);
    for (float c : {1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f}) p = p * r + c;
    const typename IntOf<V>::type bits = (to_int(n) + 127) << 23;
    V scale;
    std::memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

// erfc(x) for x >= 0: Numerical Recipes' Chebyshev fit (erfcc, fractional error < 1.2e-7)
template <typename V>
inline V fast_erfc(V x) {
    const V t = 1.0f / (1.0f + 0.5f * x);
    V p = splat<V>(0.17087277f);
    for (float c : {-0.82215223f, 1.48851587f, -1.13520398f, 0.27886807f, -0.18628806f, 0.09678418f, 0.37409196f,
                    1.00002368f, -1.26551223f})
        p = p * t + c;
    return t * fast_exp(p - x * x);
}

// act, act' and act'' at once; 1 + erf(z / sqrt 2) as 2 - erfc or erfc of |z| / sqrt 2, so
// neither side cancels, and SiLU's 1 - s as e s
template <typename V>
inline void act_all_f32(bool silu, V x, V& a0, V& a1, V& a2) {
    if (silu) {
        const V e = fast_exp(-x), s = 1.0f / (1.0f + e), s_ = e * s;
        a0 = x * s;
        a1 = s * (1.0f + x * s_);
        a2 = s * s_ * (2.0f + x * (s_ - s));
        return;
    }
    const V ax = x < 0.0f ? -x : x, c = fast_erfc(ax * 0.7071067811865476f), one_plus_erf = x >= 0.0f ? 2.0f - c : c;
    const V phi = fast_exp(-0.5f * x * x) * 0.3989422804014327f;
    a0 = 0.5f * x * one_plus_erf;
    a1 = 0.5f * one_plus_erf + x * phi;
    a2 = phi * (2.0f - x * x);
}

// act, act' and act'' of n values (a2 null: not needed); float64 keeps libm (the exactness tests
// hold it to 1e-13), float32 the forms above
template <typename T>
void act_rows(bool silu, int n, const T* z, T* a0, T* a1, T* a2) {
    T unused;
    for (int i = 0; i < n; ++i) act_all(silu, z[i], a0[i], a1[i], a2 ? a2[i] : unused);
}

template <>
void act_rows<float>(bool silu, int n, const float* z, float* a0, float* a1, float* a2) {
    constexpr int W = kW<float>;
    int i = 0;
    for (; i + W <= n; i += W) {
        Vec<float> b0, b1, b2;
        act_all_f32(silu, vload(z + i), b0, b1, b2);
        vstore(a0 + i, b0);
        vstore(a1 + i, b1);
        if (a2) vstore(a2 + i, b2);
    }
    for (; i + W / 2 <= n; i += W / 2) {  // rows of 8 on AVX-512 (16 lanes) stay on vectors
        Half<float> b0, b1, b2;
        act_all_f32(silu, vload<float, Half<float>>(z + i), b0, b1, b2);
        vstore(a0 + i, b0);
        vstore(a1 + i, b1);
        if (a2) vstore(a2 + i, b2);
    }
    for (; i < n; ++i) {
        float b2;
        act_all_f32(silu, z[i], a0[i], a1[i], b2);
        if (a2) a2[i] = b2;
    }
}

// A view of floats the forward keeps for the backward (operator[], data() and begin() as the
// vectors they replaced).
template <typename T>
struct Span {
    T* p = nullptr;
    T* data() const { return p; }
    T* begin() const { return p; }
    T& operator[](long i) const { return p[i]; }
};

// One chunk of one row: everything the reads, the state step and the backward need. What the
// backward needs lives in the chunk's slot of a workspace the forward fills (bind), so the
// backward reads it instead of recomputing the keys' forward and the reads (a fifth of the
// backward's products); the rest is scratch.
template <typename T>
struct MlpChunk {
    const MlpFlags& f;
    std::vector<Span<T>> a, z1, z2, D, carried, x, t, xm, xp, xs, zr1;  // z1, z2: act', act'' of z
    Span<T> r;
    std::vector<std::vector<T>> z, zr;
    std::vector<T> err, gt;
    explicit MlpChunk(const MlpFlags& fl) : f(fl), err(fl.C * fl.w[fl.L]), gt(fl.C * fl.C) {
        const int C = f.C, L = f.L;
        for (auto* v : {&a, &z1, &z2, &D, &carried, &x, &t, &xm, &xp, &xs, &zr1}) v->resize(L);
        z.resize(L);
        zr.resize(L);
        for (int l = 0; l < L; ++l) {
            z[l].resize(C * f.w[l + 1]);
            zr[l].resize(C * f.w[l + 1]);
        }
    }

    // Points the kept arrays into a slot (null: only counts) and returns its size in floats;
    // a_0 and x_0 are the chunk's keys and queries themselves. Layer l keeps t_l, D_l and the
    // read's products; a_{l+1}, x_{l+1}, act' and act'' of z_l, carried_l and act' of zr_l
    // where a layer follows.
    long bind(T* slot, const T* kj, const T* qj) {
        const int C = f.C, L = f.L;
        long used = 0;
        auto take = [&](Span<T>& s, long n) {
            s.p = slot ? slot + used : nullptr;
            used += n;
        };
        a[0].p = const_cast<T*>(kj);
        x[0].p = const_cast<T*>(qj);
        for (int l = 0; l < L; ++l) {
            const long o = (long)C * f.w[l + 1];
            take(t[l], (long)C * C);
            take(D[l], o);
            take(xm[l], o);
            if (f.has_P) take(xp[l], o);
            else xp[l] = xm[l];  // off: never written; reads of it (vectorized selects) stay in bounds
            if (f.has_S) take(xs[l], o);
            else xs[l] = xm[l];
            if (l + 1 < L) {
                for (auto* s : {&a[l + 1], &x[l + 1], &z1[l], &z2[l], &carried[l], &zr1[l]}) take(*s, o);
            }
        }
        take(r, C);
        return used;
    }

    // the keys forwarded at M and the l2 loss back-propagated by hand (common.keys_and_errors)
    void keys(const T* kj, const T* vj, const std::vector<const T*>& M, const std::vector<const T*>& theta) {
        const int C = f.C, L = f.L, d = f.w[L];
        for (int l = 0; l < L; ++l) {
            mm<T>(false, false, C, f.w[l + 1], f.w[l], a[l].data(), M[l], z[l].data());
            if (l + 1 < L) act_rows(f.silu, C * f.w[l + 1], z[l].data(), a[l + 1].data(), z1[l].data(), z2[l].data());
        }
        for (int i = 0; i < C * d; ++i) {
            err[i] = z[L - 1][i] + (f.residual ? kj[i] : T(0)) - vj[i];
            D[L - 1][i] = 2 * err[i];
        }
        for (int l = L - 1; l > 0; --l) {
            mm<T>(false, true, C, f.w[l], f.w[l + 1], D[l].data(), M[l], carried[l - 1].data());
            for (int i = 0; i < C * f.w[l]; ++i) D[l - 1][i] = z1[l - 1][i] * carried[l - 1][i];
        }
        for (int c = 0; c < C; ++c) {
            T rc = 1;
            if (f.cap_on) {  // r = min(1, cap |err|^2 / sum_l theta_l |a_l|^2 |D_l|^2)
                T curv = 0;
                for (int l = 0; l < L; ++l) {
                    const int i = f.w[l], o = f.w[l + 1];
                    curv += theta[l][c] * dot(a[l].data() + c * i, a[l].data() + c * i, i) *
                            dot(D[l].data() + c * o, D[l].data() + c * o, o);
                }
                const T ee = dot(err.data() + c * d, err.data() + c * d, d);
                rc = std::min<T>(T(f.cap) * ee / std::max<T>(curv, T(1e-30)), T(1));
            }
            r[c] = rc;
            for (int l = 0; l < L; ++l) {
                const int o = f.w[l + 1];
                for (int j = 0; j < o; ++j) D[l][c * o + j] *= rc;
                if (l + 1 < L)
                    for (int j = 0; j < o; ++j) carried[l][c * o + j] *= rc;
            }
        }
    }

    // the reads after each token's update, dual form (step.chunk_step), into the output rows y
    void reads(const T* qj, const std::vector<const T*>& M, const std::vector<const T*>& S,
               const std::vector<const T*>& P, const std::vector<const Coefs<T>*>& co, T* y) {
        const int C = f.C, L = f.L;
        for (int l = 0; l < L; ++l) {
            const int i = f.w[l], o = f.w[l + 1];
            const Coefs<T>& c = *co[l];
            mm<T>(false, true, C, C, i, x[l].data(), a[l].data(), t[l].data());
            mm<T>(false, false, C, o, i, x[l].data(), M[l], xm[l].data());
            if (f.has_P) mm<T>(false, false, C, o, i, x[l].data(), P[l], xp[l].data());
            if (f.has_S) mm<T>(false, false, C, o, i, x[l].data(), S[l], xs[l].data());
            for (int p = 0; p < C * C; ++p) gt[p] = c.G[p] * t[l][p];
            mm<T>(false, false, C, o, C, gt.data(), D[l].data(), zr[l].data());
            for (int row = 0; row < C; ++row)
                for (int j = 0; j < o; ++j) {
                    T& v = zr[l][row * o + j];
                    v += c.beta[row] * xm[l][row * o + j];
                    if (f.has_P) v += (1 - c.beta[row]) * xp[l][row * o + j];
                    if (f.has_S) v += c.f[row] * xs[l][row * o + j];
                }
            if (l + 1 < L) act_rows<T>(f.silu, C * o, zr[l].data(), x[l + 1].data(), zr1[l].data(), nullptr);
        }
        const int d = f.w[L];
        for (int p = 0; p < C * d; ++p) y[p] = zr[L - 1][p] + (f.residual ? qj[p] : T(0));
    }
};

// row b of layer l's tensor p[base + l] (B, w_l, w_{l+1}) into out, zeros when it is off
template <typename T>
void row_of(void** p, int base, const MlpFlags& f, int l, int b, bool on, std::vector<T>& out) {
    const long sz = (long)f.w[l] * f.w[l + 1];
    out.assign(sz, T(0));
    if (on) std::copy(static_cast<T*>(p[base + l]) + b * sz, static_cast<T*>(p[base + l]) + (b + 1) * sz, out.begin());
}

template <typename T>
void mlp_forward_row(const MlpFlags& f, int b, void** p) {
    const int K = f.K, C = f.C, L = f.L, sl = f.slots, d = f.w[0];
    const T *q = static_cast<T*>(p[0]), *k = static_cast<T*>(p[1]), *v = static_cast<T*>(p[2]);
    const T *lr = static_cast<T*>(p[3]), *log_eta = static_cast<T*>(p[4]), *log_keep = static_cast<T*>(p[5]);
    // p: q k v lr log_eta log_keep | M_l | S_l | P_l | y | M_out_l | S_out_l | M_st_l | S_st_l | work rows
    const int iM = 6, iS = 6 + L, iP = 6 + 2 * L, iy = 6 + 3 * L, iMo = iy + 1, iSo = iMo + L, iMs = iSo + L,
              iSs = iMs + L, iW = iSs + L;
    T* y = static_cast<T*>(p[iy]);
    T* work = static_cast<T**>(p[iW])[b];  // this row's workspace, K slots
    // The state lives in the chunk-start slots the backward needs (M_st, S_st: chunk j reads slot
    // j and writes its end state into slot j + 1, the last chunk into M_out / S_out), so no
    // chunk copies it (the copies showed as memmove at 5% of the op's samples at the quickstart's
    // size; without them the op was the same within noise, and the state has one place).
    auto at = [&](int base, int l, long slot) { return static_cast<T*>(p[base + l]) + slot * f.w[l] * f.w[l + 1]; };
    std::vector<const T*> P(L, nullptr);
    for (int l = 0; l < L; ++l) {
        const long sz = (long)f.w[l] * f.w[l + 1];
        std::copy(at(iM, l, b), at(iM, l, b) + sz, at(iMs, l, (long)b * K));
        if (f.has_S) std::copy(at(iS, l, b), at(iS, l, b) + sz, at(iSs, l, (long)b * K));
        if (f.has_P) P[l] = at(iP, l, b);
    }
    std::vector<Coefs<T>> co(sl, Coefs<T>(C));
    MlpChunk<T> ch(f);
    const long slot = ch.bind(nullptr, nullptr, nullptr);  // floats per chunk of the workspace
    std::vector<T> w;
    for (int j = 0; j < K; ++j) {
        const long cs = (long)b * K + j, rows = cs * C * d;
        const bool last = j + 1 == K;
        std::vector<const T*> Mc(L), Sc(L), theta(L);
        std::vector<const Coefs<T>*> cl(L);
        for (int s = 0; s < sl; ++s)
            co[s].compute(lr + (cs * sl + s) * C, f.has_S ? log_eta + cs * C : nullptr,
                          log_keep ? log_keep + cs * C : nullptr, f.has_S);
        for (int l = 0; l < L; ++l) {
            Mc[l] = at(iMs, l, cs);
            Sc[l] = f.has_S ? at(iSs, l, cs) : nullptr;
            const int s = std::min(l, sl - 1);
            cl[l] = &co[s];
            theta[l] = lr + (cs * sl + s) * C;
        }
        ch.bind(work + j * slot, k + rows, q + rows);
        ch.keys(k + rows, v + rows, Mc, theta);
        ch.reads(q + rows, Mc, Sc, P, cl, y + rows);
        for (int l = 0; l < L; ++l) {  // M' = bl M + (1 - bl) P + fl S + a^T (g o D),  S' = ml S + a^T (n o D)
            const int i = f.w[l], o = f.w[l + 1];
            const long sz = (long)i * o;
            const Coefs<T>& c = *cl[l];
            const T bl = c.beta[C - 1];
            const T *gl = c.G.data() + (C - 1) * C, *nl = c.N.data() + (C - 1) * C;
            // what is off is a valid array times 0: one loop the compiler vectorizes, no selects
            const T cp = f.has_P ? 1 - bl : T(0), cf = f.has_S ? c.f[C - 1] : T(0);
            const T *Ml = Mc[l], *Pl = f.has_P ? P[l] : Ml, *Sl = f.has_S ? Sc[l] : Ml;
            T* __restrict Mn = last ? at(iMo, l, b) : at(iMs, l, cs + 1);
#pragma omp simd
            for (long e = 0; e < sz; ++e) Mn[e] = bl * Ml[e] + cp * Pl[e] + cf * Sl[e];
            w.resize(C * o);
            for (int row = 0; row < C; ++row)
                for (int q2 = 0; q2 < o; ++q2) w[row * o + q2] = gl[row] * ch.D[l][row * o + q2];
            mm<T>(true, false, i, o, C, ch.a[l].data(), w.data(), Mn, T(1));
            if (f.has_S) {
                const T ml = c.m[C - 1];
                T* __restrict Sn = last ? at(iSo, l, b) : at(iSs, l, cs + 1);
#pragma omp simd
                for (long e = 0; e < sz; ++e) Sn[e] = ml * Sl[e];
                for (int row = 0; row < C; ++row)
                    for (int q2 = 0; q2 < o; ++q2) w[row * o + q2] = nl[row] * ch.D[l][row * o + q2];
                mm<T>(true, false, i, o, C, ch.a[l].data(), w.data(), Sn, T(1));
            }
        }
    }
}

template <typename T>
void mlp_backward_row(const MlpFlags& f, int b, void** p) {
    const int K = f.K, C = f.C, L = f.L, sl = f.slots, d = f.w[0];
    // p: q k v lr log_eta log_keep | P_l | M_st_l | S_st_l | dy | dM_l | dS_l | dq dk dv | dlr dlog_eta
    //    dlog_keep | dM0_l | dS0_l | dP_l | work rows (as the forward left them)
    const int iP = 6, iMs = 6 + L, iSs = 6 + 2 * L, idy = 6 + 3 * L, idM = idy + 1, idS = idM + L, idq = idS + L,
              idlr = idq + 3, idM0 = idlr + 3, idS0 = idM0 + L, idP = idS0 + L, iW = idP + L;
    T* work = static_cast<T**>(p[iW])[b];  // this row's workspace, K slots
    const T *q = static_cast<T*>(p[0]), *k = static_cast<T*>(p[1]), *v = static_cast<T*>(p[2]);
    const T *lr = static_cast<T*>(p[3]), *log_eta = static_cast<T*>(p[4]), *log_keep = static_cast<T*>(p[5]);
    const T* dy = static_cast<T*>(p[idy]);
    T *dq = static_cast<T*>(p[idq]), *dk = static_cast<T*>(p[idq + 1]), *dv = static_cast<T*>(p[idq + 2]);
    T *dlr = static_cast<T*>(p[idlr]), *dle = static_cast<T*>(p[idlr + 1]), *dlk = static_cast<T*>(p[idlr + 2]);
    std::vector<std::vector<T>> dM(L), dS(L), dP(L), gM(L), gS(L);
    std::vector<const T*> P(L, nullptr);
    for (int l = 0; l < L; ++l) {
        const long sz = (long)f.w[l] * f.w[l + 1];
        row_of(p, idM, f, l, b, true, dM[l]);
        row_of(p, idS, f, l, b, f.has_S, dS[l]);
        dP[l].assign(f.has_P ? sz : 0, T(0));
        if (f.has_P) P[l] = static_cast<T*>(p[iP + l]) + b * sz;
        gM[l].resize(sz);
        gS[l].resize(sz);
    }
    std::vector<Coefs<T>> co(sl, Coefs<T>(C));
    MlpChunk<T> ch(f);
    const long slot = ch.bind(nullptr, nullptr, nullptr);  // floats per chunk of the workspace
    // per slot: the coefficients' gradients of one chunk (layers sharing a slot add up)
    std::vector<std::vector<T>> gbeta(sl), gf(sl), gG(sl), ggl(sl), gnl(sl);
    std::vector<T> gbl(sl), gfl(sl), gml(sl), tmp_lr(C), tmp_le(C), tmp_lk(C);
    std::vector<std::vector<T>> dD(L), da(L), dzk(L);
    for (int l = 0; l < L; ++l) {
        dD[l].resize(C * f.w[l + 1]);
        da[l].resize(C * f.w[l]);
        dzk[l].resize(C * f.w[l + 1]);
    }
    std::vector<T> h, w, dz(C * d), dx, dgt(C * C), gt(C * C), dcar;
    for (int j = K - 1; j >= 0; --j) {
        const long cs = (long)b * K + j, rows = cs * C * d;
        std::vector<const T*> Mc(L), Sc(L);
        std::vector<const Coefs<T>*> cl(L);
        for (int s = 0; s < sl; ++s) {
            co[s].compute(lr + (cs * sl + s) * C, f.has_S ? log_eta + cs * C : nullptr,
                          log_keep ? log_keep + cs * C : nullptr, f.has_S);
            for (auto* g : {&gbeta[s], &gf[s], &ggl[s], &gnl[s]}) g->assign(C, T(0));
            gG[s].assign(C * C, T(0));
            gbl[s] = gfl[s] = gml[s] = 0;
        }
        for (int l = 0; l < L; ++l) {
            const long sz = (long)f.w[l] * f.w[l + 1];
            Mc[l] = static_cast<T*>(p[iMs + l]) + cs * sz;
            Sc[l] = f.has_S ? static_cast<T*>(p[iSs + l]) + cs * sz : nullptr;
            const int s = std::min(l, sl - 1);
            cl[l] = &co[s];
        }
        ch.bind(work + j * slot, k + rows, q + rows);  // the forward's keys and reads of this chunk
        // 1. the end-of-chunk state
        for (int l = 0; l < L; ++l) {
            const int i = f.w[l], o = f.w[l + 1], s = std::min(l, sl - 1);
            const long sz = (long)i * o;
            const Coefs<T>& c = *cl[l];
            const T bl = c.beta[C - 1];
            const T *gl = c.G.data() + (C - 1) * C, *nl = c.N.data() + (C - 1) * C;
            const T* Ml = Mc[l];
            // raw pointers in the state-sized loops: indexed through vector<vector<T>> the loops
            // stayed scalar (perf: vsubss, a third of this function), as the compiler reloads the
            // data pointers after every store that might alias them
            T* __restrict gMl = gM[l].data();
            const T* dMl = dM[l].data();
            T dbl = 0;
            if (f.has_P) {
                const T* Pl = P[l];
                T* __restrict dPl = dP[l].data();
#pragma omp simd reduction(+ : dbl)
                for (long e = 0; e < sz; ++e) {
                    gMl[e] = bl * dMl[e];
                    dbl += dMl[e] * (Ml[e] - Pl[e]);
                    dPl[e] += (1 - bl) * dMl[e];
                }
            } else {
#pragma omp simd reduction(+ : dbl)
                for (long e = 0; e < sz; ++e) {
                    gMl[e] = bl * dMl[e];
                    dbl += dMl[e] * Ml[e];
                }
            }
            gbl[s] += dbl;
            h.resize(C * o);
            w.resize(C * o);
            mm<T>(false, false, C, o, i, ch.a[l].data(), dM[l].data(), h.data());  // hm = a dM
            for (int row = 0; row < C; ++row) {
                ggl[s][row] += dot(ch.D[l].data() + row * o, h.data() + row * o, o);
                for (int e = 0; e < o; ++e) {
                    dD[l][row * o + e] = gl[row] * h[row * o + e];
                    w[row * o + e] = gl[row] * ch.D[l][row * o + e];
                }
            }
            mm<T>(false, true, C, i, o, w.data(), dM[l].data(), da[l].data());  // da = (g o D) dM^T
            if (f.has_S) {
                const T fl = c.f[C - 1], ml = c.m[C - 1];
                const T* Sl = Sc[l];
                T* __restrict gSl = gS[l].data();
                const T* dSl = dS[l].data();
                T dfl = 0, dml = 0;  // one pass over the state for the three
#pragma omp simd reduction(+ : dfl, dml)
                for (long e = 0; e < sz; ++e) {
                    gSl[e] = fl * dMl[e] + ml * dSl[e];
                    dfl += dMl[e] * Sl[e];
                    dml += dSl[e] * Sl[e];
                }
                gfl[s] += dfl;
                gml[s] += dml;
                mm<T>(false, false, C, o, i, ch.a[l].data(), dS[l].data(), h.data());  // hs = a dS
                for (int row = 0; row < C; ++row) {
                    gnl[s][row] += dot(ch.D[l].data() + row * o, h.data() + row * o, o);
                    for (int e = 0; e < o; ++e) {
                        dD[l][row * o + e] += nl[row] * h[row * o + e];
                        w[row * o + e] = nl[row] * ch.D[l][row * o + e];
                    }
                }
                mm<T>(false, true, C, i, o, w.data(), dS[l].data(), da[l].data(), T(1));
            }
        }
        // 2. the reads, last layer first: dz = d loss / d zr_l
        T* dqj = dq + rows;
        std::copy(dy + rows, dy + rows + C * d, dz.begin());
        if (f.residual) std::copy(dy + rows, dy + rows + C * d, dqj);
        for (int l = L - 1; l >= 0; --l) {
            const int i = f.w[l], o = f.w[l + 1], s = std::min(l, sl - 1);
            const Coefs<T>& c = *cl[l];
            const T* xl = ch.x[l].data();
            dx.assign(C * i, T(0));
            w.resize(C * o);
            const T *xm = ch.xm[l].data(), *xp = ch.xp[l].data(), *xs = ch.xs[l].data(), *dzp = dz.data();
            T* __restrict wp = w.data();
            // what is off is a valid array (xp, xs: xm) times 0 or a sum never used: with the
            // selects inside, this loop compiled to scalar code (perf annotate: vfmadd231ss)
            const T cp = f.has_P ? T(1) : T(0);
            for (int row = 0; row < C; ++row) {
                T gb = 0, gfv = 0;
                const T br = c.beta[row];
#pragma omp simd reduction(+ : gb, gfv)
                for (int e = 0; e < o; ++e) {
                    const int at = row * o + e;
                    gb += dzp[at] * (xm[at] - cp * xp[at]);
                    gfv += dzp[at] * xs[at];
                    wp[at] = br * dzp[at];  // bdz
                }
                gbeta[s][row] += gb;
                if (f.has_S) gf[s][row] += gfv;
            }
            mm<T>(true, false, i, o, C, xl, w.data(), gM[l].data(), T(1));  // gM += x^T bdz
            mm<T>(false, true, C, i, o, w.data(), Mc[l], dx.data());       // dx = bdz M^T
            if (f.has_P) {
                for (int e = 0; e < C * o; ++e) w[e] = dz[e] - w[e];  // (1 - beta) dz
                mm<T>(true, false, i, o, C, xl, w.data(), dP[l].data(), T(1));
                mm<T>(false, true, C, i, o, w.data(), P[l], dx.data(), T(1));
            }
            if (f.has_S) {
                for (int row = 0; row < C; ++row)
                    for (int e = 0; e < o; ++e) w[row * o + e] = c.f[row] * dz[row * o + e];  // fdz
                mm<T>(true, false, i, o, C, xl, w.data(), gS[l].data(), T(1));
                mm<T>(false, true, C, i, o, w.data(), Sc[l], dx.data(), T(1));
            }
            for (int e = 0; e < C * C; ++e) gt[e] = c.G[e] * ch.t[l][e];
            mm<T>(true, false, C, o, C, gt.data(), dz.data(), dD[l].data(), T(1));  // dD += (G o t)^T dz
            mm<T>(false, true, C, C, o, dz.data(), ch.D[l].data(), dgt.data());   // d loss / d (G o t)
            for (int e = 0; e < C * C; ++e) {
                gG[s][e] += dgt[e] * ch.t[l][e];
                dgt[e] *= c.G[e];  // dt
            }
            mm<T>(false, false, C, i, C, dgt.data(), ch.a[l].data(), dx.data(), T(1));  // dx += dt a
            mm<T>(true, false, C, i, C, dgt.data(), xl, da[l].data(), T(1));         // da += dt^T x
            if (l > 0) {
                dz.resize(C * i);
                for (int e = 0; e < C * i; ++e) dz[e] = ch.zr1[l - 1][e] * dx[e];
            } else {
                for (int e = 0; e < C * d; ++e) dqj[e] = (f.residual ? dqj[e] : T(0)) + dx[e];
            }
        }
        dz.resize(C * d);
        // 3. the inner backward (D_l = act'(z_l) o carried_l), then the keys' forward
        for (int l = 0; l + 1 < L; ++l) {
            const int o = f.w[l + 1], o2 = f.w[l + 2];
            dcar.resize(C * o);
            for (int e = 0; e < C * o; ++e) {
                dcar[e] = ch.z1[l][e] * dD[l][e];
                dzk[l][e] = ch.z2[l][e] * ch.carried[l][e] * dD[l][e];
            }
            mm<T>(false, false, C, o2, o, dcar.data(), Mc[l + 1], dD[l + 1].data(), T(1));      // dD_{l+1} += dcar M
            mm<T>(true, false, o, o2, C, dcar.data(), ch.D[l + 1].data(), gM[l + 1].data(), T(1));  // gM += dcar^T D
        }
        T *dkj = dk + rows, *dvj = dv + rows;
        for (int row = 0; row < C; ++row)
            for (int e = 0; e < d; ++e) {
                const int at = row * d + e;
                const T de = 2 * ch.r[row] * dD[L - 1][at];  // l2: d pred = 2 r dD, d v = -2 r dD
                dvj[at] = -de;
                dzk[L - 1][at] = de;  // no second-order term on the last layer
                if (f.residual) dkj[at] = de;
            }
        for (int l = L - 1; l >= 0; --l) {
            const int i = f.w[l], o = f.w[l + 1];
            mm<T>(true, false, i, o, C, ch.a[l].data(), dzk[l].data(), gM[l].data(), T(1));  // gM += a^T dzk
            mm<T>(false, true, C, i, o, dzk[l].data(), Mc[l], da[l].data(), T(1));            // da += dzk M^T
            if (l > 0) {
                for (int e = 0; e < C * i; ++e) dzk[l - 1][e] += ch.z1[l - 1][e] * da[l][e];
            } else {
                for (int e = 0; e < C * d; ++e) dkj[e] = (f.residual ? dkj[e] : T(0)) + da[0][e];
            }
        }
        // the coefficients' gradients to the gates, per slot (eta and keep are shared)
        for (int s = 0; s < sl; ++s) {
            co[s].backward(gbeta[s].data(), gf[s].data(), gG[s].data(), ggl[s].data(), gnl[s].data(), gbl[s], gfl[s],
                           gml[s], f.has_S, tmp_lr.data(), tmp_le.data(), log_keep ? tmp_lk.data() : nullptr);
            for (int c = 0; c < C; ++c) {
                dlr[(cs * sl + s) * C + c] = tmp_lr[c];
                if (f.has_S) dle[cs * C + c] = (s ? dle[cs * C + c] : T(0)) + tmp_le[c];
                if (log_keep) dlk[cs * C + c] = (s ? dlk[cs * C + c] : T(0)) + tmp_lk[c];
            }
        }
        for (int l = 0; l < L; ++l) {
            std::swap(dM[l], gM[l]);
            if (f.has_S) std::swap(dS[l], gS[l]);
        }
    }
    for (int l = 0; l < L; ++l) {
        const long sz = (long)f.w[l] * f.w[l + 1];
        std::copy(dM[l].begin(), dM[l].end(), static_cast<T*>(p[idM0 + l]) + b * sz);
        if (f.has_S) std::copy(dS[l].begin(), dS[l].end(), static_cast<T*>(p[idS0 + l]) + b * sz);
        if (f.has_P) std::copy(dP[l].begin(), dP[l].end(), static_cast<T*>(p[idP + l]) + b * sz);
    }
}

}  // namespace

// p: the tensors' data pointers in the order of triton_linear's kernels (unused ones may be any
// valid pointer); flags: has_S, has_P, cap_on, residual; double: 1 for float64, 0 for float32.
extern "C" void linear_forward(int B, int K, int C, int D, int has_S, int has_P, int cap_on, int residual, double cap,
                               int is_double, int threads, void** p) {
    const Flags f{K, C, D, has_S != 0, has_P != 0, cap_on != 0, residual != 0, cap};
    if (is_double) forward<double>(B, f, p, threads);
    else forward<float>(B, f, p, threads);
}

extern "C" void linear_backward(int B, int K, int C, int D, int has_S, int has_P, int cap_on, int residual, double cap,
                                int is_double, int threads, void** p) {
    const Flags f{K, C, D, has_S != 0, has_P != 0, cap_on != 0, residual != 0, cap};
    if (is_double) backward<double>(B, f, p, threads);
    else backward<float>(B, f, p, threads);
}

// floats per (row, chunk) of the workspace the MLP forward fills for its backward
extern "C" long mlp_work_floats(int K, int C, int L, const int* w, int has_S, int has_P) {
    const MlpFlags f{K, C, L, 1, w, has_S != 0, has_P != 0, false, false, false, 0.0};
    MlpChunk<float> ch(f);
    return ch.bind(nullptr, nullptr, nullptr);
}

// act, act' and act'' of n float32 values as the MLP kernel computes them (the tests check them
// against float64 references)
extern "C" void activations(int silu, int n, const float* z, float* a0, float* a1, float* a2) {
    act_rows<float>(silu != 0, n, z, a0, a1, a2);
}

// widths: w_0 .. w_L; p as mlp_forward_row / mlp_backward_row list them
template <void (*Row32)(const MlpFlags&, int, void**), void (*Row64)(const MlpFlags&, int, void**)>
void mlp_rows(int B, int K, int C, int L, const int* widths, int slots, int has_S, int has_P, int cap_on,
              int residual, int silu, double cap, int is_double, int threads, void** p) {
    const MlpFlags f{K, C, L, slots, widths, has_S != 0, has_P != 0, cap_on != 0, residual != 0, silu != 0, cap};
    over_rows(B, threads, [&](int b) { (is_double ? Row64 : Row32)(f, b, p); });
}

extern "C" void mlp_forward(int B, int K, int C, int L, const int* w, int slots, int has_S, int has_P, int cap_on,
                            int residual, int silu, double cap, int is_double, int threads, void** p) {
    mlp_rows<mlp_forward_row<float>, mlp_forward_row<double>>(B, K, C, L, w, slots, has_S, has_P, cap_on, residual,
                                                              silu, cap, is_double, threads, p);
}

extern "C" void mlp_backward(int B, int K, int C, int L, const int* w, int slots, int has_S, int has_P, int cap_on,
                             int residual, int silu, double cap, int is_double, int threads, void** p) {
    mlp_rows<mlp_backward_row<float>, mlp_backward_row<double>>(B, K, C, L, w, slots, has_S, has_P, cap_on, residual,
                                                                silu, cap, is_double, threads, p);
}


// f called with a null T* for T = double or float, by an entry point's dtype flag
template <typename F>
void by_dtype(int is_double, F&& f) {
    if (is_double) f(static_cast<double*>(nullptr));
    else f(static_cast<float*>(nullptr));
}

// ---------------------------------------------------------------------------------------------
// The short convolution (conv.py's _ShiftedTaps): y_t = bias + sum_i w_i z_{t + i} over z =
// [lead zeros ; src], src (B, m, d) with m = n + k - 1 - lead and w (k, d): each output row is
// one pass over its k input rows with the channels (contiguous) vectorized, the rows over
// OpenMP threads. torch's version is k shifted multiply-adds over the whole tensor, each a pass
// through memory, and its backward twice that.
namespace conv {

template <typename T>
void conv_forward_rows(int B, int m, int n, int d, int k, int lead, const T* src, const T* w, const T* bias, T* y,
                       int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long row = 0; row < (long)B * n; ++row) {
        const long b = row / n;
        const int t = row % n;
        T* out = y + row * d;
        std::copy(bias, bias + d, out);
        for (int i = 0; i < k; ++i) {
            const int r = t + i - lead;  // src's row under tap i (rows before src are zeros)
            if (r < 0) continue;
            const T *s = src + (b * m + r) * d, *wi = w + (long)i * d;
#pragma omp simd
            for (int c = 0; c < d; ++c) out[c] += wi[c] * s[c];
        }
    }
}

// dsrc_r = sum_i w_i dy_{r + lead - i}; dw_i = sum_t dy_t z_{t + i}; dbias = sum_t dy_t: one pass
// over src's rows, each thread summing its own dw and dbias, added up in thread order after.
template <typename T>
void conv_backward_rows(int B, int m, int n, int d, int k, int lead, const T* src, const T* w, const T* dy, T* dsrc,
                        T* dw, T* db, int threads) {
    const auto sums = rows_summing<T>((long)B * m, threads, (long)(k + 1) * d, [&](long row, T* mine) {
        const long b = row / m;
        const int r = row % m;
        T* out = dsrc + row * d;
        const T* s = src + row * d;
        std::fill(out, out + d, T(0));
        for (int i = 0; i < k; ++i) {
            const int t = r + lead - i;  // the output row that read src row r by tap i
            if (t < 0 || t >= n) continue;
            const T *g = dy + (b * n + t) * d, *wi = w + (long)i * d;
            T* dwi = mine + (long)i * d;
#pragma omp simd
            for (int c = 0; c < d; ++c) {
                out[c] += wi[c] * g[c];
                dwi[c] += g[c] * s[c];
            }
            if (i == k - 1) {  // the last tap reads every output row once: the bias's sum
                T* dbm = mine + (long)k * d;
#pragma omp simd
                for (int c = 0; c < d; ++c) dbm[c] += g[c];
            }
        }
    });
    std::copy(sums.begin(), sums.begin() + (long)k * d, dw);
    std::copy(sums.begin() + (long)k * d, sums.end(), db);
}

}  // namespace conv

// the short convolution's entry points: p = src, w (k, d), bias, y | src, w, dy, dsrc, dw, dbias
extern "C" void conv_forward(int B, int m, int n, int d, int k, int lead, int is_double, int threads, void** p) {
    by_dtype(is_double, [&](auto* tag) {
        using T = std::remove_pointer_t<decltype(tag)>;
        auto a = [&](int i) { return static_cast<T*>(p[i]); };
        conv::conv_forward_rows<T>(B, m, n, d, k, lead, a(0), a(1), a(2), a(3), threads);
    });
}

extern "C" void conv_backward(int B, int m, int n, int d, int k, int lead, int is_double, int threads, void** p) {
    by_dtype(is_double, [&](auto* tag) {
        using T = std::remove_pointer_t<decltype(tag)>;
        auto a = [&](int i) { return static_cast<T*>(p[i]); };
        conv::conv_backward_rows<T>(B, m, n, d, k, lead, a(0), a(1), a(2), a(3), a(4), a(5), threads);
    });
}


// ---------------------------------------------------------------------------------------------
// SiLU, then the l2 norm of each row (F.normalize(F.silu(x), dim=-1), eps 1e-12): the memory's
// q, k and v of each head (Titans §4.4). Every row is one pass forward and one backward, in
// cache; torch's silu, norm and division take ~15 passes through memory for the pair.
namespace silu_norm {

template <typename T>
constexpr T eps() {
    return T(1e-12);
}

// s = silu(x) and silu'(x) of each row by act_rows (the MLP memory's SiLU), then the norm
template <typename T>
void forward_rows(long rows, int d, const T* x, T* y, int threads) {
#pragma omp parallel num_threads(threads)
    {
        std::vector<T> d1(d);
#pragma omp for schedule(static)
        for (long r = 0; r < rows; ++r) {
            T* yr = y + r * d;
            act_rows<T>(true, d, x + r * d, yr, d1.data(), nullptr);
            const T inv = 1 / std::max(std::sqrt(dot(yr, yr, d)), eps<T>());
#pragma omp simd
            for (int c = 0; c < d; ++c) yr[c] *= inv;
        }
    }
}

// y = s / max(|s|, eps): ds = (dy - y (y . dy)) / |s| (dy / eps where |s| <= eps), dx = ds silu'(x)
template <typename T>
void backward_rows(long rows, int d, const T* x, const T* dy, T* dx, int threads) {
#pragma omp parallel num_threads(threads)
    {
        std::vector<T> s(d), d1(d);
#pragma omp for schedule(static)
        for (long r = 0; r < rows; ++r) {
            const T* gr = dy + r * d;
            T* out = dx + r * d;
            act_rows<T>(true, d, x + r * d, s.data(), d1.data(), nullptr);
            const T norm = std::sqrt(dot(s.data(), s.data(), d)), inv = 1 / std::max(norm, eps<T>());
            const T proj = norm > eps<T>() ? dot(s.data(), gr, d) * inv * inv : T(0);  // y . dy / |s|, per s
#pragma omp simd
            for (int c = 0; c < d; ++c) out[c] = (gr[c] - s[c] * proj) * inv * d1[c];
        }
    }
}

}  // namespace silu_norm

namespace rms {

// y = x r w, r = 1 / sqrt(mean(x^2) + eps) per row of d; r is kept for the backward. torch's
// CPU rms_norm runs nine kernels forward (pow, mean, two dtype copies, add, rsqrt, two muls,
// type_as) and autograd's chain of them back: a tenth of a small model's training step.
template <typename T>
void forward_rows(long rows, int d, const T* x, const T* w, T eps, T* y, T* r, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long i = 0; i < rows; ++i) {
        const T* xr = x + i * d;
        T* yr = y + i * d;
        const T ri = 1 / std::sqrt(dot(xr, xr, d) / d + eps);
#pragma omp simd
        for (int c = 0; c < d; ++c) yr[c] = xr[c] * ri * w[c];
        r[i] = ri;
    }
}

// g = dy w, xh = x r: dx = r (g - xh mean(g xh)); dw = sum over rows of dy xh (rows_summing)
template <typename T>
void backward_rows(long rows, int d, const T* x, const T* w, const T* r, const T* dy, T* dx, T* dw, int threads) {
    // Every array through a local restrict pointer, the index a long: with the lambda's captured
    // w and an int index GCC read w with gathers (vgatherqps), 6x slower than these loops.
    const auto sums = rows_summing<T>(rows, threads, d, [&](long i, T* acc) {
        const T *__restrict xr = x + i * d, *__restrict gr = dy + i * d, *__restrict wv = w;
        T *__restrict out = dx + i * d, *__restrict dwr = acc;
        const T ri = r[i];
        T s = 0;
#pragma omp simd reduction(+ : s)
        for (long c = 0; c < d; ++c) s += gr[c] * wv[c] * xr[c];
        const T m = s * ri * ri / d;  // mean(g xh) r
#pragma omp simd
        for (long c = 0; c < d; ++c) {
            out[c] = ri * (gr[c] * wv[c] - xr[c] * m);
            dwr[c] += gr[c] * xr[c] * ri;
        }
    });
    std::copy(sums.begin(), sums.end(), dw);
}

}  // namespace rms

// ---------------------------------------------------------------------------------------------
// SwiGLU's product (mlp.SwiGLU): each row of the gate_up projection is [gate | up], h each,
// y = silu(gate) up; back, d gate = dy up silu'(gate), d up = dy silu(gate). torch runs silu,
// the product, and back silu_backward and two products, each a pass through memory with its
// own allocation; these are one pass each way, silu and silu' by act_rows (the MLP memory's).
namespace swiglu {

template <typename T>
void forward_rows(long rows, int h, const T* z, T* y, int threads) {
#pragma omp parallel num_threads(threads)
    {
        std::vector<T> d1(h);
#pragma omp for schedule(static)
        for (long r = 0; r < rows; ++r) {
            const T* __restrict up = z + (2 * r + 1) * h;
            T* __restrict yr = y + r * h;
            act_rows<T>(true, h, z + 2 * r * h, yr, d1.data(), nullptr);
#pragma omp simd
            for (long c = 0; c < h; ++c) yr[c] *= up[c];
        }
    }
}

template <typename T>
void backward_rows(long rows, int h, const T* z, const T* dy, T* dz, int threads) {
#pragma omp parallel num_threads(threads)
    {
        std::vector<T> s(h), d1(h);
#pragma omp for schedule(static)
        for (long r = 0; r < rows; ++r) {
            const T *__restrict up = z + (2 * r + 1) * h, *__restrict g = dy + r * h;
            T *__restrict dgate = dz + 2 * r * h, *__restrict dup = dgate + h;
            const T *__restrict sv = s.data(), *__restrict dv = d1.data();
            act_rows<T>(true, h, z + 2 * r * h, s.data(), d1.data(), nullptr);
#pragma omp simd
            for (long c = 0; c < h; ++c) {
                dgate[c] = g[c] * up[c] * dv[c];
                dup[c] = g[c] * sv[c];
            }
        }
    }
}

}  // namespace swiglu

// rows of [gate | up], h each: p = z, y | z, dy, dz
extern "C" void swiglu_forward(long rows, int h, int is_double, int threads, void** p) {
    by_dtype(is_double, [&](auto* tag) {
        using T = std::remove_pointer_t<decltype(tag)>;
        swiglu::forward_rows<T>(rows, h, static_cast<T*>(p[0]), static_cast<T*>(p[1]), threads);
    });
}

extern "C" void swiglu_backward(long rows, int h, int is_double, int threads, void** p) {
    by_dtype(is_double, [&](auto* tag) {
        using T = std::remove_pointer_t<decltype(tag)>;
        swiglu::backward_rows<T>(rows, h, static_cast<T*>(p[0]), static_cast<T*>(p[1]), static_cast<T*>(p[2]),
                                 threads);
    });
}

// ---------------------------------------------------------------------------------------------
// Rotary positions (attention.Rotary): each row of d is d/2 pairs (x_i, x_{i + d/2}), pair i of
// the token at table row t turned by its angle, y = (x_i cos - x_{i+d/2} sin, x_{i+d/2} cos + x_i sin).
// A rotation's transpose is the turn back, so the backward is this with -sin. torch's CPU path is
// four broadcast products over 8-wide rows, two subtractions and a cat each way (134 us for 64K
// values); this one pass made the quickstart's swa step 1.05x faster. x is read in place: the
// query and key rows of a qkv projection, tokens `ts` apart, g rows of d each; y is (tokens, g, d).
namespace rope {

template <typename T>
void rotate(long tokens, int n, int g, int d, long ts, const T* x, const T* cs, const T* sn, T* y, int threads) {
    const int h = d / 2;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long t = 0; t < tokens; ++t) {
        const T *__restrict c = cs + (t % n) * h, *__restrict s = sn + (t % n) * h;
        for (int j = 0; j < g; ++j) {
            const T* __restrict a = x + t * ts + long(j) * d;
            T* __restrict o = y + (t * g + j) * long(d);
#pragma omp simd
            for (int i = 0; i < h; ++i) {
                o[i] = a[i] * c[i] - a[i + h] * s[i];
                o[i + h] = a[i + h] * c[i] + a[i] * s[i];
            }
        }
    }
}

}  // namespace rope

// tokens of g rows of d, token t at table row t % n: p = x, cos, sin, y
extern "C" void rope_rotate(long tokens, int n, int g, int d, long ts, int is_double, int threads, void** p) {
    by_dtype(is_double, [&](auto* tag) {
        using T = std::remove_pointer_t<decltype(tag)>;
        auto a = [&](int i) { return static_cast<T*>(p[i]); };
        rope::rotate<T>(tokens, n, g, d, ts, a(0), a(1), a(2), a(3), threads);
    });
}

// rows of d: p = x, w, y, r | x, w, r, dy, dx, dw
extern "C" void rms_norm_forward(long rows, int d, double eps, int is_double, int threads, void** p) {
    by_dtype(is_double, [&](auto* tag) {
        using T = std::remove_pointer_t<decltype(tag)>;
        auto a = [&](int i) { return static_cast<T*>(p[i]); };
        rms::forward_rows<T>(rows, d, a(0), a(1), T(eps), a(2), a(3), threads);
    });
}

extern "C" void rms_norm_backward(long rows, int d, int is_double, int threads, void** p) {
    by_dtype(is_double, [&](auto* tag) {
        using T = std::remove_pointer_t<decltype(tag)>;
        auto a = [&](int i) { return static_cast<T*>(p[i]); };
        rms::backward_rows<T>(rows, d, a(0), a(1), a(2), a(3), a(4), a(5), threads);
    });
}

// rows of d: p = x, y | x, dy, dx
extern "C" void silu_l2_forward(long rows, int d, int is_double, int threads, void** p) {
    by_dtype(is_double, [&](auto* tag) {
        using T = std::remove_pointer_t<decltype(tag)>;
        silu_norm::forward_rows<T>(rows, d, static_cast<T*>(p[0]), static_cast<T*>(p[1]), threads);
    });
}

extern "C" void silu_l2_backward(long rows, int d, int is_double, int threads, void** p) {
    by_dtype(is_double, [&](auto* tag) {
        using T = std::remove_pointer_t<decltype(tag)>;
        silu_norm::backward_rows<T>(rows, d, static_cast<T*>(p[0]), static_cast<T*>(p[1]), static_cast<T*>(p[2]),
                                    threads);
    });
}
