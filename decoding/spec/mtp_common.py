"""Shared by the head layouts (mtp_parallel.py, mtp_sequential.py, the Medusa layouts in
heads.py and heads_io.py): read only the tensors a layout needs from a checkpoint folder,
and hand them out by name and shape so that every missing, unexpected or mis-shaped tensor
is reported at once, naming the file; or read a whole heads weight file and assign it to a
module, refusing tensors that do not fit.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
from torch import nn


def safetensors_files(folder: Path) -> list[Path]:
    """The shards of a safetensors checkpoint (the index's, else every *.safetensors)."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / n for n in names]
    return sorted(folder.glob("*.safetensors"))


def read_matching(files: list[Path], keep: Callable[[str], bool]) -> dict[str, torch.Tensor]:
    """Tensors whose name satisfies `keep`, from .safetensors or .pth/.pt files. Only those
    are materialised: the heads live next to the whole trunk in these checkpoints."""
    out: dict[str, torch.Tensor] = {}
    for path in files:
        if not path.exists():
            raise ValueError(f"{path}: weight file is missing")
        try:
            if path.suffix == ".safetensors":
                from safetensors import safe_open

                with safe_open(str(path), framework="pt") as f:
                    for key in f.keys():
                        if keep(key):
                            out[key] = f.get_tensor(key)
            else:
                raw = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
                out.update({k: v.clone() for k, v in raw.items() if keep(k)})
        except ValueError:
            raise
        except Exception as exc:  # corrupt or foreign file: name it
            raise ValueError(f"{path}: cannot read weights ({exc})") from None
    return out


class TensorTaker:
    """Hands out tensors by name and expected shape, collecting problems; `finish()`
    raises one ValueError naming `where` and every missing, mis-shaped or unexpected one."""

    def __init__(self, tensors: dict[str, torch.Tensor], where: str | Path,
                 display: Callable[[str], str] = lambda name: name) -> None:
        self.remaining = dict(tensors)
        self.where = str(where)
        self.display = display  # our name -> the file's name, for the messages
        self.problems: list[str] = []

    def __call__(self, name: str, shape: tuple[int, ...]) -> torch.Tensor | None:
        t = self.remaining.pop(name, None)
        if t is None:
            self.problems.append(f"missing tensor {self.display(name)} "
                                 f"(expected shape {list(shape)})")
            return None
        if tuple(t.shape) != tuple(shape):
            self.problems.append(f"tensor {self.display(name)} has shape {list(t.shape)}, "
                                 f"expected {list(shape)}")
            return None
        return t

    def optional(self, name: str, shape: tuple[int, ...]) -> torch.Tensor | None:
        """Like calling the taker, but absence is not a problem."""
        return self(name, shape) if name in self.remaining else None

    def finish(self) -> None:
        self.problems += [f"unexpected tensor {self.display(k)}" for k in sorted(self.remaining)]
        if self.problems:
            shown = "; ".join(self.problems[:8])
            more = f" (and {len(self.problems) - 8} more)" if len(self.problems) > 8 else ""
            raise ValueError(f"{self.where}: heads do not fit the model: {shown}{more}")


def check_field(path: Path, raw: dict, field: str, expected: object, what: str,
                required: bool = True) -> None:
    """A config field must equal the base model's value (ValueError naming both)."""
    if field not in raw:
        if required:
            raise ValueError(f"{path}: required field {field!r} is missing")
        return
    if raw[field] != expected:
        raise ValueError(f"{path}: {field} is {raw[field]!r}, but the base model's {what} "
                         f"is {expected!r}")


@torch.no_grad()
def put(param: torch.Tensor, value: torch.Tensor | None) -> None:
    if value is not None:
        param.copy_(value.to(param.dtype))


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a heads weight file (.safetensors, else a torch pickle of tensors)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(str(path), map_location="cpu", weights_only=True)


def assign_state(module: nn.Module, tensors: dict[str, torch.Tensor], where: Path) -> None:
    """Load `tensors` into `module`, or one ValueError naming `where` and what does not fit."""
    own = module.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    bad = [f"{k} has shape {list(tensors[k].shape)}, expected {list(own[k].shape)}"
           for k in own if k in tensors and tensors[k].shape != own[k].shape]
    if missing or unexpected or bad:
        parts = ([f"missing {missing[:4]}"] if missing else []) + \
                ([f"unexpected {unexpected[:4]}"] if unexpected else []) + bad[:4]
        raise ValueError(f"{where}: heads do not fit: {'; '.join(parts)}")
    module.load_state_dict(tensors)
