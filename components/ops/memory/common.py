"""What every memory algorithm shares: the state, the memory's fixed structure around its fast
weights, f_W and its hand-derived inner backward, the step cap, gate layouts and input checks.

Letters: b batch, h heads, n tokens, B = b h (one bmm batch), c tokens of a chunk, K chunks,
l memory layers (L' = 1 for gates shared by all layers), i / o a layer's input / output width.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

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
    history:  the Omega rule only (window w > 1): (k, v, gamma, lr) of the last w - 1 tokens,
              (b, h, w - 1, ...); rows before the sequence start are zeros with gamma 0. None =
              the sequence starts here.
    """

    weights: Weights
    momentum: Weights | None = None
    anchor: Weights | None = None
    offset: int = 0
    pending: tuple[Tensor | None, ...] | None = None
    history: tuple[Tensor, ...] | None = None


@dataclass(frozen=True)
class Objective:
    """The inner loss l(f_W(k), v) per token, summed over features: the attentional bias of
    MIRAS (arXiv 2504.13173). With e = f_W(k) - v, per coordinate:

        l2     e^2                                  (eq. 12 without the 1/2: the default)
        lp     |e|^p                                 (p = 2 is l2)
        huber  e^2 if |e| <= delta, else 2 delta |e| - delta^2   (2x the usual Huber: a large
                                                     delta is l2, and it stays C^1 at |e| = delta)
        dot    -<f_W(k), v>                          (linear attention's bias: with a linear
                                                     memory and no decay, M_t = M_{t-1} + theta k^T v)

    `terms` gives, from one error, d l / d f_W(k) (the delta the inner backward starts from),
    the loss (for the step cap) and the gradient's derivatives by f_W(k) and by v (diagonal:
    per coordinate), which the hand-written outer backward needs; `loss`, `grad` and
    `jacobians` are each of them alone."""

    kind: Literal["l2", "lp", "huber", "dot"] = "l2"
    p: float = 2.0
    delta: float = 1.0

    def terms(
        self, pred: Tensor, v: Tensor, loss: bool = False, jacobians: bool = False
    ) -> tuple[Tensor, Tensor | None, tuple[Tensor | float, Tensor | float] | None]:
        """(d l / d pred, the loss per token if asked, the jacobians (d grad / d pred, d grad / d v)
        per coordinate if asked), from one error e = pred - v: the inner backward takes all three
        at once on the hot path."""
        if self.kind == "dot":
            return -v, (-(pred * v).sum(-1) if loss else None), ((0.0, -1.0) if jacobians else None)
        e = pred - v
        a = e.abs() if self.kind != "l2" else None
        if self.kind == "lp":
            # |e| from 1e-30: the same values (sign(0) = 0 keeps grad(0) = 0), but for p < 2 the
            # derivatives at e = 0 stay finite, for this gradient and for autograd through the loss
            # (else inf * 0 = nan: an Omega window's padding rows, zeros with gamma 0, have e = 0)
            a_ = a.clamp_min(1e-30)
            grad = self.p * a_.pow(self.p - 1) * e.sign()
            value = a_.pow(self.p).sum(-1) if loss else None
            slope = (self.p * (self.p - 1) * a_.pow(self.p - 2) if self.p != 1 else 0.0) if jacobians else None
        elif self.kind == "huber":
            grad = 2 * e.clamp(-self.delta, self.delta)
            value = torch.where(a <= self.delta, e * e, 2 * self.delta * a - self.delta**2).sum(-1) if loss else None
            slope = 2.0 * (a <= self.delta).to(e.dtype) if jacobians else None
        else:
            grad, value, slope = 2 * e, e.pow(2).sum(-1) if loss else None, 2.0
        return grad, value, ((slope, -slope) if jacobians else None)

    def loss(self, pred: Tensor, v: Tensor) -> Tensor:
        return self.terms(pred, v, loss=True)[1]

    def grad(self, pred: Tensor, v: Tensor) -> Tensor:
        return self.terms(pred, v)[0]

    def jacobians(self, pred: Tensor, v: Tensor) -> tuple[Tensor | float, Tensor | float]:
        return self.terms(pred, v, jacobians=True)[2]


