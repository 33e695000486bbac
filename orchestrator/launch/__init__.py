"""Submission: prepare a sweep, plan what to run, hand tasks to submitit, retry and cancel."""
