"""Data: the CIFAR-100 reader, the digits demo, datasets, loaders and preprocessing."""
