"""Text corpora for language-model distillation: documents, held-out split, tokenizer, packing.

Pure Python and NumPy (and HF `tokenizers` for the tokenizer); `text_builder.py` writes the
result as a tfds dataset, `text_loader.py` makes batches of it. docs/LM.md describes it all.

- **Documents.** A corpus is a list of documents, read in a fixed order: Debian's `fortunes`
  package (`fortune_documents`: every fortune file, one document per '%'-separated record)
  or a folder of the user's UTF-8 `.txt` files (`folder_documents`: one document per file,
  or per record with `record_separator`). Trailing whitespace is stripped; empty documents
  and exact duplicates (after the first) are dropped, so a repeated document cannot sit in
  both splits.
- **Held-out split** (`is_heldout`): a document goes to "validation" when the first 8 bytes
  of SHA-256(its UTF-8 text), as an integer, mod 10000 < heldout_fraction · 10000. It
  depends on the text alone: not on the file order, the other documents or a seed.
- **Tokenizer** (`train_tokenizer`): byte-level BPE (Radford et al., GPT-2, 2019) trained on
  the train split only, with `<pad>` = 0 and `<eos>` = 1 as its only special tokens. Text is
  encoded with special-token matching off, so a document that spells "<eos>" gets ordinary
  tokens for it, and ids 0 and 1 occur only where packing puts them.
- **Packing** (`pack`): each split's documents, encoded, each followed by `<eos>`, are
  concatenated into one stream s (length T) and cut into rows r_i = s[i·L : i·L + L + 1]
  (rows overlap by one token, so every position of the stream after the first is a target
  exactly once); the last row is filled with `<pad>`. From a row, tokens = r[:-1],
  targets = r[1:], mask = targets ≠ <pad> (`batch_fields`). Attention is not reset at
  document boundaries (GPT-2's packing): the `<eos>` before a document tells the model a
  new one starts.
"""

from __future__ import annotations

import hashlib
import math
import os
from typing import Iterable, Sequence

import numpy as np

PAD, EOS = "<pad>", "<eos>"
PAD_ID, EOS_ID = 0, 1
FORTUNES_PACKAGE = "fortunes"
FORTUNES_DIR = "/usr/share/games/fortunes"
TOKENIZER_FILE = "tokenizer.json"


# --------------------------------------------------------------------------------------------
# Documents.


def split_records(text: str, separator: str = "%") -> list[str]:
  """The records of `text` between lines that are exactly `separator` (fortune's format)."""
  records, current = [], []
  for line in text.split("\n"):
    if line.rstrip("\r") == separator:
      records.append("\n".join(current))
      current = []
    else:
      current.append(line)
  records.append("\n".join(current))
  return records


def _clean(docs: Iterable[str]) -> list[str]:
  """Trailing whitespace stripped; empty documents and later exact duplicates dropped."""
  seen, out = set(), []
  for d in docs:
    d = "\n".join(line.rstrip() for line in d.strip("\n").split("\n")).rstrip()
    if d and d not in seen:
      seen.add(d)
      out.append(d)
  return out


def _read_utf8(path: str) -> str:
  with open(path, "rb") as f:
    data = f.read()
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise ValueError(f"{path} is not UTF-8 text ({e}); convert it, e.g. with "
                     f"`iconv -f latin1 -t utf-8`.") from None


def fortune_files(directory: str = FORTUNES_DIR) -> list[str] | None:
  """The fortune files of `directory` (sorted; no `.dat` indexes, no `.u8` links), or None."""
  if not os.path.isdir(directory):
    return None
  files = sorted(
      os.path.join(directory, f) for f in os.listdir(directory)
      if not f.endswith(".dat") and not os.path.islink(os.path.join(directory, f))
      and os.path.isfile(os.path.join(directory, f)))
  return files or None


def fortune_documents(directory: str = FORTUNES_DIR) -> list[str]:
  """Every fortune of `directory`, in file-name then record order, cleaned (see above)."""
  files = fortune_files(directory)
  if files is None:
    raise FileNotFoundError(f"no fortune files in {directory}: install Debian's "
                            f"`{FORTUNES_PACKAGE}` package (apt-get install -y fortunes).")
  return _clean(r for path in files for r in split_records(_read_utf8(path)))


def folder_documents(folder: str, *, record_separator: str | None = None) -> list[str]:
  """The `.txt` files under `folder` (recursively, sorted by path), one document each, or
  one per record between lines equal to `record_separator`; cleaned (see above)."""
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"corpus folder {folder} does not exist.")
  paths = sorted(os.path.join(root, f) for root, _, files in os.walk(folder) for f in files
                 if f.endswith(".txt"))
  if not paths:
    raise FileNotFoundError(f"no .txt files under {folder}: a text corpus is a folder of "
                            f"UTF-8 .txt files.")
  texts = (_read_utf8(p) for p in paths)
  if record_separator is None:
    return _clean(texts)
  return _clean(r for t in texts for r in split_records(t, record_separator))


