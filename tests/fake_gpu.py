"""A stand-in GPU for CPU-only machines, to test that sampling keeps its tensors on the right devices.

`FakeGPU` tensors hold CPU data but report the "meta" device; `FakeGPUMode` runs every op on the data
and enforces what CUDA would: an op may not mix a fake-GPU tensor with a CPU tensor (0-dim CPU tensors
excepted, as CUDA allows), a CPU tensor may not be indexed by a GPU index, a CPU generator may not draw
a GPU tensor, and a GPU tensor has no numpy view. `.to(device)` / `.cpu()` move data across. It patches
`torch.tensor` and `torch.is_autocast_enabled` for the "meta" device, so use it in its own process
(`tests/test_fake_gpu.py` runs it in a subprocess).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

GPU = torch.device("meta")
aten = torch.ops.aten
_MOVES = {aten.copy_.default, aten.detach.default, aten.alias.default, aten.lift_fresh.default}


class DeviceMismatch(RuntimeError):
    pass


class FakeGPU(torch.Tensor):
    @staticmethod
    def __new__(cls, data: torch.Tensor) -> FakeGPU:
        data = data.data if isinstance(data, FakeGPU) else data
        out = torch.Tensor._make_wrapper_subclass(
            cls,
            data.size(),
            strides=data.stride(),
            storage_offset=data.storage_offset(),
            dtype=data.dtype,
            device=GPU,
            requires_grad=data.requires_grad,
        )
        out.data_ = data
        return out

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN206
        raise RuntimeError(f"{func} on a fake GPU tensor outside FakeGPUMode")

    def tolist(self) -> Any:  # CUDA tensors copy to the host for this
        return self.data_.tolist()

    def __array__(self, *args: Any, **kwargs: Any) -> Any:
        raise DeviceMismatch("a GPU tensor has no numpy view: call .cpu() first")

    numpy = __array__


def _data(x: Any) -> Any:
    return x.data_ if isinstance(x, FakeGPU) else x


def _on_gpu(device: Any) -> bool:
    return device is not None and torch.device(device).type == "meta"


class FakeGPUMode(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        leaves, _ = tree_flatten((args, kwargs))
        tensors = [t for t in leaves if isinstance(t, torch.Tensor)]
        gpu = [t for t in tensors if isinstance(t, FakeGPU)]
        cpu = [t for t in tensors if not isinstance(t, FakeGPU) and t.dim() > 0]
        # `.to()` reaches the mode as `_to_copy`, or as `to` itself under inference mode
        move = func.overloadpacket in (aten.to, aten._to_copy)
        if func is aten.to.other:
            to_gpu = isinstance(args[1], FakeGPU)
        elif move:
            device = kwargs.get("device", next((a for a in args[1:] if isinstance(a, torch.device)), None))
            to_gpu = _on_gpu(device) if device is not None else bool(gpu)
        else:
            to_gpu = bool(gpu) or _on_gpu(kwargs.get("device"))
        if to_gpu and any(isinstance(g, torch.Generator) and g.device.type == "cpu" for g in leaves):
            raise DeviceMismatch(f"{func}: a CPU generator drawing a GPU tensor")
        if func in (aten.index.Tensor, aten.index_put_.default, aten._index_put_impl_.default):
            if not isinstance(args[0], FakeGPU) and any(isinstance(i, FakeGPU) for i in args[1] if i is not None):
                raise DeviceMismatch(f"{func}: a CPU tensor indexed with a GPU index")
        elif not move and func not in _MOVES and gpu and cpu:
            shapes = [tuple(t.shape) for t in gpu], [tuple(t.shape) for t in cpu]
            raise DeviceMismatch(f"{func}: GPU {shapes[0]} with CPU {shapes[1]}")
        if func is aten.copy_.default:  # the destination keeps its device
            _data(args[0]).copy_(_data(args[1]))
            return args[0]
        cpu_args = tree_map(lambda x: torch.device("cpu") if isinstance(x, torch.device) else _data(x), args)
        cpu_kwargs = tree_map(lambda x: torch.device("cpu") if isinstance(x, torch.device) else _data(x), kwargs)
        out = func(*cpu_args, **cpu_kwargs)
        inputs = {id(_data(t)): t for t in tensors}

        def wrap(o: Any) -> Any:
            if not isinstance(o, torch.Tensor) or func is aten._local_scalar_dense.default:
                return o
            if id(o) in inputs and not move:  # in place: the same tensor back
                return inputs[id(o)]
            if not to_gpu:
                return o
            with torch.inference_mode(False):
                return FakeGPU(o)

        return tree_map(wrap, out)


def to_fake_gpu(module: torch.nn.Module) -> torch.nn.Module:
    """Put a module's parameters and buffers on the fake GPU (call inside FakeGPUMode)."""
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    return module._apply(lambda t: FakeGPU(t))


_tensor, _autocast_enabled = torch.tensor, torch.is_autocast_enabled


def _fake_tensor(data: Any, *args: Any, device: Any = None, **kwargs: Any) -> torch.Tensor:
    out = _tensor(data, *args, **kwargs)
    return out.to(GPU) if _on_gpu(device) else out.to(device) if device is not None else out


def _fake_autocast_enabled(*args: Any) -> bool:
    return False if args and args[0] == "meta" else _autocast_enabled(*args)


torch.tensor = _fake_tensor
torch.is_autocast_enabled = _fake_autocast_enabled
