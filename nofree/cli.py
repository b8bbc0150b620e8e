"""nofree command line (click). Each command is a thin shell over one library function."""
from __future__ import annotations

import click

from nofree import __version__


@click.group()
@click.version_option(__version__, prog_name="nofree")
def main() -> None:
    """Compose frozen pretrained models into multimodal systems without training them."""


if __name__ == "__main__":
    main()
