"""`tsae-cache`: build, list, inspect, verify, remove and export activation stores.

    tsae-cache build                                  # SmolLM2-135M layer 15, Shakespeare train, 200k tokens
    tsae-cache build --model tiny --layers 0,1 --ctx 64 --max-tokens 20k
    tsae-cache build --workers 2 ...                  # two workers fill one store (docs/distributed.md)
    tsae-cache ls
    tsae-cache info KEY
    tsae-cache verify KEY
    tsae-cache repair KEY                             # recompute only the damaged chunks
    tsae-cache export KEY --format hdf5 out.h5
    tsae-cache rm KEY

Bad input ends with one line `error: ...` and a non-zero exit status, never a traceback.  Nothing
heavy is imported at start-up (torch and transformer_lens load only when a build needs the model).
"""

from __future__ import annotations

import json
import sys
import warnings

import click

from pipeline.errors import UserError


class _Group(click.Group):
    """Turns UserError, click usage errors and Ctrl-C into one `error:` line and an exit status."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        extra.setdefault("obj", {"argv": list(sys.argv[1:] if args is None else args)})  # for --workers
        # Ctrl-C inside one of zarr's sync() calls leaves its coroutine unawaited; Python's warning
        # about that would print after the one `error: interrupted` line
        warnings.filterwarnings("ignore", message="coroutine .* was never awaited", category=RuntimeWarning)
        try:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.Exit as e:
            sys.exit(e.exit_code)
        except click.ClickException as e:
            _fail(e.format_message(), e.exit_code)
        except (click.exceptions.Abort, KeyboardInterrupt):
            _fail("interrupted", 130)
        except UserError as e:
            _fail(str(e), e.exit_code)


def _fail(message: str, code: int) -> None:
    click.echo(f"error: {' '.join(str(message).split())}", err=True)
    sys.exit(code)


def _warn_one_line(message, category, filename, lineno, file=None, line=None) -> None:
    click.echo(f"warning: {' '.join(str(message).split())}", err=True)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Activation stores for tsae: cached model activations over whole sequences (zarr v3)."""


def _parse_count(text: str | None) -> int | None:
    """``200000``, ``200k``, ``1.5M``; ``all`` or ``0`` for no limit."""
    if text is None or text.strip().lower() in ("all", "none", "0"):
        return None
    t = text.strip().lower().replace("_", "")
    scale = {"k": 10**3, "m": 10**6, "g": 10**9, "b": 10**9}.get(t[-1:], 1)
    try:
        value = float(t[:-1] if scale > 1 else t) * scale
    except ValueError:
        raise UserError(
            f"--max-tokens must be a number like 200000, 200k or 1.5M (or 'all'), not {text!r}"
        ) from None
    if not value >= 1 or value == float("inf"):  # also refuses nan and 1e999
        raise UserError(f"--max-tokens must be a positive finite count, got {text!r}")
    return int(value)


def _parse_layers(text: str | None) -> tuple[int, ...] | None:
    if not text:
        return None
    try:
        return tuple(int(x) for x in text.replace(" ", "").split(",") if x)
    except ValueError:
        raise UserError(f"--layers must be integers separated by commas, e.g. 3,6,9; got {text!r}") from None


