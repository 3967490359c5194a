"""Reading source checkpoints and mapping their tensors strictly.

Formats: a safetensors file, a folder with `model.safetensors` or a sharded
`model.safetensors.index.json`, and torch pickles (`pytorch_model.bin`,
torch-hub `.pth`), the latter through torch with weights_only=True so a
checkpoint can never run code. torch is imported only for those formats.
"""

from __future__ import annotations

import json
import os
import re
from typing import Iterable

import numpy as np


class ConversionError(ValueError):
    """A source checkpoint does not match the target architecture."""


def _torch_to_numpy(state: dict) -> dict[str, np.ndarray]:
    import torch  # only for .bin / .pth sources

    out = {}
    for name, tensor in state.items():
        if isinstance(tensor, torch.Tensor):
            if tensor.dtype == torch.bfloat16:
                tensor = tensor.float()
            out[name] = tensor.detach().cpu().numpy()
    return out


def _torch_state(path: str, *, mmap: bool = False) -> dict:
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    # torch-hub and Lightning files sometimes nest the weights.
    for key in ("model", "state_dict", "teacher"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    return state


def _load_torch_file(path: str) -> dict[str, np.ndarray]:
    return _torch_to_numpy(_torch_state(path))


def file_shapes(path: str) -> dict[str, np.ndarray]:
    """A checkpoint file's tensor names and shapes, without reading its data.

    Each value is a zero-byte stand-in (a broadcast scalar) with the tensor's shape:
    enough for code that infers a config from shapes. safetensors: the header only;
    torch files: memory-mapped (the zip format that torch has written since 1.6).
    """
    path = os.fspath(path)
    if _file_format(path) == "safetensors":
        from safetensors import safe_open

        with safe_open(path, framework="numpy") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    else:
        import torch

        shapes = {k: tuple(v.shape) for k, v in _torch_state(path, mmap=True).items()
                  if isinstance(v, torch.Tensor)}
    return {k: np.broadcast_to(np.float32(0), shape) for k, shape in shapes.items()}


def _load_safetensors(path: str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    try:
        return load_file(path)
    except Exception as err:  # bf16 tensors cannot be read by numpy directly
        if "bfloat16" not in str(err).lower() and "bf16" not in str(err).lower():
            raise ConversionError(f"{path}: cannot read safetensors file: {err}") from err
        from safetensors import safe_open
        import ml_dtypes

        out = {}
        with safe_open(path, framework="flax") as f:
            for k in f.keys():
                out[k] = np.asarray(f.get_tensor(k)).astype(np.float32)
        del ml_dtypes
        return out


def load_tensors(path: str) -> dict[str, np.ndarray]:
    """All tensors of a checkpoint file or folder as numpy arrays, by source name."""
    path = os.fspath(path)
    if os.path.isdir(path):
        index = os.path.join(path, "model.safetensors.index.json")
        single = os.path.join(path, "model.safetensors")
        bin_file = os.path.join(path, "pytorch_model.bin")
        if os.path.exists(index):
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            tensors: dict[str, np.ndarray] = {}
            for shard in shards:
                tensors.update(_load_safetensors(os.path.join(path, shard)))
            return tensors
        if os.path.exists(single):
            return _load_safetensors(single)
        if os.path.exists(bin_file):
            return _load_torch_file(bin_file)
        raise ConversionError(
            f"{path}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin found")
    if _file_format(path) == "safetensors":
        return _load_safetensors(path)
    return _load_torch_file(path)


def _file_format(path: str) -> str:
    """"safetensors" or "torch" for a checkpoint file, by its name; errors name the path."""
    if not os.path.isfile(path):
        raise ConversionError(f"{path}: no such checkpoint file or folder")
    if path.endswith(".safetensors"):
        return "safetensors"
    if path.endswith((".bin", ".pth", ".pt")):
        return "torch"
    raise ConversionError(f"{path}: unknown checkpoint format (want .safetensors, .bin, .pth or a folder)")


class StrictTensors:
    """Hands out source tensors by name and checks that all were consumed.

    `take(name, shape)` returns the tensor and marks it used; a wrong shape or a
    missing name is recorded, not raised, so `finish()` can report every problem
    in one error. `ignore(pattern)` marks tensors that are dropped on purpose.
    """

    def __init__(self, tensors: dict[str, np.ndarray], source: str = "checkpoint"):
        self.tensors = tensors
        self.source = source
        self.used: set[str] = set()
        self.missing: list[str] = []
        self.bad_shapes: list[str] = []

    def has(self, name: str) -> bool:
        return name in self.tensors

    def take(self, name: str, shape: Iterable[int] | None = None) -> np.ndarray | None:
        if name not in self.tensors:
            self.missing.append(name)
            return None
        value = self.tensors[name]
        self.used.add(name)
        if shape is not None and tuple(value.shape) != tuple(shape):
            self.bad_shapes.append(f"{name}: {tuple(value.shape)} != expected {tuple(shape)}")
        return value

    def ignore(self, pattern: str) -> None:
        """Mark every tensor whose name fully matches the regex as deliberately unused."""
        rx = re.compile(pattern)
        self.used.update(k for k in self.tensors if rx.fullmatch(k))

    def finish(self) -> None:
        unexpected = sorted(set(self.tensors) - self.used)
        problems = []
        if self.missing:
            problems.append("missing tensors: " + ", ".join(self.missing))
        if self.bad_shapes:
            problems.append("wrong shapes: " + "; ".join(self.bad_shapes))
        if unexpected:
            problems.append("unexpected tensors: " + ", ".join(unexpected))
        if problems:
            raise ConversionError(f"{self.source}: " + " | ".join(problems))
