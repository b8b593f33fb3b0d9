"""Tests of the episodic task sampler (speechbrain_meta.sampler)."""

import itertools
import logging
import math
import pickle
from collections import Counter
from unittest import mock

import pytest
import speechbrain as sb
import torch
from speechbrain.dataio.dataloader import make_dataloader
from speechbrain.dataio.dataset import DynamicItemDataset
from speechbrain.dataio.sampler import DistributedSamplerWrapper
from speechbrain.utils.checkpoints import Checkpointer

from speechbrain_meta.sampler import (
    EpisodicDataset,
    MetaBatch,
    Task,
    TaskSampler,
    _random_order,
    collate_episode,
)

SAMPLE_RATE = 100  # samples of the fake signal per second of "audio"
LANGS = {"de": 30, "es": 9, "fr": 20, "it": 12}


def make_sig(duration):
    return torch.ones(round(duration * SAMPLE_RATE))


def make_tokens(n_tokens):
    return torch.arange(1, n_tokens + 1)


def make_dataset(sizes=None, **extra):
    """A DynamicItemDataset with utterances of 0.5 to 2 seconds per language."""
    data = {}
    for lang, count in (sizes or LANGS).items():
        for i in range(count):
            data[f"{lang}_{i:03d}"] = {
                "lang": lang,
                "duration": 0.5 * (1 + i % 4),
                "n_tokens": 1 + i % 5,
                **extra,
            }
    dataset = DynamicItemDataset(data)
    dataset.add_dynamic_item(make_sig, takes="duration", provides="sig")
    dataset.add_dynamic_item(make_tokens, takes="n_tokens", provides="tokens")
    dataset.set_output_keys(["id", "lang", "sig", "tokens"])
    return dataset


def one_utterance_sets(dataset, **options) -> TaskSampler:
    """A sampler whose support and query sets are one utterance each."""
    return TaskSampler(dataset, support_size=1, query_size=1, **options)


