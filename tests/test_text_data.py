"""Text for language models: documents, the held-out split, the BPE tokenizer, packing, the
tfds builder without TensorFlow, and the host and device-resident loaders with exact resume.

The real corpus (Debian's `fortunes`) is prepared once; without the package the test skips,
except in CI (`CI=true`), where it installs it or fails, as the Fashion-MNIST tests do.
"""

import os

import jax
import numpy as np
import pytest

from jaxkd import sharding
from jaxkd.data import datasets
from jaxkd.data import text
from jaxkd.data import text_builder
from jaxkd.data import text_loader

import helpers

WORDS = ("the quick brown fox jumps over the lazy dog while a cat sleeps in the warm sun "
         "and birds sing songs of spring over green hills near the old mill").split()


def _corpus(n=60, seed=0):
  rng = np.random.default_rng(seed)
  return [" ".join(rng.choice(WORDS, size=rng.integers(3, 25))) + f" #{i}." for i in range(n)]


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("corpus")
  docs = _corpus()
  os.makedirs(root / "sub")
  (root / "a.txt").write_text("\n%\n".join(docs[:40]) + "\n")
  (root / "sub" / "b.txt").write_text("\n%\n".join(docs[40:]) + "\n%\n" + docs[0] + "\n")
  (root / ("ignored" + ".md")).write_text("not a .txt file")  # split: not a doc reference
  os.makedirs(root / "empty")
  (root / "empty" / ("notes" + ".md")).write_text("no text files here")
  return str(root)


@pytest.fixture(scope="module")
def prepared(corpus_dir, tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("data"))
  path = text_builder.prepare_text(corpus_dir, data_dir, name="lm_small", vocab_size=300,
                                   seq_len=16, heldout_fraction=0.2, record_separator="%")
  return path, data_dir


def test_records_and_folder_documents(corpus_dir):
  assert text.split_records("a\n%\nb\nc\n%\n\n") == ["a", "b\nc", "\n"]
  docs = text.folder_documents(corpus_dir, record_separator="%")
  assert docs == _corpus()  # in path order, the trailing duplicate of docs[0] dropped
  whole = text.folder_documents(corpus_dir)
  assert len(whole) == 2 and whole[0].startswith(_corpus()[0])
  with pytest.raises(FileNotFoundError, match="does not exist"):
    text.folder_documents(os.path.join(corpus_dir, "nothing"))
  with pytest.raises(FileNotFoundError, match="no .txt files"):
    text.folder_documents(os.path.join(corpus_dir, "empty"))


def test_heldout_split_is_deterministic_and_disjoint():
  docs = _corpus(400)
  split = text.split_documents(docs, 0.25)
  again = text.split_documents(list(reversed(docs)), 0.25)
  assert set(split["train"]).isdisjoint(split["validation"])
  assert set(split["train"]) | set(split["validation"]) == set(docs)
  assert set(again["validation"]) == set(split["validation"])  # the text decides, not order
  assert 60 < len(split["validation"]) < 140
  with pytest.raises(ValueError, match="heldout_fraction"):
    text.split_documents(docs, 1.0)


def test_pack_exact_rows_and_masks():
  rows = text.pack([[5, 6, 7], [8], [9, 10]], seq_len=3, eos_id=1, pad_id=0)
  # stream 5 6 7 1 8 1 9 10 1 (T = 9): ceil(8 / 3) = 3 rows of 4, overlapping by one.
  np.testing.assert_array_equal(rows, [[5, 6, 7, 1], [1, 8, 1, 9], [9, 10, 1, 0]])
  batch = text.batch_fields(rows, pad_id=0)
  np.testing.assert_array_equal(batch["tokens"], [[5, 6, 7], [1, 8, 1], [9, 10, 1]])
  np.testing.assert_array_equal(batch["targets"], [[6, 7, 1], [8, 1, 9], [10, 1, 0]])
  np.testing.assert_array_equal(batch["mask"], [[1, 1, 1], [1, 1, 1], [1, 1, 0]])
  assert rows.dtype == np.int32
  # Every stream position after the first is a target exactly once.
  assert batch["mask"].sum() == 9 - 1
  with pytest.raises(ValueError, match="seq_len"):
    text.pack([[1]], seq_len=0)


