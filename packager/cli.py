"""The `packager` command line."""

from __future__ import annotations

import json
import sys

import click

from subnet.arch import UnsupportedArchitecture
from subnet.loading import ModelLoadError
from subnet.spec import SpecError

USER_ERRORS = (ModelLoadError, UnsupportedArchitecture, SpecError, FileExistsError)


class _Group(click.Group):
    """Turns the errors a user can fix into one clear line and exit code 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except USER_ERRORS as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)


@click.group(cls=_Group)
@click.version_option(package_name="packager")
def main():
    """Find, export and measure the smallest, fastest sub-network of an LLM for a target device."""


model_option = click.option(
    "--model", "model", default=None, help="HF folder, .gguf file or hub id (default: embedded SmolLM2-135M)."
)
pickle_option = click.option(
    "--allow-pickle", is_flag=True, help="Allow pickle (.bin/.pt) checkpoints; they can run code when loaded."
)


@main.command()
@click.argument("model", required=False)
@pickle_option
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def inspect(model, allow_pickle, as_json):
    """Architecture, parameters, per-layer shapes, dtype and size of MODEL (default: embedded SmolLM2)."""
    from packager.inspect import print_summary, summary
    from subnet.loading import load_model

    info = summary(load_model(model, allow_pickle=allow_pickle))
    if as_json:
        click.echo(json.dumps(info, indent=1))
    else:
        print_summary(info)


if __name__ == "__main__":
    main()