@dataclass(frozen=True)
class MemoryModel:
    """The memory's fixed (outer) structure around its fast weights: how f_W is evaluated
    (activation between layers, optionally `x + LN(f(x))`: residual and/or LayerNorm with
    per-head gain/bias of shape (h, d)) and where the forget gate pulls the weights: `prior`
    (per layer (h, d_in, d_out), the learned initial weights W_0) or zero (None, eq. 13):

        M_t = (1 - alpha_t) M_{t-1} + alpha_t P + S_t,  i.e. eq. 13 for the deviation M_t - P.

    step_cap: c of the per-token step cap (package docstring; None: no cap).
    objective: the inner loss (`Objective`; l2 by default).
    omega_window: w of the Omega rule (ATLAS eq. 9): token t's gradient is the gamma-weighted
        sum of the last w tokens' gradients, all at t's chunk-start weights; 1 = eq. 12's rule.
    muon_steps: the inner optimiser is Muon (ATLAS eqs. 32-33) with this many Newton-Schulz
        steps: M_t = (1 - alpha_t) M_{t-1} + alpha_t P - theta_t NS(S_t), S_t = eta_t S_{t-1} + u_t
        (S holds raw gradients, theta scales the orthogonalised step); None = gradient descent.
    l1: elastic-net retention (MIRAS eqs. 22-23): when a chunk completes, the deviation of each
        weight from its prior (or zero) is soft-thresholded by l1 * chunk_size (`retained`); None = off.
    kl_scale: KL retention (MIRAS eqs. 19-21, Memora eq. 27): the state holds logits A and the
        memory's weights are W = c softmax(A) over each column (the input axis), c = kl_scale
        (`primal`); the update is eqs. 13-14 on A with the gradient taken by W (mirror descent),
        W_t = c softmax((1 - alpha_t) log W_{t-1} - theta_t grad) up to the column's constant; None = off.
    lq: l_q retention (MIRAS eqs. 24-25, Moneta): the state holds A and the memory's weights are
        W = A / ||A||_q^(q-2) per layer (the entrywise q-norm of the whole matrix), the update
        eqs. 13-14 on A with the gradient taken by W; q = 2 is the plain rule; None = off.
    """

    activation: Activation = "gelu"
    residual: bool = False
    norm: tuple[Tensor, Tensor] | None = None
    eps: float = 1e-5
    prior: Weights | None = None
    step_cap: float | None = None
    objective: Objective = Objective()
    omega_window: int = 1
    muon_steps: int | None = None
    l1: float | None = None
    kl_scale: float | None = None
    lq: float | None = None

    @property
    def mirrored(self) -> bool:
        """The state is not the weights f_W uses (`primal` maps it: the KL or l_q retention)."""
        return self.kl_scale is not None or self.lq is not None

    def to(self, dtype: torch.dtype) -> MemoryModel:
        """The same structure with its tensors (norm gain / bias, prior) in `dtype`."""
        norm = None if self.norm is None else (self.norm[0].to(dtype), self.norm[1].to(dtype))
        prior = None if self.prior is None else tuple(w.to(dtype) for w in self.prior)
        return replace(self, norm=norm, prior=prior)


def in_state_dtype(state_dtype: torch.dtype, model: MemoryModel, *xs: Tensor) -> tuple[MemoryModel, list[Tensor]]:
    """Inputs of a module cast to bf16 / fp16 and run without autocast, in the state's dtype: the
    memory's update and read stay in float32, as under autocast and in the Triton kernel. Under
    autocast (or at the state's dtype already) everything is returned as it is."""
    if all(x.dtype == state_dtype for x in xs) or torch.is_autocast_enabled(xs[0].device.type):
        return model, list(xs)
    return model.to(state_dtype), [x.to(state_dtype) for x in xs]


def init_memory_state(weights: Weights, batch: int, momentum: bool) -> MemoryState:
    """Fresh state from learned per-head initial weights (h, d_in, d_out) each; S_0 = 0. The
    state is float32 at least, also for a module cast to bf16 / fp16 (`in_state_dtype`)."""
    ws = tuple(w.expand(batch, *w.shape).to(torch.promote_types(w.dtype, torch.float32)) for w in weights)
    return MemoryState(ws, tuple(torch.zeros_like(w) for w in ws) if momentum else None)


# ---------------------------------------------------------------------------------------------
# the activation and its derivatives


def act(name: Activation, z: Tensor) -> Tensor:
    return F.gelu(z) if name == "gelu" else F.silu(z)


