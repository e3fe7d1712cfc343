"""The job contract the API and the worker share: task and queue names, the sender, the Celery app factory with
the embedded file transport, the lease file and run-status vocabulary, and the settings both processes read.

`service/` and `worker/` each import this package and never each other; it imports only `models/` (for the run
statuses the run store writes) and Celery/kombu, never torch.
"""
