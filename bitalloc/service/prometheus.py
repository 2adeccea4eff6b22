"""Prometheus metrics, read from the database at scrape time.

Jobs run in other processes (RQ workers) than the one scraped, so in-process counters would
see only part of the truth; the database sees all of it, whichever process is scraped.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import case, func, select

from bitalloc.service.context import Context
from bitalloc.service.models import FINISHED_STATES, JOB_STATES, JobRecord

DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 4 * 3600, 12 * 3600)


class JobCollector(Collector):
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def collect(self) -> Iterator:
        with self.ctx.sessions() as session:
            counts = dict(session.execute(select(JobRecord.state, func.count()).group_by(JobRecord.state)).all())
            buckets = [func.sum(case((JobRecord.seconds <= bound, 1), else_=0)) for bound in DURATION_BUCKETS]
            durations = session.execute(
                select(JobRecord.state, func.count(), func.coalesce(func.sum(JobRecord.seconds), 0.0), *buckets)
                .where(JobRecord.state.in_(FINISHED_STATES), JobRecord.seconds.is_not(None))
                .group_by(JobRecord.state)
            ).all()
        jobs = GaugeMetricFamily("bitalloc_jobs", "Jobs by state.", labels=["state"])
        for state in JOB_STATES:
            jobs.add_metric([state], counts.get(state, 0))
        yield jobs
        yield GaugeMetricFamily("bitalloc_queue_depth", "Jobs waiting for a worker.", value=counts.get("queued", 0))
        histogram = HistogramMetricFamily(
            "bitalloc_job_duration_seconds", "Run time of finished jobs (last attempt).", labels=["state"]
        )
        for state, count, total, *cumulative in durations:
            histogram.add_metric(
                [state],
                [(str(b), int(c or 0)) for b, c in zip(DURATION_BUCKETS, cumulative)] + [("+Inf", int(count))],
                float(total),
            )
        yield histogram


def registry_for(ctx: Context) -> CollectorRegistry:
    """A registry of its own per app, so several apps in one process (tests) do not collide."""
    registry = CollectorRegistry()
    registry.register(JobCollector(ctx))
    return registry
