"""The README's examples run as written, and what its first lines promise is what the code
and CI do."""

import pathlib
import re
import shlex

from jaxkd.data import builders

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def _first_commands() -> list[str]:
  """The command lines of the README's first shell block (comments dropped)."""
  block = re.search(r"```bash\n(.*?)```", README.read_text(), flags=re.S).group(1)
  return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_readme_python_blocks_run():
  blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
  assert blocks, "README has no python example"
  for block in blocks:
    exec(compile(block, str(README), "exec"), {})


def test_first_commands_are_the_main_job_and_the_tests():
  main, tests = _first_commands()
  install, run = main.split(" && ")
  assert install == "pip install -e ."
  argv = shlex.split(run)
  assert argv[:3] == ["python", "-m", "jaxkd.main"]
  assert (ROOT / argv[argv.index("--config") + 1]).is_file()
  assert tests == 'pip install -e ".[test]" && pytest'


def test_ci_runs_the_readme_test_command_with_real_data_required():
  ci = (ROOT / ".ci" / "run").read_text()
  assert 'pip install -q -e ".[test]"' in ci
  assert re.search(r"^python -m pytest( -q)?$", ci, flags=re.M)
  assert re.search(r"^export CI=true$", ci, flags=re.M)  # real Fashion-MNIST fails, not skips


def test_readme_says_where_the_data_comes_from_as_the_code_does():
  head = README.read_text().split("## ", 1)[0]
  # The names the README gives are the ones the code uses ...
  assert f"`{builders.NO_APT_ENV}=1`" in head
  assert f"`{builders.DEBIAN_PACKAGE}`" in head
  # ... and it names each source ensure_prepared tries, in its order.
  doc = builders.ensure_prepared.__doc__
  for readme_words, code_words in (("files of Debian's", "built from the files"),
                                   ("installs it first", "installed first"),
                                   ("downloads Fashion-MNIST through tfds", "downloaded"),
                                   ("stops within seconds", "DatasetNotFoundError")):
    assert readme_words in head and code_words in doc
  assert head.index("files of Debian's") < head.index("installs it first") < \
      head.index("through tfds") < head.index("stops within seconds")
