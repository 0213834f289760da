"""Starter models: the shipped catalogue, what of it is installed, and the install order with dependencies.

The catalogue is data (``starters.yaml`` beside this module), checked as it is loaded: every dependency
and bundle member names a starter, and dependencies have no cycle. A starter's source is a Hugging Face
repo (``owner/repo[:subfolder]``, installed as a repo) or one file of a repo (installed as the file's
``<endpoint>/<repo>/resolve/main/<path>`` URL, so ``MODELBUS_HF_ENDPOINT`` / ``HF_ENDPOINT`` decide the
host). A starter counts as installed when a record's ``source`` is that source.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from functools import cache
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from modelbus.events.errors import InvalidInput, NotFound
from modelbus.services.records import BaseModelType, ModelConfigBase, ModelType

CATALOG_FILE = Path(__file__).with_name("starters.yaml")


class StarterNotFound(NotFound):
    pass


class NoStarterGiven(InvalidInput):
    pass


class CatalogError(InvalidInput):
    """The catalogue file is not a valid catalogue."""


class RepoFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    repo: str = Field(pattern=r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
    path: str = Field(pattern=r"^[\w.\-]+(/[\w.\-]+)*$")


class Starter(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9.\-]*$")
    description: str
    source: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+(:[\w.\-/]+)?$")
    file: RepoFile | None = None
    variant: str | None = None
    type: ModelType
    base: BaseModelType
    size: int = Field(gt=0, description="approximate download size in bytes")
    gated: bool = False
    dependencies: tuple[str, ...] = ()

    @model_validator(mode="after")
    def _one_source(self) -> Starter:
        if (self.source is None) == (self.file is None):
            raise ValueError(f"starter {self.name!r}: give exactly one of source and file")
        return self

    def install_source(self, hf_endpoint: str) -> str:
        """What ``install`` is given for this starter."""
        if self.file is not None:
            return f"{hf_endpoint.rstrip('/')}/{self.file.repo}/resolve/main/{self.file.path}"
        assert self.source is not None
        return self.source

    def installed_by(self, record: ModelConfigBase) -> bool:
        """Whether ``record`` came from this starter, by its recorded source (an install from a repo
        records the repo's page, ``<endpoint>/<repo>``: a repo's subfolder is told by the record's path,
        whose folder is named ``<name>_<subfolder>``)."""
        source = record.source or ""
        if self.file is not None:
            return source.endswith(f"/{self.file.repo}/resolve/main/{self.file.path}")
        assert self.source is not None
        repo, _, sub = self.source.partition(":")
        if source != repo and not source.endswith(f"/{repo}"):
            return False
        folder = repo.split("/", 1)[1] + ("_" + sub.replace("/", "_") if sub else "")
        return Path(record.path).name == folder or (not sub and not _is_subfolder_path(record.path, folder))


def _is_subfolder_path(path: str, folder: str) -> bool:
    # a record of <repo>:<sub> lives in a folder named <name>_<sub>: not the whole repo's starter
    return Path(path).name.startswith(folder + "_")


class Bundle(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    description: str
    models: tuple[str, ...] = Field(min_length=1)


class Catalog(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    models: tuple[Starter, ...]
    bundles: tuple[Bundle, ...] = ()

    @model_validator(mode="after")
    def _references(self) -> Catalog:
        names = [s.name for s in self.models]
        if len(set(names)) != len(names):
            raise ValueError("a starter name is repeated")
        known = set(names)
        for s in self.models:
            missing = set(s.dependencies) - known
            if missing:
                raise ValueError(f"starter {s.name!r} depends on unknown {sorted(missing)}")
        for b in self.bundles:
            missing = set(b.models) - known
            if missing:
                raise ValueError(f"bundle {b.name!r} names unknown {sorted(missing)}")
        for s in self.models:
            self.with_dependencies([s.name])  # a cycle raises
        return self

    def starter(self, name: str) -> Starter:
        found = next((s for s in self.models if s.name == name), None)
        if found is None:
            raise StarterNotFound(f"no starter model {name!r} (see `modelbus starters`)")
        return found

    def bundle(self, name: str) -> Bundle:
        found = next((b for b in self.bundles if b.name == name), None)
        if found is None:
            known = ", ".join(b.name for b in self.bundles)
            raise StarterNotFound(f"no starter bundle {name!r} (bundles: {known})")
        return found

    def with_dependencies(self, names: Iterable[str]) -> list[Starter]:
        """The starters named and everything they depend on, each once, dependencies first."""
        out: list[Starter] = []
        done: set[str] = set()

        def visit(name: str, path: Sequence[str]) -> None:
            if name in path:
                raise ValueError("dependency cycle: " + " -> ".join([*path, name]))
            if name in done:
                return
            starter = self.starter(name)
            for dep in starter.dependencies:
                visit(dep, [*path, name])
            done.add(name)
            out.append(starter)
        for name in names:
            visit(name, [])
        return out


@cache
def _load(path: Path) -> Catalog:
    try:
        data: Any = yaml.safe_load(path.read_text())
        return Catalog.model_validate(data)
    except (OSError, yaml.YAMLError, ValidationError) as exc:
        raise CatalogError(f"starter catalogue {path}: {' '.join(str(exc).split())[:400]}") from None


def load_catalog(path: Path | None = None) -> Catalog:
    return _load(path or CATALOG_FILE)
