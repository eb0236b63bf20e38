"""The neural long-term memory layer (Titans §3.1, §4.4): projections, short convolution, SiLU,
l2-normalised q/k, data-dependent gates, per-head fast-weight memories updated by
`components.ops.memory.memory_update`, output norm + gate + projection.

Letters: b batch, n sequence, h heads, d head feature, e hidden width of an MLP memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from pydantic import Field
from torch import Tensor, nn

from components.base import Spec, SpecRuleError
from components.conv import ShortConv, ShortConvSpec
from components.ops.memory import (
    Granularity,
    MemoryModel,
    MemoryState,
    Read,
    Weights,
    init_memory_state,
    memory_read,
    memory_update,
)


class LinearMemorySpec(Spec):
    """A matrix memory f(x) = x W (one layer: online linear regression, the delta-rule family)."""

    kind: Literal["linear"] = "linear"

    def widths(self, head_dim: int) -> list[int]:
        return [head_dim, head_dim]

    def build(self, heads: int, head_dim: int) -> MemoryNet:
        return MemoryNet(heads, self.widths(head_dim), activation="gelu", residual=False, norm=False)


class MLPMemorySpec(Spec):
    """A deep memory: `depth` fast-weight layers, f(x) = act(... act(x W_1) ...) W_L, by default
    wrapped as x + LN(f(x)) (Titans T2 §3.3: depth 2, expansion 4, GELU, residual + LayerNorm)."""

    kind: Literal["mlp"] = "mlp"
    depth: int = Field(2, ge=2, le=8)
    """Fast-weight layers (the paper's L_M >= 2)."""
    expansion: float = Field(4.0, gt=0.0, le=16.0)
    """Hidden width as a multiple of the head dim."""
    activation: Literal["gelu", "silu"] = "gelu"
    """Nonlinearity between the layers."""
    residual: bool = True
    """Add the input: x + f(x)."""
    norm: bool = True
    """LayerNorm on f(x) (its gain and bias are outer parameters, not fast weights)."""

    def widths(self, head_dim: int) -> list[int]:
        hidden = max(1, round(self.expansion * head_dim))
        return [head_dim] + [hidden] * (self.depth - 1) + [head_dim]

    def build(self, heads: int, head_dim: int) -> MemoryNet:
        return MemoryNet(
            heads, self.widths(head_dim), activation=self.activation, residual=self.residual, norm=self.norm
        )


MemoryModelSpec = Annotated[MLPMemorySpec | LinearMemorySpec, Field(discriminator="kind")]


class LRSpec(Spec):
    """Inner learning rate theta_t = theta_max * sigmoid(x W_theta + b), per token and head."""

    theta_max: float = Field(0.1, gt=0.0, le=10.0)
    """Upper bound of the inner step; with l2-normalised keys this bound keeps the inner loop finite."""
    init: float = Field(0.5, gt=0.0, lt=1.0)
    """theta starts at init * theta_max (the gate's bias; its weights start at zero)."""
    per_layer: bool = True
    """One theta per memory layer (T2 App. B.3: without it a deep memory does not beat a linear one)."""


class MomentumSpec(Spec):
    """Momentum over surprise (eq. 14): S_t = eta_t S_{t-1} - theta_t grad; eta_t = sigmoid(x W_eta + b)."""

    init: float = Field(0.1, gt=0.0, lt=1.0)
    """Initial eta (large values early in training make the inner loop unstable)."""


class DecaySpec(Spec):
    """Forget gate (eq. 13): M_t = (1 - alpha_t) M_{t-1} + S_t; alpha_t = sigmoid(x W_alpha + b)."""

    init: float = Field(0.007, gt=0.0, lt=1.0)
    """Initial alpha (fraction of the memory forgotten per token)."""


class OutputGateSpec(Spec):
    """Per-head RMSNorm of the memory output, times act(x W_gate), before the output projection
    (Titans §4.4, following Mehta et al. 2023 / Gated DeltaNet)."""

    activation: Literal["silu", "sigmoid"] = "silu"
    """Activation of the gate branch."""


class NeuralMemorySpec(Spec):
    """The long-term memory module (LMM)."""

    model: MemoryModelSpec = MLPMemorySpec()
    """The memory network whose weights learn at test time."""
    heads: int | None = Field(None, ge=1)
    """Memory heads (one memory each); null = the model's `heads`."""
    chunk_size: int = Field(16, ge=1)
    """Tokens whose inner gradients are taken at the same (chunk-start) weights; 1 = fully online."""
    lr: LRSpec = LRSpec()
    """Inner learning rate theta."""
    momentum: MomentumSpec | None = MomentumSpec()
    """Momentum (past surprise); null = off (eta = 0, no momentum state)."""
    decay: DecaySpec | None = DecaySpec()
    """Forget gate / weight decay; null = off (alpha = 0)."""
    conv: ShortConvSpec | None = ShortConvSpec()
    """Short causal convolution after the q/k/v projections; null = off."""
    qk_norm: Literal["l2", "none"] = "l2"
    """Normalisation of queries and keys per head (l2 keeps the inner loop stable)."""
    gate: OutputGateSpec | None = OutputGateSpec()
    """Output norm and gate; null = the memory output goes straight to the projection."""
    read: Literal["after_update", "chunk_start"] = "after_update"
    """Token t reads the memory after its own update (paper) or the weights at its chunk start."""
    granularity: Literal["token", "chunk"] = "token"
    """Gates and updates per token (paper) or one inner step per chunk with chunk-mean gates
    (titans-pytorch's coarser rule; needs read: chunk_start)."""
    checkpoint_chunks: int | None = Field(None, ge=1)
    """Recompute groups of this many chunks in the backward pass instead of storing them
    (less memory, ~1.3x compute); null = store everything."""

    def check(self, dim: int, heads: int) -> None:
        h = self.heads or heads
        if dim % h:
            raise SpecRuleError("heads", f"{h} memory heads do not divide the model dim {dim}")
        if self.granularity == "chunk" and self.read != "chunk_start":
            raise SpecRuleError(
                "read",
                "granularity 'chunk' needs read 'chunk_start' (an in-chunk read would see the chunk's future gates)",
            )

    def build(self, dim: int, heads: int) -> NeuralMemory:
        h = self.heads or heads
        net = self.model.build(h, dim // h)
        gates = Gates(dim, h, lr=self.lr, layers=len(net.initial), momentum=self.momentum, decay=self.decay)
        return NeuralMemory(
            dim,
            h,
            net=net,
            gates=gates,
            conv=self.conv.build(3 * dim) if self.conv is not None else None,
            qk_norm=self.qk_norm == "l2",
            out_gate=OutputGate(dim, h, self.gate.activation) if self.gate is not None else None,
            rule=UpdateRule(self.chunk_size, self.read, self.granularity, self.checkpoint_chunks),
        )


class MemoryNet(nn.Module):
    """Learned initial fast weights W_0 per head (outer parameters) and the LayerNorm around f."""

    def __init__(self, heads: int, widths: list[int], *, activation: str, residual: bool, norm: bool) -> None:
        super().__init__()
        self.activation, self.residual = activation, residual
        # unit-variance propagation: W_l ~ N(0, 1 / d_in)
        self.initial = nn.ParameterList(
            nn.Parameter(torch.randn(heads, a, b) / math.sqrt(a)) for a, b in zip(widths[:-1], widths[1:])
        )
        self.gain = nn.Parameter(torch.ones(heads, widths[-1])) if norm else None
        self.bias = nn.Parameter(torch.zeros(heads, widths[-1])) if norm else None

    def model(self) -> MemoryModel:
        norm = (self.gain, self.bias) if self.gain is not None else None
        return MemoryModel(self.activation, self.residual, norm)


class Gates(nn.Module):
    """theta, eta, alpha per token and head from the mixer input x (log-space friendly: the
    op takes eta and alpha and works with log eta and log1p(-alpha))."""

    def __init__(
        self, dim: int, heads: int, *, lr: LRSpec, layers: int, momentum: MomentumSpec | None, decay: DecaySpec | None
    ) -> None:
        super().__init__()
        self.heads, self.theta_max = heads, lr.theta_max
        self.lr_layers = layers if lr.per_layer and layers > 1 else 1
        self.sizes = [heads * self.lr_layers, heads if momentum else 0, heads if decay else 0]
        self.proj = nn.Linear(dim, sum(self.sizes))
        nn.init.zeros_(self.proj.weight)
        inits = [lr.init, momentum.init if momentum else 0.5, decay.init if decay else 0.5]
        with torch.no_grad():
            self.proj.bias.copy_(
                torch.cat([torch.full((s,), math.log(p / (1 - p))) for s, p in zip(self.sizes, inits)])
            )

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """x (b, n, dim) -> lr (b, h, n[, L]), momentum (b, h, n) | None, decay (b, h, n) | None."""
        # gates in float32 even under autocast: their logs are summed over whole chunks
        # logits clamped to +-15: sigmoid stays strictly inside (0, 1) in float32
        logits = self.proj(x)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32)).clamp(-15.0, 15.0)
        lr, mom, dec = logits.split(self.sizes, dim=-1)
        lr = self.theta_max * torch.sigmoid(lr)
        lr = (
            rearrange(lr, "b n (h l) -> b h n l", h=self.heads)
            if self.lr_layers > 1
            else rearrange(lr, "b n h -> b h n")
        )
        mom = rearrange(torch.sigmoid(mom), "b n h -> b h n") if self.sizes[1] else None
        dec = rearrange(torch.sigmoid(dec), "b n h -> b h n") if self.sizes[2] else None
        return lr, mom, dec


