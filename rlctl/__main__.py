"""``python -m rlctl`` entry point (same as the ``rlctl`` console script)."""

from rlctl.cli import app

if __name__ == "__main__":
    app()
