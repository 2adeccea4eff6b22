"""Settings from the environment (``BITALLOC_*``), through pydantic-settings.

With none set, bitalloc runs embedded: a SQLite file, the profile cache and artifacts
under ``./bitalloc-data``, jobs in an in-process worker. Setting ``BITALLOC_DATABASE_URL``
and ``BITALLOC_REDIS_URL`` scales it out: PostgreSQL holds the state, RQ carries jobs to
``bitalloc worker`` processes.
"""

from __future__ import annotations

import functools
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from bitalloc.quant.loading import LoadPolicy


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BITALLOC_", env_file=".env", extra="ignore")

    data_dir: Path = Field(Path("bitalloc-data"), description="Profile cache, artifacts and the embedded SQLite file.")
    database_url: str | None = Field(None, description="SQLAlchemy URL; default: SQLite under data_dir.")
    redis_url: str | None = Field(None, description="Redis for the RQ queue; default: in-process worker.")
    allow_pickle: bool = Field(False, description="Allow pickled (.bin/.pt) model weights, which can run code.")
    trust_remote_code: bool = Field(False, description="Allow models whose code ships with their weights.")
    model_roots: list[Path] = Field(default_factory=list, description="Local model paths must lie inside these.")

    queue_name: str = Field("bitalloc", description="RQ queue the API enqueues on and workers listen to.")
    worker_threads: int = Field(1, ge=0, description="In-process workers when no redis_url is set (0: the API only queues).")
    job_timeout: float = Field(6 * 3600, gt=0, description="Seconds a job may run before it is failed as timed out.")
    max_attempts: int = Field(3, ge=1, description="Runs a job gets when its worker dies (a lost lease is retried).")
    heartbeat_seconds: float = Field(10.0, gt=0, description="How often a running job renews its lease.")
    lease_seconds: float = Field(60.0, gt=0, description="A running job whose lease is this old has lost its worker.")
    reaper_seconds: float = Field(15.0, gt=0, description="How often expired leases and deadlines are checked.")
    requeue_seconds: float = Field(60.0, ge=0, description="A job queued this long with no queue message holding "
                                   "it is enqueued again.")
    auto_migrate: bool = Field(True, description="Apply database migrations when the API or a worker starts.")
    max_request_bytes: int = Field(1 << 20, ge=1024, description="Largest request body the API reads (413 beyond).")

    @property
    def profile_dir(self) -> Path:
        return self.data_dir / "profiles"

    @property
    def storage_dir(self) -> Path:
        """Content-addressed artifacts (profiles, configs, quantized models)."""
        return self.data_dir / "artifacts"

    @property
    def sqlalchemy_url(self) -> str:
        """The configured database, or the embedded SQLite file under ``data_dir``."""
        return self.database_url or f"sqlite:///{(self.data_dir / 'bitalloc.db').resolve()}"

    def load_policy(self) -> LoadPolicy:
        return LoadPolicy(self.allow_pickle, self.trust_remote_code, tuple(self.model_roots))


@functools.lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
