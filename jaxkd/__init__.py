"""jaxkd: sample-reweighted knowledge distillation in JAX.

`jaxkd.losses` and `jaxkd.weighting` are pure functions with no dependency on the rest of the
package: copy them or import them into any JAX code. The trainer, models and data pipelines
live in the other modules.
"""

__version__ = "0.1.0"
