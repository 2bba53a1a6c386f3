"""Labelled image datasets read from local files: Fashion-MNIST idx files, ImageFolder trees and
the torchvision classes of the paper's small transfer sets.

Nothing here downloads anything. Every reader raises :class:`DatasetNotFoundError` (a
``FileNotFoundError``) naming the files it looked for when they are missing, and
:class:`DatasetFormatError` (a ``ValueError``) when a file is there but unreadable.

Fashion-MNIST::

    from trex_hub.datasets import load_fashion_mnist, FashionMNIST
    train = load_fashion_mnist("/usr/share/datasets/fashion-mnist", "train", classes="0-4")
    train.images        # uint8 [N, 28, 28]
    train.labels        # int64 [N], 0..4 (relabelled in the order of ``classes``)
    ds = FashionMNIST(split="test", classes=[5, 6, 7, 8, 9], transform=my_transform)

ImageFolder trees (``root/<class>/<image>``)::

    splits = load_image_folder("data/flowers")   # {"train": LabeledImages, "test": LabeledImages}
"""
from .core import (DatasetError, DatasetFormatError, DatasetNotFoundError, ImageDataset,
                   LabeledImages, balanced_subset, parse_classes, per_class_split,
                   select_classes)
from .fashion_mnist import (DEFAULT_FASHION_MNIST_ROOT, FASHION_MNIST_CLASSES,
                            FASHION_MNIST_ENV, FashionMNIST, fashion_mnist_files,
                            load_fashion_mnist, read_idx, write_idx)
from .folders import (TORCHVISION_DATASETS, ImageFolderDataset, TorchvisionSpec,
                      load_image_folder, load_torchvision_dataset, torchvision_dataset_name)

__all__ = [
    "DatasetError", "DatasetNotFoundError", "DatasetFormatError", "LabeledImages",
    "parse_classes", "select_classes", "per_class_split", "balanced_subset", "read_idx",
    "write_idx", "fashion_mnist_files", "load_fashion_mnist", "ImageDataset", "FashionMNIST",
    "load_image_folder", "ImageFolderDataset", "FASHION_MNIST_CLASSES",
    "DEFAULT_FASHION_MNIST_ROOT", "TORCHVISION_DATASETS", "torchvision_dataset_name",
    "load_torchvision_dataset", "FASHION_MNIST_ENV", "TorchvisionSpec",
]