def split(episode):
    """Map an episode's (slot, index) keys to {position: (support, query)}."""
    tasks = {}
    for slot, index in episode:
        tasks.setdefault(slot // 2, ([], []))[slot % 2].append(index)
    return tasks


def lang_of(dataset, index):
    return dataset.data[dataset.data_ids[index]]["lang"]


def duration_of(dataset, index):
    return dataset.data[dataset.data_ids[index]]["duration"]


def episodes(sampler, epoch=None):
    if epoch is not None:
        sampler.set_epoch(epoch)
    return list(sampler)


def task_names(dataset, episode):
    return [lang_of(dataset, support[0]) for support, _ in split(episode).values()]


# ------------------------------------------------------------- structure
def test_episode_structure_in_utterances():
    dataset = make_dataset()
    sampler = TaskSampler(
        dataset, tasks_per_batch=3, support_size=4, query_size=3, episodes_per_epoch=50
    )
    assert sampler.tasks == ["de", "es", "fr", "it"]
    assert sampler.task_size("de") == 30
    assert len(sampler) == 50
    all_episodes = episodes(sampler, epoch=1)
    assert len(all_episodes) == 50
    for episode in all_episodes:
        # Slots come in sampler order: support then query of each position.
        slots = [slot for slot, _ in episode]
        assert slots == sorted(slots)
        tasks = split(episode)
        assert sorted(tasks) == [0, 1, 2]
        names = []
        for support, query in tasks.values():
            assert len(support) == 4 and len(query) == 3
            assert len(set(support) | set(query)) == 7
            langs = {lang_of(dataset, index) for index in support + query}
            assert len(langs) == 1
            names.append(langs.pop())
        assert len(set(names)) == 3


def test_episode_structure_in_seconds():
    dataset = make_dataset()
    sampler = TaskSampler(
        dataset,
        tasks_per_batch=2,
        support_size=3.0,
        query_size=2.2,
        size_unit="seconds",
        episodes_per_epoch=50,
    )
    # 30 utterances of 0.5, 1, 1.5, 2 s (cycling): 7 full cycles of 5 s + 0.5 + 1.
    assert sampler.task_size("de") == pytest.approx(36.5)
    for episode in episodes(sampler, epoch=2):
        tasks = split(episode)
        assert len(tasks) == 2
        for support, query in tasks.values():
            assert not set(support) & set(query)
            for indices, size in ((support, 3.0), (query, 2.2)):
                durations = [duration_of(dataset, index) for index in indices]
                # Reaches the size, and would not without its last utterance.
                assert sum(durations) >= size
                assert sum(durations[:-1]) < size


@pytest.mark.parametrize(
    "task_size, support_size, query_size", [(10, 3, 2), (70, 30, 25), (400, 3, 2)]
)
def test_utterances_are_drawn_uniformly(task_size, support_size, query_size):
    """Episodes use up most of small tasks, few of large ones: both uniform."""
    dataset = make_dataset({"de": task_size, "fr": task_size})
    trials = 2000
    sampler = TaskSampler(
        dataset,
        tasks_per_batch=2,
        support_size=support_size,
        query_size=query_size,
        episodes_per_epoch=trials,
    )
    support, query = Counter(), Counter()
    for episode in episodes(sampler):
        for slot, index in episode:
            (query if slot % 2 else support)[index] += 1
    for counts, size in ((support, support_size), (query, query_size)):
        p = size / task_size
        # Each utterance: a binomial count; all within 4.5 sigma.
        sigma = math.sqrt(trials * p * (1 - p))
        assert max(abs(counts[i] - trials * p) for i in range(len(dataset))) < (
            4.5 * sigma + 1
        )


@pytest.mark.parametrize("n", [1, 2, 5, 31, 32, 33, 100, 1000])
def test_random_order_is_a_permutation(n):
    generator = torch.Generator().manual_seed(n)
    assert sorted(_random_order(n, generator)) == list(range(n))


def test_filtered_sorted_dataset():
    dataset = make_dataset().filtered_sorted(
        key_test={"lang": lambda lang: lang != "de"}, sort_key="duration"
    )
    sampler = TaskSampler(dataset, tasks_per_batch=3, support_size=2, query_size=2)
    assert sampler.tasks == ["es", "fr", "it"]
    loader = make_dataloader(
        EpisodicDataset(dataset), batch_sampler=sampler, collate_fn=collate_episode
    )
    for batch in itertools.islice(loader, 5):
        for task in batch.tasks:
            assert set(task.support.lang) == set(task.query.lang) == {task.name}


# --------------------------------------------------------------- weighting
def test_round_robin_cycles_all_tasks_equally():
    dataset = make_dataset()
    sampler = one_utterance_sets(
        dataset,
        tasks_per_batch=3,
        episodes_per_epoch=4,
        task_weighting="round_robin",
        reseed_each_epoch=False,
    )
    names = [task_names(dataset, episode) for episode in episodes(sampler, epoch=1)]
    assert names == [
        ["de", "es", "fr"],
        ["it", "de", "es"],
        ["fr", "it", "de"],
        ["es", "fr", "it"],
    ]
    assert episodes(sampler, epoch=5) == episodes(sampler, epoch=1)


def test_round_robin_continues_across_epochs_when_reseeding():
    dataset = make_dataset()
    sampler = one_utterance_sets(
        dataset,
        tasks_per_batch=3,
        episodes_per_epoch=3,
        task_weighting="round_robin",
    )
    counts = Counter()
    for epoch in range(1, 5):
        for episode in episodes(sampler, epoch):
            counts.update(task_names(dataset, episode))
    # 4 epochs x 3 episodes x 3 tasks = 36 visits, 9 per task, although one
    # epoch (9 visits) does not divide evenly among the 4 tasks.
    assert counts == {"de": 9, "es": 9, "fr": 9, "it": 9}


def task_counts(dataset, sampler, epochs=1):
    counts = Counter()
    for epoch in range(epochs):
        for episode in episodes(sampler, epoch):
            counts.update(task_names(dataset, episode))
    return counts


def assert_frequencies(counts, expected, trials):
    """Each count within 4 binomial standard deviations of its expectation."""
    for task, probability in expected.items():
        sigma = math.sqrt(trials * probability * (1 - probability))
        assert abs(counts[task] - trials * probability) < 4 * sigma + 1, (
            task,
            counts[task],
            trials * probability,
        )


SIZES = {"a": 10, "b": 20, "c": 40, "d": 80}


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_proportional_weighting_matches_size_to_one_over_temperature(temperature):
    dataset = make_dataset(SIZES)
    sampler = one_utterance_sets(
        dataset,
        tasks_per_batch=1,
        episodes_per_epoch=4000,
        task_weighting="proportional",
        temperature=temperature,
    )
    weights = {task: size ** (1 / temperature) for task, size in SIZES.items()}
    total = sum(weights.values())
    expected = {task: weight / total for task, weight in weights.items()}
    assert_frequencies(task_counts(dataset, sampler), expected, 4000)


def test_proportional_without_replacement_within_an_episode():
    """With 2 tasks per episode, inclusion follows successive sampling."""
    dataset = make_dataset(SIZES)
    sampler = one_utterance_sets(
        dataset,
        tasks_per_batch=2,
        episodes_per_epoch=3000,
        task_weighting="proportional",
    )
    total = sum(SIZES.values())
    expected = {}
    for task in SIZES:
        first = SIZES[task] / total
        second = sum(
            SIZES[other] / total * SIZES[task] / (total - SIZES[other])
            for other in SIZES
            if other != task
        )
        expected[task] = first + second
    assert_frequencies(task_counts(dataset, sampler), expected, 3000)


@pytest.mark.parametrize(
    "weighting, temperature",
    [("uniform", 1.0), ("proportional", 1e6), ("proportional", math.inf)],
)
def test_uniform_and_high_temperature_are_uniform(weighting, temperature):
    dataset = make_dataset(SIZES)
    sampler = one_utterance_sets(
        dataset,
        tasks_per_batch=1,
        episodes_per_epoch=4000,
        task_weighting=weighting,
        temperature=temperature,
    )
    expected = dict.fromkeys(SIZES, 0.25)
    assert_frequencies(task_counts(dataset, sampler), expected, 4000)


def test_low_temperature_does_not_underflow():
    dataset = make_dataset(SIZES)
    sampler = one_utterance_sets(
        dataset,
        tasks_per_batch=3,
        episodes_per_epoch=20,
        task_weighting="proportional",
        temperature=1e-3,
    )
    for episode in episodes(sampler):
        # Weights 80^1000 : 40^1000 : ...: the largest tasks always win.
        assert task_names(dataset, episode) == ["d", "c", "b"]


# ------------------------------------------------------------- determinism
def make_sampler(dataset, **kwargs):
    options = dict(
        tasks_per_batch=2, support_size=3, query_size=2, episodes_per_epoch=8
    )
    return TaskSampler(dataset, **{**options, **kwargs})


@pytest.mark.parametrize("size_unit", ["utterances", "seconds"])
def test_same_seed_and_epoch_give_the_same_episodes(size_unit):
    dataset = make_dataset()
    first = make_sampler(dataset, size_unit=size_unit)
    second = make_sampler(dataset, size_unit=size_unit)
    reference = episodes(first, epoch=3)
    # Another instance, after iterating other epochs (partly) in between.
    episodes(second, epoch=1)
    second.set_epoch(2)
    next(iter(second))
    assert episodes(second, epoch=3) == reference
    # Iterating the same sampler twice.
    assert list(first) == reference
    assert episodes(first, epoch=4) != reference
    assert episodes(make_sampler(dataset, seed=99, size_unit=size_unit), 3) != reference


def test_without_reseeding_every_epoch_is_the_same():
    dataset = make_dataset()
    sampler = make_sampler(dataset, reseed_each_epoch=False)
    assert episodes(sampler, epoch=1) == episodes(sampler, epoch=2)
    assert episodes(sampler, epoch=1) != episodes(make_sampler(dataset, seed=7), 1)


def test_episodes_within_an_epoch_differ():
    dataset = make_dataset()
    all_episodes = episodes(make_sampler(dataset), epoch=1)
    assert len({tuple(episode) for episode in all_episodes}) == len(all_episodes)


def test_sampler_and_dataset_pickle():
    dataset = make_dataset()
    sampler = make_sampler(dataset, size_unit="seconds")
    sampler.set_epoch(5)
    clone = pickle.loads(pickle.dumps(sampler))
    assert list(clone) == list(sampler)
    episodic = pickle.loads(pickle.dumps(EpisodicDataset(dataset)))
    assert episodic[(1, 0)][:2] == (1, "de")


# ------------------------------------------------------------------ errors
def test_missing_task_key_names_the_key_and_the_available_keys():
    with pytest.raises(KeyError, match=r"'language'.*duration.*lang.*n_tokens"):
        TaskSampler(make_dataset(), task_key="language")
    with pytest.raises(KeyError, match="'language'"):
        EpisodicDataset(make_dataset(), task_key="language")
    with pytest.raises(KeyError, match="'dur'"):
        TaskSampler(make_dataset(), size_unit="seconds", duration_key="dur")


def test_bad_durations():
    with pytest.raises(ValueError, match="numbers of seconds"):
        TaskSampler(
            make_dataset(length="long"), size_unit="seconds", duration_key="length"
        )
    with pytest.raises(ValueError, match="non-negative"):
        TaskSampler(
            make_dataset(length=-1.0), size_unit="seconds", duration_key="length"
        )


def test_empty_dataset():
    dataset = make_dataset().filtered_sorted(select_n=0)
    with pytest.raises(ValueError, match="empty"):
        TaskSampler(dataset)


def test_small_task_raises_with_task_size_and_need():
    with pytest.raises(
        ValueError, match=r"'es' has 9 utterances but needs at least 10"
    ):
        TaskSampler(make_dataset(), tasks_per_batch=2, support_size=6, query_size=4)
    # In seconds, es has 2 cycles of 5 s plus 0.5 s = 10.5 s; longest is 2 s.
    with pytest.raises(
        ValueError, match=r"'es' has 10.5 seconds but needs at least 12 "
    ):
        TaskSampler(
            make_dataset(),
            tasks_per_batch=2,
            support_size=5,
            query_size=5,
            size_unit="seconds",
        )


def test_drop_small_tasks_warns_and_drops(caplog):
    dataset = make_dataset()
    with caplog.at_level(logging.WARNING, logger="speechbrain_meta.sampler"):
        sampler = TaskSampler(
            dataset,
            tasks_per_batch=2,
            support_size=8,
            query_size=5,
            drop_small_tasks=True,
        )
    assert sampler.tasks == ["de", "fr"]
    assert sampler.task_size("es") == 9
    assert "'es' has 9" in caplog.text and "'it' has 12" in caplog.text
    for episode in episodes(sampler):
        assert sorted(task_names(dataset, episode)) == ["de", "fr"]
    with pytest.raises(ValueError, match="only 2 tasks are available after dropping"):
        TaskSampler(
            make_dataset(),
            tasks_per_batch=3,
            support_size=8,
            query_size=5,
            drop_small_tasks=True,
        )


def test_more_tasks_per_batch_than_tasks():
    with pytest.raises(ValueError, match="tasks_per_batch=5 but only 4 tasks"):
        TaskSampler(make_dataset(), tasks_per_batch=5, support_size=1, query_size=1)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"size_unit": "frames"}, "size_unit"),
        ({"task_weighting": "random"}, "task_weighting"),
        ({"support_size": 0}, "support_size"),
        ({"query_size": -2}, "query_size"),
        ({"support_size": 2.5}, "whole number"),
        ({"query_size": math.inf, "size_unit": "seconds"}, "query_size"),
        ({"temperature": 0}, "temperature"),
        ({"temperature": -1.0}, "temperature"),
        ({"tasks_per_batch": 0}, "tasks_per_batch"),
        ({"episodes_per_epoch": 0}, "episodes_per_epoch"),
        ({"episodes_per_epoch": 2.5}, "episodes_per_epoch"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TaskSampler(make_dataset(), **{"support_size": 1, "query_size": 1, **kwargs})


def test_unknown_task_size():
    sampler = make_sampler(make_dataset())
    with pytest.raises(KeyError, match="'en'.*'de'"):
        sampler.task_size("en")


def test_collate_rejects_malformed_episodes():
    item = {"sig": torch.ones(2)}
    with pytest.raises(ValueError, match="mixes tasks 'de' and 'fr'"):
        collate_episode([(0, "de", item), (1, "fr", item)])
    with pytest.raises(ValueError, match=r"got slots \[0, 2, 3\]"):
        collate_episode([(0, "de", item), (2, "fr", item), (3, "fr", item)])
    with pytest.raises(ValueError, match="got slots"):
        collate_episode([])


# -------------------------------------------------------- through SpeechBrain
def check_batches(dataset, sampler, batches):
    """The loader's MetaBatches hold exactly the sampler's episodes, padded."""
    assert len(batches) == len(sampler)
    for batch, episode in zip(batches, list(sampler)):
        assert isinstance(batch, MetaBatch)
        assert len(batch) == sampler.tasks_per_batch
        for task, (support, query) in zip(batch.tasks, split(episode).values()):
            assert isinstance(task, Task)
            for padded, indices in ((task.support, support), (task.query, query)):
                assert padded.id == [dataset.data_ids[index] for index in indices]
                assert padded.lang == [task.name] * len(indices)
                durations = [duration_of(dataset, index) for index in indices]
                longest = round(max(durations) * SAMPLE_RATE)
                assert padded.sig.data.shape == (len(indices), longest)
                expected = torch.tensor(durations) * SAMPLE_RATE / longest
                assert torch.allclose(padded.sig.lengths, expected)
                assert padded.tokens.data.shape[0] == len(indices)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_make_dataloader_yields_meta_batches(num_workers):
    dataset = make_dataset()
    sampler = make_sampler(dataset, tasks_per_batch=3, episodes_per_epoch=6)
    sampler.set_epoch(2)
    loader = make_dataloader(
        EpisodicDataset(dataset),
        batch_sampler=sampler,
        collate_fn=collate_episode,
        num_workers=num_workers,
    )
    check_batches(dataset, sampler, list(loader))


def test_meta_batch_to_and_pin_memory():
    dataset = make_dataset()
    loader = make_dataloader(
        EpisodicDataset(dataset),
        batch_sampler=make_sampler(dataset),
        collate_fn=collate_episode,
    )
    batch = next(iter(loader))
    assert batch.to("cpu", dtype=torch.float64) is batch
    assert batch.tasks[1].query.sig.data.dtype == torch.float64
    assert batch.tasks[1].query.sig.lengths.dtype == torch.float64
    support, query = mock.Mock(), mock.Mock()
    meta = MetaBatch([Task("de", support, query)])
    assert meta.pin_memory() is meta
    support.pin_memory.assert_called_once_with()
    query.pin_memory.assert_called_once_with()


def test_intra_epoch_recovery_continues_with_the_next_episode(tmp_path):
    dataset = make_dataset()

    def new_loader():
        sampler = make_sampler(dataset, size_unit="seconds", episodes_per_epoch=7)
        sampler.set_epoch(4)
        loader = make_dataloader(
            EpisodicDataset(dataset), batch_sampler=sampler, collate_fn=collate_episode
        )
        return loader, Checkpointer(tmp_path, {"loader": loader})

    def ids(batch):
        return [(task.name, task.support.id, task.query.id) for task in batch.tasks]

    loader, _ = new_loader()
    uninterrupted = [ids(batch) for batch in loader]

    loader, checkpointer = new_loader()
    for step, batch in enumerate(loader, start=1):
        assert ids(batch) == uninterrupted[step - 1]
        if step == 3:
            checkpointer.save_checkpoint(end_of_epoch=False)
            break

    loader, checkpointer = new_loader()
    checkpointer.recover_if_possible()
    assert [ids(batch) for batch in loader] == uninterrupted[3:]
    # The next epoch starts from the beginning again.
    assert [ids(batch) for batch in loader] == uninterrupted


def test_ddp_wrapper_splits_episodes_across_ranks():
    dataset = make_dataset()
    sampler = make_sampler(dataset, episodes_per_epoch=6)
    ranks = [DistributedSamplerWrapper(sampler, num_replicas=2, rank=r) for r in (0, 1)]
    for rank in ranks:
        rank.set_epoch(3)
    assert sampler.epoch == 3
    per_rank = [list(rank) for rank in ranks]
    assert [len(episodes) for episodes in per_rank] == [3, 3]
    assert sorted(per_rank[0] + per_rank[1]) == sorted(list(sampler))


def test_single_episode_per_rank_is_a_clear_error():
    """DistributedSamplerWrapper yields bare keys when a rank gets one episode."""
    dataset = make_dataset()
    sampler = make_sampler(dataset, episodes_per_epoch=2)
    wrapper = DistributedSamplerWrapper(sampler, num_replicas=2, rank=0)
    loader = make_dataloader(
        EpisodicDataset(dataset), batch_sampler=wrapper, collate_fn=collate_episode
    )
    with pytest.raises(TypeError, match="episodes_per_epoch >= 2 \\* world_size"):
        next(iter(loader))


class EpisodeRecorder(sb.Brain):
    """A Brain that records the episodes it is fed."""

    def on_fit_start(self):
        super().on_fit_start()
        self.seen = []

    def fit_batch(self, batch):
        epoch = self.hparams.train_sampler.epoch
        self.seen.append(("train", epoch, [t.support.id for t in batch.tasks]))
        return torch.tensor(0.0)

    def evaluate_batch(self, batch, stage):
        self.seen.append(("valid", None, [t.name for t in batch.to("cpu").tasks]))
        return torch.tensor(0.0)


def test_brain_fit_builds_the_episodic_loaders():
    """The docs' wiring, with a plain Brain that registers the train sampler."""
    train_data = make_dataset()
    valid_data = make_dataset({"de": 4, "fr": 4})
    train_sampler = make_sampler(train_data, episodes_per_epoch=3)
    valid_sampler = TaskSampler(
        valid_data,
        tasks_per_batch=1,
        support_size=2,
        query_size=2,
        episodes_per_epoch=2,
        task_weighting="round_robin",
        reseed_each_epoch=False,
    )
    brain = EpisodeRecorder(
        modules={"model": torch.nn.Linear(1, 1)},
        hparams={"train_sampler": train_sampler},
        run_opts={"device": "cpu"},
    )
    brain.train_sampler = train_sampler  # what the meta-learning Brains do
    brain.fit(
        range(1, 3),
        EpisodicDataset(train_data),
        EpisodicDataset(valid_data),
        train_loader_kwargs={
            "batch_sampler": train_sampler,
            "collate_fn": collate_episode,
        },
        valid_loader_kwargs={
            "batch_sampler": valid_sampler,
            "collate_fn": collate_episode,
        },
    )
    expected = []
    for epoch in (1, 2):
        for episode in episodes(train_sampler, epoch):
            supports = [s for s, _ in split(episode).values()]
            ids = [[train_data.data_ids[i] for i in s] for s in supports]
            expected.append(("train", epoch, ids))
        expected += [("valid", None, ["de"]), ("valid", None, ["fr"])]
    assert brain.seen == expected