def act_backward(name: Activation, g: Tensor, z: Tensor) -> Tensor:
    """g * act'(z). GELU uses the native kernel (it has a double backward); SiLU is written out
    because aten.silu_backward has no derivative in torch 2.13."""
    if name == "gelu":
        return torch.ops.aten.gelu_backward(g, z)
    s = torch.sigmoid(z)
    return g * s * (1 + z * (1 - s))


def act_second(name: Activation, z: Tensor) -> Tensor:
    """act''(z): GELU (erf form) phi(z) (2 - z^2) with phi the normal density; SiLU
    s (1 - s) (2 + z (1 - 2 s)) with s = sigmoid(z). The hand-written outer backward needs it
    where the inner backward multiplied by act'(z)."""
    if name == "gelu":
        return torch.exp(-0.5 * z * z) * (2 - z * z) * (1 / math.sqrt(2 * math.pi))
    s = torch.sigmoid(z)
    return s * (1 - s) * (2 + z * (1 - 2 * s))


# ---------------------------------------------------------------------------------------------
# f_W and its inner backward


def prior_weights(model: MemoryModel, b: int) -> Weights | None:
    """The decay's target per layer, (h, i, o) -> (b h, i, o); None = zero."""
    if model.prior is None:
        return None
    return tuple(rearrange(w.expand(b, *w.shape), "b h i o -> (b h) i o") for w in model.prior)


def norm_params(model: MemoryModel, b: int) -> tuple[Tensor, Tensor] | None:
    if model.norm is None:
        return None
    gain, bias = model.norm  # (h, d) -> (b h, 1, d)
    h, d = gain.shape
    return gain.expand(b, h, d).reshape(b * h, 1, d), bias.expand(b, h, d).reshape(b * h, 1, d)


def finish(x: Tensor, z: Tensor, model: MemoryModel, norm: tuple[Tensor, Tensor] | None):
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


def ln_backward(g: Tensor, xhat: Tensor, rstd: Tensor, gain: Tensor) -> Tensor:
    """d loss / d z for out = gain * xhat + bias, xhat = (z - mean) * rstd (biased variance)."""
    gh = g * gain
    return rstd * (gh - gh.mean(-1, keepdim=True) - xhat * (gh * xhat).mean(-1, keepdim=True))


def primal(ws: Weights, model: MemoryModel) -> Weights:
    """The weights f_W uses from the state's: W = c softmax(A) over the input axis (dim -2) under
    the KL retention, W = A / ||A||_q^(q-2) under the l_q retention ((||A||_q^q + 1e-30)^((q-2)/q):
    finite at A = 0), the state itself otherwise. Any leading dims (B, i, o), (B, c, i, o)."""
    if model.kl_scale is not None:
        return tuple(model.kl_scale * torch.softmax(w, dim=-2) for w in ws)
    if model.lq is not None:
        q = model.lq
        return tuple(w * (w.abs().pow(q).sum((-2, -1), keepdim=True) + 1e-30).pow(-(q - 2) / q) for w in ws)
    return ws


def forward(ws: Weights, x: Tensor, model: MemoryModel, norm) -> Tensor:
    """f_W(x) for x (B, c, d), ws the state's weights (`primal` maps them)."""
    ws = primal(ws, model)
    z = x
    for i, w in enumerate(ws):
        z = z @ w
        if i < len(ws) - 1:
            z = act(model.activation, z)
    return finish(x, z, model, norm)[0]


def per_token_weights(T: Tensor, X: Tensor, beta: Tensor, M0: Tensor, P: Tensor | None) -> Tensor:
    """The materialised steps' per-token state of one layer: M_t = beta_t M_0 + (1 - beta_t) P +
    sum_s T[t, s] X_s, with X (B, R, i, o) per key row and T (B, c, R), or (B, c, R, O) with a
    decay per channel (column o of X_s scaled by T[t, s, o]); beta (B, c, 1 or O) -> (B, c, i, o)."""
    o = M0.shape[-1]
    if T.ndim == 4:
        Mt = torch.einsum("btso,bsio->btio", T[..., :o].to(X.dtype), X)
    else:
        Mt = torch.einsum("bts,bsio->btio", T.to(X.dtype), X)
    b = beta[..., :o].unsqueeze(-2)  # (B, c, 1, 1 or o)
    Mt = Mt + b * M0[:, None]
    return Mt if P is None else Mt + (1 - b) * P[:, None]


