"""The one log line format, shared by the console (cli, runtime) and every run's log.txt (rundir)."""
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
