"""Tools around many runs: plan (time, energy and cost before a run), sweep (Optuna), report (plots)."""
