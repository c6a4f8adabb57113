"""Tuning before training: the learning-rate finder (Lightning's `Tuner.lr_find`)."""

from ._lr_find import lr_find as lr_find
from ._lr_finder import LRFinder as LRFinder
