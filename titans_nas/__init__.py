"""titans-nas: YAML-specified Titans memory models, studies on Ray Tune + Optuna, export."""

from titans_nas.builder import build_model
from titans_nas.config import SpecError, dump_spec, load_spec
from titans_nas.export import load_model
from titans_nas.model import TitansLM
from titans_nas.spec import ModelSpec

__version__ = "0.1.0"
__all__ = ["ModelSpec", "SpecError", "TitansLM", "build_model", "dump_spec", "load_model", "load_spec"]
