"""jaxkd.data: tfds datasets read without TensorFlow (CIFAR-100, Fashion-MNIST, ImageNet, and
long-tailed subsets of their train splits), a grain host pipeline for any of them, and a
device-resident path for the small ones (CIFAR-100, Fashion-MNIST).

A training loop needs two calls (`loader`), both yielding global `jax.Array`s sharded over
the mesh's 'data' axis, from the device-resident or the host path alike:

    train = make_train_loader(ds_spec, data_dir, mesh=mesh, global_batch=B, seeds=[0],
                              device_resident=True)   # next(train): [S, B, ...] batches
    evals = make_eval_loader(ds_spec, data_dir, mesh=mesh, global_batch=B,
                             device_resident=True)    # for batch in evals: [B, ...] + mask

`ensure_prepared(name, data_dir)` gets a dataset ready first (`python -m
jaxkd.data.prepare` does it by hand). Fashion-MNIST it builds from the files of Debian's
`dataset-fashion-mnist`; when that package is missing, it installs it with `apt-get` if we
are root or `sudo -n` works (`JAXKD_NO_APT=1` opts out), else downloads it when the
download host answers, else fails within seconds naming the commands that fix it. Other
datasets it never fetches: it names the `prepare` command. See
docs/ENVIRONMENT.md#getting-the-datasets.

The modules, from the rules up: `sampling` (which examples form each batch), `augment`,
`long_tail`, `datasets` (specs, reading splits), `raw` (the official raw formats),
`builders` / `prepare` (writing tfds datasets), `host` and `device` (one seed's pipeline),
`multiseed` (several seeds stacked), `loader`. See docs/DESIGN.md#data.
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
from jaxkd.data.arrays import load_arrays
from jaxkd.data.datasets import open_source
from jaxkd.data.datasets import spec
from jaxkd.data.datasets import SPECS
from jaxkd.data.device import device_batch
from jaxkd.data.device import device_loader
from jaxkd.data.device import DeviceResidentLoader
from jaxkd.data.device import eval_batch
from jaxkd.data.device import take_batch
from jaxkd.data.host import host_iterator
from jaxkd.data.host import HostIterator
from jaxkd.data.loader import EvalLoader
from jaxkd.data.loader import make_eval_loader
from jaxkd.data.loader import make_train_loader
from jaxkd.data.long_tail import long_tail_counts
from jaxkd.data.long_tail import long_tail_indices
from jaxkd.data.multiseed import StackedDeviceLoader
from jaxkd.data.multiseed import StackedHostLoader
from jaxkd.data.sampling import epoch_permutation
from jaxkd.data.sampling import eval_steps
from jaxkd.data.sampling import steps_per_epoch
from jaxkd.data.sampling import StepIterator

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
    "take_batch",
    "host_iterator",
    "HostIterator",
    "EvalLoader",
    "make_eval_loader",
    "make_train_loader",
    "long_tail_counts",
    "long_tail_indices",
    "StackedDeviceLoader",
    "StackedHostLoader",
    "epoch_permutation",
    "eval_steps",
    "steps_per_epoch",
    "StepIterator",
]
