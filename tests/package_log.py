"""The warnings sae-vllm logs, captured for a test (its logger sits under vLLM's, which does not
propagate to the root logger pytest's caplog reads)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from sae_vllm import LOGGER_NAME


@contextmanager
def package_warnings() -> Iterator[list[str]]:
    """The messages the package logs at WARNING while the context is open."""
    messages: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: messages.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger(LOGGER_NAME)
    logger.addHandler(handler)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)
