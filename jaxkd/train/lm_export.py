"""A trained language model's folder: its parameters, what it is, and its tokenizer.

  DIR/params/         orbax (StandardCheckpointer) tree of the float32 parameters
  DIR/lm_model.json   {"format", "model", "vocab_size", "tokenizer_sha256", "num_params", ...}
  DIR/tokenizer.json  the tokenizer it was trained with (`jaxkd.data.text.load_tokenizer`)

A teacher run writes `WORKDIR/model`; a distillation run restores it with `restore` and
checks that it reads the same tokens (the tokenizer's SHA-256), so a teacher trained on
another vocabulary is refused with a message instead of distilling nonsense. The folder is
written beside its target and renamed into place, so an interrupted export never leaves a
half-written model where a good one was.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from jaxkd import checkpoint
from jaxkd.train import workdir as jworkdir

FORMAT = "jaxkd-lm-model-1"
METADATA_FILE = "lm_model.json"
PARAMS_DIR = "params"
TOKENIZER_FILE = "tokenizer.json"


class LMModelError(jworkdir.RunError):
  """A model folder that is missing, damaged, or does not fit this run."""


def file_sha256(path: str) -> str:
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


def save(directory: str, params: Any, *, model: str, vocab_size: int, tokenizer_path: str,
         **fields: Any) -> dict[str, Any]:
  """Writes `params` of `model` to `directory` (replacing an earlier export there);
  `fields` go into the metadata as they are (JSON). Returns the metadata."""
  directory = os.path.abspath(directory)
  if os.path.exists(directory) and not os.path.isfile(os.path.join(directory, METADATA_FILE)):
    if os.listdir(directory):
      raise LMModelError(f"{directory} exists and is not a jaxkd language model; move it "
                         f"away, or use another --workdir.")
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
  meta = {"format": FORMAT, "model": model, "vocab_size": int(vocab_size),
          "tokenizer_sha256": file_sha256(tokenizer_path),
          "num_params": int(sum(x.size for x in jax.tree.leaves(params))), **fields}
  with checkpoint.replacing_folder(directory, "jaxkd_lm_export") as tmp:
    with ocp.StandardCheckpointer() as checkpointer:  # leaving the block waits for the write
      checkpointer.save(os.path.join(tmp, PARAMS_DIR), params)
    if jax.process_index() == 0:
      shutil.copyfile(tokenizer_path, os.path.join(tmp, TOKENIZER_FILE))
      with open(os.path.join(tmp, METADATA_FILE), "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")
  return meta


def read_metadata(directory: str) -> dict[str, Any]:
  path = os.path.join(os.path.abspath(directory), METADATA_FILE)
  try:
    with open(path) as f:
      meta = json.load(f)
  except FileNotFoundError:
    raise LMModelError(f"{directory} is not a jaxkd language model (no {METADATA_FILE}); "
                       f"point teacher.checkpoint at the `model` folder of a teacher run."
                       ) from None
  except (OSError, ValueError) as e:
    raise LMModelError(f"{path} is unreadable ({type(e).__name__}: {e}).") from None
  if meta.get("format") != FORMAT:
    raise LMModelError(f"{path}: format {meta.get('format')!r}, this jaxkd reads {FORMAT!r}.")
  return meta


def check_fits(meta: dict[str, Any], *, directory: str, model: str, vocab_size: int,
               tokenizer_path: str) -> None:
  """Raises LMModelError unless the folder holds `model` over this run's tokens."""
  if meta["model"] != model:
    raise LMModelError(f"{directory} holds a {meta['model']!r}, but config.teacher.model is "
                       f"{model!r}; set --config.teacher.model={meta['model']}.")
  if meta["vocab_size"] != vocab_size or meta["tokenizer_sha256"] != file_sha256(
      tokenizer_path):
    raise LMModelError(f"the teacher in {directory} was trained with another tokenizer "
                       f"(vocabulary {meta['vocab_size']}, dataset "
                       f"{meta.get('dataset', '?')}) than this run's ({vocab_size}, "
                       f"{os.path.dirname(tokenizer_path)}); distil on the teacher's data "
                       f"(the same corpus, vocab_size and seq_len), or train a teacher on "
                       f"this one.")


def restore(directory: str, like: Any, shardings: Any) -> Any:
  """The parameters in `directory`, in the structure and dtypes of `like` (a pytree of
  arrays or ShapeDtypeStructs), each leaf placed by its sharding in `shardings` (a pytree
  of `like`'s structure)."""
  target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        like, shardings)
  try:
    with ocp.StandardCheckpointer() as checkpointer:
      return checkpointer.restore(os.path.join(os.path.abspath(directory), PARAMS_DIR), target)
  except Exception as e:  # orbax and tensorstore raise many kinds
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
    raise LMModelError(f"the parameters in {directory} do not restore into this model "
                       f"({type(e).__name__}: {first}).") from None