class OutputGate(nn.Module):
    def __init__(self, dim: int, heads: int, activation: str) -> None:
        super().__init__()
        self.heads, self.activation = heads, activation
        self.norm = nn.RMSNorm(dim // heads, eps=1e-6)
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
        out_gate: OutputGate | None,
        rule: UpdateRule,
    ) -> None:
        super().__init__()
        self.heads, self.qk_norm, self.rule = heads, qk_norm, rule
        self.compiled = False  # run the chunk step through torch.compile: see compile_memory()
        self.update = memory_update  # the op; benchmarks swap in naive_memory_update
        self.net, self.gates, self.conv, self.out_gate = net, gates, conv, out_gate
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)

    def init_state(self, batch: int) -> NeuralMemoryState:
        conv = self.conv.init_state(batch) if self.conv is not None else None
        return NeuralMemoryState(conv, init_memory_state(tuple(self.net.initial), batch, self.gates.sizes[1] > 0))

    def forward(self, x: Tensor, state: NeuralMemoryState | None = None) -> tuple[Tensor, NeuralMemoryState | None]:
        """x (b, n, dim) -> (b, n, dim): update with every token and read after it (eqs. 12-15);
        streams when `state` is given."""
        qkv = self.qkv(x)
        conv_state = None
        if self.conv is not None:
            qkv, conv_state = self.conv(qkv, state.conv if state is not None else None)
        q, k, v = rearrange(F.silu(qkv), "b n (t h d) -> t b h n d", t=3, h=self.heads)
        if self.qk_norm:  # Titans §4.4: l2-normalised queries and keys
            q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        lr, momentum, decay = self.gates(x)
        memory = (
            state.memory
            if state is not None
            else init_memory_state(tuple(self.net.initial), x.shape[0], momentum is not None)
        )
        rule = self.rule
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
            model=self.net.model(),
            granularity=rule.granularity,
            checkpoint_chunks=rule.checkpoint_chunks,
            compiled=self.compiled,
        )
        return self.readout(y, x), (NeuralMemoryState(conv_state, memory) if state is not None else None)

    def readout(self, y: Tensor, x: Tensor) -> Tensor:
        """Memory output per head (b, h, n, d) -> (b, n, dim): output norm and gate from the
        layer input x, then the output projection."""
        y = self.out_gate(y, x) if self.out_gate is not None else rearrange(y, "b h n d -> b n (h d)")
        return self.out(y)

    def retrieve(self, x: Tensor, weights: Weights, conv_state: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Read the memory at fixed `weights` without updating it (eq. 21, MAC): queries come
        from x through the query path (projection, conv, SiLU, l2 norm). conv_state streams the
        query convolution (its own stream, separate from the update's)."""
        dim = x.shape[-1]
        q = F.linear(x, self.qkv.weight[:dim])
        if self.conv is not None:
            q, conv_state = self.conv(q, conv_state, channels=slice(0, dim))
        q = rearrange(F.silu(q), "b n (h d) -> b h n d", h=self.heads)
        if self.qk_norm:
            q = F.normalize(q, dim=-1)
        return self.readout(memory_read(q, weights, self.net.model()), x), conv_state

    def init_retrieval_state(self, batch: int) -> Tensor | None:
        return self.conv.init_state(batch)[..., : self.out.in_features] if self.conv is not None else None


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


def compile_memory(model: nn.Module, on: bool = True) -> nn.Module:
    """Run every neural memory's chunk step through torch.compile (the step, not the chunk loop:
    compile time stays independent of the sequence length). An execution switch, not part of
    the architecture: outputs are the same up to float rounding."""
    for module in model.modules():
        if isinstance(module, NeuralMemory):
            module.compiled = on
    return model
