"""Seeding gives bit-identical CPU runs; RNG state survives a checkpoint."""

from __future__ import annotations

import random

import numpy as np
import torch

from avatar.seeding import rng_state, seed_everything, set_rng_state


def _tiny_training(seed: int) -> torch.Tensor:
    seed_everything(seed)
    net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(20):
        x = torch.randn(64, 8)
        loss = (net(x) - x.sum(1, keepdim=True) * np.random.rand() * random.random()).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return torch.cat([p.detach().flatten() for p in net.parameters()])


def test_same_seed_bit_identical():
    a, b = _tiny_training(3), _tiny_training(3)
    assert torch.equal(a, b)
    assert not torch.equal(a, _tiny_training(4))


def test_rng_state_round_trip_through_checkpoint(tmp_path):
    seed_everything(11)
    torch.randn(5)
    saved = rng_state()
    torch.save(saved, tmp_path / "rng.pt")
    expected = (torch.randn(3), np.random.rand(3), random.random())
    seed_everything(99)
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (torch.randn(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], got[0]) and np.array_equal(expected[1], got[1]) and expected[2] == got[2]



def test_resume_on_a_machine_with_fewer_gpus_restores_only_the_devices_it_has(monkeypatch):
    """A checkpoint written with 4 GPUs, resumed on 1: device 0's CUDA state is restored and
    nothing indexes past ``device_count()`` (which raises on a real machine)."""
    import torch.cuda.random as cuda_random

    saved = rng_state()  # the CPU generators, taken before CUDA is faked
    saved["cuda"] = [torch.full((16,), i, dtype=torch.uint8) for i in range(4)]
    devices, restored = 1, []

    def fake_set_state(state, device="cuda"):
        index = device if isinstance(device, int) else (torch.device(device).index or 0)
        if index >= devices:
            raise RuntimeError(f"invalid device ordinal {index}: device_count() is {devices}")
        restored.append((index, int(state[0])))

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: devices)
    monkeypatch.setattr(torch.cuda, "set_rng_state", fake_set_state)
    monkeypatch.setattr(cuda_random, "set_rng_state", fake_set_state)
    monkeypatch.setattr(cuda_random, "device_count", lambda: devices)
    set_rng_state(saved)
    assert restored == [(0, 0)]
