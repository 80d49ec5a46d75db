"""ImageNet (ILSVRC2012): ResNet34 → ResNet18 and ResNet50 → MobileNetV1, and teachers.

Presets (`--config configs/imagenet.py:PRESET[,key=value...]`):

  r34-r18,method=M      ResNet34 → ResNet18, M in kd, erkd, eakd, ipwd, dkd, erdkd
  r34-r18,methods=A+B   a sweep: one student per method, one program sharing each batch's
                        teacher forward (docs/DESIGN.md#sweeps)
  r50-mv1,method=M      ResNet50 → MobileNetV1
  MODEL                 supervised training (resnet18_imagenet, ..., mobilenetv1_imagenet)
  ...,paper             EA-DKD at t = 2 as the paper writes it (the reference code runs t = 3)
  ...,smoke             a few steps at batch 16 (tests; tfds mock data works)

The teachers are torchvision's pretrained ResNet34 / ResNet50, converted once:

  python -m jaxkd.data.prepare imagenet2012 --manual_dir DIR_WITH_ILSVRC2012_TARS
  python -m jaxkd.convert --model resnet34_imagenet --torch resnet34-b627a593.pth \
      --out teachers/resnet34_imagenet
  python -m jaxkd.main --config configs/imagenet.py:r34-r18,method=erkd --workdir runs/r34_r18_erkd

Recipe (docs/METHODS.md#imagenet): 100 epochs, batch 512, SGD momentum 0.9, lr 0.2 ×0.1 after
epochs 30, 60, 90, weight decay 1e-4; random-resized-crop 224 + flip, eval resize 256 +
center crop 224 (host pipeline, grain workers). KD τ 1, 0.5·CE + 0.5·KD; DKD τ 1, warm-up 1,
β 0.5 (R34→R18) / 2.0 (R50→MV1); ER-KD entropy at τ′ 4 (as the reference code); EA-KD
t 2, 1.0·CE + 0.5·KD, H_ub = ln 1000; EA-DKD t 3, as the reference code runs it (its DKD
weight never receives the t option; docs/METHODS.md#reference-code-and-paper). bfloat16 compute by default (set --config.dtype=float32 to change).

Expected best top-1 (published, mdistiller README): R34→R18 KD 71.03, DKD 71.70;
R50→MV1 KD 70.50, DKD 72.05 (teachers 73.31 / 76.16).
"""

from jaxkd import config as jconfig

PAIRS = {"r34-r18": ("resnet34_imagenet", "resnet18_imagenet", 0.5),
         "r50-mv1": ("resnet50_imagenet", "mobilenetv1_imagenet", 2.0)}


def get_config(arg=None):
  positional, named = jconfig.parse_arg(arg, method=str, methods=str, beta=float,
                                        teacher_checkpoint=str)
  presets = [p for p in positional if p not in ("smoke", "paper")]
  if len(presets) != 1:
    raise ValueError("configs/imagenet.py needs one preset: r34-r18, r50-mv1 or a model name.")
  c = jconfig.default_config()
  c.dataset.name = "imagenet2012"
  c.dataset.input = "host"
  c.dataset.num_workers = 8
  c.batch_size = 512
  c.eval_batch_size = 512
  c.num_epochs = 100
  c.dtype = "bfloat16"
  c.optimizer.lr = 0.2
  c.optimizer.weight_decay = 1e-4
  c.optimizer.milestones = (30, 60, 90)
  c.log_every_steps = 100
  c.checkpoint.every_steps = 2000
  preset = presets[0]
  if preset in PAIRS:
    teacher, student, beta = PAIRS[preset]
    def method_loss(c, method):
      jconfig.apply_method(c, method, imagenet=True, dkd_beta=named.get("beta", beta))
      if method == "eakd":
        c.loss.ce_weight, c.loss.kd_weight = 1.0, 0.5
      if method == "eadkd" and "paper" in positional:
        c.loss.adaptive_temperature = 2.0
      return c.loss

    method_loss(c, named.get("method", "kd"))
    if "methods" in named:  # each member's loss as its own preset would set it
      c.sweep = tuple(named["methods"].split("+"))
      c.sweep_members = {m: {"loss": method_loss(jconfig.default_config(), m).to_dict()}
                         for m in c.sweep}
    c.mode = "distill"
    c.model, c.teacher.model = student, teacher
    c.teacher.checkpoint = named.get("teacher_checkpoint", f"teachers/{teacher}")
  else:
    c.model, c.teacher.model = preset, ""
    jconfig.apply_method(c, "ce", imagenet=True)
    c.mode = "teacher"
  if "smoke" in positional:
    jconfig.apply_smoke(c, eval_batch_size=16, max_steps=2)
    c.checkpoint.every_steps = 2000
    c.dataset.num_workers = 0
    c.dtype = "float32"
  return c
