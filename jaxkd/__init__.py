"""jaxkd: sample-reweighted knowledge distillation in JAX.

`jaxkd.losses` and `jaxkd.weighting` are pure functions of logits that depend only on the
private `jaxkd._logits`: import them into any JAX code, or copy the three files. The
objective (`objectives`), the trainer (`train`), models, data pipelines and the command line
live in the other modules; docs/DESIGN.md#layout lists them.
"""

__version__ = "0.1.0"
