"""One module per `sparsec` CLI command (see sparsec/cli.py)."""
