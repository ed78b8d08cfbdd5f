"""`python -m incontext.service serve|keys …`, until the main `incontext` CLI includes these commands."""

import typer

from incontext.service.cli import register


def main() -> None:
    app = typer.Typer(no_args_is_help=True, help="incontext HTTP service")
    register(app)
    app()


if __name__ == "__main__":
    main()
