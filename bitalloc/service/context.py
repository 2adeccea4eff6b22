"""What the API and the workers share: settings, the database, the artifact store, the queue."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from bitalloc.service.db import make_engine, make_sessions, upgrade
from bitalloc.service.queue import JobQueue, LocalQueue, RQQueue
from bitalloc.service.settings import Settings
from bitalloc.service.storage import BlobStore


@dataclass
class Context:
    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    storage: BlobStore
    queue: JobQueue

    @classmethod
    def create(cls, settings: Settings) -> Context:
        """Connect (and migrate, when ``auto_migrate``); Redis only when ``redis_url`` is set."""
        engine = make_engine(settings.sqlalchemy_url)
        if settings.auto_migrate:
            upgrade(engine)
        queue: JobQueue = (RQQueue(settings.redis_url, settings.queue_name, settings.job_timeout)
                           if settings.redis_url else LocalQueue())
        return cls(settings, engine, make_sessions(engine), BlobStore(settings.storage_dir), queue)

    @property
    def embedded(self) -> bool:
        """Jobs run in this process's worker threads (no Redis)."""
        return isinstance(self.queue, LocalQueue)

    def close(self) -> None:
        self.engine.dispose()
