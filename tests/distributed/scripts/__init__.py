"""Programs the launcher tests start on several ranks: ``python -m tests.distributed.scripts.X``."""