def test_unigram_perplexity_by_hand():
  train = np.array([[9, 2, 2, 3], [3, 2, 0, 0]])   # targets 2 2 3 | 2 (pads skipped)
  held = np.array([[9, 3, 4, 0]])                  # targets 3 4
  v = 5  # add-one: p(3) = (1 + 1) / (4 + 5), p(4) = (0 + 1) / 9
  expected = np.exp(-(np.log(2 / 9) + np.log(1 / 9)) / 2)
  assert text.unigram_perplexity(train, held, v) == pytest.approx(expected, rel=1e-12)


def test_tokenizer_round_trip_and_special_tokens():
  docs = _corpus(80)
  tok = text.train_tokenizer(docs, 300)
  assert tok.get_vocab_size() == 300
  assert tok.token_to_id(text.PAD) == 0 and tok.token_to_id(text.EOS) == 1
  tricky = ["Ünïcödé — naïve café, 日本語!\n\ttabs  and  spaces", docs[3]]
  ids = text.encode(tok, tricky)
  assert [text.decode(tok, i) for i in ids] == tricky
  # A text that spells the special tokens gets ordinary tokens for them.
  assert not {0, 1} & set(text.encode(tok, ["a <eos> b <pad>"])[0])
  assert text.train_tokenizer(docs, 300).to_str() == tok.to_str()  # deterministic
  with pytest.raises(ValueError, match="vocab_size"):
    text.train_tokenizer(docs, 100)


def test_builder_writes_the_packed_splits(prepared, corpus_dir):
  path, data_dir = prepared
  assert path == os.path.join(data_dir, "lm_small", "v300_l16_h2000", "1.0.0")
  info = text_builder.dataset_info(path)
  docs = text.folder_documents(corpus_dir, record_separator="%")
  split = text.split_documents(docs, 0.2)
  tok = text.load_tokenizer(path)
  for name in ("train", "validation"):
    rows = text_builder.load_rows(path, name)
    encoded = text.encode(tok, split[name])
    expected = text.pack(encoded, 16)
    # tfds shuffles records when it writes them: the same rows, in another order.
    assert sorted(map(tuple, rows)) == sorted(map(tuple, expected))
    assert info[f"{name}_documents"] == len(split[name])
    assert info[f"{name}_tokens"] == sum(map(len, encoded))
    assert info[f"{name}_rows"] == len(rows)
  assert info["vocab_size"] == 300 and info["seq_len"] == 16 and info["eos_id"] == 1
  # Prepared again from the same documents: returned at once; from others: refused.
  assert text_builder.prepare_text(corpus_dir, data_dir, name="lm_small", vocab_size=300,
                                   seq_len=16, heldout_fraction=0.2,
                                   record_separator="%") == path
  with pytest.raises(datasets.BadDataError, match="another corpus"):
    text_builder.prepare_text(corpus_dir, data_dir, name="lm_small", vocab_size=300,
                              seq_len=16, heldout_fraction=0.2)
  with pytest.raises(ValueError, match="unknown split 'test'"):
    text_builder.load_rows(path, "test")


def test_command_line(prepared, corpus_dir, capsys):
  path, data_dir = prepared
  assert text_builder.main([corpus_dir, "--data_dir", data_dir, "--name", "lm_small",
                            "--vocab_size", "300", "--seq_len", "16", "--heldout_fraction",
                            "0.2", "--record_separator", "%"]) == 0
  assert capsys.readouterr().out.startswith(f"{path}: train ")
  assert text_builder.main([corpus_dir + "/nope", "--data_dir", data_dir]) == 1
  assert "does not exist" in capsys.readouterr().err


def _rows(n=37, width=9, seed=0):
  rows = np.random.default_rng(seed).integers(2, 50, size=(n, width)).astype(np.int32)
  rows[-1, 5:] = text.PAD_ID
  return rows


def _collect(loader, k):
  return [jax.tree.map(np.asarray, next(loader)) for _ in range(k)]


