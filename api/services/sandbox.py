"""Sandbox processes: where the API has user files read, so that a hostile file can crash only its sandbox.

The API process never parses an upload. It hands the work (a JSON request naming files on local
disk) to one of a few long-lived child processes. Each is a fresh interpreter (`python -m MODULE`,
never a fork of the server and its connections) with a minimal environment (no database or broker
URL, no cloud credentials) at a lower CPU priority, and before it takes a request it limits itself:

- RLIMIT_AS: its address space may grow by `memory_bytes` beyond what its imports mapped;
- RLIMIT_CPU: each request gets `cpu_s` seconds of CPU (the kernel stops it with SIGXCPU);
- RLIMIT_CORE 0: a crash leaves no core file with user data in it.

The parent also kills a child whose request takes longer than `wall_s` (one that ignores SIGXCPU,
sleeps or waits). Requests and answers are single JSON lines on pipes, never pickles (a child that
ran a hostile pickle must not get to run code in the server), and the child's own stdout goes to
its stderr, so nothing the file's code prints can pass for an answer.

A child that died, ran out of memory, timed out or failed unexpectedly is replaced by a new one
for the next request, and every child after `max_tasks` requests. Waiting for a child is an
asyncio wait: requests queued here hold no thread and no database connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import resource
import shutil
import signal
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

# A preflight report of a large model is a few hundred kB; anything near this is not an answer.
MAX_ANSWER_BYTES = 64 << 20
START_TIMEOUT_S = 120.0
# Passed on to the child when set: what Python, the libraries and user classes (allowed pickles) need.
_PASSED_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "PYTHONPATH", "VIRTUAL_ENV", "HF_HOME",
               "TORCH_HOME", "XDG_CACHE_HOME")
# The package root this module runs from: the child imports the same code as its parent.
_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Limits:
    memory_bytes: int
    cpu_s: int
    wall_s: float


class Failure(StrEnum):
    """Why a request got no answer."""

    TIMEOUT = "timeout"  # past the wall-clock or the CPU limit
    OUT_OF_MEMORY = "out_of_memory"  # past the address-space limit, and the child noticed
    CRASHED = "crashed"  # the child died, or answered something that is not an answer
    UNAVAILABLE = "unavailable"  # no child could be started
    INTERNAL = "internal"  # an unexpected exception in the child (named by the message)


class SandboxError(Exception):
    def __init__(self, failure: Failure, message: str) -> None:
        super().__init__(f"{failure}: {message}")
        self.failure, self.message = failure, message


class Busy(Exception):
    """More requests are uploading or waiting for a sandbox than the pool admits."""


class _Child:
    def __init__(self, process: asyncio.subprocess.Process, scratch: Path) -> None:
        self.process, self.scratch = process, scratch
        self.tasks = 0

    async def ask(self, request: dict[str, Any], wall_s: float) -> dict[str, Any]:
        stdin, stdout = self.process.stdin, self.process.stdout
        assert stdin is not None and stdout is not None
        try:
            stdin.write(json.dumps(request).encode() + b"\n")
            await stdin.drain()
            line = await asyncio.wait_for(stdout.readline(), wall_s)
        except TimeoutError as exc:
            raise SandboxError(Failure.TIMEOUT, f"no answer within {wall_s:g} s") from exc
        except (ConnectionError, ValueError) as exc:  # a closed pipe, or a line past MAX_ANSWER_BYTES
            raise SandboxError(Failure.CRASHED, f"the pipe broke ({exc.__class__.__name__})") from exc
        if not line:
            raise _death(await self.process.wait())
        try:
            answer = json.loads(line)
        except ValueError as exc:
            raise SandboxError(Failure.CRASHED, "it answered something other than JSON") from exc
        if not isinstance(answer, dict):
            raise SandboxError(Failure.CRASHED, "it answered something other than a JSON object")
        if isinstance(answer.get("failure"), dict):  # the child caught it: out_of_memory or internal
            failure = answer["failure"]
            known = failure.get("code") in (Failure.OUT_OF_MEMORY, Failure.INTERNAL)
            raise SandboxError(Failure(failure["code"]) if known else Failure.CRASHED, str(failure.get("message")))
        return answer


def _death(returncode: int) -> SandboxError:
    if returncode == -signal.SIGXCPU:
        return SandboxError(Failure.TIMEOUT, "it used up its CPU time")
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        hint = ", possibly out of memory" if returncode == -signal.SIGKILL else ""
        return SandboxError(Failure.CRASHED, f"it was killed by {name}{hint}")
    return SandboxError(Failure.CRASHED, f"it exited with status {returncode}")


class SandboxPool:
    """`size` children running `python -m module` (whose main calls `serve`), started by `start` or on first use.

    Create and use it inside one running event loop (the app's lifespan); `close()` ends the children."""

    def __init__(self, module: str, size: int, limits: Limits, max_pending: int, scratch_root: Path,
                 max_tasks: int = 200) -> None:
        self.module, self.limits, self.max_pending, self.max_tasks = module, limits, max_pending, max_tasks
        self.size, self.scratch_root = size, scratch_root
        self._slots = asyncio.Semaphore(size)
        self._idle: list[_Child] = []
        self._warming: list[asyncio.Task[None]] = []
        self._pending = 0
        self._closed = False

    def start(self) -> None:
        """Start every child now, in the background, so that the first uploads need not wait for a
        child's imports (a request waits for a starting child rather than starting another)."""
        self._warming = [asyncio.create_task(self._warm()) for _ in range(self.size)]

    async def _warm(self) -> None:
        async with self._slots:
            with contextlib.suppress(SandboxError):  # the first request will try again, and say why
                self._idle.append(await self._spawn())

    @contextlib.contextmanager
    def admit(self) -> Iterator[None]:
        """Hold one of the `max_pending` places for a request (from its upload to its answer); `Busy`
        when none is free, so a burst cannot fill the disk with uploads waiting for a sandbox."""
        if self._pending >= self.max_pending:
            raise Busy(f"{self._pending} uploads are being received or checked")
        self._pending += 1
        try:
            yield
        finally:
            self._pending -= 1

    async def run(self, request: dict[str, Any]) -> dict[str, Any]:
        """The child's answer to `request` (a JSON object); `SandboxError` when there is none."""
        async with self._slots:
            child = self._idle_child() or await self._spawn()
            healthy = False
            try:
                answer = await child.ask(request, self.limits.wall_s)
                healthy = True
                return answer
            finally:
                child.tasks += 1
                if healthy and child.tasks < self.max_tasks and not self._closed:
                    self._idle.append(child)
                else:
                    await _retire(child)

    def _idle_child(self) -> _Child | None:
        """A waiting child that is still alive (one may have died idle, e.g. at the OOM killer's hand)."""
        while self._idle:
            child = self._idle.pop()
            if child.process.returncode is None:
                return child
            shutil.rmtree(child.scratch, ignore_errors=True)
        return None

    async def close(self) -> None:
        self._closed = True
        for task in self._warming:
            task.cancel()
        await asyncio.gather(*self._warming, return_exceptions=True)
        idle, self._idle = self._idle, []
        for child in idle:
            await _retire(child)

    async def _spawn(self) -> _Child:
        self.scratch_root.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix="sandbox-", dir=self.scratch_root))
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", self.module, json.dumps(dataclasses.asdict(self.limits)),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, cwd=scratch, env=_environment(scratch),
            limit=MAX_ANSWER_BYTES, start_new_session=True)
        child = _Child(process, scratch)
        assert process.stdout is not None
        try:
            line = await asyncio.wait_for(process.stdout.readline(), START_TIMEOUT_S)
            ready = json.loads(line or b"{}").get("ready") is True
        except (TimeoutError, ValueError):
            ready = False
        except BaseException:  # cancelled while starting: the child must not outlive its pool
            await _retire(child)
            raise
        if not ready:
            await _retire(child)
            raise SandboxError(Failure.UNAVAILABLE, "the sandbox process did not start")
        return child


