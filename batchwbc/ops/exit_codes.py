"""Process exit codes, documented in README.md; cron wrappers rely on them."""

OK = 0  #: every file classified, report written
FAILED = 1  #: the run failed; no new report (the previous one is untouched)
USAGE = 2  #: bad arguments, unusable model/config, or an output that cannot be written; nothing was classified
PARTIAL = 3  #: report written, but some files were unreadable or a patient failed (see the Errors sheet)
NO_INPUT = 4  #: no images below the slides folder (empty, or an unmounted share); the previous report is untouched
NOT_DELIVERED = 5  #: workbook written (verify; run with [lis] send_preliminary), but some LIS messages were not delivered (they stay in the --hl7 folder)
INTERRUPTED = 130  #: stopped by SIGINT/SIGTERM; the previous report is untouched


class CommandError(Exception):
    """A command stops with one sentence (str, logged, never a traceback) and an exit code.

    The project's command errors derive from it, so the CLI maps exceptions to exit codes in
    one place (batchwbc/cli.py: `_finish`) instead of one hand-made except-chain per command."""

    exit_code: int = FAILED
