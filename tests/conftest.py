"""Test configuration: 8 fake CPU devices so sharded code paths run everywhere."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _fresh_compilation_caches():
    """Each test module starts with jax's compiled functions dropped: one process runs the
    whole suite, and XLA's CPU compiler has crashed compiling late in a run holding every
    module's executables."""
    yield
    import jax

    jax.clear_caches()
