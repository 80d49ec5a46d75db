"""Packed-text tfds datasets without TensorFlow: a corpus in, array_record rows out.

    path = ensure_fortunes(data_dir, vocab_size=8192, seq_len=128)   # Debian's fortunes
    path = prepare_text("/my/corpus", data_dir, name="lm_mine")      # a folder of .txt files
    rows = load_rows(path, "train")           # int32 [R, seq_len + 1] (text.batch_fields)
    tok = text.load_tokenizer(path)           # the BPE tokenizer saved beside the records
    info = dataset_info(path)                 # vocab_size, seq_len, documents, tokens, ...
    python -m jaxkd.data.text_builder fortunes --data_dir DIR          # the same, by hand

As `builders.py` does for the image datasets, the dataset is a tfds `GeneratorBasedBuilder`
written as array_record and read back with tfds's data source, with no TensorFlow: here the
builder is jaxkd's own (tfds has no such dataset), one per corpus name, and it is read with
`tfds.builder_from_directory`, which needs no registered class. Each record is one packed
row, `{"tokens": int32 [seq_len + 1]}`; the split rule, the tokenizer and the packing are
`text.py`'s. The options that change the records make the builder config's name,
`v{vocab_size}_l{seq_len}_h{heldout in 1/10000}`, so several coexist under
`<data_dir>/<name>/<config>/1.0.0/`, which also holds `tokenizer.json` (written in tfds's
temporary folder, so it appears atomically with the records) and, in `metadata.json`, the
counts of documents, tokens and rows of each split and the SHA-256 of the corpus.

The Debian corpus: `fortunes` (the fortune-mod cookie files, /usr/share/games/fortunes): 15k
short English documents, 2.5 MB, 0.75M tokens at V = 8192, enough for the CPU preset's
models (docs/LM.md#the-corpus; dict-gcide, 17 MB installed and compressed, is dictionary
entries, not prose).
`ensure_fortunes` installs it with apt-get when it is missing and apt-get can run as root,
as `builders.ensure_prepared` does for Fashion-MNIST (`JAXKD_NO_APT=1` turns this off).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import types

import numpy as np

from jaxkd.data import builders
from jaxkd.data import datasets
from jaxkd.data import text

VERSION = "1.0.0"
FORTUNES_NAME = "lm_fortunes"
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")


def config_name(vocab_size: int, seq_len: int, heldout_fraction: float) -> str:
  return f"v{vocab_size}_l{seq_len}_h{round(heldout_fraction * 10000)}"


def dataset_path(name: str, data_dir: str | None, *, vocab_size: int, seq_len: int,
                 heldout_fraction: float) -> str:
  """`<data_dir>/<name>/<config>/1.0.0`, where the dataset is (or will be) prepared."""
  return os.path.join(datasets.resolve_data_dir(data_dir), name,
                      config_name(vocab_size, seq_len, heldout_fraction), VERSION)


def is_prepared(path: str) -> bool:
  return all(os.path.exists(os.path.join(path, f))
             for f in ("dataset_info.json", text.TOKENIZER_FILE))


def corpus_sha256(documents) -> str:
  h = hashlib.sha256()
  for d in documents:
    h.update(d.encode("utf-8") + b"\0")
  return h.hexdigest()


def _builder_class(name: str, **attributes):
  """A tfds builder named `name` with class `attributes` (documents, vocab_size, seq_len,
  heldout_fraction, source: tfds reads its info in `__init__`, so they cannot wait for the
  instance). Defined lazily: importing tfds costs time `import jaxkd` need not pay."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  class PackedText(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Packed rows of a tokenized corpus (one builder config: the options' name)."""
    VERSION = tfds.core.Version(VERSION)
    documents: list[str]
    vocab_size: int
    seq_len: int
    heldout_fraction: float
    source: str

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self,
          description=f"{self.source}, byte-level BPE tokenized, packed into rows of "
                      f"seq_len + 1 tokens (jaxkd.data.text).",
          features=tfds.features.FeaturesDict({
              "tokens": tfds.features.Tensor(shape=(self.seq_len + 1,), dtype=np.int32)}),
          metadata=tfds.core.MetadataDict())

    def _split_generators(self, dl_manager):
      del dl_manager
      splits = text.split_documents(self.documents, self.heldout_fraction)
      tokenizer = text.train_tokenizer(splits["train"], self.vocab_size)
      # self.data_dir is tfds's temporary folder here: renamed into place with the records.
      tokenizer.save(os.path.join(self.data_dir, text.TOKENIZER_FILE))
      meta = self.info.metadata
      meta.update(source=self.source, vocab_size=self.vocab_size, seq_len=self.seq_len,
                  heldout_fraction=self.heldout_fraction, pad_id=text.PAD_ID,
                  eos_id=text.EOS_ID, corpus_sha256=corpus_sha256(self.documents))
      out = {}
      for split, docs in splits.items():
        encoded = text.encode(tokenizer, docs)
        rows = text.pack(encoded, self.seq_len)
        meta[f"{split}_documents"] = len(docs)
        meta[f"{split}_tokens"] = int(sum(len(e) for e in encoded))  # without the <eos>
        meta[f"{split}_rows"] = int(len(rows))
        meta[f"{split}_characters"] = int(sum(len(d) for d in docs))
        out[split] = self._generate_examples(rows)
      return out

    def _generate_examples(self, rows):
      for i, row in enumerate(rows):
        yield i, {"tokens": row}

  config = tfds.core.BuilderConfig(name=config_name(
      attributes["vocab_size"], attributes["seq_len"], attributes["heldout_fraction"]))
  return types.new_class(f"PackedText_{name}", (PackedText,), {"skip_registration": True},
                         lambda ns: ns.update(name=name, BUILDER_CONFIGS=[config],
                                              **attributes))


