"""Every reference to a file or a heading of the repository points at something that exists.

The repository has to stand on its own: its code, configs, tests, benchmarks and docs may
cite only files that ship with it. This scans every text file git knows (tracked, or new and
not ignored) for

* documentation names: a path ending in `.md`, optionally followed by `#anchor`;
* paths rooted at a top-level folder (`jaxkd/`, `configs/`, `tests/`, `benchmarks/`,
  `docs/`, `.ci/`) that end in a file extension or a slash, e.g. the result files under
  `benchmarks/results/`;
* the targets of relative Markdown links, `[text](target)`;

and checks that each names a file (or, for a trailing slash, a folder) of the repository,
relative to the repository root or to the citing file, and that an anchor is the GitHub slug
of a heading of the target. Placeholders (`<device>`, `{name}`, `*`, an upper-case word such
as FILE) stand for any name: a glob must match a file, a placeholder needs only its folder.
It also fails on references to material outside the repository and on section numbers
(use an anchor). Every message names the file, the line and the reference.
"""

from __future__ import annotations

import fnmatch
import os
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

TEXT_SUFFIXES = {".py", ".md", ".sh", ".toml", ".txt", ".cfg", ".ini", ".yaml", ".yml"}
ROOT_FOLDERS = ("jaxkd", "configs", "tests", "benchmarks", "docs", ".ci")

# Names that look like repository files but are not: each one explained. Keep this short.
ALLOWED = {
    "summary.md": "written by a suite run into its workdir (jaxkd/suite.py)",
    "report.md": "written by python -m jaxkd.report into its --out folder (jaxkd/report.py)",
}
# Upper-case words that stand for a name the reader chooses (configs/FILE.py:PRESET).
PLACEHOLDER_WORDS = {"FILE", "DIR", "NAME", "PRESET"}

# Strings that only ever cite material outside the repository or an old numbering scheme.
# Built from parts so that this file does not contain them itself.
FORBIDDEN = {
    "../" + "shared": "material outside the repository",
    "/work/" + "shared": "material outside the repository",
    "METHODS" + " Part": "a section numbering that no file has; cite docs/METHODS.md with an anchor",
    "DESIGN" + ' "': "a section of a file that is not in the repository; cite docs/DESIGN.md "
                     "with an anchor",
}
SECTION_SIGN = re.compile(r"\.md\s*§")

_CHARS = r"[\w./<>*{}-]"
_BEFORE = r"(?<![\w./<>*{}-])"
DOC_REF = re.compile(_BEFORE + r"(" + _CHARS + r"*\.md)(?:#([\w-]+))?(?!\w)")
ROOTED_REF = re.compile(_BEFORE + r"((?:" + "|".join(re.escape(f) for f in ROOT_FOLDERS)
                        + r")/[\w./<>*{},-]*)")
MD_LINK = re.compile(r"\]\(([^()\s]+)\)")
URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://\S+")
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
FENCE = re.compile(r"^\s{0,3}(```|~~~)")


# ------------------------------------------------------------------------------------------
# The repository's files.


def _listed_files() -> list[str]:
  """Relative paths of the files git tracks or would track (not ignored), that exist."""
  try:
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
        capture_output=True, check=True, timeout=60).stdout.decode()
    names = [n for n in out.split("\0") if n]
  except (OSError, subprocess.SubprocessError):  # not a git checkout: walk the tree
    skip = {".git", "__pycache__", ".pytest_cache", "runs", "build", "data"}
    names = []
    for root, dirs, files in os.walk(REPO):
      dirs[:] = [d for d in dirs if d not in skip and not d.startswith(".venv")
                 and not d.endswith(".egg-info")]
      names += [os.path.relpath(os.path.join(root, f), REPO) for f in files]
  return sorted(n for n in names if (REPO / n).is_file())


FILES = _listed_files()
FILE_SET = set(FILES)
DIR_SET = {parent.as_posix() for f in FILES for parent in Path(f).parents}


