"""Convert a PyTorch checkpoint into a jaxkd model checkpoint (a teacher).

  python -m jaxkd.convert --model resnet32x4 \
      --torch cifar_teachers/resnet32x4_vanilla/ckpt_epoch_240.pth --out teachers/resnet32x4

The file may hold a state dict or `{"model": state_dict}` (mdistiller/RepDistiller teachers);
it is read with `torch.load(..., weights_only=True)`, so it cannot run code. The names must be
those of the peers' models (docs/PYTORCH.md#parameter-names); every missing, unexpected or
mis-shaped key is listed in one error, which also names the zoo model the file does fit, if
any. `--num_classes` defaults to the checkpoint's classifier size.

mdistiller's whole-run checkpoints (`latest`, `best`, `epoch_N`) hold the distiller, student
and teacher together: pick one with `--part student` or `--part teacher`
(docs/PYTORCH.md#mdistiller-checkpoints).

  python -m jaxkd.convert --model resnet8x4 --torch output/EXPERIMENT/best \
      --part student --out students/resnet8x4

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
  p.add_argument("--out", required=True, help="output directory (must not exist, see "
                 "--overwrite)")
  p.add_argument("--num_classes", type=int, default=None,
                 help="classes (default: read off the checkpoint's classifier)")
  p.add_argument("--part", choices=torch_import.DISTILLER_PARTS, default=None,
                 help="which model to take out of a distiller's checkpoint (mdistiller's "
                 "latest, best, epoch_N)")
  p.add_argument("--overwrite", action="store_true",
                 help="replace an existing --out, if it is empty or a jaxkd model folder "
                 "(anything else is never deleted)")
  return p


def _refused_pickle(message: str) -> bool:
  return "Weights only load failed" in message or "weights_only" in message


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  out = os.path.abspath(args.out)
  source = os.path.abspath(args.torch_file)
  try:
    name = models.spec(args.model).name
    # Checked before reading anything: replacing --out must never delete the source.
    if os.path.realpath(source).startswith(os.path.realpath(out).rstrip(os.sep) + os.sep):
      raise ValueError(f"the PyTorch file {source} lies inside --out {out}, which the "
                       f"converter would replace; choose an --out outside it")
    try:
      checkpoint.check_replaceable(out, overwrite=args.overwrite)
    except checkpoint.ModelExistsError as e:
      raise ValueError(str(e).replace("(replace it with overwrite=True)",
                                      "(pass --overwrite to replace it)")) from None
    try:
      state_dict = torch_import.load_torch_file(args.torch_file)
    except ValueError as e:
      if not _refused_pickle(str(e)):
        raise
      raise ValueError(
          f"{source} holds Python objects other than tensors, and jaxkd reads PyTorch files "
          f"with weights_only=True so that a file can never run code: it was not loaded. Save "
          f"the state dict alone (torch.save(model.state_dict(), path)) and convert that") from None
    try:
      parts = torch_import.distiller_parts(state_dict)
      if parts and args.part is None:
        prefix = "module." if all(k.startswith("module.") for k in state_dict) else ""
        raise ValueError(
            f"this is a distiller checkpoint (a whole run, as mdistiller's latest, best and "
            f"epoch_N are: keys {' and '.join(f'{prefix}{p}.*' for p in parts)}); pass --part "
            f"student or --part teacher, or convert the student_best / student_latest file "
            f"written beside it")
      state_dict = torch_import.select_part(state_dict, args.part)
      num_classes = args.num_classes or torch_import.infer_num_classes(name, state_dict)
      variables = torch_import.from_state_dict(name, state_dict, num_classes)
    except ValueError as e:
      raise ValueError(f"{os.path.abspath(args.torch_file)}: {e}") from None
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