async def _retire(child: _Child) -> None:
    if child.process.returncode is None:
        child.process.kill()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(child.process.wait(), 10)
    shutil.rmtree(child.scratch, ignore_errors=True)


def _environment(scratch: Path) -> dict[str, str]:
    env = {name: os.environ[name] for name in _PASSED_ENV if name in os.environ}
    return env | {
        "PYTHONPATH": os.pathsep.join([str(_ROOT), *filter(None, [env.get("PYTHONPATH")])]),
        "TMPDIR": str(scratch), "PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1",
        # one thread each: the pool's size is the parallelism, and every thread reserves address space
        "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "2",
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
    }


# ---- the child's side ----------------------------------------------------------------------------


def serve(handle: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    """Limit this process (the limits are the JSON in argv[1]), then answer each request line on stdin
    with `handle`'s answer on the original stdout, until stdin closes (the parent died or closed it)."""
    limits = Limits(**json.loads(sys.argv[1]))
    answers = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    os.nice(10)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    _limit_address_space(limits.memory_bytes)

    def send(answer: dict[str, Any]) -> None:
        answers.write(json.dumps(answer).encode() + b"\n")
        answers.flush()

    send({"ready": True})
    while line := sys.stdin.buffer.readline():
        _limit_cpu(limits.cpu_s)
        try:
            answer = handle(json.loads(line))
        except MemoryError:
            answer = {"failure": {"code": Failure.OUT_OF_MEMORY, "message": "MemoryError"}}
        except Exception as exc:  # the parent replaces a child after an unexpected failure
            traceback.print_exc()
            # torch's allocator reports an exhausted address space as a RuntimeError
            failure = Failure.OUT_OF_MEMORY if "can't allocate memory" in str(exc) else Failure.INTERNAL
            answer = {"failure": {"code": failure, "message": exc.__class__.__name__}}
        send(answer)


def _vm_size() -> int:
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def _limit_address_space(memory_bytes: int) -> None:
    """What the imports mapped, plus `memory_bytes`; the hard limit too, so the file's code cannot lift it."""
    limit = _vm_size() + memory_bytes
    _soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _limit_cpu(cpu_s: int) -> None:
    """`cpu_s` more seconds of CPU from now (RLIMIT_CPU counts the process's whole life)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    soft = int(usage.ru_utime + usage.ru_stime) + cpu_s + 1
    _soft, hard = resource.getrlimit(resource.RLIMIT_CPU)
    resource.setrlimit(resource.RLIMIT_CPU, (soft if hard == resource.RLIM_INFINITY else min(soft, hard), hard))
