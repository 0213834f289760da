"""RQ's registry housekeeping lines (every few seconds per worker) stay out of the log; its other lines
stay in."""

from __future__ import annotations

import logging

import pytest

from modelbus.events.logs import configure_logging, reset_logging


def test_rq_housekeeping_lines_are_dropped_and_the_rest_kept(capfd: pytest.CaptureFixture[str]) -> None:
    configure_logging("json", "INFO")
    try:
        rq = logging.getLogger("rq.worker")
        rq.info("Worker %s: cleaning group registries", "w-1")
        rq.info("Worker %s: cleaning registries for queue: %s", "w-1", "install")
        rq.info("Worker %s: started with PID %d", "w-1", 42)
        rq.warning("Worker %s: cleaning failed", "w-1")
    finally:
        reset_logging()
    out = capfd.readouterr()
    text = out.out + out.err
    assert "started with PID 42" in text and "cleaning failed" in text
    assert "cleaning group registries" not in text and "cleaning registries" not in text
