"""Datasets and batches: built-in datasets (Fashion-MNIST, CIFAR, word lists, the fortunes corpus,
synthetic), user builders, the in-memory tensor datasets a builder may return, the driver's and
workers' reading of a data config (load_data), and the batch iterator the loop trains on."""
from .datasets import (BYTE_VOCAB, IGNORE_INDEX, Batches, Data, ImageTensors, SequenceTensors, Splits, Tensors,
                       TokenTensors, load_data, resolve_dataset)

__all__ = ["BYTE_VOCAB", "IGNORE_INDEX", "Batches", "Data", "ImageTensors", "SequenceTensors", "Splits", "Tensors",
           "TokenTensors", "load_data", "resolve_dataset"]
