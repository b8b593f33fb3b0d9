"""Inner learning rates that are meta-learnt (Meta-SGD, MAML++ LSLR).

A fixed ``inner_lr`` is fragile (on the demo model, 0.3 kept MAML on CTC's
all-blank plateau and 0.2 made adaptation worse). :class:`InnerRates` holds
one learnt rate per fast-weight tensor (``tensor``: Meta-SGD with a scalar per
tensor), per element (``element``: Meta-SGD, Li et al. 2017) or per tensor
and inner step (``layer_step``: MAML++'s LSLR, Antoniou et al. 2019). The
rates are positive by construction (``exp`` of a learnt log-rate, which starts
at ``log(inner_lr)``), learnt by the outer optimizer with their own learning
rate, checkpointed with the run, and used by validation, test and
``adapt.py --optimizer learnt``.

Example
-------
>>> shapes = {"ctc_lin.w.weight": torch.Size([3, 2]), "ctc_lin.w.bias": (3,)}
>>> rates = InnerRates(shapes, initial=0.05, mode="layer_step", steps=2)
>>> rates.rate("ctc_lin.w.bias", step=1)
tensor(0.0500, grad_fn=<ExpBackward0>)
>>> last = rates.rate("ctc_lin.w.bias", step=1)
>>> bool(rates.rate("ctc_lin.w.bias", step=5) == last)  # past the learnt steps
True
>>> {k: round(v, 4) for k, v in rates.summary().items()}
{'inner_lr_min': 0.05, 'inner_lr_mean': 0.05, 'inner_lr_max': 0.05}
"""

import math
from typing import Dict, Iterable, Sequence

import torch
from speechbrain.utils.checkpoints import (
    mark_as_loader,
    mark_as_saver,
    register_checkpoint_hooks,
)

from speechbrain_meta.errors import SetupError

__all__ = ["INNER_RATE_MODES", "InnerRates", "LearntRateSGD"]

INNER_RATE_MODES = ("tensor", "element", "layer_step")


@register_checkpoint_hooks
class InnerRates(torch.nn.Module):
    """Learnt positive inner learning rates for the named fast weights.

    Arguments
    ---------
    shapes : dict
        Fast-weight name -> shape.
    initial : float
        The rate every entry starts at (the YAML ``inner_lr``).
    mode : str
        ``tensor``, ``element`` or ``layer_step`` (see the module docstring).
    steps : int
        The number of inner steps (``layer_step`` has a rate for each; a
        later step uses the last one).
    """

    def __init__(
        self,
        shapes: Dict[str, Sequence[int]],
        initial: float,
        mode: str,
        steps: int = 1,
    ):
        super().__init__()
        if mode not in INNER_RATE_MODES:
            raise SetupError(
                f"learn_inner_lr must be one of {INNER_RATE_MODES} or null, "
                f"got {mode!r}."
            )
        if not initial > 0:
            raise SetupError(f"The initial inner rate must be > 0, got {initial}.")
        self.names = list(shapes)
        self.mode = mode
        self.steps = int(steps) if mode == "layer_step" else 1
        self._index = {name: i for i, name in enumerate(self.names)}
        self.log_rates = torch.nn.ParameterList()
        for name in self.names:
            size = (self.steps, *(shapes[name] if mode == "element" else ()))
            self.log_rates.append(torch.full(size, math.log(initial)))

    def rate(self, name: str, step: int) -> torch.Tensor:
        """The rate of a fast weight at an inner step (0-based).

        Arguments
        ---------
        name : str
            The fast weight.
        step : int
            The inner step; past the learnt ones, the last one's.

        Returns
        -------
        torch.Tensor
            A scalar, or the weight's shape with ``mode: element``.
        """
        log_rate = self.log_rates[self._index[name]]
        return log_rate[min(step, log_rate.shape[0] - 1)].exp()

    def summary(self) -> Dict[str, float]:
        """The smallest, mean and largest rate, for the training log."""
        with torch.no_grad():
            rates = torch.cat([r.exp().flatten() for r in self.log_rates])
        return {
            "inner_lr_min": rates.min().item(),
            "inner_lr_mean": rates.mean().item(),
            "inner_lr_max": rates.max().item(),
        }

    def fixed(self, name: str, step: int, shape: torch.Size) -> torch.Tensor:
        """:meth:`rate` without gradient, fitted to a weight that grew rows.

        A weight whose rows were extended after meta-training (new characters
        in the output layer) takes, with ``mode: element``, the mean of the
        learnt rows' rates for its new rows.

        Arguments
        ---------
        name : str
            The weight.
        step : int
            The step.
        shape : torch.Size
            The weight's shape now.

        Returns
        -------
        torch.Tensor
            A scalar or a tensor of ``shape``.
        """
        rate = self.rate(name, step).detach()
        if rate.dim() == 0 or rate.shape == shape:
            return rate
        if rate.shape[1:] != shape[1:] or rate.shape[0] > shape[0]:
            raise SetupError(
                f"The learnt rates of {name} have the shape {tuple(rate.shape)}, "
                f"the weight {tuple(shape)}."
            )
        extra = rate.mean(0, keepdim=True).expand(shape[0] - rate.shape[0], *shape[1:])
        return torch.cat([rate, extra])

    def state(self) -> dict:
        """What the checkpoint holds: the names, the mode and the log-rates."""
        return {
            "names": self.names,
            "mode": self.mode,
            "steps": self.steps,
            "log_rates": [r.detach().cpu() for r in self.log_rates],
        }

    @mark_as_saver
    def save(self, path: str) -> None:
        """Write the rates and what they belong to."""
        torch.save(self.state(), path)

    @mark_as_loader
    def load(self, path: str, end_of_epoch: bool = False) -> None:
        """Read the rates saved by :meth:`save` for the same fast weights."""
        del end_of_epoch
        state = torch.load(path, map_location="cpu")
        if (state["names"], state["mode"], state["steps"]) != (
            self.names,
            self.mode,
            self.steps,
        ):
            raise SetupError(
                f"The learnt inner rates in {path} are for other fast weights "
                f"or another learn_inner_lr ({state['mode']}, {state['steps']} "
                f"steps); this run has {self.mode}, {self.steps} steps."
            )
        with torch.no_grad():
            for rate, saved in zip(self.log_rates, state["log_rates"]):
                rate.copy_(saved)

    @classmethod
    def from_file(cls, path: str) -> "InnerRates":
        """The rates saved in a checkpoint's ``inner_rates.ckpt``.

        Arguments
        ---------
        path : str
            The file.

        Returns
        -------
        InnerRates
            With the names, mode and values saved.
        """
        state = torch.load(path, map_location="cpu")
        shapes = {
            name: tuple(rate.shape[1:])
            for name, rate in zip(state["names"], state["log_rates"])
        }
        rates = cls(shapes, 1.0, state["mode"], state["steps"])
        with torch.no_grad():
            for rate, saved in zip(rates.log_rates, state["log_rates"]):
                rate.copy_(saved)
        return rates


