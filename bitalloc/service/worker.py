"""Workers: where jobs are taken from. ``execute`` is the RQ entry point (scaled out,
``bitalloc worker``); ``LocalWorkers`` are threads inside the API process (the embedded default).
Either way an ``Executor`` runs the job under a lease (``service.attempt``), and the
``Reaper`` settles jobs whose worker died.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Callable

from bitalloc.service.context import Context
from bitalloc.service.executor import Executor
from bitalloc.service.queue import LocalQueue
from bitalloc.service.reaper import Reaper
from bitalloc.service.settings import get_settings

log = logging.getLogger("bitalloc.worker")


class LocalWorkers:
    """The embedded default's workers: threads that claim queued jobs from the database."""

    POLL_SECONDS = 2.0

    def __init__(self, ctx: Context, threads: int) -> None:
        if not isinstance(ctx.queue, LocalQueue):
            raise ValueError("local workers need the embedded queue (no redis_url)")
        self.ctx, self.wakeup = ctx, ctx.queue.wakeup
        self.stopping = threading.Event()
        self._threads = [threading.Thread(target=self._loop, name=f"bitalloc-worker-{i}", daemon=True)
                         for i in range(threads)]

    def _loop(self) -> None:
        executor = Executor(self.ctx, self.stopping)
        while not self.stopping.is_set():
            try:
                if executor.run_next() is not None:
                    continue
            except Exception:
                log.exception("embedded worker failed to run a job")
            self.wakeup.wait(self.POLL_SECONDS)
            self.wakeup.clear()

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop taking jobs; a running job stops at its next progress report and is requeued."""
        self.stopping.set()
        self.wakeup.set()
        for thread in self._threads:
            thread.join(timeout=timeout)


_contexts: dict[int, Context] = {}


def _forget_parent_connections() -> None:
    """A forked child must not use (or close) its parent's pooled connections."""
    for ctx in _contexts.values():
        ctx.engine.dispose(close=False)


os.register_at_fork(after_in_child=_forget_parent_connections)


def process_context() -> Context:
    """This process's context: a forked RQ work horse builds its own (connections do not survive a fork)."""
    pid = os.getpid()
    if pid not in _contexts:
        _contexts[pid] = Context.create(get_settings().model_copy(update={"auto_migrate": False}))
    return _contexts[pid]


def execute(job_id: str) -> str | None:
    """The RQ job function: run the job with this id (a no-op when it is no longer queued)."""
    return Executor(process_context()).run(uuid.UUID(job_id))


RECONNECT_SECONDS = (0.5, 30.0)
"""The first and the longest wait between attempts to reach Redis again."""


def run_rq_worker(ctx: Context, burst: bool = False) -> None:
    """``bitalloc worker``: take jobs from the RQ queue (one work horse per job), reaping lost jobs
    meanwhile. A Redis outage does not end it: it waits (doubling the wait up to 30 s) until
    Redis answers again, then goes on; the reaper re-enqueues what the outage lost."""
    from redis.exceptions import ConnectionError as RedisDown
    from redis.exceptions import TimeoutError as RedisTimeout
    from rq import Worker

    from bitalloc.service.queue import RQQueue

    if not isinstance(ctx.queue, RQQueue):
        raise ValueError("bitalloc worker needs BITALLOC_REDIS_URL (without it, `bitalloc serve` runs jobs itself)")
    preload()
    reaper = Reaper(ctx)
    reaper.start()
    try:
        while True:
            try:
                Worker([ctx.queue.rq], connection=ctx.queue.redis).work(burst=burst, logging_level="INFO")
                return
            except (RedisDown, RedisTimeout) as exc:
                log.warning("lost Redis (%s): reconnecting", exc)
                wait_for_redis(ctx.queue.redis.ping, (RedisDown, RedisTimeout))
    finally:
        reaper.stop()


def preload() -> None:
    """Import what every job loads a model with before RQ forks a work horse per job, so that each
    horse starts with it: transformers' lazy modules take seconds to import, which every shard
    of a profile would otherwise pay again."""
    import transformers

    for name in ("AutoConfig", "AutoModelForCausalLM", "AutoTokenizer"):
        getattr(transformers, name)


def wait_for_redis(ping: Callable[[], object], outage: tuple[type[Exception], ...],
                   sleep: Callable[[float], None] = time.sleep) -> None:
    """Call ``ping`` until it answers, waiting longer each time (``RECONNECT_SECONDS``)."""
    wait, longest = RECONNECT_SECONDS
    while True:
        sleep(wait)
        try:
            ping()
            log.info("Redis answers again")
            return
        except outage:
            wait = min(2 * wait, longest)
