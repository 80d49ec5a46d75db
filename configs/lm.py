"""Language-model distillation: a causal-LM teacher, then students per method (docs/LM.md).

  python -m jaxkd.main --config configs/lm.py --workdir runs/lm

The CPU preset (the default): Debian's `fortunes` corpus (installed and prepared on first
use), an 8k byte-level BPE, rows of 128 tokens. `teacher` trains `lm_teacher_cpu` (4 × 256)
with next-token CE; `students` trains `lm_student_cpu` (2 × 128) five ways in one program
from that frozen teacher: CE alone (the baseline), KD, ER-KD, EA-KD and IPWD per token, the
same batches and initialisation for each and one teacher forward per batch. At the end one
table of validation perplexity per method, with the teacher and the unigram baseline
(`runs/lm/summary.md`). About 15 minutes on the 2-core CPU: teacher 205 s, the five
students 649 s in one program (docs/LM.md#the-cpu-preset).

Presets (comma-separated, as `configs/lm.py:teacher,steps=100`):
  (none)        the suite above: `teacher`, then `students`.
  teacher       only the teacher run (single run; exports WORKDIR/model).
  distill       one student (`method=`, default kd) from `teacher_checkpoint=PATH`.
  smoke         tiny models, vocabulary 512, rows of 32 tokens, 6 steps: for tests.
  gpt2          GPU shapes: `gpt2_small` (12 × 768) teacher, `gpt2_mini` (6 × 384) student,
                vocabulary 32768, rows of 1024, batch 32 (32k tokens per step), bf16,
                10,000 steps each (328 M tokens). Give it a larger corpus
                (`corpus=FOLDER` of .txt files): fortunes is 0.75 M tokens. Cost from the
                FLOPs (135 M and 36 M parameters at V = 32768; 6 per parameter per trained
                token, attention included, plus the shared teacher forward): about
                0.30 EFLOP for the teacher and 0.53 EFLOP for the five students, i.e.
                about 13 and 22 minutes on one H100/H200 at 40% of its ~990 TFLOP/s bf16
                peak. Not measured: no GPU was available to this project's CPU machines.
Options: methods=a+b+c (the students' methods), method=M, steps=N (every run),
  teacher_checkpoint=PATH, corpus=FOLDER|fortunes, vocab=V, fsdp=true (parameters and
  optimizer state sharded over the devices).
"""

from jaxkd import lm_config
from jaxkd import presets

STUDENT_METHODS = ("ce", "kd", "erkd", "eakd", "ipwd")


def get_config(arg=None):
  positional, named = presets.parse_arg(
      arg, methods=str, method=str, steps=int, teacher_checkpoint=str, corpus=str, vocab=int,
      fsdp=bool)
  unknown = set(positional) - {"teacher", "distill", "smoke", "gpt2"}
  if unknown:
    raise presets.ConfigError(f"unknown preset {', '.join(sorted(unknown))} in {arg!r}; "
                              f"configs/lm.py takes teacher, distill, smoke, gpt2.")
  c = lm_config.default_lm_config()
  teacher_steps = student_steps = 300
  if "gpt2" in positional:
    c.model, c.teacher.model = "gpt2_mini", "gpt2_small"
    c.data.vocab_size, c.data.seq_len = 32768, 1024
    c.batch_size, c.eval_batch_size, c.dtype = 32, 32, "bfloat16"
    c.optimizer.lr, c.loss.chunk_size = 6e-4, 2048
    teacher_steps = student_steps = 10_000
    c.warmup_steps = 500
    c.log_every_steps, c.eval_every_steps, c.checkpoint.every_steps = 100, 1000, 1000
  if "smoke" in positional:
    c.model = c.teacher.model = "lm_tiny"
    c.data.vocab_size, c.data.seq_len = 512, 32
    c.batch_size, c.eval_batch_size = 8, 64
    teacher_steps = student_steps = 6
    c.warmup_steps = 1
    c.log_every_steps = c.eval_every_steps = c.checkpoint.every_steps = 3
    c.loss.chunk_size = 64
  if "steps" in named:
    teacher_steps = student_steps = named["steps"]
    c.warmup_steps = min(c.warmup_steps, max(0, named["steps"] // 10))
  c.steps = student_steps
  if "corpus" in named:
    c.data.corpus = named["corpus"]
  if "vocab" in named:
    c.data.vocab_size = named["vocab"]
  if "fsdp" in named:
    c.fsdp = named["fsdp"]
  if "method" in named:
    c.method = named["method"]
  if "teacher_checkpoint" in named:
    c.teacher.checkpoint = named["teacher_checkpoint"]
  if "teacher" in positional:
    c.mode, c.model, c.method = "teacher", c.teacher.model, "ce"
    c.steps = teacher_steps
    return c
  if "distill" in positional:
    return c
  methods = tuple(named["methods"].split("+")) if "methods" in named else STUDENT_METHODS
  c.suite = ("teacher", "students")
  c.runs = {"teacher": {"mode": "teacher", "method": "ce", "model": c.teacher.model,
                        "steps": teacher_steps},
            "students": {"mode": "distill", "sweep": methods,
                         "teacher": {"checkpoint": "{workdir}/teacher/model"}}}
  return c
