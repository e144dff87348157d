"""Process-wide JAX settings a run needs before it compiles anything."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import jax

from lora_kd_jax.core.config import Config

log = logging.getLogger(__name__)


def setup(cfg: Config) -> None:
    """Multi-host start-up (before anything touches a device), console logging, and the persistent
    compilation cache (compiles cost more than a CoLA epoch)."""
    from lora_kd_jax.training.mesh import initialize_distributed

    initialize_distributed(cfg.distributed)
    if not logging.getLogger().handlers:
        from lora_kd_jax.core.logs import LOG_FORMAT

        logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    for noisy in ("absl", "jax._src.xla_bridge", "jax._src.compilation_cache"):  # Orbax/JAX chatter per save
        logging.getLogger(noisy).setLevel(logging.WARNING)
    enable_compilation_cache(cfg.run.compilation_cache)


def enable_compilation_cache(location: str) -> None:
    """JAX's persistent compilation cache in `location`; "" turns it off, also one set from the environment
    (JAX_COMPILATION_CACHE_DIR) or by an earlier run in this process."""
    from jax.experimental.compilation_cache import compilation_cache

    if not location:
        if jax.config.jax_enable_compilation_cache:
            jax.config.update("jax_enable_compilation_cache", False)
            compilation_cache.reset_cache()  # JAX decides once per process whether the cache is used
        return
    path = Path(os.path.expanduser(location))
    path.mkdir(parents=True, exist_ok=True)
    if not jax.config.jax_enable_compilation_cache or jax.config.jax_compilation_cache_dir != str(path):
        jax.config.update("jax_enable_compilation_cache", True)
        jax.config.update("jax_compilation_cache_dir", str(path))
        compilation_cache.reset_cache()
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:  # tests set 0 to share tiny compiles
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
