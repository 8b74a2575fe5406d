"""The Evaluate stage: `evaluate(model, suite=...)` runs lm-evaluation-harness on a suite's
tasks (`suites`: the paper's, or local JSONL suites in its formats) through the result store
(`store`); `runner` holds the lm-eval glue."""

from medmerge.eval.runner import EvalResult, TaskScore, evaluate, paper_table_row

__all__ = ["EvalResult", "TaskScore", "evaluate", "paper_table_row"]
