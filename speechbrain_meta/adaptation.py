"""Adapting an initialisation to a new language: the pieces of ``adapt.py``.

Low-resource adaptation is ordinary fine-tuning of a SpeechBrain Brain on a
small amount of the target language, evaluated as it goes. This module holds
what is not recipe-specific:

* :func:`select_budget` / :func:`budget_subset`: the target's training data
  cut to a budget in minutes of audio or in utterances, deterministically for
  a seed (a smaller budget is a prefix of a larger one);
* :func:`extend_vocabulary`: new characters (or tokens) of the target added to
  a SpeechBrain label encoder and mapped to rows of the output layers (spare
  rows if there are, else the layers grow), each new row initialised from its
  base letter (``ř`` from ``r``, ``ã`` from ``a``) or, lacking one, the mean of
  the known letters' rows. Rows of known labels are never changed;
* :func:`find_init_checkpoint` / :func:`load_init_parameters`: the parameter
  file of an initialisation from a ``train.py`` output folder, a Checkpointer
  folder, one checkpoint or a file, and loading it into a model;
* :func:`without_unusable_audio`: the utterances whose audio is empty, not
  finite or silent left out (and counted) before adaptation;
* :func:`adaptation_curve`: fine-tune for a number of steps and evaluate on
  the test set after each point of a curve (e.g. 0, 10, 25, 50, 100 steps).
"""

import logging
import os
import random
import unicodedata
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence

import speechbrain as sb
import torch
from speechbrain.dataio.dataloader import make_dataloader
from speechbrain.dataio.dataset import FilteredSortedDynamicItemDataset
from speechbrain.dataio.sampler import ReproducibleRandomSampler
from speechbrain.utils.checkpoints import Checkpointer, torch_recovery
from tqdm import tqdm

from speechbrain_meta.audio import audio_problem

__all__ = [
    "BUDGET_UNITS",
    "InitCheckpoint",
    "adaptation_curve",
    "base_label",
    "budget_subset",
    "extend_vocabulary",
    "find_init_checkpoint",
    "load_init_parameters",
    "select_budget",
    "without_unusable_audio",
]

logger = logging.getLogger(__name__)

BUDGET_UNITS = ("minutes", "utterances")


# ---------------------------------------------------------------- budgets
def select_budget(
    durations: Dict[str, float], budget: float, unit: str, seed: int
) -> List[str]:
    """The utterances of an adaptation budget, drawn deterministically.

    The utterances are shuffled with ``seed`` and the longest prefix that
    fits the budget is kept, so that with one seed a smaller budget is a
    subset of a larger one.

    Arguments
    ---------
    durations : dict
        Duration in seconds of every utterance, by id.
    budget : float
        How much to keep: minutes of audio, or a number of utterances.
    unit : str
        ``minutes`` or ``utterances``.
    seed : int
        Seed of the shuffle.

    Returns
    -------
    list of str
        The ids kept, in shuffled order.

    Raises
    ------
    ValueError
        If the unit is unknown, the budget is not positive, there are no
        utterances, or the budget is more than all of them.

    Example
    -------
    >>> durations = {"a": 30.0, "b": 60.0, "c": 45.0, "d": 90.0}
    >>> small = select_budget(durations, 2, "minutes", seed=1)
    >>> large = select_budget(durations, 3, "minutes", seed=1)
    >>> large[: len(small)] == small
    True
    >>> sum(durations[i] for i in large) <= 180
    True
    >>> select_budget(durations, 2, "utterances", seed=1) == large[:2]
    True
    """
    if unit not in BUDGET_UNITS:
        raise ValueError(f"Unknown budget unit '{unit}'; use one of {BUDGET_UNITS}.")
    if not budget > 0:
        raise ValueError(f"The budget must be positive, got {budget} {unit}.")
    if not durations:
        raise ValueError("There are no utterances to draw an adaptation budget from.")
    available = len(durations) if unit == "utterances" else sum(durations.values()) / 60
    if budget > available:
        raise ValueError(
            f"The budget of {budget} {unit} is more than the {available:.4g} "
            f"{unit} of adaptation data available."
        )
    ids = sorted(durations)
    random.Random(seed).shuffle(ids)
    if unit == "utterances":
        return ids[: int(budget)]
    chosen, total = [], 0.0
    for utt_id in ids:
        total += durations[utt_id]
        if total > budget * 60:
            break
        chosen.append(utt_id)
    if not chosen:
        raise ValueError(
            f"The budget of {budget} minutes is shorter than the first utterance "
            f"drawn ({durations[ids[0]]:.1f} s); raise it."
        )
    return chosen