def _text_files() -> list[str]:
  out = []
  for name in FILES:
    suffix = Path(name).suffix
    if suffix in TEXT_SUFFIXES or (suffix == "" and _is_text(REPO / name)):
      out.append(name)
  return out


def _is_text(path: Path) -> bool:
  try:
    data = path.read_bytes()[:4096]
    data.decode("utf-8")
  except (OSError, UnicodeDecodeError):
    return False
  return b"\0" not in data


def _lines(name: str) -> list[str]:
  return (REPO / name).read_text(encoding="utf-8", errors="replace").splitlines()


# ------------------------------------------------------------------------------------------
# GitHub's heading anchors.


def github_slug(heading: str) -> str:
  """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to '-'."""
  text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link counts by its text
  text = re.sub(r"<[^>]+>", "", text).strip().lower()
  text = re.sub(r"[^\w\- ]", "", text)
  return text.replace(" ", "-")


_ANCHORS: dict[str, set[str]] = {}


def anchors(name: str) -> set[str]:
  """The heading anchors of Markdown file `name`; a repeated heading gets -1, -2, ... ."""
  if name not in _ANCHORS:
    result: set[str] = set()
    counts: dict[str, int] = {}
    fenced = False
    for line in _lines(name):
      if FENCE.match(line):
        fenced = not fenced
        continue
      m = None if fenced else HEADING.match(line)
      if m:
        slug = github_slug(m.group(2))
        n = counts.get(slug, 0)
        result.add(f"{slug}-{n}" if n else slug)
        counts[slug] = n + 1
    _ANCHORS[name] = result
  return _ANCHORS[name]


# ------------------------------------------------------------------------------------------
# Resolving one reference.


def _expand_braces(path: str) -> list[str]:
  """'x.{json,txt}' -> ['x.json', 'x.txt']; a brace without a comma is a placeholder."""
  m = re.search(r"\{([^{}]*,[^{}]*)\}", path)
  if not m:
    return [path]
  return [alt for choice in m.group(1).split(",")
          for alt in _expand_braces(path[:m.start()] + choice + path[m.end():])]


def _is_placeholder(path: str) -> bool:
  if re.search(r"<[^<>]*>|\{[^{},]*\}", path):
    return True
  return any(re.sub(r"\..*$", "", part) in PLACEHOLDER_WORDS for part in path.split("/"))


def _candidates(path: str, citing: str) -> list[str]:
  out = []
  for base in ("", os.path.dirname(citing)):
    joined = os.path.normpath(os.path.join(base, path)).replace(os.sep, "/")
    if not joined.startswith("../") and joined != "..":
      out.append(joined)
  return out


def resolve(path: str, citing: str, *, directory_ok: bool) -> tuple[list[str], str]:
  """(matching repository files, "" or why the reference fails)."""
  found = []
  for alternative in _expand_braces(path):
    is_dir = alternative.endswith("/")
    alternative = alternative.rstrip("/") or "."
    hits = []
    for cand in _candidates(alternative, citing):
      if _is_placeholder(cand):
        folder = cand.rsplit("/", 1)[0] if "/" in cand else "."
        if folder in DIR_SET or folder == ".":
          hits.append(cand)
      elif any(c in cand for c in "*?["):
        hits += fnmatch.filter(FILES, cand)
      elif cand in FILE_SET and not is_dir:
        hits.append(cand)
      elif (is_dir or directory_ok) and cand in DIR_SET:
        hits.append(cand)
    if not hits:
      where = "folder" if is_dir else "file"
      return [], f"no such {where} in the repository (relative to the root or to {citing})"
    found += hits
  return found, ""


def check_anchor(targets: list[str], anchor: str) -> str:
  for target in targets:
    if target.endswith(".md") and target in FILE_SET:
      if anchor in anchors(target):
        return ""
      return f"{target} has no heading with the anchor #{anchor}"
  return ""