def is_heldout(document: str, heldout_fraction: float) -> bool:
  """Whether `document` belongs to the held-out split: SHA-256 of its UTF-8 text (first 8
  bytes, big-endian) mod 10000 < round(heldout_fraction · 10000)."""
  h = int.from_bytes(hashlib.sha256(document.encode("utf-8")).digest()[:8], "big")
  return h % 10000 < round(heldout_fraction * 10000)


def split_documents(documents: Sequence[str], heldout_fraction: float
                    ) -> dict[str, list[str]]:
  """{"train": [...], "validation": [...]} in the documents' order (see `is_heldout`)."""
  if not 0 < heldout_fraction < 1:
    raise ValueError(f"heldout_fraction must lie in (0, 1), got {heldout_fraction!r}.")
  out = {"train": [], "validation": []}
  for d in documents:
    out["validation" if is_heldout(d, heldout_fraction) else "train"].append(d)
  if not out["train"] or not out["validation"]:
    raise ValueError(f"{len(documents)} documents give an empty split at heldout_fraction "
                     f"{heldout_fraction}; the corpus needs more documents.")
  return out


# --------------------------------------------------------------------------------------------
# Tokenizer.


def train_tokenizer(documents: Sequence[str], vocab_size: int):
  """A byte-level BPE `tokenizers.Tokenizer` of `vocab_size` ids trained on `documents`.

  Ids 0 and 1 are `<pad>` and `<eos>`, then the 256 byte symbols, then the merges. The
  trainer is deterministic for the same documents in the same order.
  """
  # pylint: disable-next=g-import-not-at-top
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  if not isinstance(vocab_size, int) or vocab_size < 258:
    raise ValueError(f"vocab_size must be an int ≥ 258 (2 special tokens + 256 bytes), got "
                     f"{vocab_size!r}.")
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, EOS],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tok.train_from_iterator(documents, trainer=trainer, length=len(documents))
  return _checked(tok)


def _checked(tok):
  if tok.token_to_id(PAD) != PAD_ID or tok.token_to_id(EOS) != EOS_ID:
    raise ValueError(f"the tokenizer must map {PAD} to {PAD_ID} and {EOS} to {EOS_ID}, got "
                     f"{tok.token_to_id(PAD)} and {tok.token_to_id(EOS)}.")
  tok.encode_special_tokens = True  # "<eos>" in a text is text, not the special token
  return tok


def load_tokenizer(path: str):
  """The tokenizer saved at `path` (a `tokenizer.json`, or the dataset folder holding one)."""
  from tokenizers import Tokenizer  # pylint: disable=g-import-not-at-top
  if os.path.isdir(path):
    path = os.path.join(path, TOKENIZER_FILE)
  return _checked(Tokenizer.from_file(path))


def encode(tokenizer, documents: Sequence[str]) -> list[list[int]]:
  """Token ids of each document (no special tokens added)."""
  return [e.ids for e in tokenizer.encode_batch(list(documents), add_special_tokens=False)]


def decode(tokenizer, ids: Sequence[int]) -> str:
  """The text of `ids` (special tokens dropped)."""
  return tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)


# --------------------------------------------------------------------------------------------
# Packing.


def pack(encoded: Sequence[Sequence[int]], seq_len: int, *, eos_id: int = EOS_ID,
         pad_id: int = PAD_ID) -> np.ndarray:
  """int32 [R, seq_len + 1] rows of the `<eos>`-joined stream (see the module docstring).

  R = ceil((T − 1) / seq_len) for a stream of T ≥ 2 tokens.
  """
  if not isinstance(seq_len, int) or seq_len < 1:
    raise ValueError(f"seq_len must be a positive int, got {seq_len!r}.")
  stream = np.fromiter((t for doc in encoded for t in (*doc, eos_id)), np.int32)
  if stream.size < 2:
    raise ValueError("nothing to pack: the documents hold no tokens.")
  rows = math.ceil((stream.size - 1) / seq_len)
  padded = np.full(rows * seq_len + 1, pad_id, np.int32)
  padded[:stream.size] = stream
  starts = np.arange(rows)[:, None] * seq_len
  return padded[starts + np.arange(seq_len + 1)[None, :]]


def batch_fields(rows, pad_id: int = PAD_ID, xp=np) -> dict:
  """{"tokens", "targets": int32 [B, L], "mask": bool [B, L]} of packed rows [B, L + 1]."""
  targets = rows[:, 1:]
  return {"tokens": rows[:, :-1], "targets": targets, "mask": targets != pad_id}


def unigram_perplexity(train_rows: np.ndarray, eval_rows: np.ndarray, vocab_size: int,
                       pad_id: int = PAD_ID) -> float:
  """exp of the mean NLL of the eval targets under the train targets' unigram frequencies
  with add-one smoothing, p(v) = (c_v + 1) / (Σ c + V): the bar a model must clear."""
  train_t = train_rows[:, 1:][train_rows[:, 1:] != pad_id]
  eval_t = eval_rows[:, 1:][eval_rows[:, 1:] != pad_id]
  counts = np.bincount(train_t, minlength=vocab_size).astype(np.float64)
  logp = np.log(counts + 1.0) - np.log(counts.sum() + vocab_size)
  return float(np.exp(-logp[eval_t].mean()))
