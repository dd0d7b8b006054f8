"""Checks that turn a misuse of the sharpness-aware optimizers into a message saying what to do.

Kept apart from the step itself: each function checks one thing and raises (or warns); the
optimizer core calls them at construction, around the closure, and when loading a state.
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from torch import Tensor
from torch.optim import Optimizer

__all__ = [
    "check_base_optimizer",
    "check_nonnegative",
    "check_options",
    "check_same_losses",
    "check_state_owner",
    "closure_backward_message",
    "closure_errors",
    "gradients_left_by_closure",
    "own_options",
    "unreached_error",
]

# Arguments of the wrappers that are not options a user sets by name.
_NOT_OPTIONS = {"self", "params", "base_optimizer", "ascent", "defaults"}


def check_base_optimizer(base_optimizer: Any, owner: str) -> None:
    """A torch.optim.Optimizer class (or a callable building one); one line otherwise."""
    if isinstance(base_optimizer, Optimizer):
        name = type(base_optimizer).__name__
        raise ValueError(
            f"base_optimizer must be an optimizer class, not an instance (got a {name} instance): "
            f"pass the class and its options, e.g. {owner}(model.parameters(), torch.optim.{name}, "
            "lr=0.1)"
        )
    if not callable(base_optimizer):
        raise ValueError(
            f"base_optimizer must be a torch.optim.Optimizer class, got a {type(base_optimizer).__name__}"
        )
    if isinstance(base_optimizer, type) and not issubclass(base_optimizer, Optimizer):
        raise ValueError(f"base_optimizer must subclass torch.optim.Optimizer, got {base_optimizer.__name__}")


def check_nonnegative(name: str, value: Any) -> float:
    """A finite number >= 0 (an option such as ``rho``, ``gamma`` or ``alpha``); ValueError naming it
    otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 <= value < math.inf):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def own_options(cls: type) -> list[str]:
    """The keyword options of a torchsage optimizer class, its parents' included."""
    names: list[str] = []
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None or klass is object or klass is Optimizer:
            continue
        for p in inspect.signature(init).parameters.values():
            if p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL) or p.name in _NOT_OPTIONS:
                continue
            if p.name not in names:
                names.append(p.name)
        if klass.__name__ == "SharpnessAware":
            break
    return names


def _base_options(base_optimizer: Callable[..., Optimizer]) -> list[str] | None:
    """The base optimizer's keyword options; None when it takes any (``**kwargs``) or is opaque."""
    try:
        signature = inspect.signature(base_optimizer)
    except (TypeError, ValueError):
        return None
    names = []
    for k, p in enumerate(signature.parameters.values()):
        if p.kind == p.VAR_KEYWORD:
            return None
        if k == 0 or p.kind == p.VAR_POSITIONAL:  # the parameters (param groups) argument
            continue
        names.append(p.name)
    return names


def check_options(cls: type, base_optimizer: Callable[..., Optimizer], base_kwargs: dict[str, Any]) -> None:
    """Every option is the wrapper's or the base optimizer's; a misspelt one is named with the
    closest valid options, instead of the base optimizer's "unexpected keyword argument"."""
    allowed = _base_options(base_optimizer)
    if allowed is None:
        return
    unknown = [k for k in base_kwargs if k not in allowed]
    if not unknown:
        return
    mine = own_options(cls)
    base_name = getattr(base_optimizer, "__name__", type(base_optimizer).__name__)
    key = unknown[0]
    close = difflib.get_close_matches(key, mine + allowed, n=2)
    hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
    raise TypeError(
        f"{cls.__name__} got an unknown option {key!r}: {hint}{cls.__name__}'s options are "
        f"{', '.join(mine)}; {base_name}'s are {', '.join(allowed)}"
    )


def check_state_dict(state_dict: Any) -> None:
    """An optimizer state_dict is a dict with ``state`` and ``param_groups``; anything else (a
    model's state dict, a whole checkpoint) is refused by name before any state changes."""
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"expected an optimizer state_dict (a dict), got a {type(state_dict).__name__}")
    missing = [k for k in ("state", "param_groups") if k not in state_dict]
    if missing:
        lacks = " and ".join(repr(k) for k in missing)
        shown = ", ".join(repr(k) for k in list(state_dict)[:5])
        raise ValueError(f"not an optimizer state_dict: it lacks {lacks} (its keys: {shown})")


def check_state_owner(saved: dict[str, Any], owner: str, base: str) -> None:
    """A state_dict saved by another torchsage optimizer class (or around another base optimizer)
    is refused: its moments and noise state would be misread, or silently dropped."""
    saved_owner = saved.get("optimizer")
    if saved_owner is not None and saved_owner != owner:
        raise ValueError(
            f"this state_dict was saved by {saved_owner}, not {owner}: load it into a {saved_owner} "
            f"(a state does not carry over between optimizer classes)"
        )
    saved_base = saved.get("base_optimizer")
    if saved_base is not None and saved_base != base:
        raise ValueError(
            f"this state_dict was saved by {owner} around {saved_base}, not {base}: build the "
            f"optimizer with base_optimizer={saved_base}"
        )


def gradients_left_by_closure(params: Sequence[Tensor]) -> bool:
    """True when the closure left gradients (the optimizer clears them before calling it)."""
    return any(p.grad is not None for p in params)


def closure_backward_message(owner: str) -> str:
    return (
        f"the closure called backward(): {owner}'s closure must only compute the forward pass and "
        "return the losses (no zero_grad(), no loss.backward()); the optimizer runs the backward "
        "passes itself, at the clean and at the perturbed weights"
    )


@contextlib.contextmanager
def closure_errors(owner: str) -> Iterator[None]:
    """Turns autograd's "backward through the graph a second time", which a closure that called
    backward itself causes, into the message saying what the closure must do."""
    try:
        yield
    except RuntimeError as error:
        if "donated buffers" in str(error):
            raise ValueError(
                f"{owner} differentiates each distribution's loss on its own, and the losses share one "
                "forward graph compiled by torch.compile, whose donated buffers allow one backward "
                "pass only: set torch._functorch.config.donated_buffer = False before compiling, or "
                "have the closure yield one loss at a time from its own forward pass (a generator)"
            ) from error
        if "second time" in str(error):
            raise ValueError(
                closure_backward_message(owner)
                + " (or the losses reuse a graph built outside the closure: run the forward pass "
                "inside it, on every call)"
            ) from error
        raise


def unreached_error(which: str) -> ValueError:
    return ValueError(
        f"{which} does not depend on any parameter of this optimizer: compute the losses from the "
        "model whose parameters the optimizer was built on"
    )


def check_same_losses(clean: Sequence[str], perturbed: Sequence[str]) -> None:
    """The closure returns the same distributions at the clean and the perturbed weights."""
    if list(clean) == list(perturbed):
        return
    if len(clean) != len(perturbed):
        what = f"{len(clean)} losses at the clean weights but {len(perturbed)} at the perturbed weights"
    else:
        what = f"losses named {list(clean)} at the clean weights but {list(perturbed)} at the perturbed ones"
    raise ValueError(
        f"the closure returned {what}: it must return the same distributions on every call of a step "
        "(same number, same names, same order)"
    )
