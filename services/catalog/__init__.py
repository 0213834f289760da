"""The shipped catalogue of starter models and bundles (``starters.yaml``): :mod:`.starters`."""

from modelbus.services.catalog.starters import (
    Bundle,
    Catalog,
    NoStarterGiven,
    Starter,
    StarterNotFound,
    load_catalog,
)

__all__ = ["Bundle", "Catalog", "NoStarterGiven", "Starter", "StarterNotFound", "load_catalog"]