def budget_subset(
    dataset,
    budget: float,
    unit: str,
    seed: int,
    duration_key: str = "duration",
):
    """A DynamicItemDataset cut to an adaptation budget (see select_budget).

    Arguments
    ---------
    dataset : speechbrain.dataio.dataset.DynamicItemDataset
        The target's training data.
    budget : float
        Minutes of audio or number of utterances.
    unit : str
        ``minutes`` or ``utterances``.
    seed : int
        Seed of the draw.
    duration_key : str
        The static key holding durations in seconds.

    Returns
    -------
    speechbrain.dataio.dataset.DynamicItemDataset
        The subset, with the pipeline of ``dataset``.

    Example
    -------
    >>> from speechbrain.dataio.dataset import DynamicItemDataset
    >>> data = DynamicItemDataset({f"u{i}": {"duration": 20.0} for i in range(9)})
    >>> len(budget_subset(data, 1, "minutes", seed=0))
    3
    """
    durations = {i: float(dataset.data[i][duration_key]) for i in dataset.data_ids}
    chosen = select_budget(durations, budget, unit, seed)
    return FilteredSortedDynamicItemDataset(dataset, chosen)


# ---------------------------------------------------------------- vocabulary
def base_label(label: str) -> str:
    """The base letter of a character: its first Unicode decomposition part.

    Arguments
    ---------
    label : str
        A character (or token).

    Returns
    -------
    str
        ``label`` without diacritics when it is one precomposed character,
        else ``label`` itself.

    Example
    -------
    >>> [base_label(c) for c in "řůãçйß"]
    ['r', 'u', 'a', 'c', 'и', 'ß']
    """
    if len(label) != 1:
        return label
    return unicodedata.normalize("NFD", label)[0]


def _row_holder(module: torch.nn.Module) -> torch.nn.Module:
    """The one torch Linear or Embedding in ``module`` (wrappers included)."""
    found = [
        m
        for m in module.modules()
        if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))
    ]
    if len(found) != 1:
        raise TypeError(
            f"{type(module).__name__} holds {len(found)} torch.nn.Linear or "
            "torch.nn.Embedding layers; give the one whose rows are the labels."
        )
    return found[0]


def _resize_rows(layer: torch.nn.Module, rows: int) -> None:
    """Give ``layer`` ``rows`` output rows, keeping the existing ones."""
    old = layer.weight.shape[0]
    if rows <= old:
        return
    extra = torch.empty(rows - old, *layer.weight.shape[1:], dtype=layer.weight.dtype)
    torch.nn.init.normal_(extra, std=layer.weight.detach().std().item())
    weight = torch.cat([layer.weight.detach(), extra.to(layer.weight.device)])
    layer.weight = torch.nn.Parameter(weight, layer.weight.requires_grad)
    if getattr(layer, "bias", None) is not None:
        bias = torch.cat([layer.bias.detach(), layer.bias.new_zeros(rows - old)])
        layer.bias = torch.nn.Parameter(bias, layer.bias.requires_grad)
    if isinstance(layer, torch.nn.Linear):
        layer.out_features = rows
    else:
        layer.num_embeddings = rows


