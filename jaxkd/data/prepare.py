"""Command line: prepare a tfds dataset as array_record, without TensorFlow.

    python -m jaxkd.data.prepare cifar100 --data_dir DIR [--manual_dir DIR]
    python -m jaxkd.data.prepare fashion_mnist            # Debian's files, or download
    python -m jaxkd.data.prepare imagenet2012 --manual_dir DIR_WITH_ILSVRC2012_TARS

`--manual_dir` holds files you already have (the `prepare` function's docstring says what
each dataset needs). Without it, Fashion-MNIST is built from the files of Debian's
`dataset-fashion-mnist` when that package is installed (this command never installs it;
the trainer's `ensure_prepared` does); otherwise tfds downloads, when the download host
answers. Offline, the command fails within seconds, saying what it looked for and what to
run. See docs/ENVIRONMENT.md#getting-the-datasets.
"""

import argparse
import sys

from jaxkd.data import builders
from jaxkd.data import datasets


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m jaxkd.data.prepare",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("name", choices=sorted(datasets.SPECS))
  parser.add_argument("--data_dir", default=None,
                      help="tfds data dir (default: $TFDS_DATA_DIR or ~/tensorflow_datasets)")
  parser.add_argument("--manual_dir", default=None,
                      help="folder with the archives / files you already have")
  parser.add_argument("--no_download", action="store_true",
                      help="use local files only; never download")
  args = parser.parse_args(argv)
  try:
    path = builders.prepare(args.name, args.data_dir, args.manual_dir,
                            download=not args.no_download)
  except (datasets.DatasetNotFoundError, datasets.BadDataError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"{args.name} is prepared in {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
