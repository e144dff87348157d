"""The one log line format, shared by the console (cli, runtime) and every run's log.txt (rundir); and the one
library notice kept off the console."""
import logging

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# what transformers logs when it is imported where PyTorch is not installed (the core install: PyTorch comes with the
# test extra only)
TRANSFORMERS_WITHOUT_TORCH = "PyTorch was not found."


class _WithoutTorchNotice(logging.Filter):
    """Drops transformers' import-time notice that, without PyTorch, its models are unavailable: this library uses
    only its configs, tokenizers and hub files, so the notice is noise on every command of the core install. Every
    other transformers message passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.name == "transformers" and str(record.msg).startswith(TRANSFORMERS_WITHOUT_TORCH))


def quiet_transformers_without_torch() -> None:
    """Keep transformers' without-PyTorch notice off the console (before transformers is first imported)."""
    logger = logging.getLogger("transformers")
    if not any(isinstance(f, _WithoutTorchNotice) for f in logger.filters):
        logger.addFilter(_WithoutTorchNotice())
