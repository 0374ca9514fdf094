"""Seeding and RNG state for reproducible runs.

On the CPU, a fixed seed and a fixed thread count give bit-identical runs:
:func:`seed_everything` seeds Python, NumPy and torch and asks torch for
deterministic algorithms; :func:`rng_state` / :func:`set_rng_state` carry every
generator through a checkpoint so a resumed run continues the same sequence.

Every random draw that takes an explicit ``torch.Generator`` goes through :func:`draw`:
PyTorch only draws with a generator on that generator's own device ("Expected a 'cuda'
device type for generator"), so the draw happens there and the result then moves to
where it is used. A run's generators live on the CPU, which also makes the sequence
the same whatever device the run trains on. ``tests/test_random_draws.py`` checks that
no other code in the package passes a generator to a random function.
"""

from __future__ import annotations

import random
from typing import Any


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Seed ``random``, NumPy and torch (CPU and CUDA) with ``seed``."""
    import numpy as np
    import torch

    if not 0 <= seed < 2**32:
        raise ValueError(f"seed must be in [0, 2**32), got {seed}")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
    if deterministic:
        # warn_only: a GPU op without a deterministic kernel warns instead of failing a run.
        torch.use_deterministic_algorithms(True, warn_only=True)
        if torch.backends.cudnn.is_available():
            torch.backends.cudnn.benchmark = False


def draw(fn: Any, *args: Any, generator: Any = None, device: Any = None, **kwargs: Any) -> Any:
    """``fn(*args, generator=generator, **kwargs)`` drawn on the generator's device, then moved.

    fn: a torch sampling function (``torch.rand``, ``randn``, ``randint``, ``randperm``,
    ``multinomial``, ...). Tensor arguments (``multinomial``'s probabilities) move to the
    generator's device first; functions without tensor arguments get ``device=`` the
    generator's device. device: where the result is wanted (default: where it was drawn).
    Without a generator the draw uses ``device``'s default generator directly.
    """
    import torch

    where = generator.device if generator is not None else device
    if generator is not None:
        kwargs["generator"] = generator
    if any(isinstance(a, torch.Tensor) for a in args):
        out = fn(*(a.to(where) if isinstance(a, torch.Tensor) and where is not None else a for a in args), **kwargs)
    else:
        out = fn(*args, device=where, **kwargs)
    return out if device is None else out.to(device, non_blocking=True)


def rng_state() -> dict[str, Any]:
    """Every global generator's state, in a form ``torch.save(weights_only)`` accepts."""
    import numpy as np
    import torch

    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": _python_state_to_tensor(random.getstate()),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    import numpy as np
    import torch

    random.setstate(_python_state_from_tensor(state["python"]))
    ns = state["numpy"]
    np.random.set_state(("MT19937", ns["keys"].numpy().astype(np.uint32), ns["pos"], ns["has_gauss"], ns["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        # A checkpoint from a machine with more GPUs carries more states than this one has
        # devices: restore those that exist (one device trains a run; the others are unused).
        saved = list(state["cuda"])
        for index in range(min(len(saved), torch.cuda.device_count())):
            torch.cuda.set_rng_state(saved[index], index)


def _python_state_to_tensor(st: tuple) -> Any:
    import torch

    version, internal, gauss = st
    return {"version": version, "internal": torch.tensor(internal, dtype=torch.int64),
            "gauss": gauss}


def _python_state_from_tensor(d: dict[str, Any]) -> tuple:
    return (d["version"], tuple(int(x) for x in d["internal"].tolist()), d["gauss"])


def generator(seed: int, device: str = "cpu") -> Any:
    """A torch.Generator seeded with ``seed`` on ``device``, for code that takes one."""
    import torch

    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g
