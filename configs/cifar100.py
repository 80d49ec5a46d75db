"""CIFAR-100: teachers and every teacher→student pair of the mdistiller/CRD benchmark.

Presets (`--config configs/cifar100.py:PRESET[,key=value...]`):

  MODEL                          train a teacher (or a vanilla student) with CE
  TEACHER-STUDENT,method=M       distil, M in kd, erkd, eakd, ipwd, dkd, erdkd (default kd)
  TEACHER-STUDENT,methods=A+B+C  a sweep: one student per method (× num_seeds), one program
                                 sharing each batch's teacher forward (docs/DESIGN.md#sweeps);
                                 ce in the list adds the vanilla student
  MODEL,self_distill             one-stage PS-KD; add method=ipwd for PS-KD + IPW
  ...,lt=100                     the long-tailed CIFAR-100-LT train split (rho = 10, 50, 100)
  ...,beta=B                     DKD beta (default: the pair's published beta)
  ...,epochs=N                   another number of epochs
  ...,paper                      EA-KD / EA-DKD as the paper writes them (H_ub = ln C) instead
                                 of the reference code (H_ub = 100)
  ...,smoke                      a few steps at batch 16, for tests

Examples (one GPU; the recipe's global batch 64 is kept whatever the device count):

  python -m jaxkd.main --config configs/cifar100.py:resnet32x4 --workdir runs/teachers/resnet32x4
  python -m jaxkd.main --config configs/cifar100.py:resnet32x4-resnet8x4,method=erkd \
      --config.teacher.checkpoint=runs/teachers/resnet32x4/model --workdir runs/r32x4_r8x4_erkd

A PyTorch teacher from mdistiller/RepDistiller converts with
  python -m jaxkd.convert --model resnet32x4 --torch resnet32x4_vanilla/ckpt_epoch_240.pth \
      --out teachers/resnet32x4
and the default `teacher.checkpoint` of a pair is `teachers/<TEACHER>`.

Recipe (docs/METHODS.md#cifar-100): 240 epochs, batch 64, SGD momentum 0.9, weight decay 5e-4,
lr 0.05 (0.01 for ShuffleNet/MobileNet students) ×0.1 after epochs 150, 180, 210; random
crop 32 (4-px padding) + flip. KD τ 4, 0.1·CE + 0.9·KD. DKD α 1, β per pair, τ 4, warm-up
20 epochs. ER-DKD uses the β of the ER-KD authors' fork where it has one. EA-KD and EA-DKD
use the reference code's H_ub = 100 (the paper writes ln C; `paper` selects it), t = 3
(docs/METHODS.md#reference-code-and-paper).

Expected best top-1 (mean of 5 runs, published; mdistiller README / CRD README):

| pair | teacher | KD | DKD |
|---|---|---|---|
| resnet56 → resnet20 | 72.34 | 70.66 | 71.97 |
| resnet110 → resnet32 | 74.31 | 73.08 | 74.11 |
| resnet32x4 → resnet8x4 | 79.42 | 73.33 | 76.32 |
| wrn_40_2 → wrn_16_2 | 75.61 | 74.92 | 76.23 |
| wrn_40_2 → wrn_40_1 | 75.61 | 73.54 | 74.81 |
| vgg13 → vgg8 | 74.64 | 72.98 | 74.68 |
| resnet32x4 → ShuffleV1 | 79.42 | 74.07 | 76.45 |
| wrn_40_2 → ShuffleV1 | 75.61 | 74.83 | 76.70 |
| vgg13 → MobileNetV2 | 74.64 | 67.37 | 69.71 |
| ResNet50 → MobileNetV2 | 79.34 | 67.35 | 70.35 |
| resnet32x4 → ShuffleV2 | 79.42 | 74.45 | 77.07 |

The ER-KD, EA-KD and IPWD numbers that are known are in docs/METHODS.md#published-numbers.
Time: benchmarks/results/train-cpu-2core.md projects the 240-epoch wall-clock per pair.
"""

