"""The neural long-term memory layer (Titans §3.1, §4.4): projections, short convolution, SiLU,
l2-normalised q/k, data-dependent gates, per-head fast-weight memories updated by
`components.ops.memory.memory_update`, output norm + gate + projection.

Letters: b batch, n sequence, h heads, d head feature, e hidden width of an MLP memory.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Annotated, Literal, NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from pydantic import Field
from torch import Tensor, nn

from components.base import Spec, SpecRuleError
from components.conv import ShortConv, ShortConvSpec
from components.feature_map import FeatureMapSpec
from components.norm import RMSNorm, silu_l2_normalize
from components.objective import L2ObjectiveSpec, ObjectiveSpec
from components.omega import OmegaSpec
from components.ops.memory import (
    Granularity,
    MemoryModel,
    MemoryState,
    Read,
    Weights,
    chunk_surprise,
    init_memory_state,
    memory_read,
    memory_update,
)
from components.ops.memory.common import beyond_plain_rule, in_state_dtype, kernel_reach
from components.optimizer import GDOptimizerSpec, InnerOptimizerSpec
from components.retention import RetentionSpec


class LinearMemorySpec(Spec):
    """A matrix memory f(x) = x W (one layer: online linear regression, the delta-rule family)."""

    kind: Literal["linear"] = "linear"

    def describe(self) -> str:
        return "linear"

    def widths(self, head_dim: int, key_dim: int | None = None) -> list[int]:
        return [key_dim or head_dim, head_dim]

    def build(self, heads: int, head_dim: int, key_dim: int | None = None) -> MemoryNet:
        return MemoryNet(heads, self.widths(head_dim, key_dim), activation="gelu", residual=False, norm=False)


class MLPMemorySpec(Spec):
    """A deep memory: `depth` fast-weight layers, f(x) = act(... act(x W_1) ...) W_L (Titans T2
    §3.3: depth 2, expansion 4, GELU). The paper wraps it as x + LN(f(x)); that form is
    `residual: true, norm: true`, off by default because its inner loss cannot fall below a floor
    and its forget gate only rescales what the LayerNorm undoes (docs/decisions/0006)."""

    kind: Literal["mlp"] = "mlp"
    depth: int = Field(2, ge=2, le=8)
    """Fast-weight layers (the paper's L_M >= 2)."""
    expansion: float = Field(4.0, gt=0.0, le=16.0)
    """Hidden width as a multiple of the head dim."""
    activation: Literal["gelu", "silu"] = "gelu"
    """Nonlinearity between the layers."""
    residual: bool = False
    """Add the input: x + f(x) (the paper's form, with `norm`)."""
    norm: bool = False
    """LayerNorm on f(x), gain and bias outer parameters (the paper's form; see the class doc)."""

    def describe(self) -> str:
        return f"MLP of depth {self.depth} (expansion {self.expansion})"

    def widths(self, head_dim: int, key_dim: int | None = None) -> list[int]:
        """Layer widths from the (feature-mapped) key width to the head dim of the values."""
        hidden = max(1, round(self.expansion * head_dim))
        return [key_dim or head_dim] + [hidden] * (self.depth - 1) + [head_dim]

    def build(self, heads: int, head_dim: int, key_dim: int | None = None) -> MemoryNet:
        widths = self.widths(head_dim, key_dim)
        return MemoryNet(heads, widths, activation=self.activation, residual=self.residual, norm=self.norm)


MemoryModelSpec = Annotated[MLPMemorySpec | LinearMemorySpec, Field(discriminator="kind")]


class LRSpec(Spec):
    """Inner learning rate theta_t = theta_max * sigmoid(x W_theta + b), per token and head, times
    (1 - eta_t) when momentum is on: eq. 14's momentum then averages surprise instead of summing
    it, so a surprise repeated forever moves the memory by theta_max sigmoid(.) per token whatever
    eta is (summed, a chunk of near-identical keys at eta 0.63 overshot and diverged:
    docs/decisions/0006). The recurrence is eq. 14 with this theta."""

    theta_max: float | None = Field(None, gt=0.0, le=10.0)
    """Upper bound of the inner step; null = 1 / chunk_size: a chunk's gradients are all taken at
    its start, so c repeated unit keys add up to a step of 2 c theta; at 1 / c the error along
    that key flips sign at worst and never grows (docs/decisions/0006 §4). Above it a run of one
    repeated token diverges."""
    curvature_cap: float | None = Field(2.0, gt=0.0)
    """Also bound each token's step by the curvature kappa of its own loss (normalised LMS): at
    most curvature_cap / (chunk_size kappa), where kappa is the Gauss-Newton curvature along the
    token's error (1 for a linear memory with unit keys, where the cap never binds below
    theta_max). A deep memory's curvature grows with its weights; with no cap MAL and MAC at
    theta_max 1 / c diverged within 340 steps (docs/decisions/0006 §4). null = eq. 14 with
    theta_max as the only bound."""
    init: float = Field(0.9, gt=0.0, lt=1.0)
    """theta starts at init * theta_max (the gate's bias; its weights start at zero): writes start
    strong, and the gate learns what not to write (at 0.5 the LMM stayed at chance on S-NIAH for
    1000 steps, at 0.9 it solved it in 600: docs/decisions/0006)."""
    per_layer: bool = True
    """One theta per memory layer (T2 App. B.3: without it a deep memory does not beat a linear one)."""


class MomentumSpec(Spec):
    """Momentum over surprise (eq. 14): S_t = eta_t S_{t-1} - theta_t grad; eta_t = sigmoid(x W_eta + b)."""

    init: float = Field(0.1, gt=0.0, lt=1.0)
    """Initial eta (large values early in training make the inner loop unstable)."""


class DecaySpec(Spec):
    """Forget gate (eq. 13): M_t = (1 - alpha_t) M_{t-1} + alpha_t P + S_t; alpha_t = sigmoid(x W_alpha + b)."""

    init: float = Field(0.001, gt=0.0, lt=1.0)
    """Initial alpha (fraction of the memory forgotten per token): 0.001 keeps 37% of a write
    after 1000 tokens (0.007 kept 0.1%), so what is learned on short contexts still holds on
    long ones."""
    toward: Literal["initial", "zero"] = "initial"
    """P, what forgetting returns to: the learned initial weights W_0 (the memory's prior), or zero
    (eq. 13 as written; a deep memory decayed toward zero loses both layers at once and stops
    learning: docs/decisions/0006)."""
    per: Literal["token", "channel"] = "token"
    """The retention's strength: one alpha per token and head (Titans eq. 13), or one per output
    channel of every memory layer (hidden units, value channels), M_t = M_{t-1} diag(1 - alpha_t)
    + ... (Titans T2's channel-wise alpha, MIRAS's channel-wise gates; GLA's diagonal decay)."""


class OutputGateSpec(Spec):
    """Per-head RMSNorm of the memory output, times act(x W_gate), before the output projection
    (Titans §4.4, following Mehta et al. 2023 / Gated DeltaNet)."""

    activation: Literal["silu", "sigmoid"] = "silu"
    """Activation of the gate branch."""


class NeuralMemorySpec(Spec):
    """The long-term memory module (LMM)."""

    model: MemoryModelSpec = MLPMemorySpec()
    """The memory network whose weights learn at test time."""
    heads: int | None = Field(None, ge=1, le=4096)
    """Memory heads (one memory each); null = the model's `heads`."""
    chunk_size: int = Field(16, ge=1, le=2**16)
    """Tokens whose inner gradients are taken at the same (chunk-start) weights; 1 = fully online."""
    objective: ObjectiveSpec = L2ObjectiveSpec()
    """The inner loss each token's write descends (MIRAS's attentional bias): l2 (Titans), lp,
    huber or dot (linear attention's)."""
    omega: OmegaSpec | None = None
    """ATLAS's Omega rule: each write descends the gated losses of the last `window` tokens;
    null = eq. 12 (the token's own loss)."""
    lr: LRSpec = LRSpec()
    """Inner learning rate theta."""
    optimizer: InnerOptimizerSpec = GDOptimizerSpec()
    """How a gradient becomes a write: gd (eqs. 13-14, Titans) or muon (its momentum
    orthogonalised by Newton-Schulz steps, ATLAS)."""
    momentum: MomentumSpec | None = MomentumSpec()
    """Momentum (past surprise); null = off (eta = 0, no momentum state)."""
    decay: DecaySpec | None = DecaySpec()
    """Forget gate / weight decay (MIRAS's l2 retention); null = off (alpha = 0)."""
    retention: RetentionSpec | None = None
    """Retention beyond the forget gate (MIRAS): elastic_net (an l1 soft threshold at every
    chunk's end), kl (softmax weights written by mirror descent, Memora's) or lq (q-norm
    normalised weights, Moneta's); null = the forget gate alone."""
    conv: ShortConvSpec | None = ShortConvSpec()
    """Short causal convolution after the q/k/v projections; null = off."""
    qk_norm: Literal["l2", "none"] = "l2"
    """Normalisation of queries and keys per head (l2 keeps the inner loop stable)."""
    feature_map: FeatureMapSpec | None = None
    """phi on queries and keys after their norm, the memory learning f(phi(k)) -> v (ATLAS's
    polynomial features); null = identity."""
    v_norm: Literal["l2", "none"] = "l2"
    """Normalisation of the values per head: l2 puts the targets on the unit sphere with the keys,
    so the outer model cannot rescale the inner problem (a deep memory's curvature grows with
    |v|^2; docs/decisions/0006); none = the paper's raw values."""
    gate: OutputGateSpec | None = OutputGateSpec()
    """Output norm and gate; null = the memory output goes straight to the projection."""
    read: Literal["after_update", "chunk_start"] = "after_update"
    """Token t reads the memory after its own update (paper) or the weights at its chunk start."""
    granularity: Literal["token", "chunk"] = "token"
    """Gates and updates per token (paper) or one inner step per chunk with chunk-mean gates
    (titans-pytorch's coarser rule; needs read: chunk_start)."""
    checkpoint_chunks: int | None = Field(None, ge=1, le=2**20)
    """Recompute groups of this many chunks in the backward pass instead of storing them
    (less memory, ~1.3x compute); null = store everything."""
    backend: Literal["auto", "torch", "triton", "cpp"] = "auto"
    """Who runs whole chunks: the Triton kernel (GPU; CPU only under TRITON_INTERPRET=1), the C++
    kernel (CPU: the linear memory and the MLP memory of any depth without norm; built on first
    use with the machine's C++ compiler), torch,
    or auto = Triton on CUDA where the kernels cover the memory (linear, or 2-layer MLP without
    norm; granularity token, read after_update; chunk, head dim and hidden width powers of two
    >= 16) up to head dim 64, hidden 256 and chunk 64 (the sizes compiled for an H100 in the
    tests), the C++ kernel on CPU where it covers the memory and builds, torch otherwise."""

    def window(self) -> int:
        """The Omega rule's c (1 without it)."""
        return self.omega.window if self.omega is not None else 1

    def channel_decay(self) -> bool:
        """One forget gate per output channel of every memory layer (`decay.per: channel`)."""
        return self.decay is not None and self.decay.per == "channel"

    def theta_max(self) -> float:
        """The inner step's bound: `lr.theta_max`, or 1 / (chunk_size c) when that is null (c the
        Omega window: a chunk's c tokens each count up to c gradients at the same weights)."""
        return self.lr.theta_max if self.lr.theta_max is not None else 1.0 / (self.chunk_size * self.window())

    def inner_rule(self) -> MemoryModel:
        """The op's update rule this spec asks for (step cap, objective, Omega window, optimiser,
        retention), without the memory's structure, which `MemoryNet.model` fills in."""
        cap = self.lr.curvature_cap
        return MemoryModel(
            # |grad l|^2 = 4 l kappa, so step <= cap / (c kappa) is the op's step_cap 4 cap / c
            # (c = chunk_size times the Omega window: each row counts in that many writes)
            step_cap=4.0 * cap / (self.chunk_size * self.window()) if cap else None,
            objective=self.objective.build(),
            omega_window=self.window(),
            muon_steps=self.optimizer.steps(),
            **(self.retention.fields() if self.retention is not None else {}),
        )

    def check(self, dim: int, heads: int) -> None:
        h = self.heads or heads
        if dim % h:
            raise SpecRuleError("heads", f"{h} memory heads do not divide the model dim {dim}")
        if self.granularity == "chunk" and self.read != "chunk_start":
            raise SpecRuleError(
                "read",
                "granularity 'chunk' needs read 'chunk_start' (an in-chunk read would see the chunk's future gates)",
            )
        if self.feature_map is not None and self.model.kind == "mlp" and self.model.residual:
            raise SpecRuleError(
                "feature_map",
                "feature-mapped keys are wider than the values: no residual x + f(x) (set model.residual: false)",
            )
        if self.omega is not None and self.granularity == "chunk":
            raise SpecRuleError("omega", "the Omega rule needs granularity 'token' (its windows are per token)")
        if self.optimizer.kind == "muon" and self.lr.curvature_cap is not None:
            raise SpecRuleError(
                "lr.curvature_cap",
                "Muon orthogonalises the momentum, so a cap that scales the gradient does not bound the step"
                " (set lr.curvature_cap: null)",
            )
        if self.objective.kind == "dot" and self.lr.curvature_cap is not None:
            raise SpecRuleError(
                "lr.curvature_cap",
                "the step cap bounds a step by the loss, and the dot objective's loss is not >= 0"
                " (set lr.curvature_cap: null)",
            )
        if self.backend in ("triton", "cpp"):
            m, widths = self.model, self.model.widths(dim // h, self._key_dim(dim // h))
            norm = m.kind == "mlp" and m.norm
            dims = (self.chunk_size, *widths)
            beyond = beyond_plain_rule(self.inner_rule(), self.channel_decay())
            reason = kernel_reach(
                self.backend, len(widths) - 1, norm, self.granularity, self.read, dims, self.objective.kind, beyond
            )
            if reason is not None:
                raise SpecRuleError("backend", reason)

    def _key_dim(self, head_dim: int) -> int | None:
        return self.feature_map.features(head_dim) if self.feature_map is not None else None

    def build(self, dim: int, heads: int) -> NeuralMemory:
        h = self.heads or heads
        net = self.model.build(h, dim // h, self._key_dim(dim // h))
        gates = Gates(
            dim,
            h,
            theta_max=self.theta_max(),
            theta_init=self.lr.init,
            theta_layers=len(net.initial) if self.lr.per_layer else 1,
            eta_init=self.momentum.init if self.momentum is not None else None,
            alpha_init=self.decay.init if self.decay is not None else None,
            alpha_channels=tuple(w.shape[-1] for w in net.initial) if self.channel_decay() else None,
            gamma_init=self.omega.gate_init if self.omega is not None and self.window() > 1 else None,
        )
        return NeuralMemory(
            dim,
            h,
            net=net,
            gates=gates,
            conv=self.conv.build(3 * dim) if self.conv is not None else None,
            qk_norm=self.qk_norm == "l2",
            v_norm=self.v_norm == "l2",
            out_gate=OutputGate(dim, h, self.gate.activation) if self.gate is not None else None,
            feature_map=self.feature_map.build(dim // h) if self.feature_map is not None else None,
            rule=UpdateRule(
                self.chunk_size,
                self.read,
                self.granularity,
                self.checkpoint_chunks,
                backend=self.backend,
                forget_to_prior=self.decay is not None and self.decay.toward == "initial",
                inner=self.inner_rule(),
            ),
        )


class MemoryNet(nn.Module):
    """Learned initial fast weights W_0 per head (outer parameters) and the LayerNorm around f."""

    def __init__(self, heads: int, widths: list[int], *, activation: str, residual: bool, norm: bool) -> None:
        super().__init__()
        self.activation, self.residual = activation, residual
        # W_l ~ N(0, 1 / d_in) for the hidden layers, a tenth of that scale for the last: a fresh
        # memory's reads are small, so what is written dominates them (at unit scale the prior's
        # reads drowned a needle 14 to 1), yet not zero, which the output norms would amplify
        # without bound (docs/decisions/0006)
        last = len(widths) - 2
        self.initial = nn.ParameterList(
            nn.Parameter(torch.randn(heads, a, b) / math.sqrt(a) * (0.1 if i == last else 1.0))
            for i, (a, b) in enumerate(zip(widths[:-1], widths[1:]))
        )
        # gain d^-1/2: the LayerNorm's output then has norm ~1, the norm of the (l2) values it fits
        self.gain = nn.Parameter(torch.full((heads, widths[-1]), widths[-1] ** -0.5)) if norm else None
        self.bias = nn.Parameter(torch.zeros(heads, widths[-1])) if norm else None

    def model(self, rule: UpdateRule) -> MemoryModel:
        """The op's view of this memory under `rule`: its inner rule with this net's structure
        (activation, residual, norm, and the prior when forgetting returns to it)."""
        norm = (self.gain, self.bias) if self.gain is not None else None
        prior = tuple(self.initial) if rule.forget_to_prior else None
        return replace(rule.inner, activation=self.activation, residual=self.residual, norm=norm, prior=prior)


class GateValues(NamedTuple):
    """The gates of one forward: lr (b, h, n[, L]), momentum / decay / omega (b, h, n) or None."""

    lr: Tensor
    momentum: Tensor | None
    decay: Tensor | None
    omega: Tensor | None


class Gates(nn.Module):
    """theta, eta, alpha (and the Omega rule's gamma) per token and head from the mixer input x
    (log-space friendly: the op takes eta and alpha and works with log eta and log1p(-alpha)).
    Each gate starts at its init value everywhere (zero weights, bias = logit(init));
    eta_init / alpha_init / gamma_init None = that gate is off."""

    def __init__(
        self,
        dim: int,
        heads: int,
        *,
        theta_max: float,
        theta_init: float,
        theta_layers: int,
        eta_init: float | None,
        alpha_init: float | None,
        alpha_channels: tuple[int, ...] | None = None,
        gamma_init: float | None = None,
    ) -> None:
        super().__init__()
        self.heads, self.theta_max = heads, theta_max
        self.theta_layers = theta_layers
        self.momentum, self.decay = eta_init is not None, alpha_init is not None
        on = lambda init: heads if init is not None else 0  # noqa: E731
        self.alpha_channels = alpha_channels  # per channel: each layer's output widths
        alphas = heads * sum(alpha_channels) if alpha_channels and alpha_init is not None else on(alpha_init)
        self.sizes = [heads * theta_layers, on(eta_init), alphas, on(gamma_init)]
        self.proj = nn.Linear(dim, sum(self.sizes))
        nn.init.zeros_(self.proj.weight)
        inits = [theta_init, eta_init or 0.5, alpha_init or 0.5, gamma_init or 0.5]
        with torch.no_grad():
            self.proj.bias.copy_(
                torch.cat([torch.full((s,), math.log(p / (1 - p))) for s, p in zip(self.sizes, inits)])
            )

    def forward(self, x: Tensor) -> GateValues:
        """x (b, n, dim) -> lr (b, h, n[, L]), momentum, decay and omega (b, h, n) | None."""
        # gates in float32 even under autocast: their logs are summed over whole chunks
        # logits clamped to +-15: sigmoid stays strictly inside (0, 1) in float32
        logits = self.proj(x)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32)).clamp(-15.0, 15.0)
        lr, mom, dec, gamma = logits.split(self.sizes, dim=-1)
        lr = self.theta_max * torch.sigmoid(lr)
        lr = (
            rearrange(lr, "b n (h l) -> b h n l", h=self.heads)
            if self.theta_layers > 1
            else rearrange(lr, "b n h -> b h n")
        )
        mom = rearrange(torch.sigmoid(mom), "b n h -> b h n") if self.sizes[1] else None
        dec = self._decay(torch.sigmoid(dec)) if self.sizes[2] else None
        gamma = rearrange(torch.sigmoid(gamma), "b n h -> b h n") if self.sizes[3] else None
        if mom is not None:  # theta_t (1 - eta_t): momentum averages surprise (LRSpec)
            lr = lr * (1 - (mom[..., None] if lr.ndim == 4 else mom))
        return GateValues(lr, mom, dec, gamma)

    def _decay(self, alpha: Tensor) -> Tensor:
        """(b, n, h) -> (b, h, n); per channel (b, n, h sum_l o_l) -> (b, h, n, L, O), each layer's
        o_l channels first and zeros after them (O the widest layer's width; the op reads o_l)."""
        if self.alpha_channels is None:
            return rearrange(alpha, "b n h -> b h n")
        alpha = rearrange(alpha, "b n (h s) -> b h n s", h=self.heads)
        widest = max(self.alpha_channels)
        layers = alpha.split(list(self.alpha_channels), dim=-1)
        return torch.stack([F.pad(a, (0, widest - a.shape[-1])) for a in layers], 3)


class QKVProjection(nn.Linear):
    """The fused query, key and value projection: its output is [q | k | v], dim channels each.
    The one place that knows that layout (MAC reads queries alone: eq. 21)."""

    def __init__(self, dim: int) -> None:
        super().__init__(dim, 3 * dim, bias=False)
        self.query_channels = slice(0, dim)

    def queries(self, x: Tensor) -> Tensor:
        """x (b, n, dim) -> the query channels of the projection (b, n, dim), alone."""
        return F.linear(x, self.weight[self.query_channels])


class OutputGate(nn.Module):
    def __init__(self, dim: int, heads: int, activation: str) -> None:
        super().__init__()
        self.heads, self.activation = heads, activation
        self.norm = RMSNorm(dim // heads, eps=1e-6)
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(self, y: Tensor, x: Tensor) -> Tensor:
        """y (b, h, n, d) memory output, x (b, n, dim) mixer input -> (b, n, dim)."""
        y = rearrange(self.norm(y), "b h n d -> b n (h d)")
        g = self.proj(x)
        return y * (F.silu(g) if self.activation == "silu" else torch.sigmoid(g))


@dataclass(frozen=True)
class UpdateRule:
    chunk_size: int
    read: Read
    granularity: Granularity
    checkpoint_chunks: int | None
    backend: str = "auto"
    forget_to_prior: bool = False
    inner: MemoryModel = MemoryModel()  # the update rule's settings (`NeuralMemorySpec.inner_rule`)


@dataclass
class MemoryHealth:
    """What one forward of the memory did, for a researcher to see whether it memorizes."""

    surprise: Tensor
    """(chunks,): mean inner loss of each whole chunk's tokens at the weights it starts from."""
    theta: float
    """Mean inner learning rate."""
    eta: float | None
    """Mean momentum gate (None: momentum off)."""
    alpha: float | None
    """Mean forget gate (None: decay off)."""
    w_norm: float
    """Frobenius norm of the memory weights after the forward (all layers), mean over batch and heads."""


@dataclass
class NeuralMemoryState:
    conv: Tensor | None
    memory: MemoryState


class NeuralMemory(nn.Module):
    def __init__(
        self,
        dim: int,
        heads: int,
        *,
        net: MemoryNet,
        gates: Gates,
        conv: ShortConv | None,
        qk_norm: bool,
        v_norm: bool,
        out_gate: OutputGate | None,
        rule: UpdateRule,
        feature_map: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.heads, self.qk_norm, self.v_norm, self.rule = heads, qk_norm, v_norm, rule
        self.compiled = False  # run the chunk step through torch.compile: see compile_memory()
        self.update = memory_update  # the op; benchmarks swap in naive_memory_update
        self.health: list[MemoryHealth] | None = None  # a list while `recording`: one entry per forward
        self.net, self.gates, self.conv, self.out_gate, self.feature_map = net, gates, conv, out_gate, feature_map
        self.dim = dim
        self.qkv = QKVProjection(dim)
        self.out = nn.Linear(dim, dim, bias=False)

    def init_state(self, batch: int) -> NeuralMemoryState:
        conv = self.conv.init_state(batch) if self.conv is not None else None
        return NeuralMemoryState(conv, init_memory_state(tuple(self.net.initial), batch, self.gates.momentum))

    def forward(self, x: Tensor, state: NeuralMemoryState | None = None) -> tuple[Tensor, NeuralMemoryState | None]:
        """x (b, n, dim) -> (b, n, dim): update with every token and read after it (eqs. 12-15);
        streams when `state` is given."""
        qkv = self.qkv(x)  # [q | k | v]
        conv_state = None
        if self.conv is not None:
            qkv, conv_state = self.conv(qkv, state.conv if state is not None else None)
        if self.qk_norm and self.v_norm:  # all three l2-normalised: with the SiLU in one pass (norm.py)
            qkv = rearrange(silu_l2_normalize(qkv.unflatten(-1, (3 * self.heads, -1))), "b n (t h) d -> t b h n d", t=3)
        else:
            qkv = rearrange(F.silu(qkv), "b n (t h d) -> t b h n d", t=3, h=self.heads)
        q, k, v = qkv
        if self.qk_norm and not self.v_norm:  # Titans §4.4: l2-normalised queries and keys
            q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        if self.feature_map is not None:  # ATLAS: the memory learns f(phi(k)) -> v
            q, k = self.feature_map(q), self.feature_map(k)
        if self.v_norm and not self.qk_norm:
            v = F.normalize(v, dim=-1)
        lr, momentum, decay, omega = self.gates(x)
        memory = (
            state.memory
            if state is not None
            else init_memory_state(tuple(self.net.initial), x.shape[0], momentum is not None)
        )
        # a module cast to bf16 without autocast: q, k, v to the (float32) state's dtype
        model, (q, k, v) = in_state_dtype(memory.weights[0].dtype, self.memory_model(), q, k, v)
        rule, before = self.rule, memory
        y, memory = self.update(
            q,
            k,
            v,
            lr,
            momentum,
            decay,
            memory,
            chunk_size=rule.chunk_size,
            read=rule.read,
            model=model,
            granularity=rule.granularity,
            checkpoint_chunks=rule.checkpoint_chunks,
            compiled=self.compiled,
            backend=rule.backend,
            omega=omega,
            final_state=state is not None or self.health is not None,  # else dropped below
        )
        if self.health is not None:
            self.health.append(self._health(k, v, lr, momentum, decay, omega, before, memory))
        return self.readout(y.to(x.dtype), x), (NeuralMemoryState(conv_state, memory) if state is not None else None)

    @torch.no_grad()
    def _health(self, k, v, lr, momentum, decay, omega, before: MemoryState, after: MemoryState) -> MemoryHealth:
        rule = self.rule
        surprise = chunk_surprise(
            k, v, lr, momentum, decay, before, chunk_size=rule.chunk_size, model=self.memory_model(),
            granularity=rule.granularity, omega=omega,
        )  # fmt: skip
        w_norm = torch.stack([w.pow(2).sum((-2, -1)) for w in after.weights]).sum(0).sqrt()
        mean = lambda g: None if g is None else float(g.mean())  # noqa: E731
        if decay is not None and decay.ndim == 5:  # per channel: the layers' own channels, not the padding
            decay = torch.cat([decay[..., i, : w.shape[-1]].flatten() for i, w in enumerate(after.weights)])
        return MemoryHealth(surprise.mean((0, 1)), float(lr.mean()), mean(momentum), mean(decay), float(w_norm.mean()))

    def memory_model(self) -> MemoryModel:
        return self.net.model(self.rule)

    def readout(self, y: Tensor, x: Tensor) -> Tensor:
        """Memory output per head (b, h, n, d) -> (b, n, dim): output norm and gate from the
        layer input x, then the output projection."""
        y = self.out_gate(y, x) if self.out_gate is not None else rearrange(y, "b h n d -> b n (h d)")
        return self.out(y)

    def retrieval_queries(self, x: Tensor, conv_state: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """The queries of a read without update (eq. 21, MAC), x (b, n, dim) -> (b, h, n, d),
        through the memory's own query path (projection, conv, SiLU, l2 norm, feature map).
        conv_state streams the query convolution (its own stream, separate from the update's).
        They depend on x alone, so MAC computes them for all its segments at once."""
        q = self.qkv.queries(x)
        if self.conv is not None:
            q, conv_state = self.conv(q, conv_state, channels=self.qkv.query_channels)
        if self.qk_norm:  # with the SiLU in one pass (norm.py)
            q = rearrange(silu_l2_normalize(q.unflatten(-1, (self.heads, -1))), "b n h d -> b h n d")
        else:
            q = rearrange(F.silu(q), "b n (h d) -> b h n d", h=self.heads)
        if self.feature_map is not None:
            q = self.feature_map(q)
        return q, conv_state

    def read(self, q: Tensor, weights: Weights, x: Tensor) -> Tensor:
        """Read the memory at fixed `weights` (eq. 21): queries q (b, h, n, d) from
        `retrieval_queries(x)` -> (b, n, dim), through the output norm, gate and projection."""
        model, (q,) = in_state_dtype(weights[0].dtype, self.memory_model(), q)
        return self.readout(memory_read(q, weights, model).to(x.dtype), x)

    def init_retrieval_state(self, batch: int) -> Tensor | None:
        return self.conv.init_state(batch)[..., self.qkv.query_channels] if self.conv is not None else None


def over_prefix(memory: NeuralMemory, x: Tensor, state: NeuralMemoryState | None, prefix: Tensor | None):
    """The memory over [prefix ; x] (eq. 19), outputs for both parts: (y_prefix | None, y_x, state).
    Streaming (`state` given): the prefix was read when the state was made (see `primed`)."""
    if state is not None or prefix is None:
        y, state = memory(x, state)
        return None, y, state
    y, _ = memory(torch.cat([prefix, x], 1), None)
    return y[:, : prefix.shape[1]], y[:, prefix.shape[1] :], None


def primed(memory: NeuralMemory, prefix: Tensor | None, batch: int) -> tuple[Tensor | None, NeuralMemoryState]:
    """A fresh memory state after reading the persistent tokens `prefix` (b, p, dim), and the
    memory's outputs on them (eq. 19: the memory sees [p ; x]). No prefix: the initial state."""
    state = memory.init_state(batch)
    if prefix is None:
        return None, state
    return memory(prefix, state)


def summarize_health(records: list[MemoryHealth]) -> dict[str, float]:
    """One memory's records of one model forward (MAC makes one per segment, in order) ->
    scalars: surprise (mean over chunks), surprise_start / surprise_end (first / last quarter of
    the chunks: a memory that learns the sequence shows end < start), theta, eta, alpha, w_norm."""
    if not records:
        return {}
    curve = torch.cat([r.surprise for r in records])
    out: dict[str, float] = {}
    if curve.numel():
        q = max(1, curve.numel() // 4)
        out |= {"surprise": float(curve.mean()), "surprise_start": float(curve[:q].mean()),
                "surprise_end": float(curve[-q:].mean())}  # fmt: skip
    for name in ("theta", "eta", "alpha", "w_norm"):
        values = [getattr(r, name) for r in records if getattr(r, name) is not None]
        if values:
            out[name] = sum(values) / len(values)
    return out


@contextmanager
def recording(modules: list[NeuralMemory]):
    """Record `MemoryHealth` of every forward of `modules` inside the block; yields the lists."""
    for m in modules:
        m.health = []
    try:
        yield [m.health for m in modules]
    finally:
        for m in modules:
            m.health = None


def compile_memory(model: nn.Module, on: bool = True) -> nn.Module:
    """Run every neural memory's chunk step, and its hand-written backward where that applies,
    through torch.compile (the step, not the chunk loop: compile time stays independent of the
    sequence length). An execution switch, not part of the architecture: outputs are the same up
    to float rounding."""
    for module in model.modules():
        if isinstance(module, NeuralMemory):
            module.compiled = on
    return model
