"""Episodic task sampling for meta-learning ASR across languages.

A *task* is the set of utterances that share one value of a task key (by
default ``"lang"``: one task per language). An *episode* (one meta-batch)
picks ``tasks_per_batch`` distinct tasks and, for each of them, a *support*
set (used for the inner-loop adaptation) and a disjoint *query* set (used for
the outer-loop loss).

:class:`TaskSampler` is a batch sampler: each item it yields is the list of
``(slot, dataset_index)`` keys of one episode, where
``slot = 2 * task_position + (0 for support, 1 for query)``.
:class:`EpisodicDataset` fetches those keys from a ``DynamicItemDataset`` and
:func:`collate_episode` turns one episode into a :class:`MetaBatch` of
:class:`Task` objects holding two ``PaddedBatch`` objects each. Because the
sampler is a plain batch sampler, ``Brain.fit`` can build the loader itself,
split episodes across DDP ranks and checkpoint the position in the epoch.

Example
-------
>>> import torch
>>> from speechbrain.dataio.dataloader import make_dataloader
>>> from speechbrain.dataio.dataset import DynamicItemDataset
>>> data = {
...     f"{lang}{i}": {"lang": lang, "duration": 1.0 + i}
...     for lang in ("de", "fr", "it")
...     for i in range(4)
... }
>>> dataset = DynamicItemDataset(data)
>>> dataset.add_dynamic_item(
...     lambda duration: torch.ones(int(10 * duration)),
...     takes="duration",
...     provides="sig",
... )
>>> dataset.set_output_keys(["id", "sig"])
>>> sampler = TaskSampler(
...     dataset, tasks_per_batch=2, support_size=2, query_size=1,
...     episodes_per_epoch=3, task_weighting="round_robin",
... )
>>> loader = make_dataloader(
...     EpisodicDataset(dataset), batch_sampler=sampler,
...     collate_fn=collate_episode,
... )
>>> batches = list(loader)
>>> [[task.name for task in batch.tasks] for batch in batches]
[['de', 'fr'], ['it', 'de'], ['fr', 'it']]
>>> task = batches[0].tasks[0]
>>> len(task.support), len(task.query)
(2, 1)
>>> task.support.sig.data.shape[0], task.support.id[0][:2]
(2, 'de')
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from speechbrain.dataio.batch import PaddedBatch
from speechbrain.dataio.dataset import DynamicItemDataset

from speechbrain_meta.audio import audio_problem
from speechbrain_meta.errors import SetupError

__all__ = [
    "EpisodicDataset",
    "MetaBatch",
    "SkippedUtterance",
    "Task",
    "TaskSampler",
    "collate_episode",
]

logger = logging.getLogger(__name__)

SIZE_UNITS = ("utterances", "seconds")
TASK_WEIGHTINGS = ("uniform", "proportional", "round_robin")
_CHUNK = 32  # positions drawn at once by _random_order


class _HoldsBatches:
    """``to`` and ``pin_memory`` applied in place to every batch held."""

    def _parts(self) -> list:
        raise NotImplementedError

    def to(self, device: torch.device | str, **kwargs):
        """Move every batch in place, as ``PaddedBatch.to`` does.

        Arguments
        ---------
        device : torch.device or str
            The target device.
        **kwargs : dict
            Further arguments of ``torch.Tensor.to``, e.g. ``non_blocking``.

        Returns
        -------
        Task or MetaBatch
            This object, moved.
        """
        for part in self._parts():
            part.to(device, **kwargs)
        return self

    def pin_memory(self):
        """Pin every batch in place (used by ``DataLoader(pin_memory=True)``).

        Returns
        -------
        Task or MetaBatch
            This object, pinned.
        """
        for part in self._parts():
            part.pin_memory()
        return self


@dataclass
class Task(_HoldsBatches):
    """The support and query batches of one task in an episode.

    Arguments
    ---------
    name : str
        The value of the task key shared by all utterances, e.g. ``"de"``.
    support : PaddedBatch
        The support utterances (inner-loop adaptation data).
    query : PaddedBatch
        The query utterances (outer-loop evaluation data).
    """

    name: str
    support: PaddedBatch
    query: PaddedBatch

    def _parts(self) -> list:
        return [self.support, self.query]


@dataclass
class MetaBatch(_HoldsBatches):
    """One episode: the tasks of a meta-batch, in sampler order.

    Arguments
    ---------
    tasks : list of Task
        The distinct tasks of the episode.
    skipped : list of tuple
        ``(utterance id, reason)`` of the utterances drawn for the episode
        but left out because their audio is not usable.
    """

    tasks: list[Task]
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def _parts(self) -> list:
        return self.tasks

    def __len__(self) -> int:
        """Return the number of tasks."""
        return len(self.tasks)


def _static_values(dataset: DynamicItemDataset, key: str, role: str) -> list:
    """Return ``key`` of every data point of ``dataset``, in dataset order."""
    values = []
    for data_id in dataset.data_ids:
        point = dataset.data[data_id]
        if key not in point:
            available = sorted(k for k in point if k != "id")
            raise KeyError(
                f"The {role} {key!r} is not a key of data point {data_id!r}; "
                f"available keys: {available}. It must be a static key of the "
                "data (a CSV column or JSON field), not a dynamic item."
            )
        values.append(point[key])
    return values


def _task_names(dataset: DynamicItemDataset, task_key: str) -> list[str]:
    """Return the task name (as a string) of every data point of ``dataset``."""
    if len(dataset) == 0:
        raise SetupError(
            "The dataset is empty: no utterance is left to draw tasks from "
            "(check the manifest, the source tasks and max_duration)."
        )
    return [str(value) for value in _static_values(dataset, task_key, "task_key")]


def _random_order(n: int, generator: torch.Generator) -> Iterator[int]:
    """Yield ``range(n)`` in uniformly random order, lazily.

    A full ``randperm`` costs milliseconds for large tasks, of which an
    episode needs a few utterances. While less than half of the positions
    have been yielded, positions are drawn with replacement and repeats
    skipped (sequential sampling without replacement); then the rest follow
    in random order.
    """
    seen: set[int] = set()
    while 2 * len(seen) < n:
        for position in torch.randint(n, (_CHUNK,), generator=generator).tolist():
            if position not in seen:
                seen.add(position)
                yield position
    rest = [position for position in range(n) if position not in seen]
    for i in torch.randperm(len(rest), generator=generator).tolist():
        yield rest[i]


def _take_until(order: Iterator[int], durations: list[float], size: float) -> list[int]:
    """Take positions from ``order`` until their durations reach ``size``."""
    taken = []
    total = 0.0
    for position in order:
        taken.append(position)
        total += durations[position]
        if total >= size:
            break
    return taken


class TaskSampler(torch.utils.data.Sampler):
    """Batch sampler of episodes: each yielded item is one meta-batch.

    Each episode draws ``tasks_per_batch`` distinct tasks and, for each task,
    a support set and a disjoint query set without replacement from the
    task's utterances. It yields the episode as a list of
    ``(slot, dataset_index)`` pairs with
    ``slot = 2 * task_position + (0 for support, 1 for query)``: support
    items of task 0, query items of task 0, support items of task 1, ...
    Use it as ``batch_sampler`` together with :class:`EpisodicDataset` and
    :func:`collate_episode`.

    All randomness comes from a ``torch.Generator`` created at the start of
    every iteration and seeded from ``(seed, epoch)`` (or ``seed`` alone when
    ``reseed_each_epoch`` is False). Hence iterating yields the same episodes
    for the same seed and epoch, however often the sampler was iterated
    before: this is what lets ``SaveableDataLoader`` fast-forward to the
    right episode after intra-epoch recovery, and every DDP rank compute the
    same episode list. Call :meth:`set_epoch` before each epoch (``Brain``
    does so for its ``train_sampler``).

    Note
    ----
    Under DDP, SpeechBrain wraps a batch sampler in
    ``DistributedSamplerWrapper``, which breaks when a rank gets exactly one
    episode. Use ``episodes_per_epoch >= 2 * world_size``;
    :class:`EpisodicDataset` raises a ``TypeError`` if the broken case
    happens.

    Arguments
    ---------
    dataset : DynamicItemDataset
        The utterances, possibly filtered/sorted. Only its static data is
        read (the task key and, for ``size_unit="seconds"``, the duration).
    task_key : str
        The static data key whose distinct values are the tasks.
    tasks_per_batch : int
        The number of distinct tasks in each episode.
    support_size : float
        The size of each support set, in ``size_unit``: a whole number of
        utterances, or seconds of audio (utterances are drawn until their
        cumulative duration reaches this, at least one).
    query_size : float
        The size of each query set, in ``size_unit``.
    size_unit : str
        ``"utterances"`` or ``"seconds"``.
    duration_key : str
        The static data key holding utterance durations in seconds (used
        for ``size_unit="seconds"`` only).
    episodes_per_epoch : int
        The number of episodes (meta-batches) per epoch; this is ``len()``.
    task_weighting : str
        How the tasks of an episode are chosen: ``"uniform"``;
        ``"proportional"``, with probability proportional to
        ``task_size ** (1 / temperature)``, drawing the tasks of one episode
        without replacement (with ``tasks_per_batch > 1`` the chance to
        appear in an episode is therefore flatter than these weights);
        or ``"round_robin"``, cycling deterministically through the sorted
        tasks so every task is visited equally (meant for validation). With
        ``reseed_each_epoch`` the cycle continues across epochs, otherwise
        every epoch starts at the first task.
    temperature : float
        Temperature of the proportional weighting: 1 weights tasks by their
        size, larger values flatten towards uniform (``math.inf`` is uniform).
    seed : int
        The base random seed.
    reseed_each_epoch : bool
        If True, the episodes depend on ``(seed, epoch)``; if False, every
        epoch yields the same episodes (meant for validation).
    drop_small_tasks : bool
        If True, tasks too small for disjoint support and query sets are
        dropped with a warning; if False, they raise a ``ValueError``.

    Example
    -------
    >>> from speechbrain.dataio.dataset import DynamicItemDataset
    >>> data = {
    ...     f"utt{i}": {"lang": ("de", "fr", "it")[i % 3], "duration": 2.0}
    ...     for i in range(12)
    ... }
    >>> sampler = TaskSampler(
    ...     DynamicItemDataset(data), tasks_per_batch=2, support_size=3,
    ...     query_size=1, episodes_per_epoch=5,
    ... )
    >>> sampler.tasks, sampler.task_size("de"), len(sampler)
    (['de', 'fr', 'it'], 4.0, 5)
    >>> sampler.set_epoch(1)
    >>> episode = next(iter(sampler))
    >>> sorted(slot for slot, index in episode)
    [0, 0, 0, 1, 2, 2, 2, 3]
    >>> episode == next(iter(sampler))
    True
    """

    def __init__(
        self,
        dataset: DynamicItemDataset,
        task_key: str = "lang",
        tasks_per_batch: int = 4,
        support_size: float = 8,
        query_size: float = 8,
        size_unit: str = "utterances",
        duration_key: str = "duration",
        episodes_per_epoch: int = 100,
        task_weighting: str = "uniform",
        temperature: float = 1.0,
        seed: int = 1234,
        reseed_each_epoch: bool = True,
        drop_small_tasks: bool = False,
    ):
        if size_unit not in SIZE_UNITS:
            raise SetupError(
                f"size_unit must be one of {SIZE_UNITS}, got {size_unit!r}"
            )
        if task_weighting not in TASK_WEIGHTINGS:
            raise SetupError(
                f"task_weighting must be one of {TASK_WEIGHTINGS}, "
                f"got {task_weighting!r}"
            )
        for name, count in (
            ("tasks_per_batch", tasks_per_batch),
            ("episodes_per_epoch", episodes_per_epoch),
        ):
            if count != int(count) or count < 1:
                raise SetupError(f"{name} must be an integer >= 1, got {count}")
        if not temperature > 0:
            raise SetupError(f"temperature must be > 0, got {temperature}")
        for name, size in (("support_size", support_size), ("query_size", query_size)):
            if not (size > 0 and math.isfinite(size)):
                raise SetupError(f"{name} must be positive and finite, got {size}")
            if size_unit == "utterances" and not float(size).is_integer():
                raise SetupError(
                    f"{name} must be a whole number of utterances, got {size}"
                )
        self.task_key = task_key
        self.tasks_per_batch = int(tasks_per_batch)
        self.size_unit = size_unit
        if size_unit == "utterances":
            self.support_size: float = int(support_size)
            self.query_size: float = int(query_size)
        else:
            self.support_size = float(support_size)
            self.query_size = float(query_size)
        self.duration_key = duration_key
        self.episodes_per_epoch = int(episodes_per_epoch)
        self.task_weighting = task_weighting
        self.temperature = float(temperature)
        self.seed = int(seed)
        self.reseed_each_epoch = reseed_each_epoch
        self.drop_small_tasks = drop_small_tasks
        self.epoch = 0

        members: dict[str, list[int]] = {}
        for index, name in enumerate(_task_names(dataset, task_key)):
            members.setdefault(name, []).append(index)
        durations = None
        if size_unit == "seconds":
            durations = self._read_durations(dataset)
        self._sizes: dict[str, float] = {}
        self._tasks: list[str] = []
        self._indices: list[list[int]] = []
        self._durations: list[list[float]] = []
        too_small = []
        for name in sorted(members):
            indices = members[name]
            if durations is None:
                self._sizes[name] = float(len(indices))
                needed, why = self._needed_utterances()
            else:
                task_durations = [durations[index] for index in indices]
                self._sizes[name] = math.fsum(task_durations)
                needed, why = self._needed_seconds(max(task_durations))
            if self._sizes[name] < needed:
                too_small.append(
                    f"task {name!r} has {self._sizes[name]:g} {size_unit} but "
                    f"needs at least {needed:g} ({why})"
                )
                continue
            self._tasks.append(name)
            self._indices.append(indices)
            if durations is not None:
                self._durations.append(task_durations)
        if too_small and not drop_small_tasks:
            raise SetupError(
                "Tasks too small to draw disjoint support and query sets (pass "
                "drop_small_tasks=True to drop them: in the recipes' YAML "
                "drop_small_tasks: True, or --drop_small_tasks True; or lower "
                "the support and query sizes): " + "; ".join(too_small)
            )
        for message in too_small:
            logger.warning("Dropping small task: %s", message)
        if len(self._tasks) < self.tasks_per_batch:
            dropped = " after dropping small tasks" if too_small else ""
            raise SetupError(
                f"tasks_per_batch={self.tasks_per_batch} but only "
                f"{len(self._tasks)} tasks are available{dropped}: {self._tasks}"
            )
        sizes = [self._sizes[name] for name in self._tasks]
        if task_weighting == "proportional":
            # Log-space weights: size ** (1 / temperature) may overflow.
            sizes = torch.tensor(sizes, dtype=torch.float64)
            self._log_weights = sizes.log() / self.temperature
        else:
            self._log_weights = torch.zeros(len(self._tasks), dtype=torch.float64)

    def _read_durations(self, dataset: DynamicItemDataset) -> list[float]:
        """Return the duration (seconds) of every data point, validated."""
        values = _static_values(dataset, self.duration_key, "duration_key")
        try:
            durations = [float(value) for value in values]
        except (TypeError, ValueError) as error:
            raise SetupError(
                f"The {self.duration_key!r} values must be numbers of seconds: {error}"
            ) from error
        if not all(0 <= duration < math.inf for duration in durations):
            raise SetupError(
                f"The {self.duration_key!r} values must be finite and non-negative."
            )
        return durations

    def _needed_utterances(self) -> tuple[float, str]:
        """Return the utterances a task needs, and why."""
        needed = self.support_size + self.query_size
        why = f"support_size {self.support_size} + query_size {self.query_size}"
        return needed, why

    def _needed_seconds(self, longest: float) -> tuple[float, str]:
        """Return the seconds a task needs whatever the draw order, and why.

        The support set overshoots ``support_size`` by less than one
        utterance, so ``support_size + query_size + longest`` always leaves
        enough audio for the query set.
        """
        needed = self.support_size + self.query_size + longest
        return needed, (
            f"support_size {self.support_size:g} s + query_size "
            f"{self.query_size:g} s + its longest utterance {longest:g} s"
        )

    @property
    def tasks(self) -> list[str]:
        """The sorted names of the tasks that episodes are drawn from."""
        return list(self._tasks)

    def task_size(self, task: str) -> float:
        """Return the size of a task in the size unit (utterances or seconds).

        Arguments
        ---------
        task : str
            A task name (also those dropped as too small).

        Returns
        -------
        float
            The number of utterances or the total duration in seconds.
        """
        if task not in self._sizes:
            raise KeyError(f"Unknown task {task!r}; tasks: {sorted(self._sizes)}")
        return self._sizes[task]

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch that seeds the next iterations.

        Arguments
        ---------
        epoch : int
            The epoch number.
        """
        self.epoch = int(epoch)

    def __len__(self) -> int:
        """Return the number of episodes per epoch."""
        return self.episodes_per_epoch

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        """Yield the episodes of the current epoch.

        Returns
        -------
        Iterator[list[tuple[int, int]]]
            The ``(slot, dataset_index)`` pairs of each episode.
        """
        key = (self.seed, self.epoch) if self.reseed_each_epoch else (self.seed,)
        digest = hashlib.sha256(repr(key).encode()).digest()
        generator = torch.Generator()
        generator.manual_seed(int.from_bytes(digest[:8], "little"))
        # Where the round-robin cycle starts: it goes on across epochs.
        first = 0
        if self.reseed_each_epoch:
            first = self.epoch * self.episodes_per_epoch * self.tasks_per_batch
        return self._episodes(generator, first)

    def _episodes(
        self, generator: torch.Generator, first: int
    ) -> Iterator[list[tuple[int, int]]]:
        """Generate the episodes of one epoch (``first``: round-robin start)."""
        for episode in range(self.episodes_per_epoch):
            if self.task_weighting == "round_robin":
                start = first + episode * self.tasks_per_batch
                positions = [
                    (start + i) % len(self._tasks) for i in range(self.tasks_per_batch)
                ]
            else:
                positions = self._draw_tasks(generator)
            keys = []
            for position, task in enumerate(positions):
                support, query = self._draw_sets(task, generator)
                keys.extend((2 * position, index) for index in support)
                keys.extend((2 * position + 1, index) for index in query)
            yield keys

    def _draw_tasks(self, generator: torch.Generator) -> list[int]:
        """Draw distinct tasks with probability proportional to their weights.

        Exponential race: the ``k`` smallest ``E_i / w_i`` with
        ``E_i ~ Exp(1)`` are a draw without replacement proportional to
        ``w_i``; here in log space.
        """
        race = torch.empty(len(self._tasks), dtype=torch.float64)
        race.exponential_(generator=generator)
        scores = self._log_weights - race.log()
        return scores.topk(self.tasks_per_batch).indices.tolist()

    def _draw_sets(
        self, task: int, generator: torch.Generator
    ) -> tuple[list[int], list[int]]:
        """Draw disjoint support and query dataset indices from one task."""
        indices = self._indices[task]
        order = _random_order(len(indices), generator)
        if self.size_unit == "utterances":
            support = list(itertools.islice(order, self.support_size))
            query = list(itertools.islice(order, self.query_size))
        else:
            durations = self._durations[task]
            support = _take_until(order, durations, self.support_size)
            query = _take_until(order, durations, self.query_size)
        return [indices[p] for p in support], [indices[p] for p in query]


