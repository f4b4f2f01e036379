"""What stops the process decides its exit code (systemd acts on it) and its log line."""

from __future__ import annotations

import asyncio
import logging

import pytest

from rnr_gateway.cli import EXIT_CONFIG, EXIT_FAILURE, EXIT_OK, EXIT_UNAVAILABLE, exit_code
from rnr_gateway.errors import ConfigError, DependencyUnavailable, TopologyMismatch


def test_a_failed_task_s_error_decides_the_exit_code_through_its_exception_group(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR)
    down = DependencyUnavailable("postgresql", "postgresql://db", "refused")
    nested = BaseExceptionGroup(
        "tasks", [asyncio.CancelledError(), ExceptionGroup("inner", [down])]
    )
    assert exit_code(nested) == EXIT_UNAVAILABLE
    assert caplog.records[-1].getMessage() == str(down)
    assert exit_code(ConfigError("HTTP_PORT: not a number")) == EXIT_CONFIG
    assert (
        exit_code(ExceptionGroup("g", [TopologyMismatch("q", "v", "ttl differs")])) == EXIT_CONFIG
    )
    assert exit_code(BaseExceptionGroup("g", [KeyboardInterrupt()])) == EXIT_OK


def test_an_unexpected_crash_is_one_line_naming_it_with_its_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR)
    try:
        raise ZeroDivisionError("division by zero")
    except ZeroDivisionError as exc:
        crash = ExceptionGroup("tasks", [exc])
    assert exit_code(crash) == EXIT_FAILURE
    record = caplog.records[-1]
    assert (
        record.getMessage() == "stopped by an unexpected error: ZeroDivisionError: division by zero"
    )
    assert record.exc_info is not None
