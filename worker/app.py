"""The Celery worker: `celery -A worker.app worker -Q cpu,webhooks` (or gpu,webhooks on a GPU machine).

The worker process reads its settings from the environment once, here; the tasks and every
retry, webhook and requeue they enqueue go through this `queue`.
"""

from __future__ import annotations

from domain.queue import CeleryQueue
from domain.settings import get_settings

queue = CeleryQueue(get_settings())
celery_app = queue.app
celery_app.conf.imports = ("worker.tasks",)