def extend_vocabulary(
    encoder, texts: Sequence[str], layers: Sequence[torch.nn.Module]
) -> Dict[str, str]:
    """Add the unseen characters of ``texts`` to ``encoder`` and to ``layers``.

    Each new character gets the encoder's next free index. A layer with
    fewer rows than the encoder then has grows to fit it (spare rows, e.g.
    of ``output_neurons: 128``, are used as they are), even when no label is
    new: a layer made for the original encoder then fits an extended copy of
    it, whose run's checkpoint can be loaded into it. The row of a new
    character (weights and bias) is set to a copy of its base letter's row
    (:func:`base_label`) when the encoder knows that letter, else to the mean
    of the rows of the labels the encoder knew that are not special (blank,
    bos, eos, unk); when it knew none, the row is left as it is. The rows of
    known labels are never modified.

    Arguments
    ---------
    encoder : speechbrain.dataio.encoder.CategoricalEncoder
        The encoder of the initialisation, e.g. a ``CTCTextEncoder``;
        extended in place.
    texts : sequence of str
        The target's transcripts (every character is a label).
    layers : sequence of torch.nn.Module
        Layers whose rows are indexed by the labels: output layers and
        embeddings, each a ``torch.nn.Linear`` or ``torch.nn.Embedding`` or a
        module holding exactly one of them (SpeechBrain's ``Linear``,
        ``Embedding``, a Transformer's target embedding); extended in place.

    Returns
    -------
    dict
        The new labels, each with the label its rows were copied from
        (``""`` for the mean), in index order.

    Example
    -------
    >>> from speechbrain.dataio.encoder import CTCTextEncoder
    >>> encoder = CTCTextEncoder()
    >>> encoder.update_from_iterable(["ab", "ba"], sequence_input=True)
    >>> encoder.insert_blank()
    >>> output = torch.nn.Linear(4, 3)
    >>> extend_vocabulary(encoder, ["à b", "c"], [output])
    {' ': '', 'c': '', 'à': 'a'}
    >>> output.weight.shape
    torch.Size([6, 4])
    >>> row = output.weight[encoder.encode_sequence(["à", "a"])]
    >>> torch.equal(row[0], row[1])
    True
    """
    known = dict(encoder.lab2ind)
    special = {
        getattr(encoder, name, None)
        for name in ("blank_label", "bos_label", "eos_label", "unk_label")
    }
    letters = [index for label, index in known.items() if label not in special]
    new = sorted({char for text in texts for char in text} - set(known))
    sources = {}
    for label in new:
        base = base_label(label)
        sources[label] = base if base in known and base not in special else ""
        encoder.add_label(label)
    rows = max(encoder.lab2ind.values()) + 1
    for module in layers:
        layer = _row_holder(module)
        _resize_rows(layer, rows)
        if not new:
            continue
        tensors = [layer.weight] + [getattr(layer, "bias", None)]
        with torch.no_grad():
            for tensor in filter(lambda t: t is not None, tensors):
                mean = tensor[letters].mean(0) if letters else None
                for label, base in sources.items():
                    if base:
                        tensor[encoder.lab2ind[label]] = tensor[known[base]]
                    elif mean is not None:
                        tensor[encoder.lab2ind[label]] = mean
    return sources


# ---------------------------------------------------------------- initialisations
class InitCheckpoint(NamedTuple):
    """Where an initialisation's parameters are.

    Attributes
    ----------
    paramfile : str
        The file of the recoverable (e.g. ``.../CKPT+.../model.ckpt``).
    save_folder : str
        The Checkpointer folder it belongs to, where ``train.py`` also keeps
        ``label_encoder.txt``.
    """

    paramfile: str
    save_folder: str

    @property
    def label_encoder_file(self) -> str:
        """The ``label_encoder.txt`` that ``train.py`` saves beside it."""
        return os.path.join(self.save_folder, "label_encoder.txt")


