"""The Titans neural long-term memory update (eqs. 12-16): fast chunked form and naive reference.

Per head, row vectors, memory f_W(x) = act(... act(x W_1) ...) W_L, optionally `x + LN(.)`
around it (residual; LayerNorm gain/bias are outer parameters, never fast weights). For token t:

    loss      l_t(W)  = || f_W(k_t) - v_t ||^2                     (eq. 12, no 1/2: gradient has a 2)
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

Fast path: a loop over chunks with matmuls inside: keys forward at the chunk-start weights, a
hand-derived backward (per-token gradients are outer products and are never built), per-token
coefficients from log-space cumulative sums (every exp has a non-positive argument), the TTT
dual form for per-token reads, and one matmul per weight for the end-of-chunk state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor
from torch.utils.checkpoint import checkpoint

Read = Literal["after_update", "chunk_start"]
Granularity = Literal["token", "chunk"]
Activation = Literal["gelu", "silu"]
Weights = tuple[Tensor, ...]


@dataclass
class MemoryState:
    """The memory after the tokens fed so far.

    weights:  M_t per layer, (b, h, d_in, d_out), float32 (or float64 in tests).
    momentum: S_t per layer, same shapes; None when momentum is off.
    anchor:   W_{t'}, the weights the current chunk's gradients are taken at; None at a chunk
              boundary (then it is `weights`).
    offset:   tokens of the current chunk already seen (0 at a boundary).
    pending:  granularity "chunk" only: (k, v, lr, momentum, decay) of the unfinished chunk's
              tokens, applied when the chunk completes.
    """

    weights: Weights
    momentum: Weights | None = None
    anchor: Weights | None = None
    offset: int = 0
    pending: tuple[Tensor | None, ...] | None = None


@dataclass(frozen=True)
class MemoryModel:
    """The memory's fixed (outer) structure around its fast weights: how f_W is evaluated
    (activation between layers, optionally `x + LN(f(x))`: residual and/or LayerNorm with
    per-head gain/bias of shape (h, d)) and where the forget gate pulls the weights: `prior`
    (per layer (h, d_in, d_out), the learned initial weights W_0) or zero (None, eq. 13):

        M_t = (1 - alpha_t) M_{t-1} + alpha_t P + S_t,  i.e. eq. 13 for the deviation M_t - P.

    step_cap: c of the per-token step cap in the module docstring (None: no cap).
    """

    activation: Activation = "gelu"
    residual: bool = False
    norm: tuple[Tensor, Tensor] | None = None
    eps: float = 1e-5
    prior: Weights | None = None
    step_cap: float | None = None


# ---------------------------------------------------------------------------------------------
# shared pieces


def _act(name: Activation, z: Tensor) -> Tensor:
    return F.gelu(z) if name == "gelu" else F.silu(z)


def _act_backward(name: Activation, g: Tensor, z: Tensor) -> Tensor:
    """g * act'(z). GELU uses the native kernel (it has a double backward); SiLU is written out
    because aten.silu_backward has no derivative in torch 2.13."""
    if name == "gelu":
        return torch.ops.aten.gelu_backward(g, z)
    s = torch.sigmoid(z)
    return g * s * (1 + z * (1 - s))


def _prior(model: MemoryModel, b: int) -> Weights | None:
    """The decay's target per layer, (h, i, o) -> (b h, i, o); None = zero."""
    if model.prior is None:
        return None
    return tuple(rearrange(w.expand(b, *w.shape), "b h i o -> (b h) i o") for w in model.prior)


def _norm_params(model: MemoryModel, b: int) -> tuple[Tensor, Tensor] | None:
    if model.norm is None:
        return None
    gain, bias = model.norm  # (h, d) -> (b h, 1, d)
    h, d = gain.shape
    return gain.expand(b, h, d).reshape(b * h, 1, d), bias.expand(b, h, d).reshape(b * h, 1, d)


def _finish(x: Tensor, z: Tensor, model: MemoryModel, norm: tuple[Tensor, Tensor] | None):
    """Output of the memory for input x whose last layer produced z: x + LN(z), LN(z), x + z or z.
    Also returns what the LayerNorm backward needs."""
    cache = None
    if norm is not None:
        mu = z.mean(-1, keepdim=True)
        rstd = torch.rsqrt((z - mu).pow(2).mean(-1, keepdim=True) + model.eps)
        xhat = (z - mu) * rstd
        z = xhat * norm[0] + norm[1]
        cache = (xhat, rstd)
    return (x + z if model.residual else z), cache


def _ln_backward(g: Tensor, xhat: Tensor, rstd: Tensor, gain: Tensor) -> Tensor:
    """d loss / d z for out = gain * xhat + bias, xhat = (z - mean) * rstd (biased variance)."""
    gh = g * gain
    return rstd * (gh - gh.mean(-1, keepdim=True) - xhat * (gh * xhat).mean(-1, keepdim=True))


def _forward(ws: Weights, x: Tensor, model: MemoryModel, norm) -> Tensor:
    """f_W(x) for x (B, c, d)."""
    z = x
    for i, w in enumerate(ws):
        z = z @ w
        if i < len(ws) - 1:
            z = _act(model.activation, z)
    return _finish(x, z, model, norm)[0]


def _keys_and_errors(
    ws: Weights,
    k: Tensor,
    v: Tensor,
    model: MemoryModel,
    norm,
    q: Tensor | None = None,
    q_layers: int = 0,
    theta=None,
):
    """Forward the keys at ws and back-propagate the loss by hand.

    Returns inputs[l] (the input of layer l, (B, c, d_l-1)) and deltas[l] = d loss / d z_l
    (B, c, d_l): token j's gradient for W_l is the outer product inputs[l][j]^T deltas[l][j];
    with `model.step_cap` the deltas come already scaled by the cap r_j (`_capped`).
    If q is given, its rows ride along through the first q_layers layers (same weights, one
    bmm for both) and the third result is their output there: the pre-activation after layer
    q_layers, or f_W(q) when q_layers is the whole depth.
    """
    c, depth = k.shape[1], len(ws)
    x = torch.cat([k, q], 1) if q is not None and q_layers else k
    inputs, pre, q_out = [], [], None
    for i, w in enumerate(ws):
        inputs.append(x[:, :c])
        z = x @ w
        if x.shape[1] > c and i == q_layers - 1:  # the queries leave here
            q_out = z[:, c:]
            if q_layers == depth:
                q_out = _finish(q, q_out, model, norm)[0]
            z = z[:, :c]
        pre.append(z[:, :c])
        if i < depth - 1:
            x = _act(model.activation, z)
    pred, cache = _finish(k, pre[-1], model, norm)
    delta = 2 * (pred - v)  # eq. 12 without the 1/2
    if cache is not None:
        delta = _ln_backward(delta, *cache, norm[0])
    deltas = [delta]
    for i in range(depth - 1, 0, -1):
        deltas.insert(0, _act_backward(model.activation, deltas[0] @ ws[i].transpose(-1, -2), pre[i - 1]))
    if model.step_cap is not None and theta is not None:
        sq = [a.pow(2).sum(-1) * g.pow(2).sum(-1) for a, g in zip(inputs, deltas)]  # |grad_L l_j|^2
        r = _capped(model.step_cap, (pred - v).pow(2).sum(-1), sq, theta)
        deltas = [g * r[..., None] for g in deltas]
    return inputs, deltas, q_out


def _capped(cap: float, loss: Tensor, sq: list[Tensor], theta) -> Tensor:
    """r = min(1, cap l / sum_L theta_L |grad_L l|^2) per token, detached (a step-size control,
    not part of the function the outer loop learns). theta(L) gives layer L's step, broadcastable
    to loss's shape."""
    with torch.no_grad():
        curv = sum(theta(i) * g for i, g in enumerate(sq))
        return (cap * loss / curv.clamp_min(1e-30)).clamp(max=1.0).to(loss.dtype)


def _autocast_on(t: Tensor) -> bool:
    return t.device.type in ("cpu", "cuda", "xpu", "mps") and torch.is_autocast_enabled(t.device.type)


def _accumulate(base: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """base + a @ b with base's precision: under autocast the product runs in low precision and
    is added to the float32 state (baddbmm would cast the state itself down)."""
    if _autocast_on(a):
        return base + torch.bmm(a, b).to(base.dtype)
    return torch.baddbmm(base, a, b)


def _flat(t: Tensor | None) -> Tensor | None:
    return None if t is None else rearrange(t, "b h ... -> (b h) ...")


def _per_layer(g: Tensor | None, b: int, h: int) -> Tensor | None:
    """Gate (b, h, n) or (b, h, n, L) -> (b h, L', n) with L' = 1 or L."""
    if g is None:
        return None
    return rearrange(g if g.ndim == 4 else g[..., None], "b h n l -> (b h) l n")


def _check(q, k, v, lr, momentum, decay, state: MemoryState) -> int:
    b, h, n, d = k.shape
    layers = len(state.weights)
    for name, g in (("lr", lr), ("momentum", momentum), ("decay", decay)):
        if g is not None and (
            g.shape[:3] != (b, h, n) or (g.ndim == 4 and g.shape[3] != layers) or g.ndim not in (3, 4)
        ):
            raise ValueError(f"{name} must be (b, h, n) or (b, h, n, {layers}), got {tuple(g.shape)}")
    if (momentum is None) != (state.momentum is None):
        raise ValueError("momentum gates and momentum state must be given together (or both None)")
    return layers


# ---------------------------------------------------------------------------------------------
# fast path


class LayerCoefficients(NamedTuple):
    """One chunk's coefficients for one memory layer, shaped for broadcasting (B = b h, c tokens).

    With beta_t = prod_{s<=t} (1 - alpha_s), m_t = prod_{s<=t} eta_s,
    N[s, j] = theta_j prod_{j<i<=s} eta_i and G[t, j] = sum_{j<=s<=t} (beta_t / beta_s) N[s, j],
    unrolling eqs. 13-14 inside the chunk gives (u_j = grad l_j at the anchor)
        S_t = m_t S_0 - sum_j N[t, j] u_j,   M_t = beta_t M_0 + f_t S_0 - sum_j G[t, j] u_j.
    G and N are stored negated, so the chunk step only accumulates.
    """

    theta: Tensor  # (B, c): the gate itself (for the step cap)
    beta: Tensor  # (B, c, 1)
    f: Tensor | None  # (B, c, 1); None without momentum
    neg_G: Tensor  # (B, c, c)
    beta_last: Tensor  # (B, 1, 1)
    f_last: Tensor | None  # (B, 1, 1)
    neg_g_last: Tensor  # (B, c, 1): the last row of -G, as a column
    m_last: Tensor | None  # (B, 1, 1)
    neg_n_last: Tensor | None  # (B, c, 1): the last row of -N, as a column


def _coefficients(
    lr: Tensor, log_eta: Tensor | None, log_keep: Tensor | None, layers: int
) -> list[tuple[LayerCoefficients, ...]]:
    """lr, log_eta, log_keep: (B, K, L', c) for K chunks of c tokens, L' in {1, layers} ->
    per chunk, per memory layer coefficients. All chunks at once (a few batched ops), in the
    gates' precision (float32 at least) also under autocast: these products span whole chunks."""
    if not _autocast_on(lr):
        return _coefficients_fp(lr, log_eta, log_keep, layers)
    with torch.autocast(lr.device.type, enabled=False):
        return _coefficients_fp(lr, log_eta, log_keep, layers)


def _coefficients_fp(lr: Tensor, log_eta: Tensor | None, log_keep: Tensor | None, layers: int):
    c = lr.shape[-1]
    causal = torch.ones(c, c, dtype=torch.bool, device=lr.device).tril()

    def decay_matrix(log_cum: Tensor) -> Tensor:  # [t, i] = exp(cum_t - cum_i) for i <= t, else 0
        diff = log_cum[..., :, None] - log_cum[..., None, :]
        return diff.masked_fill(~causal, float("-inf")).exp()

    lam = torch.cumsum(log_keep, -1) if log_keep is not None else torch.zeros_like(lr[..., :1, :])
    l_beta = decay_matrix(lam)  # (B, K, L', c, c)
    beta = lam.exp()
    if log_eta is None:  # no momentum: N = diag(theta)
        f = m_last = neg_n_last = None
        neg_G = l_beta * -lr[..., None, :]
    else:
        mu = torch.cumsum(log_eta, -1)
        neg_N = decay_matrix(mu) * -lr[..., None, :]
        m = mu.exp()
        f = (l_beta @ m[..., None])[..., 0]
        neg_G = l_beta @ neg_N
        m_last, neg_n_last = m[..., -1, None, None], neg_N[..., -1, :, None]
    fields = {
        "theta": lr,
        "beta": beta[..., None],
        "f": None if f is None else f[..., None],
        "neg_G": neg_G,
        "beta_last": beta[..., -1, None, None],
        "f_last": None if f is None else f[..., -1, None, None],
        "neg_g_last": neg_G[..., -1, :, None],
        "m_last": m_last,
        "neg_n_last": neg_n_last,
    }
    # (B, K, L', ...) -> per layer (slot min(i, L' - 1)) -> per chunk
    K = lr.shape[1]
    per_layer = []
    for i in range(layers):
        per_field = [
            t.select(2, min(i, t.shape[2] - 1)).unbind(1) if t is not None else [None] * K for t in fields.values()
        ]
        per_layer.append([LayerCoefficients(*vals) for vals in zip(*per_field)])
    return [tuple(layer[k] for layer in per_layer) for k in range(K)]


def _chunk_step(
    anchor: Weights,
    M: Weights,
    S: Weights | None,
    q: Tensor | None,
    k: Tensor,
    v: Tensor,
    coef: tuple[LayerCoefficients, ...],
    model: MemoryModel,
    norm,
    read: Read,
    prior: Weights | None,
):
    """One chunk piece of c tokens: per-token reads (if q is given) and the end state.
    Written with fused accumulations (addcmul, baddbmm): on CPU every elementwise pass over a
    (c, e) or (d, e) tensor costs a third of a matmul."""
    shared = anchor is M  # the keys and queries see the same weights: one bmm for both
    theta = lambda i: coef[i].theta  # noqa: E731  (B, c) per layer, for the step cap
    qz = None
    if q is not None and read == "chunk_start":
        inputs, deltas, y = _keys_and_errors(anchor, k, v, model, norm, q if shared else None, len(M), theta)
        if y is None:
            y = _forward(anchor, q, model, norm)
    else:
        inputs, deltas, qz = _keys_and_errors(anchor, k, v, model, norm, q if shared else None, 1, theta)
        y = None
    if q is not None and read == "after_update":  # TTT dual form: row t is x_t M_t, M_t never built
        x = q
        for i, co in enumerate(coef):
            xm = qz if (i == 0 and qz is not None) else x @ M[i]
            z = torch.bmm(co.neg_G * (x @ inputs[i].transpose(-1, -2)), deltas[i])
            z = torch.addcmul(z, co.beta, xm)
            if prior is not None:  # the share 1 - beta_t of the prior that decay brought back
                z = torch.addcmul(z, 1 - co.beta, x @ prior[i])
            if S is not None:
                z = torch.addcmul(z, co.f, x @ S[i])
            x = _act(model.activation, z) if i < len(M) - 1 else z
        y = _finish(q, x, model, norm)[0]
    new_M, new_S = [], []
    for i, co in enumerate(coef):
        a_t = inputs[i].transpose(-1, -2)
        base = M[i] * co.beta_last
        if prior is not None:
            base = torch.addcmul(base, 1 - co.beta_last, prior[i])
        if S is not None:
            base = torch.addcmul(base, co.f_last, S[i])
            new_S.append(_accumulate(S[i] * co.m_last, a_t, co.neg_n_last * deltas[i]))
        new_M.append(_accumulate(base, a_t, co.neg_g_last * deltas[i]))
    return y, tuple(new_M), tuple(new_S) if S is not None else None


def _layer(t: Tensor | None, i: int) -> Tensor | None:
    """Gate slice for memory layer i (shared gates have a layer dim of 1)."""
    return None if t is None else t[:, min(i, t.shape[1] - 1)]


def _chunkwise_step(
    W: Weights,
    S: Weights | None,
    q: Tensor | None,
    k: Tensor,
    v: Tensor,
    theta: Tensor,
    eta: Tensor | None,
    keep: Tensor | None,
    model: MemoryModel,
    norm,
    prior: Weights | None,
):
    """granularity "chunk": one inner step for a whole chunk with its mean gates theta, eta,
    keep = 1 - alpha (B, L'), and the reads f_W(q) of the chunk's new queries (same weights:
    they share the keys' bmm)."""
    cap_theta = lambda i: _layer(theta, i)[..., None]  # noqa: E731  the chunk's mean theta, (B, 1)
    inputs, deltas, y = _keys_and_errors(W, k, v, model, norm, q, len(W) if q is not None else 0, cap_theta)
    new_W, new_S = [], []
    for i in range(len(W)):
        # the sum over the chunk's tokens of theta * grad is one matmul: -theta A^T delta
        step = torch.bmm(inputs[i].transpose(-1, -2), deltas[i] * -_layer(theta, i)[..., None, None]).to(W[i].dtype)
        if S is not None:
            step = torch.addcmul(step, _layer(eta, i)[..., None, None], S[i])
            new_S.append(step)
        if keep is None:
            new_W.append(W[i] + step)
            continue
        keep_i = _layer(keep, i)[..., None, None]
        if prior is not None:
            step = torch.addcmul(step, 1 - keep_i, prior[i])
        new_W.append(torch.addcmul(step, keep_i, W[i]))
    return y, tuple(new_W), tuple(new_S) if S is not None else None


_compiled: dict[str, object] = {}


def _step(fn, compiled: bool):
    """The chunk step itself, or its torch.compile'd version (compiled once per function; the
    step, not the loop, is compiled, so compile time does not grow with the sequence)."""
    if not compiled:
        return fn
    if fn.__name__ not in _compiled:
        _compiled[fn.__name__] = torch.compile(fn, dynamic=False)
    return _compiled[fn.__name__]


def memory_update(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    lr: Tensor,
    momentum: Tensor | None,
    decay: Tensor | None,
    state: MemoryState,
    *,
    chunk_size: int,
    activation: Activation = "gelu",
    read: Read = "after_update",
    model: MemoryModel | None = None,
    granularity: Granularity = "token",
    checkpoint_chunks: int | None = None,
    compiled: bool = False,
) -> tuple[Tensor, MemoryState]:
    """Run the memory over n tokens from `state`: outputs (b, h, n, d) and the state after them.

    `model` describes f_W around the weights (activation, residual, LayerNorm); `activation`
    is kept for the plain MLP case. checkpoint_chunks: recompute groups of that many chunks in
    the backward pass (torch.utils.checkpoint) instead of storing their activations.
    compiled: run the chunk step through torch.compile (GPU, or CPU with a C++ compiler).
    """
    model = model or MemoryModel(activation=activation)
    _check(q, k, v, lr, momentum, decay, state)
    if granularity == "chunk":
        if read != "chunk_start":
            raise ValueError('granularity "chunk" needs read="chunk_start"')
        return _memory_update_chunkwise(q, k, v, lr, momentum, decay, state, chunk_size, model, compiled)
    b, h, n, _ = q.shape
    norm, prior = _norm_params(model, b), _prior(model, b)
    qf, kf, vf = _flat(q), _flat(k), _flat(v)
    lr_, log_eta, log_keep = _gate_logs(lr, momentum, decay, b, h)
    M = tuple(_flat(w) for w in state.weights)
    S = tuple(_flat(s) for s in state.momentum) if state.momentum is not None else None
    anchor = tuple(_flat(w) for w in state.anchor) if state.anchor is not None else M
    offset, outs, pos = state.offset, [], 0

    def piece(M, S, anchor, start: int, c: int):
        """Tokens [start, start + c) of one chunk, gradients at `anchor`."""
        sl = slice(start, start + c)
        co = _coefficients(*[None if t is None else t[..., sl][:, None] for t in (lr_, log_eta, log_keep)], len(M))
        args = (anchor, M, S, qf[:, sl], kf[:, sl], vf[:, sl], co[0], model, norm, read, prior)
        return _step(_chunk_step, compiled)(*args)

    # the unfinished chunk of the previous call, with gradients still at its anchor
    if offset and n:
        c = min(n, chunk_size - offset)
        y, M, S = piece(M, S, anchor, 0, c)  # anchor is not M here: no shared bmm
        outs.append(y)
        pos, offset = c, (offset + c) % chunk_size
        anchor = M if offset == 0 else anchor
    if pos < n:
        full = (n - pos) // chunk_size
        if full:
            outs_full, M, S = _full_chunks(
                qf,
                kf,
                vf,
                lr_,
                log_eta,
                log_keep,
                M,
                S,
                pos,
                full,
                chunk_size,
                model,
                norm,
                read,
                prior,
                checkpoint_chunks,
                compiled,
            )
            outs.append(outs_full)
            pos += full * chunk_size
        anchor = M
        if pos < n:
            c = n - pos
            y, M, S = piece(M, S, anchor, pos, c)
            outs.append(y)
            offset = c
    unflat = lambda ws: None if ws is None else tuple(rearrange(w, "(b h) i o -> b h i o", b=b) for w in ws)  # noqa: E731
    out = rearrange(torch.cat(outs, 1) if outs else q.new_zeros(b * h, 0, q.shape[-1]), "(b h) n d -> b h n d", b=b)
    new_state = MemoryState(unflat(M), unflat(S), unflat(anchor) if offset else None, offset)
    return out, new_state


def _gate_logs(lr, momentum, decay, b, h):
    """Gates -> (B, L', n): theta as is, log eta, log(1 - alpha) (log1p keeps small alpha exact)."""
    lr_ = _per_layer(lr, b, h)
    log_eta = _per_layer(torch.log(momentum), b, h) if momentum is not None else None
    log_keep = _per_layer(torch.log1p(-decay), b, h) if decay is not None else None
    return lr_, log_eta, log_keep


def _full_chunks(qf, kf, vf, lr_, log_eta, log_keep, M, S, pos, count, C, model, norm, read, prior, group, compiled):
    """`count` whole chunks from `pos`: coefficients for all of them at once, then the loop."""
    end = pos + count * C
    split = lambda t: None if t is None else rearrange(t[..., pos:end], "B l (k c) -> B k l c", c=C)  # noqa: E731
    coefs = _coefficients(split(lr_), split(log_eta), split(log_keep), len(M))
    # unbind: one stack in the backward pass instead of a full-size zero tensor per chunk
    chunks = lambda t: rearrange(t[:, pos:end], "B (k c) d -> B k c d", c=C).unbind(1)  # noqa: E731
    q, k, v = chunks(qf), chunks(kf), chunks(vf)
    step = _step(_chunk_step, compiled)

    def steps(M, S, q, k, v, coefs):
        ys = []
        for args in zip(q, k, v, coefs):
            y, M, S = step(M, M, S, *args, model, norm, read, prior)
            ys.append(y)
        return torch.cat(ys, 1), M, S

    group = group or count
    outs = []
    for lo in range(0, count, group):
        sl = slice(lo, min(count, lo + group))
        if group < count and torch.is_grad_enabled():
            y, M, S = checkpoint(steps, M, S, q[sl], k[sl], v[sl], coefs[sl], use_reentrant=False)
        else:
            y, M, S = steps(M, S, q[sl], k[sl], v[sl], coefs[sl])
        outs.append(y)
    return torch.cat(outs, 1), M, S


def _memory_update_chunkwise(
    q, k, v, lr, momentum, decay, state: MemoryState, C: int, model: MemoryModel, compiled: bool
):
    """granularity "chunk": reads at the chunk start; the chunk's update waits until it is whole."""
    b, h, n, _ = q.shape
    norm, prior = _norm_params(model, b), _prior(model, b)
    r = state.offset
    if state.pending is not None and r:
        pk, pv, plr, pm, pd = state.pending
        k, v, lr = torch.cat([pk, k], 2), torch.cat([pv, v], 2), torch.cat([plr, lr], 2)
        momentum = torch.cat([pm, momentum], 2) if momentum is not None else None
        decay = torch.cat([pd, decay], 2) if decay is not None else None
    total, whole = r + n, (r + n) // C
    kf, vf, qf = _flat(k), _flat(v), _flat(q)
    W = tuple(_flat(w) for w in state.weights)
    S = tuple(_flat(s) for s in state.momentum) if state.momentum is not None else None

    def chunk_means(g: Tensor | None) -> list[Tensor | None]:
        """(b, h, total[, L]) -> one (B, L') mean per whole chunk (eta, 1 - alpha as values)."""
        if g is None:
            return [None] * whole
        g = _per_layer(g, b, h)[..., : whole * C]
        return list(rearrange(g, "B l (k c) -> k B l c", c=C).mean(-1).unbind(0))

    gates = zip(chunk_means(lr), chunk_means(momentum), chunk_means(None if decay is None else 1 - decay))
    step = _step(_chunkwise_step, compiled)
    outs = []
    for start in range(0, total, C):
        end = min(total, start + C)
        q_lo, q_hi = max(start, r) - r, end - r  # new tokens of this chunk
        q_rows = qf[:, q_lo:q_hi] if q_hi > q_lo else None
        if end - start == C:  # a whole chunk: one inner step with the chunk-mean gates
            theta, eta, keep = next(gates)
            y, W, S = step(W, S, q_rows, kf[:, start:end], vf[:, start:end], theta, eta, keep, model, norm, prior)
        else:
            y = _forward(W, q_rows, model, norm) if q_rows is not None else None
        if y is not None:
            outs.append(y)
    left = total % C
    pending = None
    if left:
        tail = lambda t: None if t is None else t[:, :, total - left :]  # noqa: E731
        pending = (tail(k), tail(v), tail(lr), tail(momentum), tail(decay))
    unflat = lambda ws: None if ws is None else tuple(rearrange(w, "(b h) i o -> b h i o", b=b) for w in ws)  # noqa: E731
    out = rearrange(torch.cat(outs, 1) if outs else q.new_zeros(b * h, 0, q.shape[-1]), "(b h) n d -> b h n d", b=b)
    return out, MemoryState(unflat(W), unflat(S), None, left, pending)


# ---------------------------------------------------------------------------------------------
# reference


def naive_memory_update(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    lr: Tensor,
    momentum: Tensor | None,
    decay: Tensor | None,
    state: MemoryState,
    *,
    chunk_size: int,
    activation: Activation = "gelu",
    read: Read = "after_update",
    model: MemoryModel | None = None,
    granularity: Granularity = "token",
    checkpoint_chunks: int | None = None,
    compiled: bool = False,
) -> tuple[Tensor, MemoryState]:
    """Reference: the equations token by token; inner gradients by autograd at W_{t'}
    (create_graph=True, so outer gradients flow through them). Same signature as memory_update."""
    model = model or MemoryModel(activation=activation)
    layers = _check(q, k, v, lr, momentum, decay, state)
    b, h, n, d = q.shape
    gate = lambda g, t, i: None if g is None else (g[:, :, t, i] if g.ndim == 4 else g[:, :, t])  # noqa: E731
    scalar = lambda x: x[..., None, None]  # noqa: E731

    def f(ws: Weights, x: Tensor) -> Tensor:  # x (b, h, d)
        y = x
        for i, w in enumerate(ws):
            y = torch.einsum("bhi,bhio->bho", y, w)
            if i < len(ws) - 1:
                y = _act(model.activation, y)
        if model.norm is not None:
            y = F.layer_norm(y, (d,), eps=model.eps) * model.norm[0] + model.norm[1]
        return x + y if model.residual else y

    outer = torch.is_grad_enabled()  # build the graph through the inner gradients only if needed

    def grads(ws: Weights, kt: Tensor, vt: Tensor, theta) -> Weights:
        """grad l_t at ws, times the step cap r_t when there is one (theta(i): layer i's step)."""
        ws = tuple(w if (outer and w.requires_grad) else w.detach().requires_grad_() for w in ws)
        losses = (f(ws, kt) - vt).pow(2).sum(-1)  # (b, h)
        u = torch.autograd.grad(losses.sum(), ws, create_graph=outer)
        if model.step_cap is None:
            return u
        with torch.no_grad():
            curv = sum(theta(i) * g.pow(2).sum((-2, -1)) for i, g in enumerate(u))
            r = (model.step_cap * losses / curv.clamp_min(1e-30)).clamp(max=1.0)
        return tuple(scalar(r) * g for g in u)

    W, S = state.weights, state.momentum
    if granularity == "chunk":
        if read != "chunk_start":
            raise ValueError('granularity "chunk" needs read="chunk_start"')
        r = state.offset
        if state.pending is not None and r:
            pk, pv, plr, pm, pd = state.pending
            k, v, lr = torch.cat([pk, k], 2), torch.cat([pv, v], 2), torch.cat([plr, lr], 2)
            momentum = torch.cat([pm, momentum], 2) if momentum is not None else None
            decay = torch.cat([pd, decay], 2) if decay is not None else None
        outs = []
        for t in range(r, r + n):
            outs.append(f(W, q[:, :, t - r]))
            if (t + 1) % chunk_size == 0:  # the chunk is whole: one step with its mean gates
                s0 = t + 1 - chunk_size
                theta = lambda i: torch.stack([gate(lr, s, i) for s in range(s0, t + 1)]).mean(0)  # noqa: E731
                with torch.enable_grad():
                    us = (grads(W, k[:, :, s], v[:, :, s], theta) for s in range(s0, t + 1))
                    total = [sum(gs) for gs in zip(*us)]
                new_W, new_S = [], []
                for i in range(layers):
                    mean = lambda g: torch.stack([gate(g, s, i) for s in range(s0, t + 1)]).mean(0)  # noqa: E731
                    step = -scalar(mean(lr)) * total[i]
                    if S is not None:
                        step = scalar(mean(momentum)) * S[i] + step
                        new_S.append(step)
                    if decay is not None and model.prior is not None:
                        step = step + scalar(mean(decay)) * model.prior[i]
                    keep = scalar(1 - mean(decay)) if decay is not None else 1.0
                    new_W.append(keep * W[i] + step)
                W, S = tuple(new_W), tuple(new_S) if S is not None else None
        left = (r + n) % chunk_size
        pending = None
        if left:
            tail = lambda t: None if t is None else t[:, :, r + n - left :]  # noqa: E731
            pending = (tail(k), tail(v), tail(lr), tail(momentum), tail(decay))
        out = torch.stack(outs, 2) if outs else q.new_zeros(b, h, 0, d)
        return out, MemoryState(W, S, None, left, pending)

    anchor = state.anchor if state.anchor is not None else W
    offset = state.offset
    outs = []
    for t in range(n):
        if offset == 0:
            anchor = W  # a new chunk starts: gradients at its start state W_{t'}
        with torch.enable_grad():
            u = grads(anchor, k[:, :, t], v[:, :, t], lambda i, t=t: gate(lr, t, i))
        new_W, new_S = [], []
        for i in range(layers):
            step = -scalar(gate(lr, t, i)) * u[i]  # eq. 14 (momentary surprise)
            if S is not None:
                step = scalar(gate(momentum, t, i)) * S[i] + step
                new_S.append(step)
            if decay is not None and model.prior is not None:  # forget toward the prior
                step = step + scalar(gate(decay, t, i)) * model.prior[i]
            keep = scalar(1 - gate(decay, t, i)) if decay is not None else 1.0
            new_W.append(keep * W[i] + step)  # eq. 13
        W, S = tuple(new_W), tuple(new_S) if S is not None else None
        outs.append(f(anchor if read == "chunk_start" else W, q[:, :, t]))
        offset = (offset + 1) % chunk_size
    out = torch.stack(outs, 2) if outs else q.new_zeros(b, h, 0, d)
    return out, MemoryState(W, S, anchor if offset else None, offset)


def memory_read(q: Tensor, weights: Weights, model: MemoryModel) -> Tensor:
    """y = f_W(q) at fixed weights, no update (MAC's retrieval, eq. 21): q (b, h, n, d),
    weights (b, h, d_in, d_out) each -> (b, h, n, d)."""
    b = q.shape[0]
    y = _forward(tuple(_flat(w) for w in weights), _flat(q), model, _norm_params(model, b))
    return rearrange(y, "(b h) n d -> b h n d", b=b)


def chunk_surprise(
    k: Tensor,
    v: Tensor,
    lr: Tensor,
    momentum: Tensor | None,
    decay: Tensor | None,
    state: MemoryState,
    *,
    chunk_size: int,
    model: MemoryModel,
    granularity: Granularity = "token",
) -> Tensor:
    """The inner loss (eq. 12) of every whole chunk's tokens at the weights the chunk starts from,
    i.e. the momentary surprise the chunk's gradients are taken at: (b, h, chunks), the mean
    over the chunk's tokens of ||f_{W_{t'}}(k_t) - v_t||^2. A diagnostic (no gradients): a memory
    that learns the sequence shows it falling along the chunks. Tokens before the first chunk
    boundary (a stream cut mid-chunk) are fed but not measured."""
    b, h, n, _ = k.shape
    norm = _norm_params(model, b)
    cut = lambda g, sl: None if g is None else g[:, :, sl]  # noqa: E731
    read = "chunk_start" if granularity == "chunk" else "after_update"
    losses, pos = [], (chunk_size - state.offset) % chunk_size
    with torch.no_grad():
        if pos:
            sl = slice(0, min(pos, n))
            _, state = memory_update(
                k[:, :, sl], k[:, :, sl], v[:, :, sl], cut(lr, sl), cut(momentum, sl), cut(decay, sl), state,
                chunk_size=chunk_size, model=model, read=read, granularity=granularity,
            )  # fmt: skip
        while pos + chunk_size <= n:
            sl = slice(pos, pos + chunk_size)
            pred = _forward(tuple(_flat(w) for w in state.weights), _flat(k[:, :, sl]), model, norm)
            losses.append((pred - _flat(v[:, :, sl])).pow(2).sum(-1).mean(-1))
            _, state = memory_update(
                k[:, :, sl], k[:, :, sl], v[:, :, sl], cut(lr, sl), cut(momentum, sl), cut(decay, sl), state,
                chunk_size=chunk_size, model=model, read=read, granularity=granularity,
            )  # fmt: skip
            pos += chunk_size
    if not losses:
        return k.new_zeros(b, h, 0)
    return rearrange(torch.stack(losses, -1), "(b h) k -> b h k", b=b)


def init_memory_state(weights: Weights, batch: int, momentum: bool) -> MemoryState:
    """Fresh state from learned per-head initial weights (h, d_in, d_out) each; S_0 = 0."""
    ws = tuple(w.expand(batch, *w.shape) for w in weights)
    return MemoryState(ws, tuple(torch.zeros_like(w) for w in ws) if momentum else None)


def memory_flops_per_token(widths: list[int], chunk_size: int, momentum: bool, read: Read) -> float:
    """Forward FLOPs per token per head of memory_update (research/efficient_memory.md §8.2):
    keys forward 2P, inner backward 2(P - d d_1), state update 2P (+2P momentum), reads 2P
    (+2P momentum) plus the intra-chunk terms 2C sum(d_l-1 + d_l) and the coefficient matrix 2C^2."""
    P = sum(a * b for a, b in zip(widths[:-1], widths[1:]))
    flops = 2 * P + 2 * (P - widths[0] * widths[1]) + 2 * P * (2 if momentum else 1)
    if read == "after_update":
        flops += 2 * P * (2 if momentum else 1) + 2 * chunk_size * sum(a + b for a, b in zip(widths[:-1], widths[1:]))
        flops += 2 * chunk_size**2
    else:
        flops += 2 * P
    return float(flops)


__all__ = [
    "chunk_surprise",
    "MemoryModel",
    "MemoryState",
    "init_memory_state",
    "memory_flops_per_token",
    "memory_read",
    "memory_update",
    "naive_memory_update",
]
