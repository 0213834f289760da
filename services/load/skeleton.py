"""Meta-model skeletons: build a model class's empty module tree once per config, then clone it.

Building a diffusers or transformers model on the meta device runs every ``__init__`` of hundreds
of modules (an SDXL UNet: 1,930 modules, 1,680 parameters), which costs more than streaming its
5 GB of weights to the GPU. The tree a (class, config) pair builds is always the same, so the first
build is kept as a skeleton and later loads get a clone of it:

- the clone has its own module objects, and its own ``_parameters``/``_buffers``/``_modules`` and
  hook dicts (and every other container attribute) one level deep: assigning weights to one clone,
  or setting an attention processor on it, never touches the skeleton or another clone;
- meta parameters are shared, the very Parameter objects (they hold no data and the assignment
  replaces each by a new Parameter; nothing writes to one before that); real parameters and buffers
  the build made on the CPU (non-persistent ones: position ids, masks) are copied per clone;
- immutable attributes (the frozen config, ints, strings, functions) are shared.

The skeleton's tree is flattened once into a plan (:class:`_Plan`); a clone is then a loop over
its list of modules with ``object.__new__`` and dict copies, no type tests and no recursion (the
half-width SD-1.5 UNet's 709 modules: 10 ms, the walk it replaced 31 ms; a build 240 ms).
A build and a clone run with the cyclic garbage collector paused (:func:`gc_paused`). Skeletons are kept per process, least recently used first out, with
a small bound (:data:`SKELETONS`); a class whose build is not repeatable cannot be keyed and is
built each time (the key is the class and the config's canonical JSON).
"""

from __future__ import annotations

import copy
import gc
import json
import os
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
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
        with gc_paused():
            return build()
    with _lock:
        kept = _skeletons.get(key)
        if kept is not None:
            _skeletons.move_to_end(key)
    with gc_paused():
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


_gc_lock = threading.Lock()
_gc_depth = 0
_gc_was_enabled = False


@contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic garbage collection inside: a build or a clone makes tens of thousands of objects
    that live on (the model), and the collections they trigger walk the whole heap (one full pass:
    0.44 s in a process with diffusers imported, about every other load of an SD-1.5 UNet). Nested
    and concurrent pauses are counted; the last one out restores what it found."""
    global _gc_depth, _gc_was_enabled
    with _gc_lock:
        if _gc_depth == 0:
            _gc_was_enabled = gc.isenabled()
            gc.disable()
        _gc_depth += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_depth -= 1
            if _gc_depth == 0 and _gc_was_enabled:
                gc.enable()


def state_keys(model: torch.nn.Module) -> frozenset[str] | None:
    """The ``state_dict`` keys of a skeleton's clone (known without walking it); None for other models."""
    return _keys.get(model)


def forget_skeletons() -> None:
    with _lock:
        _skeletons.clear()


def clone_module(module: torch.nn.Module) -> torch.nn.Module:
    """A structural copy of a meta-built module tree (see the module docstring for what is shared)."""
    plan = _plans.get(module)
    if plan is None:
        plan = _plans[module] = _Plan(module)
    return plan.clone()


@dataclass
class _Node:
    """What cloning one module does: its shared attributes as they are, its containers copied,
    its children, parameters and buffers by their place in the plan's lists."""

    cls: type
    shared: dict[str, Any]
    containers: list[tuple[str, Any]]
    deep: list[tuple[str, Any]]                      # containers holding modules: the general walk
    children: list[tuple[str, int]]                  # (name, node index; -1: None)
    params: list[tuple[str, int]]                    # (name, parameter index; -1: None)
    buffers: list[tuple[str, torch.Tensor | None]]
    module_attrs: list[tuple[str, int]]


class _Plan:
    """A skeleton's tree flattened once into nodes, so each clone is a loop over lists: no type
    tests, no recursion (an SD-1.5 UNet's 7,000 modules: about half the time of the walk)."""

    def __init__(self, root: torch.nn.Module) -> None:
        self.nodes: list[_Node] = []
        self.params: list[torch.nn.Parameter] = []
        self.sources: list[torch.nn.Module] = []
        index: dict[int, int] = {}
        param_index: dict[int, int] = {}

        def visit(m: torch.nn.Module) -> int:
            if id(m) in index:
                return index[id(m)]  # a submodule reachable twice stays one object
            i = index[id(m)] = len(self.nodes)
            node = _Node(type(m), {}, [], [], [], [], [], [])
            self.nodes.append(node)
            self.sources.append(m)
            for name, value in m.__dict__.items():
                if name == "_modules":
                    node.children = [(k, visit(c) if c is not None else -1) for k, c in value.items()]
                elif name == "_parameters":
                    for k, prm in value.items():
                        if prm is not None and id(prm) not in param_index:
                            param_index[id(prm)] = len(self.params)
                            self.params.append(prm)
                        node.params.append((k, param_index[id(prm)] if prm is not None else -1))
                elif name == "_buffers":
                    node.buffers = list(value.items())
                elif isinstance(value, torch.nn.Module):
                    node.module_attrs.append((name, visit(value)))
                elif isinstance(value, _CONTAINERS):
                    holds = value.values() if isinstance(value, dict) else value
                    if isinstance(value, (dict, list)) and any(isinstance(v, torch.nn.Module) for v in holds):
                        node.deep.append((name, value))
                    else:
                        node.containers.append((name, value))
                else:
                    node.shared[name] = value
            return i

        visit(root)

    def clone(self) -> torch.nn.Module:
        twins: list[torch.nn.Module] = [object.__new__(n.cls) for n in self.nodes]
        # meta parameters are the skeleton's own objects (the assignment replaces each by a new
        # Parameter holding the weights, ties kept by identity); real ones are copied
        params = [p if p.is_meta else _param(p, {}) for p in self.params]
        memo: dict[int, Any] | None = None
        copied: dict[int, Any] = {}  # real (CPU) buffers, copied once per clone
        for node, twin in zip(self.nodes, twins):
            state = node.shared.copy()
            for name, value in node.containers:
                kind = type(value)
                state[name] = kind(value) if kind in _PLAIN else copy.copy(value)  # keeps the type (defaultdict...)
            state["_modules"] = {k: twins[i] if i >= 0 else None for k, i in node.children}
            state["_parameters"] = {k: params[i] if i >= 0 else None for k, i in node.params}
            state["_buffers"] = {k: b if b is None else _tensor(b, copied) for k, b in node.buffers}
            for name, i in node.module_attrs:
                state[name] = twins[i]
            if node.deep:
                if memo is None:
                    memo = {id(src): t for src, t in zip(self.sources, twins)}
                for name, value in node.deep:
                    state[name] = _container(value, memo)
            object.__setattr__(twin, "__dict__", state)
        return twins[0]


_plans: weakref.WeakKeyDictionary[torch.nn.Module, _Plan] = weakref.WeakKeyDictionary()


def _clone(module: torch.nn.Module, memo: dict[int, Any]) -> torch.nn.Module:
    """A module reached from inside a container attribute: its own clone (or the one made already)."""
    done = memo.get(id(module))
    if done is not None:
        return done  # type: ignore[no-any-return]
    return clone_module(module)


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
