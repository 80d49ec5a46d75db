"""Augmentations: pad-crop-flip and normalisation for numpy and jax.numpy alike.

The functions that take `xp` run unchanged on numpy (host pipeline, in grain workers) and on
jax.numpy (device-resident path, inside jit). Their randomness is not drawn from a stateful
generator but hashed from (seed, epoch, example index): an example gets the same crop and
flip in a given epoch whichever pipeline, batch position, process or device handles it, so
the host pipeline and the device-resident path produce identical batches, and a resumed
run repeats exactly.

ImageNet's random-resized-crop decodes JPEGs with PIL and runs on the host only.
"""

import io
import math
from typing import Any, Sequence

import numpy as np

# murmur3's 32-bit finaliser constants (Appleby, MurmurHash3, `fmix32`), and the golden
# ratio, to decorrelate the words fed in.
_M1, _M2, _GOLDEN = 0x85EBCA6B, 0xC2B2AE35, 0x9E3779B9

# Streams of `hash_bits`, one per random quantity.
_STREAM_DY, _STREAM_DX, _STREAM_FLIP = 1, 2, 3


def _fmix32(h, xp):
  """murmur3 fmix32: a bijection of uint32 with full avalanche (each input bit flips each
  output bit with probability ~1/2)."""
  h = h ^ (h >> 16)
  h = h * xp.uint32(_M1)
  h = h ^ (h >> 13)
  h = h * xp.uint32(_M2)
  return h ^ (h >> 16)


def hash_bits(seed, epoch, index, stream: int, xp=np):
  """uint32 [B] pseudo-random bits of (seed, epoch, index[b], stream).

  Args:
    seed, epoch: ints or 0-d integer arrays (values in [0, 2^31)).
    index: int [B], the examples' indices.
    stream: which random quantity (a small constant).
    xp: numpy or jax.numpy.
  """
  index = xp.asarray(index).astype(xp.uint32)
  h = xp.zeros_like(index) + xp.asarray(seed).astype(xp.uint32)
  h = _fmix32(h + xp.uint32(_GOLDEN), xp)
  for word in (xp.asarray(epoch).astype(xp.uint32), index, xp.uint32(stream)):
    h = _fmix32(h ^ (word + xp.uint32(_GOLDEN)), xp)
  return h


def crop_flip_params(seed, epoch, index, *, pad: int, flip: bool, xp=np):
  """Random-crop offsets and flips of a batch.

  Returns:
    (dy, dx, flips): int32 [B] offsets uniform in [0, 2*pad] (the crop's top-left corner in
    the padded image, as torchvision's RandomCrop(padding=pad) draws it) and bool [B]
    flips with probability 1/2 (never when `flip` is False).
  """
  span = xp.uint32(2 * pad + 1)
  dy = (hash_bits(seed, epoch, index, _STREAM_DY, xp) % span).astype(xp.int32)
  dx = (hash_bits(seed, epoch, index, _STREAM_DX, xp) % span).astype(xp.int32)
  flips = (hash_bits(seed, epoch, index, _STREAM_FLIP, xp) >> 31) == 1
  if not flip:
    flips = xp.zeros_like(flips)
  return dy, dx, flips


