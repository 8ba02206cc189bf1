"""The training jobs' import path before the backend was split into packages: jobs queued by an older
release name ``backend.training_jobs.train_project`` / ``training_tick``. New jobs use backend.jobs."""

from backend.jobs import train_project, training_tick

__all__ = ["train_project", "training_tick"]