class SkippedUtterance(NamedTuple):
    """An utterance :class:`EpisodicDataset` will not let into an episode."""

    utt_id: str
    reason: str


class EpisodicDataset(torch.utils.data.Dataset):
    """Wraps a DynamicItemDataset so a DataLoader can fetch (slot, index) keys.

    An item whose signal (``signal_key``) is empty, not finite or silent
    (:func:`speechbrain_meta.audio.audio_problem`) is returned as a
    :class:`SkippedUtterance`, which :func:`collate_episode` leaves out of the
    episode and records in :attr:`MetaBatch.skipped`.

    Arguments
    ---------
    dataset : DynamicItemDataset
        The dataset the :class:`TaskSampler` was built on.
    task_key : str
        The static data key whose values are the tasks.
    signal_key : str
        The output key holding the audio signal, if any.

    Example
    -------
    >>> from speechbrain.dataio.dataset import DynamicItemDataset
    >>> data = {
    ...     "a": {"lang": "de", "text": "hallo"},
    ...     "b": {"lang": "fr", "text": "salut"},
    ... }
    >>> dataset = DynamicItemDataset(data, output_keys=["id", "text"])
    >>> EpisodicDataset(dataset)[(3, 1)]
    (3, 'fr', {'id': 'b', 'text': 'salut'})
    >>> silent = DynamicItemDataset(
    ...     {"c": {"lang": "de", "sig": torch.zeros(4)}}, output_keys=["id", "sig"]
    ... )
    >>> EpisodicDataset(silent)[(0, 0)]
    (0, 'de', SkippedUtterance(utt_id='c', reason='silent (all samples are zero)'))
    """

    def __init__(
        self,
        dataset: DynamicItemDataset,
        task_key: str = "lang",
        signal_key: str = "sig",
    ):
        self.dataset = dataset
        self.task_key = task_key
        self.signal_key = signal_key
        self._names = _task_names(dataset, task_key)

    def __getitem__(
        self, key: tuple[int, int]
    ) -> tuple[int, str, dict | SkippedUtterance]:
        """Return ``(slot, task name, the dataset item dict)`` for a key.

        Arguments
        ---------
        key : tuple of int
            A ``(slot, dataset_index)`` pair yielded by :class:`TaskSampler`.

        Returns
        -------
        tuple
            The slot, the task name and ``dataset[dataset_index]``, or a
            :class:`SkippedUtterance` in its place if its signal is not usable.
        """
        if not (isinstance(key, tuple) and len(key) == 2):
            raise TypeError(
                "EpisodicDataset expects (slot, dataset_index) keys from a "
                f"TaskSampler used as batch_sampler, got {key!r}. Under DDP this "
                "happens when a rank gets a single episode: use "
                "episodes_per_epoch >= 2 * world_size."
            )
        slot, index = key
        item = self.dataset[index]
        signal = item.get(self.signal_key)
        if isinstance(signal, torch.Tensor):
            problem = audio_problem(signal)
            if problem is not None:
                utt_id = item.get("id", self.dataset.data_ids[index])
                item = SkippedUtterance(str(utt_id), problem)
        return slot, self._names[index], item

    def __len__(self) -> int:
        """Return the number of utterances."""
        return len(self.dataset)


