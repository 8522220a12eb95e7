"""``python -m densemap``: the ``densemap`` command."""

from densemap.service.cli import entry

if __name__ == "__main__":
    entry()
