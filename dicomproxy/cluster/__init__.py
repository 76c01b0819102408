"""Replicas sharing state on Redis (``Cluster:Redis``): the task queue, the notification feed.

Without ``Cluster:Redis`` nothing here is used: one machine, everything local as before.
"""
