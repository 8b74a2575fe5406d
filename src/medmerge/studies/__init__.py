"""Experiments over merges: a study (`study`: a grid of merges evaluated and reported, its data
in `records`, its report in `report`) and a search (`tune`: Optuna on a dev split, judged on
held-out questions; `tune_report`, and `tune_ray` for Ray Tune)."""

import importlib

MODULES = ("records", "report", "search", "study", "tune", "tune_report", "tune_ray")
ENTRY_POINTS = {"run_study": "study", "run_tune": "tune", "write_report": "report"}


def __getattr__(name: str):
    """The modules and entry points as attributes, imported when first used."""
    if name in MODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name in ENTRY_POINTS:
        return getattr(importlib.import_module(f"{__name__}.{ENTRY_POINTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