from jaxkd import config as jconfig

TEACHERS = ("resnet56", "resnet110", "resnet32x4", "ResNet50", "wrn_40_2", "vgg13")

# (teacher, student): (lr, DKD beta upstream, DKD beta in the ER-KD fork or None).
PAIRS = {
    ("resnet56", "resnet20"): (0.05, 2.0, None),
    ("resnet110", "resnet32"): (0.05, 2.0, None),
    ("resnet32x4", "resnet8x4"): (0.05, 8.0, 3.0),
    ("resnet32x4", "ShuffleV1"): (0.01, 8.0, None),
    ("resnet32x4", "ShuffleV2"): (0.01, 8.0, 3.0),
    ("ResNet50", "MobileNetV2"): (0.01, 8.0, 3.0),
    ("vgg13", "MobileNetV2"): (0.01, 6.0, 2.0),
    ("vgg13", "vgg8"): (0.05, 6.0, 2.0),
    ("wrn_40_2", "ShuffleV1"): (0.01, 8.0, None),
    ("wrn_40_2", "wrn_16_2"): (0.05, 6.0, 2.0),
    ("wrn_40_2", "wrn_40_1"): (0.05, 6.0, 2.0),
}
SMALL_LR_STUDENTS = ("ShuffleV1", "ShuffleV2", "MobileNetV2", "mobile_half")


def _pair(teacher: str, student: str):
  for (t, s), value in PAIRS.items():
    if t.lower() == teacher.lower() and s.lower() == student.lower():
      return t, s, value
  return teacher, student, None


def get_config(arg=None):
  positional, named = jconfig.parse_arg(arg, method=str, methods=str, beta=float, lt=float,
                                        epochs=int, teacher_checkpoint=str)
  presets = [p for p in positional if p not in ("smoke", "self_distill", "paper")]
  if len(presets) != 1:
    raise ValueError("configs/cifar100.py needs one preset: MODEL or TEACHER-STUDENT, e.g. "
                     "configs/cifar100.py:resnet32x4-resnet8x4,method=erkd")
  c = jconfig.default_config()
  c.dataset.name = "cifar100"
  h_ub = None if "paper" in positional else jconfig.REFERENCE_CIFAR_ENTROPY_UPPER_BOUND
  preset = presets[0]
  method = named.get("method", "kd")
  if "-" in preset:
    teacher, student, known = _pair(*preset.split("-", 1))
    lr, beta, fork_beta = known or (
        0.01 if student in SMALL_LR_STUDENTS else 0.05, 8.0, None)
    beta_of = lambda m: named.get("beta", fork_beta if m.startswith("er") and fork_beta else beta)
    jconfig.apply_method(c, method, dkd_beta=beta_of(method), entropy_upper_bound=h_ub)
    if "methods" in named:  # each member's loss as its own preset would set it
      c.sweep = tuple(named["methods"].split("+"))
      c.sweep_members = {m: {"loss": jconfig.apply_method(
          jconfig.default_config(), m, dkd_beta=beta_of(m), entropy_upper_bound=h_ub
      ).loss.to_dict()} for m in c.sweep}
    c.mode = "distill"
    c.model, c.teacher.model = student, teacher
    c.teacher.checkpoint = named.get("teacher_checkpoint", f"teachers/{teacher}")
    c.optimizer.lr = lr
  else:
    c.model = preset
    c.teacher.model = ""
    c.optimizer.lr = 0.01 if preset in SMALL_LR_STUDENTS else 0.05
    if "self_distill" in positional:
      jconfig.apply_method(c, method)
      c.mode = "self_distill"
    else:
      jconfig.apply_method(c, "ce")
      c.mode = "teacher"
  if "lt" in named:
    c.dataset.long_tail_factor = named["lt"]
  if "epochs" in named:
    c.num_epochs = named["epochs"]
  if "smoke" in positional:
    jconfig.apply_smoke(c)
  return c
