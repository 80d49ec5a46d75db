"""jaxkd.train: the pure step (`step`), what runs write (`report`) and the loop (`loop`).

    from jaxkd import train
    summary = train.train_and_evaluate(config, workdir)

The layers and how a batch flows through them: docs/DESIGN.md#a-training-step.
"""

from jaxkd.train.loop import Experiment
from jaxkd.train.loop import train_and_evaluate
from jaxkd.train.loop import TrainingDiverged
from jaxkd.train.report import describe
from jaxkd.train.report import summarize_eval
from jaxkd.train.step import default_seeds_per_vmap
from jaxkd.train.step import eval_step
from jaxkd.train.step import init_train_state
from jaxkd.train.step import make_step_config
from jaxkd.train.step import map_seeds
from jaxkd.train.step import model_variables
from jaxkd.train.step import seeds_eval_step
from jaxkd.train.step import seeds_train_step
from jaxkd.train.step import StepConfig
from jaxkd.train.step import train_step
from jaxkd.train.step import TrainState

__all__ = [
    "Experiment",
    "train_and_evaluate",
    "TrainingDiverged",
    "describe",
    "summarize_eval",
    "default_seeds_per_vmap",
    "eval_step",
    "init_train_state",
    "make_step_config",
    "map_seeds",
    "model_variables",
    "seeds_eval_step",
    "seeds_train_step",
    "StepConfig",
    "train_step",
    "TrainState",
]
