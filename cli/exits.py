"""The exit statuses of ``spruce`` (see :mod:`spruce.cli.main`); no imports, so the entry can know
them before it imports anything that a Ctrl-C could interrupt."""

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report a command stopped by Ctrl-C
