"""speechbrain-meta: meta-learned ASR initialisations for SpeechBrain.

The Brains (:class:`MAML`, :class:`FOMAML`, :class:`Reptile` and the
:class:`MultiTask` baseline) run an ordinary SpeechBrain recipe's
``compute_forward`` / ``compute_objectives`` on episodes drawn by a
:class:`TaskSampler`.
"""

from speechbrain_meta.algorithms import FOMAML, MAML, MultiTask, Reptile
from speechbrain_meta.brain import MetaBrain
from speechbrain_meta.sampler import (
    EpisodicDataset,
    MetaBatch,
    Task,
    TaskSampler,
    collate_episode,
)

__version__ = "0.1.0"

__all__ = [
    "FOMAML",
    "MAML",
    "EpisodicDataset",
    "MetaBatch",
    "MetaBrain",
    "MultiTask",
    "Reptile",
    "Task",
    "TaskSampler",
    "collate_episode",
]
