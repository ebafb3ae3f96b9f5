"""Prometheus metrics, computed from the database at scrape time: the API and the workers are
separate processes, and the job table is what they share."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from domain.clock import aware
from domain.db import get_sessionmaker
from domain.models import Job, WebhookDelivery
from domain.settings import Settings
from domain.states import JobStatus
from domain.workers import WorkerKind, count_kinds, live_workers

DURATION_BUCKETS = (10, 30, 60, 300, 900, 1800, 3600, 7200, 21600)


class DatabaseCollector(Collector):
    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily | HistogramMetricFamily]:
        with get_sessionmaker(self.settings.database)() as session:
            counts = dict(session.execute(select(Job.status, func.count()).group_by(Job.status)).all())
            finished = session.execute(select(Job.started_at, Job.finished_at).where(
                Job.status == JobStatus.SUCCEEDED, Job.started_at.is_not(None))).all()
            webhook_failures = session.scalar(select(func.count()).select_from(WebhookDelivery)
                                              .where(WebhookDelivery.succeeded.is_(False))) or 0
            workers = count_kinds(self.settings, live_workers(session, self.settings))
        jobs = GaugeMetricFamily("idap_jobs", "Jobs by status", labels=["status"])
        for status in JobStatus:
            jobs.add_metric([status], counts.get(status, 0))
        yield jobs
        yield GaugeMetricFamily("idap_queue_depth", "Jobs waiting for a worker", value=counts.get(JobStatus.QUEUED, 0))
        durations = [(aware(end) - aware(start)).total_seconds() for start, end in finished if start and end]
        buckets = [(str(bound), sum(d <= bound for d in durations)) for bound in DURATION_BUCKETS]
        buckets.append(("+Inf", len(durations)))
        yield HistogramMetricFamily("idap_job_duration_seconds", "Run time of succeeded jobs",
                                    buckets=buckets, sum_value=sum(durations))
        yield CounterMetricFamily("idap_webhook_failures", "Failed webhook delivery attempts", value=webhook_failures)
        live = GaugeMetricFamily("idap_workers_live", "Workers seen within IDAP_DEVICE_REPORT_TTL_S, by kind",
                                 labels=["kind"])
        for kind in WorkerKind:
            live.add_metric([kind], workers[kind])
        yield live