def test_loader_is_deterministic_and_resumes_exactly():
  rows = _rows()
  a = _collect(text_loader.TextLoader(rows, global_batch=8, seed=3), 10)  # 4 per epoch
  b = _collect(text_loader.TextLoader(rows, global_batch=8, seed=3), 10)
  jax.tree.map(np.testing.assert_array_equal, a, b)
  assert a[0]["tokens"].shape == (8, 8) and a[0]["tokens"].dtype == np.int32
  assert a[0]["mask"].dtype == bool
  other = _collect(text_loader.TextLoader(rows, global_batch=8, seed=4), 1)
  assert not np.array_equal(other[0]["tokens"], a[0]["tokens"])
  epoch0 = np.concatenate([x["tokens"] for x in a[:4]])
  assert len({tuple(r) for r in epoch0}) == 32  # an epoch draws distinct rows
  loader = text_loader.TextLoader(rows, global_batch=8, seed=3)
  _collect(loader, 6)
  state = loader.get_state()
  assert state["step"] == 6
  resumed = text_loader.TextLoader(rows, global_batch=8, seed=3)
  resumed.set_state(state)
  jax.tree.map(np.testing.assert_array_equal, _collect(resumed, 4), a[6:])
  with pytest.raises(ValueError, match="seed=3 but this pipeline has seed=5"):
    text_loader.TextLoader(rows, global_batch=8, seed=5).set_state(state)


def test_eval_pass_covers_every_row_once():
  rows = _rows()
  evals = text_loader.TextLoader(rows, global_batch=8, train=False)
  batches = list(evals)
  assert len(batches) == 5 == len(evals)
  tokens = np.concatenate([b["tokens"] for b in batches])
  mask = np.concatenate([b["mask"] for b in batches])
  np.testing.assert_array_equal(tokens[:37], rows[:, :-1])
  assert not mask[37:].any()
  np.testing.assert_array_equal(mask[:37], rows[:, 1:] != text.PAD_ID)


@pytest.mark.parametrize("train", [True, False])
def test_device_resident_loader_equals_host_loader(train):
  rows = _rows()
  mesh = sharding.make_mesh()
  host = text_loader.TextLoader(rows, global_batch=8, seed=1, train=train, mesh=mesh)
  dev = text_loader.DeviceTextLoader(rows, global_batch=8, seed=1, train=train, mesh=mesh)
  k = 5 if not train else 6
  hb, db = _collect(host, k), _collect(dev, k)
  jax.tree.map(np.testing.assert_array_equal, hb, db)
  batch = next(iter(text_loader.DeviceTextLoader(rows, global_batch=8, mesh=mesh)))
  assert batch["tokens"].sharding.spec == jax.sharding.PartitionSpec("data")
  if train:
    dev2 = text_loader.DeviceTextLoader(rows, global_batch=8, seed=1, mesh=mesh)
    dev2.set_state(host.get_state())  # the state is the same on either path
    assert dev2.step == k


def test_fortunes_missing_without_apt_names_the_command(tmp_path, monkeypatch):
  monkeypatch.setenv("JAXKD_NO_APT", "1")
  with pytest.raises(datasets.DatasetNotFoundError, match="apt-get install -y fortunes"):
    text_builder.ensure_fortunes(str(tmp_path), fortunes_dir=str(tmp_path / "none"))


def test_real_fortunes_corpus(tmp_path):
  """Debian's fortunes: prepared (installed first in CI), counts, round trip, baseline."""
  if text.fortune_files() is None and not helpers.in_ci():
    pytest.skip("Debian package fortunes is not installed (apt-get install -y fortunes); "
                "with CI=true this test installs it or fails.")
  try:
    path = text_builder.ensure_fortunes(str(tmp_path), vocab_size=8192, seq_len=128)
  except datasets.DatasetNotFoundError as e:
    pytest.fail(f"The fortunes corpus is required (CI=true) and could not be had: {e}",
                pytrace=False)
  info = text_builder.dataset_info(path)
  assert info["train_documents"] > 10_000 and info["validation_documents"] > 400
  assert info["train_tokens"] > 500_000
  train, val = text_builder.load_rows(path, "train"), text_builder.load_rows(path, "validation")
  assert train.shape == (info["train_rows"], 129) and val.shape[0] == info["validation_rows"]
  tok = text.load_tokenizer(path)
  docs = text.split_documents(text.fortune_documents(), 0.05)["validation"][:50]
  assert [text.decode(tok, ids) for ids in text.encode(tok, docs)] == docs
  ppl = text.unigram_perplexity(train, val, 8192)
  assert 200 < ppl < 5000