@main.command()
@click.option(
    "--model",
    default="smollm2-135m",
    show_default=True,
    help="smollm2-135m (embedded), tiny (random test model), a local HF folder, or a hub name.",
)
@click.option(
    "--layers",
    "--layer",
    "layers",
    default=None,
    metavar="L[,L...]",
    help="Residual-stream layers (blocks.L.hook_resid_post); default: the middle layer n_layers // 2.",
)
@click.option(
    "--hook",
    "hooks",
    multiple=True,
    metavar="NAME",
    help="An explicit TransformerLens hook name (repeatable), in addition to --layers.",
)
@click.option(
    "--dataset",
    default="shakespeare",
    show_default=True,
    help="shakespeare (embedded), a local .txt/.jsonl/.parquet file or folder, or a hub dataset.",
)
@click.option("--split", default="train", show_default=True, help="train, validation, test or all.")
@click.option("--text-column", default="text", show_default=True)
@click.option("--config", default=None, help="Dataset configuration name (hub datasets).")
@click.option("--ctx", default=128, show_default=True, type=int, help="Tokens per stored sequence.")
@click.option(
    "--max-tokens",
    default="200k",
    show_default=True,
    help="Stop after this many tokens (200k, 1.5M, or 'all').",
)
@click.option(
    "--prepend-bos/--no-prepend-bos",
    default=True,
    show_default=True,
    help="Start every sequence with the tokenizer's BOS token.",
)
@click.option(
    "--dtype", default="float32", show_default=True, help="Compute dtype: float32, bfloat16, float16."
)
@click.option("--store-dtype", default="float16", show_default=True, help="Stored dtype: float16 or float32.")
@click.option("--batch-size", default=16, show_default=True, type=int, help="Sequences per forward pass.")
@click.option(
    "--chunk-seqs",
    default=64,
    show_default=True,
    type=int,
    help="Sequences per chunk (the unit written, checksummed, resumed).",
)
@click.option(
    "--inner-seqs",
    default=None,
    type=int,
    help="Shard each chunk into inner chunks of this many sequences (faster random reads).",
)
@click.option(
    "--cache-dir", default=None, help="Cache home (a path or fsspec URL); default $TSAE_CACHE_DIR or ./cache."
)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N.")
@click.option("--progress/--no-progress", default=True, show_default=True)
@click.option(
    "--workers",
    default=1,
    show_default=True,
    type=click.IntRange(min=1),
    help="Start this many local workers under torchrun, one model replica each (docs/distributed.md).",
)
@click.option("--shard", default=None, metavar="R/W", help="Compute worker R's share of W alone (a rerun).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON line.")
def build(as_json: bool, layers, max_tokens, workers, shard, **opts) -> None:
    """Build (or resume, or find) the store for these settings.  A repeat is a cache hit: no model work."""
    from pipeline import distributed_cache as dist
    from pipeline.cache_runner import CacheConfig, build_cache

    warnings.showwarning = _warn_one_line
    cfg = CacheConfig(
        layers=_parse_layers(layers),
        max_tokens=_parse_count(max_tokens),
        hooks=tuple(opts.pop("hooks")),
        **opts,
    )
    shard = dist.parse_shard(shard)
    if workers > 1 and shard:
        raise UserError("--workers starts a whole job; --shard runs one share alone: choose one")
    if workers > 1 and not dist.under_launcher() and not dist.already_built(cfg):
        sys.exit(dist.launch(workers, click.get_current_context().obj["argv"]))
    try:
        r = dist.build_distributed(cfg, shard=shard) if shard or dist.under_launcher() else build_cache(cfg)
    except dist.PeerFailed:
        sys.exit(1)  # rank 0 reports why
    if getattr(r, "rank", 0) and not shard:
        return  # one line per job: rank 0 reports
    if not getattr(r, "complete", True):
        todo = (
            f"chunks {_ranges(r.missing_chunks)} are still missing: run their shares, then"
            if r.missing_chunks
            else "every chunk is recorded:"
        )
        click.echo(
            f"share {r.rank}/{r.world_size} of {r.key} done ({r.computed_tokens} tokens computed); "
            f"{todo} run this build without --shard to finish the store"
        )
        return
    if as_json:
        click.echo(
            json.dumps(
                {
                    "key": r.key,
                    "location": r.location,
                    "hit": r.hit,
                    "n_seq": r.n_seq,
                    "n_tokens": r.n_tokens,
                    "resumed_seqs": r.resumed_seqs,
                    "seconds": round(r.seconds, 3),
                    "tokens_per_s": round(r.tokens_per_s, 1),
                }
            )
        )
    elif r.hit:
        click.echo(f"cache hit: {r.key} ({r.n_seq} sequences, {r.n_tokens} tokens) at {r.location}")
    else:
        resumed = f", resumed after {r.resumed_seqs} sequences" if r.resumed_seqs else ""
        click.echo(
            f"built {r.key}: {r.n_seq} sequences, {r.n_tokens} tokens in {r.seconds:.1f} s "
            f"({r.tokens_per_s:.0f} tok/s{resumed}) at {r.location}"
        )


@main.command("ls")
@click.option("--cache-dir", default=None)
def ls_(cache_dir) -> None:
    """List the stores in the cache home."""
    from pipeline import paths
    from pipeline.store import list_stores

    rows = [("KEY", "MODEL", "HOOKS", "N_SEQ", "STATUS", "SIZE")]
    for s in list_stores(cache_dir):
        a = s["attrs"]
        model = a["model"]["name"] if a else "?"
        rows.append(
            (
                s["key"],
                model,
                ",".join(a.get("hooks", ["?"])),
                str(s["n_seq"]),
                s["status"],
                _human(s["bytes"]),
            )
        )
    if len(rows) == 1:
        click.echo(f"no stores in {paths.cache_home(cache_dir)}")
        return
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


