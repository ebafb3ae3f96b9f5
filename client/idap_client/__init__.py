"""idap-client: the IDAP++ Compress service from Python and the shell (`idap-client --help`)."""

from idap_client.client import Client, Job
from idap_client.errors import ApiError, ChecksumMismatch, IdapError, JobFailed, ServerUnavailable, WaitTimeout
from idap_client.models import JobInfo, JobStatus, Metrics, Preflight, Report
from idap_client.transport import RetryPolicy

__all__ = [
    "ApiError", "ChecksumMismatch", "Client", "IdapError", "Job", "JobFailed", "JobInfo", "JobStatus", "Metrics",
    "Preflight", "Report", "RetryPolicy", "ServerUnavailable", "WaitTimeout",
]
