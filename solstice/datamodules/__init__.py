"""DataModules: swappable sources of batches."""

from ._array import ArrayDataModule as ArrayDataModule
from ._augment import RandomCropFlip as RandomCropFlip
from ._augment import StepKeyed as StepKeyed
from ._batching import batch_size_of as batch_size_of
from ._batching import pad_batch as pad_batch
from ._cifar import CIFAR10 as CIFAR10
from ._colour_mnist import ColourMNIST as ColourMNIST
from ._datamodule import DataModule as DataModule
from ._decode import PixelDecode as PixelDecode
from ._device import DeviceBatchLoader as DeviceBatchLoader
from ._digits import Digits as Digits
from ._grain import GrainDataModule as GrainDataModule
from ._loader import BatchLoader as BatchLoader
from ._loader import epoch_permutation as epoch_permutation
from ._loader_api import IterableLoader as IterableLoader
from ._loader_api import Loader as Loader
from ._loader_api import as_loader as as_loader
from ._mnist import MNIST as MNIST
from ._mnist import FashionMNIST as FashionMNIST
from ._torch import TorchDataModule as TorchDataModule
