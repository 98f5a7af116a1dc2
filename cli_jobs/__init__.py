"""What the `scan` commands do, beside `cli.py` so the CLI stays a thin layer.

The jobs choose between packages (the eager model, export, the runtime); nothing imports
them but `cli.py`. Jobs whose command also runs on a runtime-only install import PyTorch
lazily, and say which extra to install when it is missing.
"""
