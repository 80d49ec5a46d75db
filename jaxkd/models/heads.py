"""Heads that a distillation method adds on top of a zoo model's features."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


class AuxHead(nn.Module):
  """IPWD's auxiliary linear classifier on the student's penultimate features.

  logits = features @ W + b in float32, features [B, D] -> logits [B, num_classes]. It is
  trained by its own cross-entropy only (docs/METHODS.md#ipwd); whether that gradient reaches
  the backbone is the objective's choice (`LossConfig.aux_head_stop_gradient`).

  Parameters: {"fc": {"kernel" [D, num_classes], "bias" [num_classes]}} float32, with Flax's
  default Dense initialisation.

  Attributes:
    num_classes: C.
  """
  num_classes: int

  @nn.compact
  def __call__(self, features: jax.Array) -> jax.Array:
    """features: [B, D] (any float dtype) -> logits [B, num_classes] float32."""
    return nn.Dense(self.num_classes, name="fc")(features.astype(jnp.float32))