def read_per_token(q: Tensor, Ms: list[Tensor], model: MemoryModel, norm) -> Tensor:
    """f_{M_t}(q_t) for q (B, c, d) and per-token state weights (B, c or 1, i, o) per layer (the
    materialised steps: Muon's, the KL retention's)."""
    x = q
    for i, w in enumerate(primal(tuple(Ms), model)):
        x = torch.einsum("bti,btio->bto", x, w.expand(-1, q.shape[1], -1, -1))
        if i < len(Ms) - 1:
            x = act(model.activation, x)
    return finish(q, x, model, norm)[0]


class Keys(NamedTuple):
    """The keys forwarded at W and the loss back-propagated by hand (eq. 12), per layer l:
    inputs[l] (B, c, i) and deltas[l] = d loss / d z_l (B, c, o), so token j's gradient for W_l
    is the outer product inputs[l][j]^T deltas[l][j] (never built). With a step cap the deltas
    (and `carried`) come scaled by the cap r_j (`capped`)."""

    inputs: list[Tensor]
    pre: list[Tensor]  # z_l = inputs[l] W_l
    deltas: list[Tensor]
    carried: list[Tensor]  # deltas[l + 1] W_{l+1}^T, before act'(z_l): what the outer backward needs
    r: Tensor | None  # (B, c, 1) the cap's scale; None without a cap
    jacobians: tuple[Tensor | float, Tensor | float] | None  # the objective's d delta / d pred, / d v (no LN)
    q_inputs: list[Tensor]  # the queries riding along: their input and pre-activation per layer
    q_pre: list[Tensor]
    q_out: Tensor | None


def keys_and_errors(ws: Weights, k: Tensor, v: Tensor, model: MemoryModel, norm, q=None, q_layers=0, theta=None):
    """Forward the keys at ws and back-propagate the loss by hand (see `Keys`).

    If q is given, its rows ride along through the first q_layers layers (same weights, one
    bmm for both) and q_out is their output there: the pre-activation after layer q_layers,
    or f_W(q) when q_layers is the whole depth. theta(l): layer l's step (B, c), for the cap.
    """
    c, depth = k.shape[1], len(ws)
    ws = primal(ws, model)  # the gradients are by W (by the logits' softmax under the KL retention)
    x = torch.cat([k, q], 1) if q is not None and q_layers else k
    inputs, pre, q_inputs, q_pre, q_out = [], [], [], [], None
    for i, w in enumerate(ws):
        inputs.append(x[:, :c])
        z = x @ w
        if x.shape[1] > c:
            q_inputs.append(x[:, c:])
            q_pre.append(z[:, c:])
        if x.shape[1] > c and i == q_layers - 1:  # the queries leave here
            q_out = z[:, c:]
            if q_layers == depth:
                q_out = finish(q, q_out, model, norm)[0]
            z = z[:, :c]
        pre.append(z[:, :c])
        if i < depth - 1:
            x = act(model.activation, z)
    pred, cache = finish(k, pre[-1], model, norm)
    capping = model.step_cap is not None and theta is not None
    # eq. 12's gradient (l2: 2 (pred - v)); the loss for the cap; the jacobians for the hand
    # backward (a LayerNorm'd memory keeps autograd: none needed)
    delta, loss, jacobians = model.objective.terms(pred, v, loss=capping, jacobians=cache is None)
    if cache is not None:
        delta = ln_backward(delta, *cache, norm[0])
    deltas, carried = [delta], []
    for i in range(depth - 1, 0, -1):
        carried.insert(0, deltas[0] @ ws[i].transpose(-1, -2))
        deltas.insert(0, act_backward(model.activation, carried[0], pre[i - 1]))
    r = None
    if capping:
        sq = [a.pow(2).sum(-1) * g.pow(2).sum(-1) for a, g in zip(inputs, deltas)]  # |grad_l l_j|^2
        r = capped(model.step_cap, loss, sq, theta)[..., None]
        deltas = [g * r for g in deltas]
        carried = [g * r for g in carried]
    return Keys(inputs, pre, deltas, carried, r, jacobians, q_inputs, q_pre, q_out)


def capped(cap: float, loss: Tensor, sq: list[Tensor], theta) -> Tensor:
    """r = min(1, cap l / sum_L theta_L |grad_L l|^2) per token, detached (a step-size control,
    not part of the function the outer loop learns). theta(L) gives layer L's step, broadcastable
    to loss's shape."""
    with torch.no_grad():
        curv = sum(theta(i) * g for i, g in enumerate(sq))
        return (cap * loss / curv.clamp_min(1e-30)).clamp(max=1.0).to(loss.dtype)


