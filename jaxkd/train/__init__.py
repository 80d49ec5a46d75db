"""jaxkd.train: the pure step (`step`), what runs write (`report`) and the loop (`loop`).

    from jaxkd import train
    summary = train.train_and_evaluate(config, workdir)

The names below are loaded on first use, so `import jaxkd.train.step` (what benchmarks and
your own code need to build a step) pulls in neither the data pipelines nor orbax. The
layers and how a batch flows through them: docs/DESIGN.md#a-training-step.
"""

import importlib

_WHERE = {
    "Experiment": "loop", "train_and_evaluate": "loop", "TrainingDiverged": "loop",
    "IncompatibleCheckpointError": "loop", "RunError": "loop", "Interrupted": "loop",
    "describe": "report", "summarize_eval": "report",
    "default_seeds_per_vmap": "step", "eval_step": "step", "init_train_state": "step",
    "make_step_config": "step", "map_seeds": "step", "model_variables": "step",
    "seeds_eval_step": "step", "seeds_train_step": "step", "StepConfig": "step",
    "sweep_train_step": "step", "train_step_on": "step", "teacher_logits": "step",
    "train_step": "step", "TrainState": "step",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
  if name not in _WHERE:
    raise AttributeError(f"module 'jaxkd.train' has no attribute {name!r}")
  return getattr(importlib.import_module(f"jaxkd.train.{_WHERE[name]}"), name)


def __dir__():
  return sorted(set(globals()) | set(_WHERE))
