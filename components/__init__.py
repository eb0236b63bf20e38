"""Titans mechanisms: one file per mechanism holding its pydantic spec and its nn.Module.

Tensor letters (einops), used the same way in every file:
    b  batch                       n  sequence (queries)         m  sequence (keys / values)
    h  heads                       d  feature (per head or model) e  hidden width of a memory MLP
    c  position inside a chunk     k  chunk index                w  flattened memory weights
    p  persistent tokens           v  vocabulary

Layering: `components` never imports `titans_nas`; mechanisms import `components.ops` (the
functional fast paths and their `naive_*` references) and `components.base`.
"""
