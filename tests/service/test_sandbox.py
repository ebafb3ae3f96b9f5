"""The sandbox pool against a child that misbehaves: every wrong answer is a SandboxError, the child
is replaced, a healthy one is reused, and nothing is left in the scratch directory."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from api.services.sandbox import Failure, Limits, SandboxError, SandboxPool


def test_a_child_that_answers_wrong_dies_or_hangs_is_replaced(tmp_path: Path) -> None:
    async def scenario() -> None:
        pool = SandboxPool("tests.service.sandbox_child", 1, Limits(memory_bytes=256 << 20, cpu_s=5, wall_s=2),
                           max_pending=4, scratch_root=tmp_path)
        try:
            first = (await pool.run({"do": "pid"}))["pid"]
            assert (await pool.run({"do": "pid"}))["pid"] == first, "a healthy child is reused"
            for do, failure in (("garbage", Failure.CRASHED), ("list", Failure.CRASHED),
                                ("bad-failure", Failure.CRASHED), ("exit", Failure.CRASHED),
                                ("sleep", Failure.TIMEOUT)):
                with pytest.raises(SandboxError) as info:
                    await pool.run({"do": do})
                assert info.value.failure == failure, (do, info.value)
                pid = (await pool.run({"do": "pid"}))["pid"]
                assert pid != first, f"the child is replaced after {do}"
                first = pid
        finally:
            await pool.close()

    asyncio.run(scenario())
    assert list(tmp_path.iterdir()) == [], "every child's scratch directory is removed"
