"""Functional fast paths and their `naive_*` references (same signatures, compared in tests)."""
