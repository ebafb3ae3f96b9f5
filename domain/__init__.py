"""The job domain shared by the API and the workers: settings, tables, job states, storage, the job
config and read model, webhooks and the queue. It imports neither `api` nor `worker`."""