def collate_episode(items: list[tuple[int, str, dict | SkippedUtterance]]) -> MetaBatch:
    """Group items by slot into one Task per task position.

    Support and query are each a ``PaddedBatch`` of the items in sampler order.
    :class:`SkippedUtterance` items are left out and listed in
    :attr:`MetaBatch.skipped`; a task left without support or query items is
    left out of the episode.

    Arguments
    ---------
    items : list of tuple
        ``(slot, task name, item dict)`` triples from :class:`EpisodicDataset`.

    Returns
    -------
    MetaBatch
        One :class:`Task` per task position ``slot // 2``, in position order.

    Example
    -------
    >>> import torch
    >>> items = [
    ...     (0, "de", {"sig": torch.ones(3)}),
    ...     (1, "de", {"sig": torch.ones(2)}),
    ...     (0, "de", {"sig": torch.ones(1)}),
    ...     (2, "fr", {"sig": torch.ones(1)}),
    ...     (3, "fr", SkippedUtterance("fr_1", "non-finite samples")),
    ... ]
    >>> batch = collate_episode(items)
    >>> len(batch), batch.tasks[0].name, batch.skipped
    (1, 'de', [('fr_1', 'non-finite samples')])
    >>> task = batch.tasks[0]
    >>> task.support.sig.data.shape, task.query.sig.data.shape
    (torch.Size([2, 3]), torch.Size([1, 2]))
    """
    groups: dict[int, list[dict]] = {}
    names: dict[int, str] = {}
    skipped: list[tuple[str, str]] = []
    for slot, name, item in items:
        if isinstance(item, SkippedUtterance):
            groups.setdefault(slot, [])
            skipped.append(tuple(item))
        else:
            groups.setdefault(slot, []).append(item)
        if names.setdefault(slot // 2, name) != name:
            raise ValueError(
                f"Task position {slot // 2} mixes tasks {names[slot // 2]!r} "
                f"and {name!r}."
            )
    n_tasks = len(names)
    if n_tasks == 0 or sorted(groups) != list(range(2 * n_tasks)):
        raise ValueError(
            "An episode needs support and query slots 0 .. 2 * n_tasks - 1, "
            f"got slots {sorted(groups)}."
        )
    tasks = [
        Task(
            name=names[position],
            support=PaddedBatch(groups[2 * position]),
            query=PaddedBatch(groups[2 * position + 1]),
        )
        for position in range(n_tasks)
        if groups[2 * position] and groups[2 * position + 1]
    ]
    return MetaBatch(tasks, skipped)
