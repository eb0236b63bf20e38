"""ModelSpec: the whole model as data. The block union lists every block kind in one place."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, field_validator, model_validator

from components.base import Spec, SpecRuleError
from components.lmm import LMMSpec
from components.mac import MACSpec
from components.mag import MAGSpec
from components.mal import MALSpec
from components.mlp import MLPSpec
from components.norm import NormSpec, RMSNormSpec
from components.swa import SWASpec
from components.transformer import TransformerSpec

SCHEMA_VERSION = 1
"""Version of the spec schema this package writes and reads; bumped when a field changes meaning."""

MAX_PARAMS = 10**12
"""The largest model a spec may describe (about 4 TB of float32 weights)."""

BlockSpec = Annotated[TransformerSpec | SWASpec | LMMSpec | MACSpec | MAGSpec | MALSpec, Field(discriminator="kind")]
"""Every block kind, discriminated by `kind`. A new kind is one more member here."""


class ModelSpec(Spec):
    """A causal language model: token embedding, `depth` blocks of one kind (pre-norm mixer +
    SwiGLU MLP, residuals), a final norm and the LM head."""

    vocab_size: int = Field(ge=2, le=2**24)
    """Number of token ids the embedding and the head cover."""
    dim: int = Field(ge=2, le=2**16)
    """Model width (residual stream)."""
    depth: int = Field(ge=1, le=4096)
    """Number of blocks."""
    heads: int = Field(ge=1, le=4096)
    """Default number of heads for attention and memory (each may override its own)."""
    block: BlockSpec
    """The block kind and its mechanisms."""
    mlp: MLPSpec | None = MLPSpec()
    """The MLP after the mixer in every block; null = mixer-only blocks."""
    norm: NormSpec = RMSNormSpec()
    """Pre-norm of every mixer and MLP, and the final norm."""
    tie_embeddings: bool = False
    """Share the token embedding matrix with the LM head."""
    seed: int = Field(0, ge=0)
    """Seed of the parameter initialisation: the same spec always builds the same weights."""
    schema_version: int = Field(SCHEMA_VERSION, ge=1)
    """Spec schema version the file was written with; a newer one than this package reads is
    refused (upgrade titans-nas) rather than misread."""

    @field_validator("schema_version")
    @classmethod
    def _known_schema(cls, v: int) -> int:
        if v > SCHEMA_VERSION:
            raise ValueError(
                f"written by a newer titans-nas (spec schema {v}); this one reads schema <= {SCHEMA_VERSION}:"
                " upgrade titans-nas"
            )
        return v

    @model_validator(mode="after")
    def _cross_field(self) -> ModelSpec:
        # a floor on the parameter count (embedding + a block's four dim x dim projections and a
        # x8/3 MLP, whatever the kind): a model past MAX_PARAMS is refused before anything is built
        floor = self.vocab_size * self.dim + self.depth * 12 * self.dim**2
        if floor > MAX_PARAMS:
            raise SpecRuleError("dim", f"this model would have over {floor:.2g} parameters (at most {MAX_PARAMS:.0e})")
        if self.dim % self.heads:
            raise SpecRuleError("heads", f"{self.heads} heads do not divide dim {self.dim}")
        try:
            self.block.check(self.dim, self.heads)
        except SpecRuleError as e:
            raise e.under("block") from None
        return self