def _trim(token: str) -> str:
  """Drops trailing punctuation and anything after a comma outside braces."""
  depth, end = 0, len(token)
  for i, ch in enumerate(token):
    depth += ch == "{"
    depth -= ch == "}"
    if ch == "," and depth == 0:
      end = i
      break
  return token[:end].rstrip(".,;:")


def _basename(path: str) -> str:
  return path.rstrip("/").rsplit("/", 1)[-1]


def problems_in(name: str) -> list[str]:
  out = []
  is_md = name.endswith(".md")
  for lineno, raw in enumerate(_lines(name), 1):
    where = f"{name}:{lineno}"
    for text, why in FORBIDDEN.items():
      if text in raw:
        out.append(f"{where}: {text!r}: {why}")
    if SECTION_SIGN.search(raw):
      out.append(f"{where}: a section sign after a document name: cite a heading with "
                 f"#anchor instead")
    line = URL.sub(" ", raw)
    refs = []  # (reference as written, path, anchor, directory_ok)
    for m in DOC_REF.finditer(line):
      refs.append((m.group(0), m.group(1), m.group(2), False))
    for m in ROOTED_REF.finditer(line):
      token = _trim(m.group(1))
      base = _basename(token)
      if token.endswith(".md") or not (token.endswith("/") or "." in base):
        continue  # a documentation name (above) or prose such as "jaxkd/PyTorch"
      refs.append((token, token, None, token.endswith("/")))
    if is_md:
      for m in MD_LINK.finditer(raw):
        target = m.group(1)
        if URL.match(target) or target.startswith("mailto:"):
          continue
        path, _, anchor = target.partition("#")
        refs.append((target, path or name, anchor or None, True))
    for written, path, anchor, directory_ok in refs:
      base = _basename(path)
      if base in ALLOWED or not re.match(r"[\w<{*]", base):
        continue  # an explained external name, or a fragment such as "-smoke" + ".md"
      targets, why = resolve(path, name, directory_ok=directory_ok)
      if not why and anchor:
        why = check_anchor(targets, anchor)
      if why:
        out.append(f"{where}: {written!r}: {why}")
  return out


# ------------------------------------------------------------------------------------------
# Tests.


def test_github_slug():
  assert github_slug("XLA:CPU collective hangs") == "xlacpu-collective-hangs"
  assert github_slug("ER-KD") == "er-kd"
  assert github_slug("CIFAR-100") == "cifar-100"
  assert github_slug("Composing a base and a weighting") == "composing-a-base-and-a-weighting"
  assert github_slug("`jaxkd.losses` and [the docs](x)") == "jaxkdlosses-and-the-docs"


def test_resolve_rules():
  assert resolve("tests/test_references.py", "README.md", directory_ok=False)[0]
  assert resolve("test_references.py", "tests/conftest.py", directory_ok=False)[0]
  assert resolve("tests/", "README.md", directory_ok=False)[0]
  assert resolve("tests/*.py", "README.md", directory_ok=False)[0]
  assert resolve("tests/<name>.json", "README.md", directory_ok=False)[0]
  assert resolve("tests/{conftest,test_references}.py", "x", directory_ok=False)[0]
  missing = "no_such_" + "file"  # not written out whole: this file is scanned too
  assert resolve(f"tests/{missing}.py", "x", directory_ok=False)[1]
  assert resolve(f"tests/{{conftest,{missing}}}.py", "x", directory_ok=False)[1]
  assert resolve("no_such_folder/<name>.py", "x", directory_ok=False)[1]
  assert resolve("../outside.py", "tests/conftest.py", directory_ok=False)[1]


def test_every_text_file_is_scanned():
  scanned = set(_text_files())
  assert "tests/test_references.py" in scanned
  assert any(n.startswith("jaxkd/") for n in scanned)
  assert "README.md" in scanned


def test_no_dangling_references():
  problems = [p for name in _text_files() for p in problems_in(name)]
  if problems:
    pytest.fail(f"{len(problems)} reference(s) point at nothing in the repository:\n"
                + "\n".join(problems), pytrace=False)
