"""A worker builds its pydantic validators before it forks jobs: the models are declared with
``defer_build`` (for the CLI's start-up), and a forked job that built them itself threw the work away at
exit, a tenth of a local install's time."""

from __future__ import annotations

import subprocess
import sys

CHECK = """
import gc, sys
from pydantic import BaseModel, TypeAdapter
from pydantic._internal._mock_val_ser import MockValSer
from modelbus.workers.__main__ import _preload
_preload(sys.argv[1].split(","))
def subclasses(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from subclasses(sub)
ours = [c for c in set(subclasses(BaseModel)) if c.__module__.startswith("modelbus.")]
unbuilt = sorted(c.__qualname__ for c in ours if isinstance(c.__pydantic_validator__, MockValSer))
adapters = [v for n, m in list(sys.modules.items()) if n.startswith("modelbus.") and m
            for v in vars(m).values() if isinstance(v, TypeAdapter)]
unbuilt += [repr(a) for a in adapters if isinstance(a.validator, MockValSer)]
print(len(ours), len(adapters), gc.get_freeze_count() > 0, unbuilt)
"""


def test_preload_builds_every_deferred_validator_before_the_fork() -> None:
    out = subprocess.run([sys.executable, "-c", CHECK, "install,download,hash"], capture_output=True,
                         text=True, timeout=120, check=True).stdout.split(maxsplit=3)
    models, adapters, frozen, unbuilt = int(out[0]), int(out[1]), out[2], out[3].strip()
    assert models > 50 and adapters >= 3  # the record configs, the events, their adapters
    assert frozen == "True"
    assert unbuilt == "[]"
