"""The Titans neural long-term memory update (eqs. 12-16): fast chunked form and naive reference.

Per head, row vectors, memory f_W(x) = act(... act(x W_1) ...) W_L, optionally `x + LN(.)`
around it (residual; LayerNorm gain/bias are outer parameters, never fast weights). For token t:

    loss      l_t(W)  = || f_W(k_t) - v_t ||^2                     (eq. 12, no 1/2: gradient has a 2;
                                                                   or another `Objective`: lp, huber, dot)
    momentum  S_t     = eta_t S_{t-1} - theta_t grad l_t(W_{t'})    (eq. 14)
    decay     M_t     = (1 - alpha_t) M_{t-1} + S_t                 (eq. 13)
    read      y_t     = f_{M_t}(q_t)            (`after_update`, TTT convention)
              y_t     = f_{W_{t'}}(q_t)         (`chunk_start`)

W_{t'} is the state at the start of t's chunk (paper §3.2; chunk_size 1 is the fully online rule).
Momentum off (None) means eta = 0 (no S state at all); decay off means alpha = 0.

Step cap (`MemoryModel.step_cap = c`, decision 0006 §4): token t's gradient is scaled by

    r_t = min(1, c l_t / sum_L theta_t,L |grad_L l_t|^2)     (taken as a constant: no outer gradient)

a normalised-LMS bound: the step never exceeds c / 4 over the Gauss-Newton curvature of l_t
along its error (for a linear memory with unit keys that curvature is 1, so r_t = 1 while
theta_t <= c / 4). A deep memory's curvature grows with its weights; without the cap a chunk of
similar keys at a fixed theta can overshoot, grow the weights and overshoot further.

`granularity="chunk"` is the coarser rule (titans-pytorch's): a chunk is one inner step with the
chunk means of theta, eta, alpha: S_k = eta S_{k-1} - theta sum_{t in k} grad l_t(W_{k-1}),
W_k = (1 - alpha) W_{k-1} + S_k; it needs `read="chunk_start"` (an in-chunk read would see the
chunk's future gates).

Shapes: q, k, v (b, h, n, d); lr, momentum, decay (b, h, n) or (b, h, n, L) (one value per memory
layer); state weights / momentum: tuples of (b, h, d_in, d_out). Internally (b h) is one bmm
batch and e is the hidden width of an MLP memory.

One file per algorithm, its reference beside it:

    common.py        state, f_W, its inner backward, the step cap, layouts
    coefficients.py  the per-token coefficients of a chunk from the gates (log space)
    step.py          one chunk of it: TTT dual-form reads and the end-of-chunk state
    token.py         the fast chunked loop, per-token gates (the paper's rule)
    backward.py      its outer backward written by hand (autograd.Function over whole chunks)
    chunk.py         granularity "chunk" (one step per chunk with mean gates)
    omega.py         the Omega rule's windows of key rows (ATLAS eq. 9)
    muon.py          Muon as the inner optimiser: Newton-Schulz on per-token momenta (ATLAS eqs. 32-33)
    mirror.py        the KL and l_q retentions' step: the state mapped to the weights, reads per token
    naive.py         the reference token loop, both granularities
    surprise.py      the inner loss along a sequence (a diagnostic)
    triton_*.py      Triton kernels of the whole chunk loop, forward and backward (GPU; tested
                     on CPU under TRITON_INTERPRET=1): linear and 2-layer MLP memory, built
                     from `triton_parts`, launched by `triton_loop.TritonLoop`
    cpu_kernel.cpp   the C++ kernel of the whole chunk loop on CPU (linear and MLP memory of
    cpu_loop.py      any depth, coefficients from the gates inside), its build and Functions;
                     the same library runs the layer's short conv and SiLU + l2 norm, and the
                     blocks' RMSNorm, rotary positions and SwiGLU product
"""

from components.ops.memory.common import (
    Activation,
    Granularity,
    MemoryModel,
    MemoryState,
    Objective,
    Read,
    Weights,
    init_memory_state,
    memory_read,
)
from components.ops.memory.naive import naive_memory_update
from components.ops.memory.surprise import chunk_surprise
from components.ops.memory.token import memory_update

__all__ = [
    "Activation",
    "Granularity",
    "MemoryModel",
    "MemoryState",
    "Objective",
    "Read",
    "Weights",
    "chunk_surprise",
    "init_memory_state",
    "memory_read",
    "memory_update",
    "naive_memory_update",
]
