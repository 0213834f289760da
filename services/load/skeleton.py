"""Meta-model skeletons: build a model class's empty module tree once per config, then clone it.

Building a diffusers or transformers model on the meta device runs every ``__init__`` of hundreds
of modules (an SDXL UNet: 1,930 modules, 1,680 parameters), which costs more than streaming its
5 GB of weights to the GPU. The tree a (class, config) pair builds is always the same, so the first
build is kept as a skeleton and later loads get a clone of it:

- the clone has its own module objects, and its own ``_parameters``/``_buffers``/``_modules`` and
  hook dicts (and every other container attribute) one level deep: assigning weights to one clone,
  or setting an attention processor on it, never touches the skeleton or another clone;
- meta parameters are shared (they hold no data and are replaced by the assignment); real buffers
  the build made on the CPU (non-persistent ones: position ids, masks) are copied per clone;
- immutable attributes (the frozen config, ints, strings, functions) are shared.

Cloning walks the tree once with ``object.__new__`` and dict copies: about a tenth of a build,
a fifth of ``copy.deepcopy``. Skeletons are kept per process, least recently used first out, with
a small bound (:data:`SKELETONS`); a class whose build is not repeatable cannot be keyed and is
built each time (the key is the class and the config's canonical JSON).
"""

from __future__ import annotations

import copy
import json
import os
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch

SKELETONS = int(os.environ.get("MODELBUS_SKELETON_CACHE", "16"))

_lock = threading.Lock()
_skeletons: OrderedDict[tuple[str, str], torch.nn.Module] = OrderedDict()
_keys: weakref.WeakKeyDictionary[torch.nn.Module, frozenset[str]] = weakref.WeakKeyDictionary()
_CONTAINERS = (dict, list, set)
_PLAIN = frozenset({dict, OrderedDict, list, set})


def config_key(cls: type, config: Any) -> tuple[str, str] | None:
    """The cache key of a (class, config); None when the config has no canonical JSON form."""
    try:
        text = json.dumps(_plain(config), sort_keys=True, default=_refuse)
    except (TypeError, ValueError):
        return None
    return f"{cls.__module__}.{cls.__qualname__}", text


def _plain(config: Any) -> Any:
    to_dict = getattr(config, "to_dict", None)  # transformers' PretrainedConfig
    return to_dict() if callable(to_dict) else config


def _refuse(value: Any) -> Any:
    raise TypeError(f"not JSON: {type(value).__name__}")


def skeleton_model(cls: type, config: Any, build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """A fresh meta-device model of ``cls`` with ``config``: a clone of the kept skeleton, or
    ``build()`` (whose result becomes the skeleton) the first time."""
    key = config_key(cls, config) if SKELETONS > 0 else None
    if key is None:
        return build()
    with _lock:
        kept = _skeletons.get(key)
        if kept is not None:
            _skeletons.move_to_end(key)
    if kept is None:
        kept = build()
        kept.eval()  # clones start in inference mode: no walk over the tree per load
        kept.requires_grad_(False)
        _keys[kept] = frozenset(kept.state_dict().keys())
        with _lock:
            _skeletons[key] = kept
            while len(_skeletons) > SKELETONS:
                _skeletons.popitem(last=False)
    twin = clone_module(kept)
    _keys[twin] = _keys[kept]
    return twin


def state_keys(model: torch.nn.Module) -> frozenset[str] | None:
    """The ``state_dict`` keys of a skeleton's clone (known without walking it); None for other models."""
    return _keys.get(model)


def forget_skeletons() -> None:
    with _lock:
        _skeletons.clear()


def clone_module(module: torch.nn.Module) -> torch.nn.Module:
    """A structural copy of a meta-built module tree (see the module docstring for what is shared)."""
    memo: dict[int, Any] = {}
    return _clone(module, memo)


def _clone(module: torch.nn.Module, memo: dict[int, Any]) -> torch.nn.Module:
    done = memo.get(id(module))
    if done is not None:
        return done  # type: ignore[no-any-return]  # a submodule reachable twice stays one object
    twin = object.__new__(type(module))
    memo[id(module)] = twin
    state = {}
    for name, value in module.__dict__.items():
        if name == "_modules":
            value = {k: (_clone(m, memo) if m is not None else None) for k, m in value.items()}
        elif name == "_parameters":
            value = {k: _param(p, memo) for k, p in value.items()}
        elif name == "_buffers":
            value = {k: (_tensor(b, memo) if b is not None else None) for k, b in value.items()}
        elif isinstance(value, torch.nn.Module):
            value = _clone(value, memo)
        elif isinstance(value, _CONTAINERS):
            value = _container(value, memo)
        state[name] = value
    twin.__dict__.update(state)
    return twin


def _container(value: Any, memo: dict[int, Any]) -> Any:
    """A one-level copy of a dict/list/set attribute; modules inside it are the clone's own."""
    kind = type(value)
    # the plain kinds by their constructor (copy.copy goes through __reduce_ex__: 15 us each)
    out = kind(value) if kind in _PLAIN else copy.copy(value)  # keeps the type (defaultdict...)
    if isinstance(out, dict):
        for k, v in out.items():
            if isinstance(v, torch.nn.Module):
                out[k] = _clone(v, memo)
    elif isinstance(out, list):
        for i, v in enumerate(out):
            if isinstance(v, torch.nn.Module):
                out[i] = _clone(v, memo)
    return out


def _param(p: torch.nn.Parameter | None, memo: dict[int, Any]) -> torch.nn.Parameter | None:
    if p is None:
        return None
    done = memo.get(id(p))
    if done is None:
        # a Parameter of its own (a tied weight stays tied inside the clone), sharing the meta tensor
        data = p.data if p.is_meta else p.detach().clone()
        done = torch.nn.Parameter(data, requires_grad=p.requires_grad)
        memo[id(p)] = done
    return done  # type: ignore[no-any-return]


def _tensor(t: torch.Tensor, memo: dict[int, Any]) -> torch.Tensor:
    done = memo.get(id(t))
    if done is None:
        done = t if t.is_meta else t.clone()
        memo[id(t)] = done
    return done  # type: ignore[no-any-return]
