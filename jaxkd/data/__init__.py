"""jaxkd.data: tfds datasets read without TensorFlow, a grain host pipeline, and a
device-resident path for small datasets.

Datasets: `cifar100`, `fashion_mnist`, `imagenet2012`, and long-tailed subsets of any of
them (`long_tail_factor=rho`, train split only, test split untouched).

Preparing (array_record, tfds's own builders with plain-Python readers):

    python -m jaxkd.data.prepare cifar100 --data_dir DIR [--manual_dir DIR_WITH_ARCHIVES]
    prepare(name, data_dir=None, manual_dir=None, *, download=True) -> dataset folder
    ensure_prepared(name, data_dir=None) -> data_dir   # fast if present; Fashion-MNIST
        # comes from Debian's dataset-fashion-mnist automatically; else DatasetNotFoundError
        # (within seconds, with the command to run)

The data dir defaults to `$TFDS_DATA_DIR`, else `~/tensorflow_datasets`.

Specs:

    spec(name, **overrides) -> DatasetSpec(name, num_classes, image_shape, mean, std,
        train_split, eval_split, fits_on_device, id_key, train_augment, pad, flip, ...)

Reading whole small splits:

    load_arrays(name, split, data_dir=None, *, long_tail_factor=None, seed=0,
                with_ids=False) -> {'image': uint8 [N,H,W,C], 'label': int32 [N],
                                    'index': int32 [N] (+ 'id')}

`index` is an example's position in the tfds data source of the whole split: stable,
carried by every batch of both pipelines, for per-example tables (self-distillation).

Which examples form each batch (both pipelines; `sampling`):

    epoch_permutation(seed, epoch, n) -> int32 [n]   # numpy default_rng((seed, epoch))
    steps_per_epoch(n, global_batch) = n // global_batch   (train drops the remainder)
    global step t = batch t % S of epoch t // S; process p of P reads rows
    [p*B/P, (p+1)*B/P) of each global batch, so the global batch never depends on P.
    Eval: in order, ceil(n / B) batches, the last padded, with 'mask' (bool [B]).

Augmentation (`augment`): CIFAR random crop 32 with 4-px zero padding + horizontal flip +
per-channel normalisation; Fashion-MNIST normalisation (+ pad-crop with
`spec("fashion_mnist", pad=2)`); ImageNet random-resized-crop 224 + flip, eval resize 256 +
center crop 224 (host only). Crop offsets and flips are hashed from (seed, epoch, index),
so the host pipeline and the device path give identical batches.

Host pipeline (grain over `tfds.data_source`; any dataset):

    it = host_iterator(name, split=None, data_dir=None, *, global_batch, train=True, seed=0,
                       long_tail_factor=None, long_tail_seed=0, process_index=None,
                       process_count=None, worker_count=0, read_threads=1, prefetch=2,
                       start_step=0, num_epochs=None, normalize=True, ds_spec=None)
        -> HostIterator
    next(it) -> numpy {'image': float32 [b,H,W,C], 'label': int32 [b], 'index': int32 [b]
                       (+ 'mask' bool [b] in eval)}, b = global_batch / process_count;
        normalize=False: uint8 images, normalised on device with
        normalize(images, ds_spec.mean, ds_spec.std, xp=jax.numpy)
    it.get_state() -> {'step': next global step, ...} (JSON); it.set_state(state)
    shard_batch(batch, mesh) -> global jax.Arrays sharded over 'data'

Device-resident path (CIFAR, Fashion-MNIST; the default where `spec.fits_on_device`):

    place_dataset(arrays, mesh) -> replicated uint8 split on every device
    take_batch(data, perm, step_in_epoch, global_batch) -> {'image', 'label', 'index'}
    augment_batch(images_uint8, ds_spec, *, train, seed=0, epoch=0, index=None) -> float32
        (jax.numpy inside jit / on jax arrays, numpy on numpy arrays)
    device_batch(data, perm, step_in_epoch, epoch, *, ds_spec, global_batch, seed=0)
        = take_batch + augment_batch, for a trainer's own jitted step
    eval_batch(data, step, *, ds_spec, global_batch) -> + 'mask'
    device_loader(name, split=None, data_dir=None, *, global_batch, mesh, train=True,
                  seed=0, long_tail_factor=None, long_tail_seed=0, ...)
        -> DeviceResidentLoader: batches sharded over the mesh's 'data' axis, same
           get_state / set_state as HostIterator.

One entry point for a training loop (device-resident where the split fits, else host;
both yield global jax.Arrays sharded over the mesh's 'data' axis, same state format):

    make_loader(name, split=None, data_dir=None, *, global_batch, mesh, train=True, seed=0,
                device_resident=None, long_tail_factor=None, long_tail_seed=0,
                worker_count=0, start_step=0, num_epochs=None, data_axis='data')

Errors: `DatasetNotFoundError` (not prepared, not obtainable), `BadDataError` (corrupted or
truncated record file, image of unexpected shape, label out of range; names the file or
field), `ValueError` for an unknown split (lists the available ones). Both error classes
subclass `ValueError`.
"""

from jaxkd.data.augment import augment_batch
from jaxkd.data.augment import normalize
from jaxkd.data.builders import ensure_prepared
from jaxkd.data.builders import is_prepared
from jaxkd.data.builders import prepare
from jaxkd.data.datasets import BadDataError
from jaxkd.data.datasets import DatasetNotFoundError
from jaxkd.data.datasets import DatasetSpec
from jaxkd.data.datasets import default_data_dir
from jaxkd.data.datasets import load_arrays
from jaxkd.data.datasets import open_source
from jaxkd.data.datasets import spec
from jaxkd.data.datasets import SPECS
from jaxkd.data.device import device_batch
from jaxkd.data.device import device_loader
from jaxkd.data.device import DeviceResidentLoader
from jaxkd.data.device import eval_batch
from jaxkd.data.device import place_dataset
from jaxkd.data.device import shard_batch
from jaxkd.data.device import take_batch
from jaxkd.data.host import host_iterator
from jaxkd.data.host import HostIterator
from jaxkd.data.loader import make_loader
from jaxkd.data.loader import ShardedHostIterator
from jaxkd.data.long_tail import long_tail_counts
from jaxkd.data.long_tail import long_tail_indices
from jaxkd.data.sampling import epoch_permutation
from jaxkd.data.sampling import eval_steps
from jaxkd.data.sampling import steps_per_epoch

__all__ = [
    "augment_batch",
    "normalize",
    "ensure_prepared",
    "is_prepared",
    "prepare",
    "BadDataError",
    "DatasetNotFoundError",
    "DatasetSpec",
    "default_data_dir",
    "load_arrays",
    "open_source",
    "spec",
    "SPECS",
    "device_batch",
    "device_loader",
    "DeviceResidentLoader",
    "eval_batch",
    "place_dataset",
    "shard_batch",
    "take_batch",
    "host_iterator",
    "HostIterator",
    "make_loader",
    "ShardedHostIterator",
    "long_tail_counts",
    "long_tail_indices",
    "epoch_permutation",
    "eval_steps",
    "steps_per_epoch",
]
