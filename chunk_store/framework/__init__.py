"""The stage framework and the toolkit every package shares.

- ``registry.py``: the one list of database stages (name, module, order, prerequisite); the CLI,
  the manifest's stage order and the stage routine all read it.
- ``stage.py``: the one routine every stage runs through (record, refuse, skip, resume, share
  over ranks, finalize).
- ``errors.py`` (UserError, run_main: one line, never a traceback), ``runtime.py`` (ranks,
  barriers, devices), ``argtypes.py`` (argparse types), ``atomic.py`` (write-then-rename files),
  ``moved.py`` (old import paths of moved modules).
"""
