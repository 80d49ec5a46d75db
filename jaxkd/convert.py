"""Convert a PyTorch checkpoint into a jaxkd model checkpoint (a teacher).

  python -m jaxkd.convert --model resnet32x4 \
      --torch cifar_teachers/resnet32x4_vanilla/ckpt_epoch_240.pth --out teachers/resnet32x4

The file may hold a state dict or `{"model": state_dict}` (mdistiller/RepDistiller teachers);
it is read with `torch.load(..., weights_only=True)`, so it cannot run code. The names must be
those of the peers' models (docs/STATE_DICTS.md); every missing, unexpected or mis-shaped key
is listed in one error. `--num_classes` defaults to the checkpoint's classifier size.
Restore the result with `jaxkd.checkpoint.restore_model_variables(DIR)`.
"""

from __future__ import annotations

import argparse
import os
import sys

import jaxkd.models as models
from jaxkd import checkpoint
from jaxkd.models import torch_import


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m jaxkd.convert", description=__doc__.split("\n")[0])
  p.add_argument("--model", required=True,
                 help="jaxkd model name, e.g. resnet32x4 (known: "
                 + ", ".join(models.available()) + ")")
  p.add_argument("--torch", required=True, dest="torch_file", help="PyTorch .pth file")
  p.add_argument("--out", required=True, help="output directory (must not exist)")
  p.add_argument("--num_classes", type=int, default=None,
                 help="classes (default: read off the checkpoint's classifier)")
  p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
  return p


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  try:
    name = models.spec(args.model).name
    state_dict = torch_import.load_torch_file(args.torch_file)
    num_classes = args.num_classes or torch_import.infer_num_classes(name, state_dict)
    try:
      variables = torch_import.from_state_dict(name, state_dict, num_classes)
    except ValueError as e:
      raise ValueError(f"{os.path.abspath(args.torch_file)}: {e}") from None
    out = os.path.abspath(args.out)
    metadata = checkpoint.save_model_variables(
        out, variables, model=name, num_classes=num_classes,
        source=os.path.abspath(args.torch_file), overwrite=args.overwrite)
  except (ValueError, FileNotFoundError, ImportError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"wrote {out}: {metadata['model']}, {metadata['num_classes']} classes, "
        f"{metadata['num_params']:,} parameters, from {metadata['source']}")
  print(f"restore with jaxkd.checkpoint.restore_model_variables({out!r})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
