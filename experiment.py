"""Run the whole tsae experiment: cache, train, evaluate, analyse, report.

    python experiment.py --out_dir=run_1          # run_1 ... run_5 select experiments.toml's sections
    python experiment.py --out_dir=anything       # any other name runs the main experiment
    python experiment.py --out_dir=tmp --smoke    # the reduced preset (tiny model, about a minute)

Writes final_info.json, report.html, figures/, saes/<model>_s<seed>/, eval/ and run.log into out_dir.
"""

from __future__ import annotations

import os
import sys

import click

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--out_dir", "--out-dir", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Output folder; its name (run_1 ... run_5) selects the plan section.")
@click.option("--smoke", is_flag=True, help="Reduced end-to-end preset on the tiny random model.")
@click.option("--cache-dir", default=None, help="Activation stores and trained SAEs (default: ./cache).")
def main(out_dir: str, smoke: bool, cache_dir: str | None) -> None:
    from pipeline.errors import UserError

    try:
        from pipeline.experiment.runner import run_experiment

        run_experiment(out_dir, smoke=smoke, cache_dir=cache_dir)
    except UserError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted: rerun the same command to resume (the cache and finished SAEs are kept)",
                   err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
