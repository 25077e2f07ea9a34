"""Pipeline parallelism: schedules as data (schedules.py), stages and their runtime."""