def _prepare(documents: list[str], name: str, data_dir: str | None, *, source: str,
             vocab_size: int, seq_len: int, heldout_fraction: float) -> str:
  if not _NAME_RE.match(name):
    raise ValueError(f"name must be lowercase letters, digits and '_' (starting with a "
                     f"letter), got {name!r}.")
  path = dataset_path(name, data_dir, vocab_size=vocab_size, seq_len=seq_len,
                      heldout_fraction=heldout_fraction)
  if is_prepared(path):
    have = dataset_info(path).get("corpus_sha256")
    if have != corpus_sha256(documents):
      raise datasets.BadDataError(
          f"{path} was prepared from another corpus than {source} (its documents changed). "
          f"Delete {os.path.dirname(os.path.dirname(path))} or choose another name=.")
    return path
  text.split_documents(documents, heldout_fraction)  # fails early on a corpus too small
  resolved = datasets.resolve_data_dir(data_dir)
  cls = _builder_class(name, documents=documents, source=source, vocab_size=vocab_size,
                       seq_len=seq_len, heldout_fraction=heldout_fraction)
  builder = cls(data_dir=resolved, file_format="array_record",
                config=config_name(vocab_size, seq_len, heldout_fraction))
  try:
    builder.download_and_prepare()
  finally:
    downloads = os.path.join(resolved, "downloads")  # tfds leaves it behind, empty
    if os.path.isdir(downloads) and not any(f for _, _, f in os.walk(downloads)):
      shutil.rmtree(downloads, ignore_errors=True)
  return path


def prepare_text(corpus: str, data_dir: str | None = None, *, name: str | None = None,
                 vocab_size: int = 8192, seq_len: int = 128, heldout_fraction: float = 0.05,
                 record_separator: str | None = None) -> str:
  """Prepares the folder of `.txt` files `corpus` (see `text.folder_documents`); returns
  its dataset folder. `name` defaults to "lm_" + the folder's name, lowercased. Already
  prepared from the same documents: returns at once; from others: `BadDataError`."""
  corpus = os.path.abspath(os.path.expanduser(corpus))
  if name is None:
    name = "lm_" + re.sub(r"[^a-z0-9_]", "_", os.path.basename(corpus).lower())
  documents = text.folder_documents(corpus, record_separator=record_separator)
  return _prepare(documents, name, data_dir, source=f"text files of {corpus}",
                  vocab_size=vocab_size, seq_len=seq_len, heldout_fraction=heldout_fraction)


def install_debian_fortunes() -> str:
  """Installs Debian's `fortunes` with apt-get; returns "" or why not."""
  prefix, why = builders.apt_prefix()
  if prefix is None:
    return why
  install = prefix + ["install", "-y", "-qq", text.FORTUNES_PACKAGE]
  print(f"jaxkd: the fortunes corpus is missing; installing its Debian package (3 MB): "
        f"{' '.join(install)}   ({builders.NO_APT_ENV}=1 turns this off)", file=sys.stderr,
        flush=True)
  try:
    out = builders._run(install, 600)  # pylint: disable=protected-access
    if out.returncode != 0 and "Unable to locate package" in out.stdout + out.stderr:
      builders._run(prefix + ["update", "-qq"], 300)  # pylint: disable=protected-access
      out = builders._run(install, 600)  # pylint: disable=protected-access
  except (OSError, subprocess.SubprocessError) as e:
    return f"`{' '.join(install)}` failed: {e}"
  if out.returncode != 0:
    lines = (out.stderr.strip() or out.stdout.strip()).splitlines()
    return f"`{' '.join(install)}` failed: {lines[-1] if lines else out.returncode}"
  return ""


