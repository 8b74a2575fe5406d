"""Experiments over merges: a study (`study`: a grid of merges evaluated and reported, its data
in `records`, its report in `report`) and a search (`tune`: Optuna on a dev split, judged on
held-out questions; `tune_report`, and `tune_ray` for Ray Tune)."""
