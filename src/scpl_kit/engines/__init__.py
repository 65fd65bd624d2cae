"""Engines: where units run and how batches flow between them. Importing registers them all."""

from __future__ import annotations

from typing import Any, Callable

from scpl_kit.engines.base import Engine
from scpl_kit.registry import Registry

EngineBuilder = Callable[..., Engine]
ENGINES: Registry[EngineBuilder] = Registry("engine")


def build_engine(name: str, **options: Any) -> Engine:
    return ENGINES.build(name, **options)


from scpl_kit.engines import async_sgd, data_parallel, gpipe, pipeline, sequential, threads  # noqa: E402,F401  (register each engine)

__all__ = ["ENGINES", "Engine", "build_engine"]