@main.command()
@click.argument("key")
@click.option("--cache-dir", default=None)
@click.option("--json", "as_json", is_flag=True, help="All attributes as JSON, vectors included.")
def info(key, cache_dir, as_json) -> None:
    """Show a store's attributes (stat vectors abbreviated unless --json)."""
    from pipeline.store import read_attrs, resolve_key

    location = resolve_key(key, cache_dir, "show")
    attrs = read_attrs(location)
    if attrs is None:
        raise UserError(f"no activation store at {location}")
    if not as_json:
        attrs = _abbreviate(attrs)
        attrs["location"] = str(location)
    click.echo(json.dumps(attrs, indent=2))


@main.command()
@click.argument("key")
@click.option("--cache-dir", default=None)
@click.option("--progress/--no-progress", default=False)
def verify(key, cache_dir, progress) -> None:
    """Read every chunk: shapes, checksums, finite values, stats.  Exit 1 if anything is wrong."""
    from pipeline.store import resolve_key
    from pipeline.verify import verify_store

    r = verify_store(resolve_key(key, cache_dir, "verify"), progress=progress)
    for p in r.problems:
        click.echo(f"problem: {p}", err=True)
    if not r.ok:
        _fail(f"{r.key}: {len(r.problems)} problem(s) found", 1)
    click.echo(
        f"ok: {r.key}: {r.n_chunks} chunks, {r.n_seq} sequences, {_human(r.bytes_read)} read and "
        f"checked in {r.seconds:.1f} s"
    )


@main.command()
@click.argument("key")
@click.option("--cache-dir", default=None)
def rm(key, cache_dir) -> None:
    """Delete a store (only stores directly under the cache home)."""
    from pipeline.store import remove

    click.echo(f"removed {remove(key, cache_dir)}")


@main.command()
@click.argument("key")
@click.option("--cache-dir", default=None)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N.")
def repair(key, cache_dir, device) -> None:
    """Recompute only the chunks `verify` finds damaged, from the store's own recipe, and restore it."""
    from pipeline.repair import repair_store
    from pipeline.store import resolve_key

    r = repair_store(resolve_key(key, cache_dir, "repair"), cache_dir, device=device)
    if not r.chunks and not r.stats_updated:
        click.echo(f"nothing to repair: {r.key} verifies")
        return
    done = "; ".join(f"chunk {c}: {', '.join(names)}" for c, names in sorted(r.chunks.items()))
    how = "bit for bit" if not r.changed else f"with new digests for {', '.join(r.changed)}"
    click.echo(
        f"repaired {r.key}: {done or 'statistics'}{'; stats recomputed' if r.stats_updated else ''}; "
        f"restored {how} ({r.forward_tokens} tokens recomputed in {r.seconds:.1f} s); it verifies"
    )


@main.command()
@click.argument("key")
@click.argument("out")
@click.option("--format", "fmt", type=click.Choice(["hdf5"]), default="hdf5", show_default=True)
@click.option("--cache-dir", default=None)
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("--progress/--no-progress", default=False)
def export(key, out, fmt, cache_dir, overwrite, progress) -> None:
    """Copy a complete store to OUT (HDF5: same arrays and attributes)."""
    from pipeline.export import export_hdf5
    from pipeline.store import resolve_key

    path = export_hdf5(resolve_key(key, cache_dir, "export"), out, overwrite=overwrite, progress=progress)
    click.echo(f"exported {key} to {path} ({_human(path.stat().st_size)})")


def _ranges(ints: list[int]) -> str:
    """[0, 2, 4, 5, 6] -> '0, 2, 4-6'."""
    out, i = [], 0
    while i < len(ints):
        j = i
        while j + 1 < len(ints) and ints[j + 1] == ints[j] + 1:
            j += 1
        out.append(str(ints[i]) if i == j else f"{ints[i]}-{ints[j]}")
        i = j + 1
    return ", ".join(out)


def _abbreviate(obj):
    if isinstance(obj, dict):
        return {k: _abbreviate(v) for k, v in obj.items()}
    if isinstance(obj, list) and len(obj) > 8 and all(isinstance(x, (int, float)) for x in obj):
        return f"[{len(obj)} numbers: {', '.join(f'{x:.4g}' for x in obj[:3])}, ...]"
    return obj


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            break
        n /= 1024
    return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"


if __name__ == "__main__":
    main()
