"""Random sequences of pool operations (Hypothesis stateful testing).

Each step runs one operation (exec echo, soft error, crash, stop request,
reset, add_worker, remove_worker), or a few of them at once, alongside a few
concurrent echo jobs, on a pool of real ``commands.php`` workers. After every
step:

- every call was answered exactly once, with the outcome its body asks for;
- once the step settles, the pool is back at its expected size, every worker
  ready and idle, nothing queued, no error raised in a loop callback.

At teardown the pool is destroyed and no PHP process it ever ran is left.

Each example runs on its own uvloop loop, created in ``__init__``, driven
with ``run_until_complete`` per step and closed in ``teardown``. One test
case is generated per ``pipeline_depth`` in ``PIPELINE_DEPTHS``; the expected
outcomes do not depend on the depth (a job pipelined behind a crash never
reached PHP, so the pool runs it again).
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Awaitable, Coroutine
from typing import Any, TypeVar

import psutil
import pytest
import uvloop
from conftest import php
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from shardpool import (
    Payload,
    Pool,
    ShardpoolError,
    SoftJobError,
    WorkerCrashedError,
    WorkerStoppedError,
    pool_config,
)

T = TypeVar("T")

PIPELINE_DEPTHS: list[int | str] = [1, 4, "auto"]
NUM_WORKERS = 2
MAX_WORKERS = 4
STEP_TIMEOUT = 15.0  # one operation and its concurrent jobs
SETTLE_TIMEOUT = 5.0  # the pool back at its size after a step

# Shrinking a failure replays many sequences, each bounded by the timeouts
# above: give it room beyond the project's 120 s per test.
pytestmark = pytest.mark.timeout(900)

SETTINGS = settings(
    max_examples=10,
    stateful_step_count=10,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

texts = st.text(st.characters(exclude_categories=["Cs"]), max_size=24)
background = st.lists(texts, max_size=4)  # echo jobs running alongside an operation
OPERATIONS = ["soft_error", "crash", "stop_request", "reset", "add_worker", "remove_worker"]


together = st.lists(st.sampled_from(OPERATIONS), min_size=2, max_size=4)


class PoolMachine(RuleBasedStateMachine):
    pipeline_depth: int | str = 1

    def __init__(self) -> None:
        super().__init__()
        self.loop = uvloop.new_event_loop()
        self.loop_errors: list[dict[str, Any]] = []
        self.loop.set_exception_handler(lambda _loop, context: self.loop_errors.append(context))
        self.target = NUM_WORKERS
        self.answers: collections.Counter[int] = collections.Counter()
        self.calls = 0
        self.seen_pids: set[int] = set()
        self.pool = Pool(
            pool_config(
                command=php("commands.php"),
                num_workers=NUM_WORKERS,
                pipeline_depth=self.pipeline_depth,
                allocate_timeout="10s",
                destroy_timeout="5s",
                reset_timeout="5s",
            )
        )
        self.run(self.pool.start())
        self._note_pids()

    # -- driving the loop -----------------------------------------------------

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = STEP_TIMEOUT) -> T:
        async def bounded() -> T:
            async with asyncio.timeout(timeout):
                return await coro

        return self.loop.run_until_complete(bounded())

    def _note_pids(self) -> None:
        self.seen_pids |= {info.pid for info in self.pool.workers()}

    # -- calls and their expected outcomes -------------------------------------

    async def call(self, body: bytes) -> Payload | ShardpoolError:
        """One exec; its answer is counted against a fresh call id."""
        ident = self.calls
        self.calls += 1
        try:
            outcome: Payload | ShardpoolError = await self.pool.exec(body)
        except ShardpoolError as exc:
            outcome = exc
        self.answers[ident] += 1
        return outcome

    async def echoes(self, words: list[str]) -> None:
        outcomes = await asyncio.gather(*(self.call(b"echo:" + w.encode()) for w in words))
        for word, outcome in zip(words, outcomes, strict=True):
            assert isinstance(outcome, Payload), f"echo {word!r} got {outcome!r}"
            assert outcome.body == word.encode()

    def alongside(self, operation: Awaitable[None], words: list[str]) -> None:
        """Run ``operation`` and echo jobs for ``words`` concurrently."""

        async def both() -> None:
            await asyncio.gather(operation, self.echoes(words))

        self.run(both())

    async def expect(self, body: bytes, kind: type[ShardpoolError], text: str) -> None:
        outcome = await self.call(body)
        assert isinstance(outcome, kind), f"{body!r} got {outcome!r}"
        assert text in str(outcome), f"{text!r} not in {outcome}"

    # -- operations -------------------------------------------------------------
    # Each checks its own outcome. The model (self.target) changes before the
    # first await, exactly when the pool's does, so operations may overlap.

    async def soft_error_op(self, text: str) -> None:
        outcome = await self.call(b"error:" + text.encode())
        assert isinstance(outcome, SoftJobError), outcome
        assert str(outcome) == text

    async def crash_op(self, code: int) -> None:
        await self.expect(b"crash:%d" % code, WorkerCrashedError, f"exited with status {code}")

    async def stop_request_op(self) -> None:
        # commands.php asks to be replaced on every "stop": each replacement
        # refuses the retried job too, until the pool gives up.
        await self.expect(b"stop", WorkerStoppedError, "refused")

    async def reset_op(self) -> None:
        before = {info.pid for info in self.pool.workers()}
        await self.pool.reset()
        # Workers another operation is already retiring may still be stopping
        # (the settle check sees them go); none from before may still serve.
        serving = {i.pid for i in self.pool.workers() if i.state in ("ready", "working")}
        assert not before & serving

    async def add_worker_op(self) -> None:
        if self.target >= MAX_WORKERS:
            return
        self.target += 1
        await self.pool.add_worker()

    async def remove_worker_op(self) -> None:
        if self.target > 1:
            self.target -= 1
            await self.pool.remove_worker()
            return
        try:
            await self.pool.remove_worker()
        except ShardpoolError as exc:
            assert "last worker" in str(exc)
        else:
            raise AssertionError("remove_worker removed the last worker")

    # -- rules ------------------------------------------------------------------

    @rule(words=st.lists(texts, min_size=1, max_size=8))
    def exec_echo(self, words: list[str]) -> None:
        self.run(self.echoes(words))

    @rule(text=texts, words=background)
    def soft_error(self, text: str, words: list[str]) -> None:
        self.alongside(self.soft_error_op(text), words)

    @rule(code=st.integers(1, 9), words=background)
    def crash(self, code: int, words: list[str]) -> None:
        self.alongside(self.crash_op(code), words)

    @rule(words=background)
    def stop_request(self, words: list[str]) -> None:
        self.alongside(self.stop_request_op(), words)

    @rule(words=background)
    def reset(self, words: list[str]) -> None:
        self.alongside(self.reset_op(), words)

    @precondition(lambda self: self.target < MAX_WORKERS)
    @rule(words=background)
    def add_worker(self, words: list[str]) -> None:
        self.alongside(self.add_worker_op(), words)

    @rule(words=background)
    def remove_worker(self, words: list[str]) -> None:
        self.alongside(self.remove_worker_op(), words)

    @rule(ops=together, code=st.integers(1, 9), words=background)
    def operations_together(self, ops: list[str], code: int, words: list[str]) -> None:
        made = {
            "soft_error": lambda: self.soft_error_op(f"error {code}"),
            "crash": lambda: self.crash_op(code),
            "stop_request": self.stop_request_op,
            "reset": self.reset_op,
            "add_worker": self.add_worker_op,
            "remove_worker": self.remove_worker_op,
        }

        async def together() -> None:
            await asyncio.gather(*(made[op]() for op in ops))

        self.alongside(together(), words)

    # -- after every step -----------------------------------------------------

    @invariant()
    def every_call_answered_exactly_once(self) -> None:
        assert len(self.answers) == self.calls
        assert set(self.answers.values()) <= {1}

    @invariant()
    def pool_settles_at_its_expected_size(self) -> None:
        pool = self.pool

        def settled() -> bool:
            infos = pool.workers()
            return pool.size == len(infos) == self.target and all(
                i.state == "ready" and i.in_flight == 0 for i in infos
            )

        async def wait() -> None:
            # The pool signals each worker spawned or gone on its change event.
            while not settled():
                assert pool._changed is not None
                await pool._changed.wait()

        self.run(wait(), SETTLE_TIMEOUT)
        assert pool.queue_size == 0
        self._note_pids()

    @invariant()
    def no_error_in_loop_callbacks(self) -> None:
        assert self.loop_errors == []

    def teardown(self) -> None:
        try:
            if not self.loop.is_closed():
                self.run(self.pool.destroy())
                self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        finally:
            self.loop.close()
        left = []
        for pid in self.seen_pids:
            try:
                proc = psutil.Process(pid)
                if proc.status() != psutil.STATUS_ZOMBIE:
                    left.append(proc)
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(left, timeout=3)
        for proc in alive:
            proc.kill()
        assert not alive, f"PHP workers outlived the pool: {[p.pid for p in alive]}"


def machine_for(depth: int | str) -> type[PoolMachine]:
    return type(f"PoolMachineDepth{depth}", (PoolMachine,), {"pipeline_depth": depth})


def machine_test_case(depth: int | str) -> Any:
    case = machine_for(depth).TestCase
    case.settings = SETTINGS
    return case


globals().update({f"TestPoolStateMachineDepth{d}": machine_test_case(d) for d in PIPELINE_DEPTHS})
