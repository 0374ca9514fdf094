"""The field frame: where the head sits in the box the neural fields work in.

The head prior lives in metres (+Y up, face toward +Z, head centre at the
origin). Fields and cameras work in *field units*: the cube ``[-bound, bound]^3``
with the same axes, scaled so a head fills about 80% of the default camera's
view. The transform is one uniform scale and an offset, stored with every run
(:meth:`FieldFrame.to_dict`) so exports come back to metres exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class FieldFrame:
    """field = (metres - centre) * scale.

    scale: field units per metre (2.5 puts a 0.3 m head-and-neck within +-0.4).
    centre: (3,) the point in metres that maps to the field origin.
    bound: half-size of the field cube in field units.
    """

    scale: float = 2.5
    centre: tuple[float, float, float] = (0.0, 0.0, 0.0)
    bound: float = 1.0

    def to_field(self, metres: torch.Tensor) -> torch.Tensor:
        return (metres - metres.new_tensor(self.centre)) * self.scale

    def to_metres(self, field: torch.Tensor) -> torch.Tensor:
        return field / self.scale + field.new_tensor(self.centre)

    def to_unit(self, field: torch.Tensor) -> torch.Tensor:
        """Field units -> the [0, 1]^3 cube the hash grid reads."""
        return (field / self.bound + 1.0) * 0.5

    def to_dict(self) -> dict:
        return {"scale": self.scale, "centre": list(self.centre), "bound": self.bound}

    @classmethod
    def from_dict(cls, data: dict) -> FieldFrame:
        return cls(float(data["scale"]), tuple(float(c) for c in data["centre"]), float(data["bound"]))
