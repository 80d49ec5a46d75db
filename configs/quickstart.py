"""Quickstart: Fashion-MNIST, a quick teacher, then one quick student per method.

  python -m jaxkd.main --config configs/quickstart.py --workdir runs/quickstart

Trains `quick_teacher` with CE, then `quick_student` with CE only (the vanilla student), KD,
ER-KD, EA-KD, IPWD and DKD from that teacher as one sweep (run `students`: all six in one
program, one teacher forward per batch, docs/DESIGN.md#sweeps), and prints one table of test
top-1 per method with the time it took. Fashion-MNIST is prepared automatically on first use
(docs/ENVIRONMENT.md#getting-the-datasets). Measured on an idle 2-core CPU: teacher 89.94%
(168 s); students CE 76.66%, KD 78.82%, ER-KD 81.56%, EA-KD 80.09%, IPWD 81.06%, DKD 81.31%
(125 s for all six), the teacher's time including preparing Fashion-MNIST; 5.8 min from a
fresh clone with `pip install`.

  :smoke   a few steps per run, for CI (well under a minute per run).
  :lt=100  Fashion-MNIST-LT: every run (the teacher too) trains on a long-tailed subset of
           the train split with the CIFAR-100-LT exponential profile (Cao et al. 2019),
           n_c = floor(6000 · ρ^(−c/9)) for class c: 6,000 T-shirts ... 60 ankle boots at
           ρ = 100, 14,886 images; the test split stays balanced. Students then train 4
           epochs by default (about the steps of the balanced quickstart's one), so the
           report (WORKDIR/report) shows the teacher's long-tailed class mass, the recall
           gain by teacher-mass rank and the weights the methods give the tail classes.
  :epochs=N  the students' epochs (the teacher's: 2N).
  :seeds=N   N seeds of every student (mean ± std, and the paired difference to KD and CE
             with a 95% interval in WORKDIR/students/summary.md).

  python -m jaxkd.main --config configs/quickstart.py:lt=100 --workdir runs/quickstart_lt
"""

from jaxkd import config as jconfig

STUDENT_METHODS = ("ce", "kd", "erkd", "eakd", "ipwd", "dkd")


def get_config(arg=None):
  positional, named = jconfig.parse_arg(arg, epochs=int, lt=float, seeds=int)
  c = jconfig.default_config()
  c.dataset.name = "fashion_mnist"
  c.batch_size = 128
  c.eval_batch_size = 1000
  # Students; the teacher trains twice as long. The long-tailed split is a quarter of the
  # balanced one's size: four epochs take about the steps of one balanced epoch.
  c.num_epochs = named.get("epochs", 4 if "lt" in named else 1)
  if "lt" in named:
    c.dataset.long_tail_factor = named["lt"]
  c.optimizer.lr = 0.05
  c.optimizer.schedule = "cosine"
  c.optimizer.nesterov = True
  c.optimizer.milestones = ()
  c.model = "quick_student"
  c.teacher.model = "quick_teacher"
  c.teacher.checkpoint = "{workdir}/teacher/model"
  c.log_every_steps = 50
  c.checkpoint.every_steps = 200
  if "smoke" in positional:
    c.max_steps = 6
    c.log_every_steps = 3
    c.eval_batch_size = 2000
    c.checkpoint.every_steps = 3

  # The teacher, then every student of the table in one sweep: one program, one teacher
  # forward per batch for all of them, the same batches for every method.
  c.suite = ("teacher", "students")
  c.runs = {"teacher": {"mode": "teacher", "method": "ce", "model": "quick_teacher",
                        "num_epochs": 2 * c.num_epochs},
            "students": {"mode": "distill", "sweep": STUDENT_METHODS,
                         "num_seeds": named.get("seeds", 1), "sweep_members": {}}}
  # H_ub = ln C here (the preset's default): the reference code's literal 100 belongs to
  # CIFAR-100. DKD's 20-epoch warm-up (a staircase over whole epochs) is for 240-epoch runs:
  # here it ramps per step over the run, or DKD starts at full strength (β·τ² = 128) and
  # diverges.
  c.runs["students"]["sweep_members"]["dkd"] = {"loss": {
      "dkd_warmup_epochs": float(c.num_epochs), "dkd_warmup_per_step": True}}
  return c