def find_init_checkpoint(
    path: str, recoverable: str = "model", min_key: Optional[str] = "CER"
) -> InitCheckpoint:
    """Find the parameters of an initialisation.

    Arguments
    ---------
    path : str
        One of: the output folder of a ``train.py`` run (with ``save/``), a
        Checkpointer folder (with ``CKPT+*`` folders), one ``CKPT+*`` folder,
        or a parameter file.
    recoverable : str
        The name of the recoverable to load in a checkpoint.
    min_key : str, optional
        In a folder of checkpoints, take the one with the lowest value of
        this meta key (e.g. the validation CER); None: the most recent.

    Returns
    -------
    InitCheckpoint
        The parameter file and its Checkpointer folder.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist or holds no such checkpoint.

    Example
    -------
    >>> find_init_checkpoint("no/such/run")
    Traceback (most recent call last):
    ...
    FileNotFoundError: Initialisation checkpoint 'no/such/run' does not exist.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"Initialisation checkpoint '{path}' does not exist.")
    if os.path.isfile(path):
        folder = os.path.dirname(os.path.abspath(path))
        return InitCheckpoint(path, os.path.dirname(folder))
    paramfile = os.path.join(path, f"{recoverable}.ckpt")
    if os.path.isfile(paramfile):
        return InitCheckpoint(paramfile, os.path.dirname(os.path.abspath(path)))
    save_folder = os.path.join(path, "save")
    if not os.path.isdir(save_folder):
        save_folder = path
    checkpoint = Checkpointer(save_folder).find_checkpoint(
        min_key=min_key,
        ckpt_predicate=lambda ckpt: recoverable in ckpt.paramfiles,
    )
    if checkpoint is None:
        key = f" with a '{min_key}' value" if min_key else ""
        raise FileNotFoundError(
            f"No checkpoint of '{recoverable}'{key} in '{path}': give a train.py "
            "output folder, its save folder, a CKPT+ folder or a .ckpt file."
        )
    return InitCheckpoint(str(checkpoint.paramfiles[recoverable]), save_folder)


def load_init_parameters(
    model: torch.nn.Module, path: str, min_key: Optional[str] = "CER"
) -> InitCheckpoint:
    """Load an initialisation's parameters into ``model``.

    Arguments
    ---------
    model : torch.nn.Module
        The model, with the architecture of the checkpoint.
    path : str
        Where the initialisation is (see :func:`find_init_checkpoint`).
    min_key : str, optional
        In a folder of checkpoints, the meta key to minimise; None: latest.

    Returns
    -------
    InitCheckpoint
        The parameter file loaded and its Checkpointer folder.

    Raises
    ------
    FileNotFoundError
        If there is no such checkpoint.
    ValueError
        If the checkpoint does not fit ``model``.

    Example
    -------
    >>> import tempfile
    >>> folder = tempfile.mkdtemp()
    >>> torch.save(torch.nn.Linear(2, 3).state_dict(), f"{folder}/model.ckpt")
    >>> init = load_init_parameters(torch.nn.Linear(2, 3), folder)
    >>> os.path.basename(init.paramfile)
    'model.ckpt'
    >>> load_init_parameters(torch.nn.Linear(2, 4), folder)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: The checkpoint '...model.ckpt' does not fit the model ...
    """
    init = find_init_checkpoint(path, min_key=min_key)
    try:
        torch_recovery(model, init.paramfile, end_of_epoch=True)
    except RuntimeError as error:
        raise ValueError(
            f"The checkpoint '{init.paramfile}' does not fit the model (same "
            f"architecture and output_neurons?): {error}"
        ) from error
    return init


# ---------------------------------------------------------------- audio
def without_unusable_audio(dataset, signal_key: str = "sig"):
    """``dataset`` without the utterances whose audio cannot be trained on.

    Every utterance's signal is loaded once (adaptation sets are minutes of
    audio) and checked with :func:`speechbrain_meta.audio.audio_problem`;
    those that are empty, not finite or silent are left out with one warning.

    Arguments
    ---------
    dataset : speechbrain.dataio.dataset.DynamicItemDataset
        Utterances with an ``id`` and a ``signal_key`` item.
    signal_key : str
        The dynamic item holding the signal.

    Returns
    -------
    speechbrain.dataio.dataset.DynamicItemDataset
        The usable utterances (``dataset`` itself when all are).

    Example
    -------
    >>> from speechbrain.dataio.dataset import DynamicItemDataset
    >>> data = DynamicItemDataset(
    ...     {"a": {"sig": torch.ones(4)}, "b": {"sig": torch.zeros(4)}},
    ...     output_keys=["id", "sig"],
    ... )
    >>> [item["id"] for item in without_unusable_audio(data)]
    ['a']
    """
    problems = {}
    with dataset.output_keys_as(["id", signal_key]):
        for item in dataset:
            problem = audio_problem(item[signal_key])
            if problem is not None:
                problems[item["id"]] = problem
    if not problems:
        return dataset
    examples = ", ".join(f"{i} ({p})" for i, p in list(problems.items())[:5])
    logger.warning(
        f"{len(problems)} of {len(dataset)} utterances left out, their audio "
        f"cannot be trained on: {examples}"
    )
    return FilteredSortedDynamicItemDataset(
        dataset, [i for i in dataset.data_ids if i not in problems]
    )


# ---------------------------------------------------------------- fine-tuning
def _batches(dataset, seed: int, loader_kwargs: dict):
    """Endless shuffled batches of ``dataset``, a new order every pass."""
    sampler = ReproducibleRandomSampler(dataset, seed=seed)
    loader = make_dataloader(dataset, sampler=sampler, **loader_kwargs)
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def _train_steps(brain: sb.Brain, batches, steps: int, epoch: int, bar) -> float:
    """One TRAIN stage of ``steps`` optimizer steps; the mean training loss."""
    brain.on_stage_start(sb.Stage.TRAIN, epoch)
    brain.modules.train()
    brain.zero_grad()
    brain.step, brain.avg_train_loss = 0, 0.0
    for _ in range(steps):
        brain.step += 1
        loss = brain.fit_batch(next(batches))
        brain.avg_train_loss = brain.update_average(loss, brain.avg_train_loss)
        bar.update(1)
        bar.set_postfix(train_loss=f"{brain.avg_train_loss:.3g}")
    brain.on_stage_end(sb.Stage.TRAIN, brain.avg_train_loss, epoch)
    brain.step = 0
    return brain.avg_train_loss


def adaptation_curve(
    brain: sb.Brain,
    train_set,
    test_set,
    curve_steps: Sequence[int],
    train_loader_kwargs: Optional[dict] = None,
    test_loader_kwargs: Optional[dict] = None,
    seed: int = 1234,
    metrics: Optional[Callable[[sb.Brain], Dict[str, float]]] = None,
    progressbar: bool = True,
    on_point: Optional[Callable[[dict], None]] = None,
) -> List[dict]:
    """Fine-tune ``brain`` on ``train_set``, testing after each curve point.

    Training batches are drawn from ``train_set`` in a new order every pass
    (seeded); each is one call of the Brain's ``fit_batch`` (one optimizer
    step), between ``on_stage_start`` / ``on_stage_end`` calls of the TRAIN
    stage as in ``Brain.fit``. After ``curve_steps[k]`` steps in total the
    Brain's ``evaluate`` runs on ``test_set`` (no checkpoint is loaded), so
    the recipe's TEST stage writes its usual outputs; the last point's stay.
    If the Brain's hparams have an ``epoch_counter``, its ``current`` is set
    to the number of steps taken before each evaluation, so that recipes that
    log the loaded epoch log the step.

    Arguments
    ---------
    brain : speechbrain.core.Brain
        The Brain to fine-tune, holding the initialisation; its optimizer is
        created here.
    train_set : Dataset
        The adaptation data.
    test_set : Dataset
        The evaluation data.
    curve_steps : sequence of int
        Increasing step counts at which to evaluate (0: before any update).
    train_loader_kwargs, test_loader_kwargs : dict, optional
        Options of the two loaders (e.g. ``batch_size``).
    seed : int
        Seed of the order of the training batches.
    metrics : callable, optional
        Called with the Brain after each evaluation; its dict is added to
        the point (e.g. error rates of the recipe's metric trackers).
    progressbar : bool
        Whether to show a tqdm bar over the update steps.
    on_point : callable, optional
        Called with each point once it is scored, the Brain's weights being
        those of that point (e.g. to keep them).

    Returns
    -------
    list of dict
        One per curve point: ``step``, ``train_loss`` (mean over the steps
        since the previous point; NaN at step 0), ``test_loss`` and the
        entries of ``metrics``.

    Example
    -------
    >>> class Fit(sb.Brain):
    ...     def compute_forward(self, batch, stage):
    ...         return self.modules.lin(batch.x.data)
    ...     def compute_objectives(self, predictions, batch, stage):
    ...         return ((predictions - 2 * batch.x.data) ** 2).mean()
    >>> from speechbrain.dataio.dataset import DynamicItemDataset
    >>> data = DynamicItemDataset(
    ...     {str(i): {"x": torch.tensor([i / 8])} for i in range(8)},
    ...     output_keys=["id", "x"],
    ... )
    >>> brain = Fit(
    ...     {"lin": torch.nn.Linear(1, 1, bias=False)},
    ...     opt_class=lambda p: torch.optim.SGD(p, lr=0.5),
    ...     run_opts={"noprogressbar": True},
    ... )
    >>> curve = adaptation_curve(
    ...     brain, data, data, [0, 20], {"batch_size": 4}, {"batch_size": 8},
    ...     progressbar=False,
    ... )
    >>> [point["step"] for point in curve]
    [0, 20]
    >>> curve[1]["test_loss"] < curve[0]["test_loss"]
    True
    """
    steps = list(curve_steps)
    if not steps or steps != sorted(set(steps)) or steps[0] < 0:
        raise ValueError(
            f"curve_steps must be increasing, non-negative step counts; got {steps}."
        )
    test_loader_kwargs = test_loader_kwargs or {}
    batches = _batches(train_set, seed, train_loader_kwargs or {})
    counter = getattr(getattr(brain, "hparams", None), "epoch_counter", None)
    brain.on_fit_start()
    brain.nonfinite_count = 0  # what Brain.fit sets: check_loss_isfinite counts
    curve, taken = [], 0
    with tqdm(total=steps[-1], disable=not progressbar, dynamic_ncols=True) as bar:
        for point, target_step in enumerate(steps, start=1):
            train_loss = float("nan")
            if target_step > taken:
                todo = target_step - taken
                train_loss = _train_steps(brain, batches, todo, point, bar)
                taken = target_step
            if counter is not None:
                counter.current = target_step
            test_loss = brain.evaluate(
                test_set, progressbar=False, test_loader_kwargs=test_loader_kwargs
            )
            scores = metrics(brain) if metrics else {}
            curve.append(
                {
                    "step": target_step,
                    "train_loss": train_loss,
                    "test_loss": test_loss,
                    **scores,
                }
            )
            logger.info(
                "Adaptation step %d: %s",
                target_step,
                ", ".join(f"{k} {v:.4g}" for k, v in curve[-1].items() if k != "step"),
            )
            if on_point is not None:
                on_point(curve[-1])
    return curve
