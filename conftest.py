"""The test session owns the smoke runs' scratch folder: nbval stops each notebook's kernel at once
(no exit handlers run), so a folder a kernel made for itself would outlive it."""
from elastictrain.checkpoints import scratch_root


def pytest_configure(config):
    scratch_root()  # before any kernel starts, so every kernel inherits it
