"""Corpus streams, segment pairs and the pretraining DataModule (see datamodule.py)."""

from lmdistill.data.datamodule import PretrainingDataModule
from lmdistill.data.loader import DataPositionCallback, ResumableDataLoader

__all__ = ["PretrainingDataModule", "DataPositionCallback", "ResumableDataLoader"]
