"""Studies on Ray Tune + Optuna: search spaces, study specs, the engine and reports (DESIGN §8)."""
