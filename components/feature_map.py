"""Feature maps on the memory's keys and queries (ATLAS, Behrouz et al., arXiv 2505.23735, §3.2):
the memory learns f(phi(k)) -> v, and reads f(phi(q)). A richer phi raises what a memory of a
given size can store (for a matrix memory, from O(d) independent pairs to O(d^p): ATLAS Prop. 2).
Letters: b batch, h heads, n tokens, d head dim, D = C(d + p, p) features."""

from __future__ import annotations

import itertools
import math
from typing import Annotated, ClassVar, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from components.base import Spec


class _MonomialFeaturesSpec(Spec):
    """Every monomial of degree <= p of the head's d entries (the constant included): D = C(d + p, p)
    features per head (d = 16: 153 at p = 2, 969 at p = 3), so the memory's first layer grows to
    D rows. The kinds differ in the monomials' weights."""

    degree: int = Field(2, ge=1, le=4)
    """p, the largest degree."""
    exponential: ClassVar[bool] = False

    def features(self, head_dim: int) -> int:
        return math.comb(head_dim + self.degree, self.degree)

    def build(self, head_dim: int) -> PolynomialFeatures:
        return PolynomialFeatures(head_dim, self.degree, self.exponential)


class PolynomialFeaturesSpec(_MonomialFeaturesSpec):
    """phi_p(x) = [c_beta x^beta] over the monomials of degree <= p, c_beta the square root of its
    multinomial coefficient, so that <phi(x), phi(y)> = sum_{j <= p} (x . y)^j: the polynomial
    kernel (ATLAS's phi_p)."""

    kind: Literal["polynomial"] = "polynomial"


class ExponentialFeaturesSpec(_MonomialFeaturesSpec):
    """ATLAS's phi* (the exponential kernel's features), truncated at degree p: the polynomial
    features with each degree-j monomial also divided by sqrt(j!), so that <phi(x), phi(y)> =
    sum_{j <= p} (x . y)^j / j!, the Taylor polynomial of exp(x . y). A dot-objective memory over
    it is DeepTransformers' unnormalised softmax attention, to that order (ATLAS eqs. 22-26)."""

    kind: Literal["exponential"] = "exponential"
    exponential: ClassVar[bool] = True


FeatureMapSpec = Annotated[PolynomialFeaturesSpec | ExponentialFeaturesSpec, Field(discriminator="kind")]


class PolynomialFeatures(nn.Module):
    """(..., d) -> (..., D). Each feature is a product of p entries of [1, x_1, .., x_d] (index 0
    is the constant): the multisets of size p of those d + 1 entries are exactly the monomials
    of degree <= p. `exponential`: a degree-j monomial is also divided by sqrt(j!)."""

    def __init__(self, head_dim: int, degree: int, exponential: bool = False) -> None:
        super().__init__()
        combos = list(itertools.combinations_with_replacement(range(head_dim + 1), degree))
        index = torch.tensor(combos, dtype=torch.long)  # (D, p)
        scale = []
        for combo in combos:  # multinomial coefficient of the monomial's degree j over its exponents
            counts = [combo.count(i) for i in set(combo) if i]
            j = sum(counts)
            weight = math.factorial(j) / math.prod(math.factorial(c) for c in counts)
            scale.append(weight / math.factorial(j) if exponential else weight)
        self.register_buffer("index", index, persistent=False)
        self.register_buffer("scale", torch.tensor(scale, dtype=torch.float64).sqrt(), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        padded = torch.cat([torch.ones_like(x[..., :1]), x], dim=-1)  # (..., d + 1)
        return padded[..., self.index].prod(-1) * self.scale.to(x.dtype)