# ---------------------------------------------------------------------------------------------
# layouts and checks


def retained(ws: Weights, model: MemoryModel, prior: Weights | None, chunk_size: int) -> Weights:
    """The elastic-net retention at a chunk's end (MIRAS eqs. 22-23): P + S_g(W - P) per layer,
    S_g the soft threshold at g = l1 * chunk_size, P the prior (or zero). The identity without l1."""
    if model.l1 is None:
        return ws
    g = model.l1 * chunk_size
    if prior is None:
        return tuple(F.softshrink(w, g) for w in ws)
    return tuple(p + F.softshrink(w - p, g) for w, p in zip(ws, prior))


_compiled: dict[str, object] = {}


def compile_once(f):
    """f through torch.compile, compiled once per function (fixed shapes: dynamic=False): the
    chunk step and its backward are compiled, not the loop over chunks, so compile time does
    not grow with the sequence. One cache for every algorithm's step."""
    name = f"{f.__module__}.{f.__qualname__}"
    if name not in _compiled:
        _compiled[name] = torch.compile(f, dynamic=False)
    return _compiled[name]


def autocast_on(t: Tensor) -> bool:
    return t.device.type in ("cpu", "cuda", "xpu", "mps") and torch.is_autocast_enabled(t.device.type)


def accumulate(base: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """base + a @ b with base's precision: under autocast the product runs in low precision and
    is added to the float32 state (baddbmm would cast the state itself down)."""
    if autocast_on(a):
        return base + torch.bmm(a, b).to(base.dtype)
    return torch.baddbmm(base, a, b)


def flat(t: Tensor | None) -> Tensor | None:
    return None if t is None else rearrange(t, "b h ... -> (b h) ...")


def flat_weights(ws: Weights | None) -> Weights | None:
    return None if ws is None else tuple(flat(w) for w in ws)


def unflat_weights(ws: Weights | None, b: int) -> Weights | None:
    return None if ws is None else tuple(rearrange(w, "(b h) i o -> b h i o", b=b) for w in ws)


def unflat_outputs(outs: list[Tensor], q: Tensor, v: Tensor) -> Tensor:
    """Reads per chunk (B, c, d_v) -> (b, h, n, d_v); q (b, h, n, d_k) and v give the shapes."""
    b, d = q.shape[0], v.shape[-1]
    out = torch.cat(outs, 1) if outs else q.new_zeros(b * q.shape[1], 0, d)
    return rearrange(out, "(b h) n d -> b h n d", b=b)


def per_layer(g: Tensor | None, b: int, h: int) -> Tensor | None:
    """Gate (b, h, n), (b, h, n, L) or per channel (b, h, n, L, O) -> (b h, L', n[, O]) with
    L' = 1 or L (the token axis is always dim 2)."""
    if g is None:
        return None
    if g.ndim == 5:
        return rearrange(g, "b h n l o -> (b h) l n o")
    return rearrange(g if g.ndim == 4 else g[..., None], "b h n l -> (b h) l n")


def gate_logs(lr, momentum, decay, b, h):
    """Gates -> (B, L', n): theta as is, log eta, log(1 - alpha) (log1p keeps small alpha exact)."""
    lr_ = per_layer(lr, b, h)
    log_eta = per_layer(torch.log(momentum), b, h) if momentum is not None else None
    log_keep = per_layer(torch.log1p(-decay), b, h) if decay is not None else None
    return lr_, log_eta, log_keep


def with_pending(state: MemoryState, k, v, lr, momentum, decay):
    """granularity "chunk": the unfinished chunk's tokens kept in the state, put before the new ones."""
    if state.pending is None or not state.offset:
        return k, v, lr, momentum, decay
    pk, pv, plr, pm, pd = state.pending
    join = lambda a, b: None if b is None else torch.cat([a, b], 2)  # noqa: E731
    return join(pk, k), join(pv, v), join(plr, lr), join(pm, momentum), join(pd, decay)


def beyond_plain_rule(model: MemoryModel, channelwise: bool = False) -> list[str]:
    """The mechanisms of a memory beyond eq. 12's one-token rule with gradient descent and the
    forget gate per token as the only retention: what neither the hand-written outer backward
    (`backward.hand_backward_applies`) nor the fused kernels (`kernel_reach`) cover."""
    named = [
        (model.omega_window > 1, "the Omega rule"),
        (model.muon_steps is not None, "Muon"),
        (model.l1 is not None, "the elastic-net retention"),
        (model.kl_scale is not None, "the KL retention"),
        (model.lq is not None, "the l_q retention"),
        (channelwise, "a decay per channel"),
    ]
    return [name for used, name in named if used]


def kernel_reach(
    kernel: str,
    depth: int,
    norm: bool,
    granularity: str,
    read: str,
    dims: tuple[int, ...],
    objective: str = "l2",
    beyond: list[str] | None = None,
) -> str | None:
    """Why a fused kernel ("triton" or "cpp") cannot run a memory (None: it can). dims: chunk
    size, then every layer's width from the keys' to the values' (in, hidden..., out); beyond:
    the memory's mechanisms outside them
    (`beyond_plain_rule`). The one statement of what the kernels cover: the spec refuses
    `backend: triton | cpp` with it, and the op picks its backend with it. Both run eq. 12's
    one-token rule with gradient descent on the l2 objective, per-token reads after each update;
    Triton covers depth 1 and 2 with power-of-two tiles, the C++ kernel any depth and size."""
    name = "Triton kernels" if kernel == "triton" else "C++ kernel"
    mlp = "2-layer MLP memory" if kernel == "triton" else "MLP memory of any depth"
    what = f"the linear memory and the {mlp} without norm"
    too_deep = kernel == "triton" and depth > 2
    if too_deep or norm or granularity != "token" or read != "after_update" or objective != "l2":
        return f"the {name} cover {what}, with granularity 'token', read 'after_update' and the l2 objective"
    if beyond:
        return f"the {name} do not cover {', '.join(beyond)}"
    if dims[1] != dims[-1]:
        return f"the {name} need keys as wide as values (got {dims[1]} and {dims[-1]}: a feature map widens the keys)"
    if kernel == "triton" and any(x < 16 or x & (x - 1) for x in dims):
        return f"the Triton kernels need chunk size, head dim and hidden width powers of two >= 16 (got {dims})"
    return None


def setting_reach(kernel: str, setting, M, q) -> str | None:
    """`kernel_reach` of one call: chunks q (B, K, c, d) from states M, at token granularity."""
    m = setting.model
    beyond = beyond_plain_rule(m, setting.channelwise)
    dims = (q.shape[-2], M[0].shape[-2], *(w.shape[-1] for w in M))
    return kernel_reach(kernel, len(M), m.norm is not None, "token", setting.read, dims, m.objective.kind, beyond)


def check(q, k, v, lr, momentum, decay, state: MemoryState, model: MemoryModel, omega: Tensor | None = None) -> int:
    b, h, n, d = k.shape
    if decay is not None and decay.ndim == 5:  # per channel: (b, h, n, L, widest layer's outputs)
        widths = (len(state.weights), max(w.shape[-1] for w in state.weights))
        if decay.shape[:3] != (b, h, n) or decay.shape[3:] != widths:
            want = (b, h, n, *widths)
            raise ValueError(f"per-channel decay must be (b, h, n, L, O) = {want}, got {tuple(decay.shape)}")
        decay = decay[..., 0]
    if omega is not None and (omega.shape != (b, h, n) or model.omega_window == 1):
        raise ValueError(f"omega gates must be (b, h, n) = {(b, h, n)} with an Omega window > 1")
    if model.muon_steps is not None and model.step_cap is not None:
        raise ValueError("Muon's step is orthogonalised (scale-free): a step cap does not bound it")
    layers = len(state.weights)
    for name, g in (("lr", lr), ("momentum", momentum), ("decay", decay)):
        if g is not None and (
            g.shape[:3] != (b, h, n) or (g.ndim == 4 and g.shape[3] != layers) or g.ndim not in (3, 4)
        ):
            raise ValueError(f"{name} must be (b, h, n) or (b, h, n, {layers}), got {tuple(g.shape)}")
    if (momentum is None) != (state.momentum is None):
        raise ValueError("momentum gates and momentum state must be given together (or both None)")
    return layers


def memory_read(q: Tensor, weights: Weights, model: MemoryModel) -> Tensor:
    """y = f_W(q) at fixed weights, no update (MAC's retrieval, eq. 21): q (b, h, n, d),
    weights (b, h, d_in, d_out) each -> (b, h, n, d)."""
    b = q.shape[0]
    y = forward(flat_weights(weights), flat(q), model, norm_params(model, b))
    return rearrange(y, "(b h) n d -> b h n d", b=b)