def ensure_fortunes(data_dir: str | None = None, *, vocab_size: int = 8192,
                    seq_len: int = 128, heldout_fraction: float = 0.05,
                    fortunes_dir: str = text.FORTUNES_DIR, install: bool = True) -> str:
  """The prepared fortunes dataset's folder: prepared from `fortunes_dir`, which is first
  installed with apt-get when missing (`install`, and see `install_debian_fortunes`).

  Raises:
    DatasetNotFoundError: the corpus is missing and could not be installed; the message
      names the command that installs it.
  """
  path = dataset_path(FORTUNES_NAME, data_dir, vocab_size=vocab_size, seq_len=seq_len,
                      heldout_fraction=heldout_fraction)
  if text.fortune_files(fortunes_dir) is None:
    if is_prepared(path):  # prepared earlier, the package since removed: still usable
      return path
    why = install_debian_fortunes() if install else "installing is off"
    if text.fortune_files(fortunes_dir) is None:
      sudo = "" if os.geteuid() == 0 else "sudo "
      raise datasets.DatasetNotFoundError(
          f"The fortunes corpus is not in {fortunes_dir} and jaxkd did not install it: "
          f"{why or 'apt-get succeeded but the files are not there'}. Install it with:\n"
          f"  {sudo}apt-get install -y {text.FORTUNES_PACKAGE}")
  return _prepare(text.fortune_documents(fortunes_dir), FORTUNES_NAME, data_dir,
                  source="Debian's fortunes (fortune-mod cookie files)",
                  vocab_size=vocab_size, seq_len=seq_len, heldout_fraction=heldout_fraction)


def dataset_info(path: str) -> dict:
  """The dataset's metadata (vocab_size, seq_len, pad_id, eos_id, per-split counts, ...)."""
  import json  # pylint: disable=g-import-not-at-top
  meta = os.path.join(path, "metadata.json")
  if not os.path.exists(meta):
    raise datasets.DatasetNotFoundError(f"no prepared text dataset in {path} (no "
                                        f"metadata.json); prepare it with prepare_text or "
                                        f"ensure_fortunes.")
  with open(meta) as f:
    return json.load(f)


def load_rows(path: str, split: str, chunk: int = 4096) -> np.ndarray:
  """All rows of `split` ("train" or "validation") of the dataset at `path`: int32
  [R, seq_len + 1], in the data source's order (tfds shuffles records when it writes)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  info = dataset_info(path)
  builder = tfds.builder_from_directory(path)
  if split not in builder.info.splits:
    raise ValueError(f"unknown split {split!r} of {path}; available: "
                     f"{', '.join(sorted(builder.info.splits))}.")
  source = builder.as_data_source(split)
  n, width = len(source), info["seq_len"] + 1
  rows = np.empty((n, width), np.int32)
  try:
    for start in range(0, n, chunk):
      keys = list(range(start, min(start + chunk, n)))
      rows[start:start + len(keys)] = np.stack([ex["tokens"] for ex in
                                                source.__getitems__(keys)])
  except Exception as e:  # pylint: disable=broad-except
    raise datasets.BadDataError(f"could not read {split} of {path}: {type(e).__name__}: "
                                f"{e}. Delete the folder and prepare it again.") from e
  if n and (rows.min() < 0 or rows.max() >= info["vocab_size"]):
    raise datasets.BadDataError(f"{split} of {path} holds token ids outside "
                                f"[0, {info['vocab_size']}); prepare it again.")
  return rows


def main(argv=None) -> int:
  """`python -m jaxkd.data.text_builder fortunes|FOLDER [--data_dir DIR] [--vocab_size V]
  [--seq_len L] [--heldout_fraction F] [--name NAME] [--record_separator SEP]`."""
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(prog="python -m jaxkd.data.text_builder",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("corpus", help="'fortunes' (Debian's package) or a folder of .txt files")
  parser.add_argument("--data_dir", default=None,
                      help="tfds data dir (default: $TFDS_DATA_DIR or ~/tensorflow_datasets)")
  parser.add_argument("--vocab_size", type=int, default=8192)
  parser.add_argument("--seq_len", type=int, default=128)
  parser.add_argument("--heldout_fraction", type=float, default=0.05)
  parser.add_argument("--name", default=None, help="dataset name of a folder corpus")
  parser.add_argument("--record_separator", default=None,
                      help="a line that separates documents within a file (e.g. %%)")
  args = parser.parse_args(argv)
  options = dict(vocab_size=args.vocab_size, seq_len=args.seq_len,
                 heldout_fraction=args.heldout_fraction)
  try:
    if args.corpus == "fortunes":
      path = ensure_fortunes(args.data_dir, **options)
    else:
      path = prepare_text(args.corpus, args.data_dir, name=args.name,
                          record_separator=args.record_separator, **options)
  except (datasets.DatasetNotFoundError, datasets.BadDataError, FileNotFoundError,
          ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  info = dataset_info(path)
  print(f"{path}: " + ", ".join(f"{s} {info[s + '_documents']} documents, "
                                f"{info[s + '_tokens']} tokens, {info[s + '_rows']} rows"
                                for s in ("train", "validation")))
  return 0


if __name__ == "__main__":
  sys.exit(main())