class LearntRateSGD(torch.optim.Optimizer):
    """SGD with meta-learnt rates: test-time adaptation as in the inner loop.

    Step ``t`` (0-based) moves each weight by ``- rate(name, t) * grad``, the
    update the inner loop meta-learnt; past the learnt steps, the last
    step's rates. Weights that have no learnt rate are refused (frozen ones,
    which do not require a gradient, aside).

    Arguments
    ---------
    params : iterable of torch.Tensor
        The weights to adapt.
    names : dict
        ``id(weight)`` -> its name in the rates.
    rates : InnerRates
        The learnt rates.

    Example
    -------
    >>> layer = torch.nn.Linear(2, 1)
    >>> rates = InnerRates({"w": (1, 2), "b": (1,)}, initial=0.5, mode="tensor")
    >>> names = {id(layer.weight): "w", id(layer.bias): "b"}
    >>> optimizer = LearntRateSGD(layer.parameters(), names, rates)
    >>> layer.bias.grad, layer.weight.grad = torch.ones(1), torch.zeros(1, 2)
    >>> before = layer.bias.item()
    >>> optimizer.step()
    >>> round(before - layer.bias.item(), 4)
    0.5
    """

    def __init__(
        self, params: Iterable[torch.Tensor], names: Dict[int, str], rates: InnerRates
    ):
        super().__init__(params, {})
        missing = [
            p.shape
            for group in self.param_groups
            for p in group["params"]
            if p.requires_grad and names.get(id(p)) not in rates.names
        ]
        if missing:
            raise SetupError(
                f"{len(missing)} adapted weights have no learnt rate: adapt the "
                "fast weights of meta-training only (their names: "
                f"{', '.join(rates.names[:3])}, ...)."
            )
        self.names, self.rates, self.steps_taken = names, rates, 0

    @torch.no_grad()
    def step(self, closure=None):
        """Take one step (``closure`` is not supported)."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.requires_grad and p.grad is not None:
                    name = self.names[id(p)]
                    rate = self.rates.fixed(name, self.steps_taken, p.shape)
                    p.sub_(rate.to(p.device) * p.grad)
        self.steps_taken += 1
