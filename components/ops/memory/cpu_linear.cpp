// The chunk loop of the linear (matrix) memory on CPU, forward and backward: the math of
// triton_linear.py (itself step.chunk_step / backward.chunk_backward at depth 1), one (batch,
// head) row at a time with its states in cache, the rows over OpenMP threads, the products by
// MKL's GEMM as torch's CPU wheel exports it (sgemm_ / dgemm_ in libtorch_cpu.so).
//
// Layout (as the Triton kernels take it, see triton_loop.py): q, k, v, y (B, K, C, D); per-token
// coefficients (B, K, C); G (B, K, C, C); per-chunk scalars (B, K); states (B, D, D); the
// chunk-start states (B, K, D, D). Names: G = neg_G, gl = neg_g_last, nl = neg_n_last.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

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

// Row-major C (m x n) = alpha op(A) op(B) + beta C, with op(A) (m x k), op(B) (k x n), rows
// contiguous (A is m x k, or k x m when transposed; likewise B). Column-major GEMM on the
// transposes: C^T = op(B)^T op(A)^T.
template <typename T>
void mm(bool ta, bool tb, int m, int n, int k, const T* A, const T* B, T* C, T beta = 0, T alpha = 1) {
    const int lda = ta ? m : k, ldb = tb ? k : n;
    gemm(tb ? "T" : "N", ta ? "T" : "N", n, m, k, alpha, B, ldb, A, lda, beta, C, n);
}

template <typename T>
T dot(const T* x, const T* y, int n) {
    T s = 0;
    for (int i = 0; i < n; ++i) s += x[i] * y[i];
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
        std::vector<T> gG(C, T(0)), gN(C, T(0)), tmp(C);
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
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int b = 0; b < B; ++b)
        forward_row<T>(f, b, a(0), a(1), a(2), a(3), a(4), a(5), a(6), a(7), a(8), a(9), a(10), a(11), a(12), a(13));
}

template <typename T>
void backward(int B, const Flags& f, void** p, int threads) {
    auto a = [&](int i) { return static_cast<T*>(p[i]); };
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int b = 0; b < B; ++b)
        backward_row<T>(f, b, a(0), a(1), a(2), a(3), a(4), a(5), a(6), a(7), a(8), a(9), a(10), a(11), a(12), a(13),
                        a(14), a(15), a(16), a(17), a(18), a(19), a(20));
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