def crop_flip(images, dy, dx, flips, *, pad: int, xp=np):
  """Zero-padded random crop followed by a horizontal flip.

  out[b, y, x] = padded[b, y + dy[b], x' + dx[b]] with x' = W-1-x where flips[b] else x,
  padded = images with `pad` zero pixels on each side (no padded copy is made).

  Args:
    images: uint8 [B, H, W, C].
    dy, dx: int32 [B] in [0, 2*pad]. flips: bool [B].
  Returns:
    uint8 [B, H, W, C].
  """
  _, h, w, _ = images.shape
  rows = xp.arange(h, dtype=xp.int32)[None, :] + dy[:, None] - pad            # [B, H]
  cols = xp.arange(w, dtype=xp.int32)[None, :]
  cols = xp.where(flips[:, None], w - 1 - cols, cols) + dx[:, None] - pad     # [B, W]
  valid = (((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :])
  rows, cols = xp.clip(rows, 0, h - 1), xp.clip(cols, 0, w - 1)
  # Two gathers along one axis each, batched over the first: XLA then keeps every
  # example's crop on the device that holds the example (a gather that indexes the batch
  # axis too makes it all-gather the batch first).
  out = xp.take_along_axis(images, rows[:, :, None, None], axis=1)
  out = xp.take_along_axis(out, cols[:, None, :, None], axis=2)
  return xp.where(valid[..., None], out, xp.zeros((), images.dtype))


def normalize(images, mean: Sequence[float], std: Sequence[float], xp=np):
  """(images / 255 - mean) / std per channel, as float32 [..., C].

  Computed as images * a + b with float32 constants derived in float64 the same way on
  both backends, so host and device agree to the last few ulps.
  """
  mean, std = np.asarray(mean, np.float64), np.asarray(std, np.float64)
  a = xp.asarray((1.0 / (255.0 * std)).astype(np.float32))
  b = xp.asarray((-mean / std).astype(np.float32))
  return images.astype(xp.float32) * a + b


def augment_batch(images, ds_spec, *, train: bool, seed=0, epoch=0, index=None, xp=None,
                  normalize_images: bool = True):
  """Train or eval augmentation of a uint8 batch of a "pad_crop_flip" dataset.

  Train: crop with `ds_spec.pad` zero padding (if > 0), flip (if `ds_spec.flip`), then
  normalise; eval: normalise only. With `normalize_images=False` the result stays uint8
  (normalise later, e.g. on device, with `normalize`). Pure: call it inside a jitted step (xp=jax.numpy, the
  default for jax arrays) or on numpy batches (xp=numpy, the default for numpy arrays).

  Args:
    images: uint8 [B, H, W, C].
    ds_spec: a `DatasetSpec` (pad, flip, mean, std).
    train: whether to crop and flip.
    seed, epoch: the run's data seed and the current epoch (ints or 0-d int arrays).
    index: int32 [B], the examples' `index` (required when train).
    xp: numpy or jax.numpy; inferred from `images` when None.

  Returns:
    float32 [B, H, W, C], normalised (or uint8, see `normalize_images`).
  """
  if xp is None:
    xp = np if isinstance(images, np.ndarray) else _jnp()
  if ds_spec.train_augment != "pad_crop_flip":
    if train:
      raise ValueError(f"{ds_spec.name} uses {ds_spec.train_augment!r}, which runs in the "
                       "host pipeline (jaxkd.data.host_iterator), not on device.")
  elif train and (ds_spec.pad > 0 or ds_spec.flip):
    if index is None:
      raise ValueError("augment_batch(train=True) needs the examples' `index`.")
    dy, dx, flips = crop_flip_params(seed, epoch, index, pad=ds_spec.pad,
                                     flip=ds_spec.flip, xp=xp)
    images = crop_flip(images, dy, dx, flips, pad=ds_spec.pad, xp=xp)
  if not normalize_images:
    return images
  return normalize(images, ds_spec.mean, ds_spec.std, xp=xp)


def _jnp():
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  return jnp


# ------------------------------------------------------------------------------------------
# ImageNet (host only): random-resized-crop and resize + center crop, with PIL.
# ------------------------------------------------------------------------------------------


def example_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
  """The generator of one example's ImageNet augmentation in one epoch."""
  return np.random.default_rng((seed, epoch, int(index)))


def random_resized_crop_box(height: int, width: int, rng: np.random.Generator,
                            scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> tuple[int, ...]:
  """(top, left, h, w) of a random-resized crop, torchvision's RandomResizedCrop rule.

  Up to 10 tries of an area fraction uniform in `scale` and a log-uniform aspect ratio in
  `ratio`; if none fits, the largest center crop with the nearest allowed aspect ratio.
  """
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target = area * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(*log_ratio))
    w = int(round(math.sqrt(target * aspect)))
    h = int(round(math.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  in_ratio = width / height
  if in_ratio < ratio[0]:
    w, h = width, int(round(width / ratio[0]))
  elif in_ratio > ratio[1]:
    h, w = height, int(round(height * ratio[1]))
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def _open_image(image: Any):
  """A PIL image from encoded bytes (lazy: the header only) or a decoded uint8 array."""
  import PIL.Image  # pylint: disable=g-import-not-at-top
  if isinstance(image, (bytes, bytearray)):
    return PIL.Image.open(io.BytesIO(image))
  arr = np.asarray(image)
  return PIL.Image.fromarray(arr[..., 0] if arr.ndim == 3 and arr.shape[-1] == 1 else arr)


def _crop_resize(img, box: tuple[float, float, float, float], size: int) -> np.ndarray:
  """Crops `box` = (left, top, right, bottom) of `img`, resizes to size x size, RGB uint8.

  JPEGs are decoded at the smallest power-of-two reduction (`draft`) that keeps the crop
  at least `size` pixels on each side: same result up to resampling, several times faster.
  """
  import PIL.Image  # pylint: disable=g-import-not-at-top
  left, top, right, bottom = box
  if getattr(img, "format", None) == "JPEG":
    full_w, full_h = img.size
    reduce = max(1.0, min((right - left) / size, (bottom - top) / size))
    got = img.draft("RGB", (math.ceil(full_w / reduce), math.ceil(full_h / reduce)))
    if got is not None:
      sx, sy = img.size[0] / full_w, img.size[1] / full_h
      left, right, top, bottom = left * sx, right * sx, top * sy, bottom * sy
  img = img.convert("RGB")
  img = img.resize((size, size), PIL.Image.BILINEAR, box=(left, top, right, bottom))
  return np.asarray(img, dtype=np.uint8)


def random_resized_crop(image: Any, rng: np.random.Generator, size: int = 224,
                        flip: bool = True) -> np.ndarray:
  """Train view of one ImageNet image: random-resized-crop to size x size, random flip.

  Args:
    image: JPEG bytes or a uint8 [H, W, C] array.
    rng: this example's generator (`example_rng`).
  Returns:
    uint8 [size, size, 3].
  """
  img = _open_image(image)
  width, height = img.size
  top, left, h, w = random_resized_crop_box(height, width, rng)
  out = _crop_resize(img, (left, top, left + w, top + h), size)
  if flip and rng.random() < 0.5:
    out = out[:, ::-1]
  return out


def resize_center_crop(image: Any, size: int = 224, resize: int = 256) -> np.ndarray:
  """Eval view: resize the shorter side to `resize`, take the central size x size crop.

  Done as one crop-and-resize of the equivalent box of the original image.
  """
  img = _open_image(image)
  width, height = img.size
  crop = size * min(width, height) / resize  # the crop's side in original pixels
  left, top = (width - crop) / 2, (height - crop) / 2
  return _crop_resize(img, (left, top, left + crop, top + crop), size)
