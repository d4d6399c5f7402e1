"""autotune: an SLO-aware autotuner for GPU sharing between LLM serving and
LoRA fine-tuning.

    from autotune import StudyConfig, make_backend, run_study, StudyResult
    ctx = run_study(StudyConfig(system="llmstation", figure="fig8a"), make_backend("sim"), n_trials=40)
    print(StudyResult.of(ctx.study).best)

Names are imported on first use, so that ``import autotune`` stays cheap for
the trainer processes of the GPU backend.
"""

from __future__ import annotations

import importlib
from typing import Any

_PUBLIC = {
    "StudyConfig": "autotune.context",
    "run_study": "autotune.study",
    "make_backend": "autotune.backends",
    "Backend": "autotune.backends",
    "SloSpec": "autotune.slo",
    "StudyResult": "autotune.results",
    "TrialRow": "autotune.records",
    "load_result": "autotune.results",
    "tradeoff_curve": "autotune.results",
    "get_system": "autotune.systems",
    "get_figure": "autotune.figures",
    "UserError": "autotune.errors",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'autotune' has no attribute {name!r}")
    return getattr(importlib.import_module(_PUBLIC[name]), name)
