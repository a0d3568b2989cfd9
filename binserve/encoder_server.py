"""`encoder-server`: the encoder model server's command line (document 001), served by binserve.

design: a launcher beside `server.main`, at the top of the package like `launch.py`. Each of the
document's options becomes binserve settings (BINSERVE_* variables for the Gunicorn workers, as
`python server.py` passes its flags) or, where binserve has nothing to switch, is accepted and the
start-up output says what binserve does instead: no option is silently ignored. `--models` takes hub
ids (`wandb/WeaveFluencyScorerV1`) resolved from the local Hugging Face cache only - never a download
at run time - or local directories; a hub id stays the model's name on every route. `--benchmark`
loads the models in this process, times them and exits, as the document's table reports them.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from binserve.config import LOG_LEVELS, ServerConfig

#: what binserve does for the document's switches, printed at start-up when one is given
NOTES = {
    "disable_adaptive_batching": "binserve's batcher has no separate adaptive mode to disable: while a batch runs, "
    "requests queue, and the next batch takes what queued (up to --max-batch-size), so batches grow with the "
    "load; --max-wait-time and --preferred-batch-size bound the only extra wait",
    "disable_compile": "torch.compile is left out of the engines binserve times at load (torch_compile false)",
    "disable_better_transformer": "binserve does not use BetterTransformer (deprecated in optimum); attention "
    "runs on PyTorch's scaled-dot-product kernels (--disable-flash-attention turns their flash kernel off)",
}


def parser() -> argparse.ArgumentParser:
    """The document's options, with its defaults."""
    p = argparse.ArgumentParser(
        prog="encoder-server",
        description="Serve encoder text classifiers (the encoder model server's command line) with binserve: "
        "POST /predict, GET /health with per-model stats, GET /models keyed by model name.",
    )
    g = p.add_argument_group("model configuration")
    g.add_argument("--models", required=True,
                   help="comma-separated models: Hugging Face hub ids, found in the local cache (never downloaded), "
                        "or local directories; each is served under the name given")  # fmt: skip
    g.add_argument("--cache-dir", default=None,
                   help="the Hugging Face cache holding the hub ids (default: $HF_HUB_CACHE, else $HF_HOME/hub, "
                        "else ~/.cache/huggingface/hub)")  # fmt: skip
    g = p.add_argument_group("server configuration")
    g.add_argument("--host", default="0.0.0.0", help="server host (default: 0.0.0.0)")
    g.add_argument("--port", type=int, default=8000, help="server port (default: 8000)")
    g.add_argument("--workers", type=int, default=1, help="worker processes, each loads every model (default: 1)")
    g.add_argument("--log-level", default="info", choices=LOG_LEVELS, help="logging level (default: info)")
    g = p.add_argument_group("batch processing")
    g.add_argument("--max-batch-size", type=int, default=32, help="maximum batch size (default: 32)")
    g.add_argument("--max-wait-time", type=float, default=0.01,
                   help="the longest a request waits for a fuller batch, in seconds (default: 0.01; 0: never, "
                        "binserve's own default)")  # fmt: skip
    g.add_argument("--preferred-batch-size", type=int, default=8,
                   help="a batch of this many runs without waiting out --max-wait-time (default: 8)")
    g.add_argument("--max-sequence-length", type=int, default=512,
                   help="tokens per text at most, cut beyond (default: 512; below the model's own maximum)")
    g.add_argument("--disable-adaptive-batching", action="store_true", help="accepted: " + NOTES[
        "disable_adaptive_batching"])  # fmt: skip
    g = p.add_argument_group("optimizations")
    g.add_argument("--disable-flash-attention", action="store_true",
                   help="turn off the flash kernel of PyTorch's scaled-dot-product attention (CPU and CUDA)")
    g.add_argument("--disable-compile", action="store_true",
                   help="never try torch.compile as an engine (torch_compile false); by default it is compiled at "
                   "load and kept where the plan times it fastest")  # fmt: skip
    g.add_argument("--disable-better-transformer", action="store_true",
                   help="accepted: " + NOTES["disable_better_transformer"])
    g = p.add_argument_group("benchmarking")
    g.add_argument("--benchmark", action="store_true",
                   help="load the models, time one text per request against batches of --max-batch-size, print "
                        "the table and exit (no server)")  # fmt: skip
    g.add_argument("--benchmark-texts", type=int, default=100, help="texts per benchmark run (default: 100)")
    return p


def hub_cache(cache_dir: str | None) -> Path:
    """Where hub ids are looked up: --cache-dir, else huggingface_hub's own default (HF_HUB_CACHE, HF_HOME)."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def resolve(model: str, cache: Path) -> str:
    """The local directory of `model`: a directory as given, or a hub id's snapshot in the cache.
    ValueError naming the cache searched and how to fill it when the id is not there."""
    if Path(model).is_dir():
        return str(Path(model).resolve())
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot_download(model, cache_dir=str(cache), local_files_only=True)
    except (LocalEntryNotFoundError, OSError, ValueError) as exc:
        raise ValueError(
            f"model {model!r} is not in the Hugging Face cache {cache} (nor a local directory): binserve never "
            f"downloads at run time. Fill the cache where the hub is reachable, e.g. `huggingface-cli download "
            f"{model} --cache-dir {cache}` (or copy a cache there), or pass --cache-dir; ({type(exc).__name__})"
        ) from None


def model_specs(models: str, cache: Path) -> str:
    """binserve's `models` setting for the document's `--models`: `name=adapter:dir`, names as given."""
    from models.layout import detect_adapter

    names = [m.strip() for m in models.split(",") if m.strip()]
    if not names:
        raise ValueError("--models names no model")
    specs = []
    for name in names:
        path = resolve(name, cache)
        label = name if not Path(name).is_dir() else Path(path).name
        specs.append(f"{label}={detect_adapter(path)}:{path}")
    return ",".join(specs)


def config_for(args: argparse.Namespace) -> ServerConfig:
    """The binserve settings the document's options stand for (other BINSERVE_* variables still apply)."""
    return ServerConfig.from_env(
        models=model_specs(args.models, hub_cache(args.cache_dir)),
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_level=args.log_level,
        max_batch_size=args.max_batch_size,
        max_wait_ms=args.max_wait_time * 1000.0,
        preferred_batch_size=args.preferred_batch_size,
        max_text_tokens=args.max_sequence_length,
        flash_attention=not args.disable_flash_attention,
        torch_compile=not args.disable_compile,
        models_listing="encoder-server",
    )


def main(argv: list[str] | None = None) -> None:
    """`encoder-server [options]`: serve (Gunicorn, as `python server.py`), or `--benchmark`."""
    args = parser().parse_args(argv)
    try:
        config = config_for(args)
    except ValueError as exc:
        print(f"encoder-server: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    for option, note in NOTES.items():
        if getattr(args, option):
            print(f"encoder-server: --{option.replace('_', '-')}: {note}", flush=True)
    if args.benchmark:
        from binserve.encoder_benchmark import run

        run(config, args.benchmark_texts)
        return
    import server

    os.environ.update(config.to_env())
    server.main([])


if __name__ == "__main__":
    main()
