"""The ``rlctl`` command line (typer).

Commands: ``check-config``, ``train``, ``eval``, ``prepare-data``, ``prepare-model``, ``plot``,
``presets``. Heavy modules (torch, ray, sglang, transformers) are imported only inside the commands
that need them; ``rlctl --help`` and ``rlctl check-config`` import none of them
(``tests/unit/test_cli_imports.py`` checks this in a subprocess). Even ``rlctl.config`` (pydantic)
is imported lazily so ``--help`` stays fast.

Exit codes: 0 ok; 1 runtime failure; 2 invalid configuration or input (message on stderr, no
traceback).

Tests: ``pytest tests/unit/test_cli*.py``.
"""

from __future__ import annotations

import enum
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from rlctl.metrics import write_text_atomic  # stdlib + rich only: keeps the CLI light

if TYPE_CHECKING:  # pragma: no cover
    from rlctl.config import LoadedConfig

app = typer.Typer(
    name="rlctl",
    help="GRPO fine-tuning of LLMs on GSM8K: FSDP2 policy + colocated SGLang rollouts in one Ray job.",
    no_args_is_help=True,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

def _version(value: bool) -> None:
    if value:
        from rlctl import __version__

        typer.echo(f"rlctl {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print rlctl's version and exit.")] = False,
) -> None:
    """GRPO fine-tuning of LLMs on GSM8K: FSDP2 policy + colocated SGLang rollouts in one Ray job."""


# the panel title of the shared options; short enough for an 80-column terminal (rich cuts a long title)
CONFIG_PANEL = "Configuration (defaults < --preset < --config < key=value, --backend)"


class Backend(str, enum.Enum):
    sglang = "sglang"
    hf = "hf"


class Format(str, enum.Enum):
    tree = "tree"
    yaml = "yaml"
    json = "json"


class Dataset(str, enum.Enum):
    gsm8k = "gsm8k"


class ModelName(str, enum.Enum):
    smollm2 = "smollm2"


PresetOpt = Annotated[
    Optional[str],
    typer.Option("--preset", "-p", help="Preset name from presets/ (see `rlctl presets`).", rich_help_panel=CONFIG_PANEL),
]
ConfigOpt = Annotated[
    Optional[Path],
    typer.Option("--config", "-c", help="YAML config file (may list `defaults: \\[preset, ...]`).", rich_help_panel=CONFIG_PANEL),
]
BackendOpt = Annotated[
    Optional[str],
    typer.Option("--backend", "-b", help="Rollout backend: sglang (GPU) or hf (CPU). Same as generator.backend=B.",
                 rich_help_panel=CONFIG_PANEL, show_default=False),
]
OverridesArg = Annotated[
    Optional[list[str]],
    typer.Argument(help="key=value overrides, e.g. trainer.seed=1 generator.n_samples_per_prompt=8", show_default=False),
]
EvalOverridesArg = Annotated[
    Optional[list[str]],
    typer.Argument(help="key=value overrides, e.g. data.val_data=\\[FILE.parquet] trainer.eval_batch_size=64. "
                        "Generation follows generator.eval_sampling_params (greedy by default, one sample per "
                        "problem); generator.eval_n_samples_per_prompt=K with a temperature > 0 samples K per "
                        "problem and adds mean accuracy and pass@K.", show_default=False),
]
RayAddressOpt = Annotated[
    Optional[str],
    typer.Option("--ray-address", envvar="RAY_ADDRESS", help="Connect to this Ray cluster (sets ray.address).",
                 rich_help_panel=CONFIG_PANEL),
]


GpuMemOpt = Annotated[
    Optional[float],
    typer.Option("--gpu-memory-gb", min=1, help="Plan GPU memory for GPUs of this size (GiB) instead of the local "
                 "GPU (read with nvidia-smi).", rich_help_panel=CONFIG_PANEL),
]
IgnorePlanOpt = Annotated[
    bool,
    typer.Option("--ignore-memory-plan", help="Run even when the GPU memory plan says the layout does not fit.",
                 rich_help_panel=CONFIG_PANEL),
]


def _err(msg: str) -> None:
    typer.echo(msg, err=True)


def _load(preset, config, overrides, backend, for_training: bool = False, extra: list[str] | None = None,
          command: Optional[str] = None, dry_run: bool = False) -> "LoadedConfig":
    """load_config, printing a ConfigError and exiting 2 (no traceback). With ``command`` (train / eval), the
    environment preflight's problems follow the configuration errors in the same message: all of them when
    the configuration failed only on this machine's files, else those that need no more than the values
    the errors left sure (:func:`rlctl.preflight.check`'s ``unsure``)."""
    from rlctl.config import ConfigError, load_config

    try:
        return load_config(
            preset=preset,
            config_file=config,
            overrides=[*(overrides or []), *(extra or [])],
            backend=backend,
            for_training=for_training,
        )
    except ConfigError as exc:
        n = len(exc.errors)
        _err(f"rlctl: invalid configuration ({n} error{'s' if n != 1 else ''}):")
        for line in exc.errors:
            _err(f"  - {line}")
        if command is not None and exc.cfg is not None:
            _preflight(exc.cfg, command, dry_run=dry_run, failed=True, unsure=exc.unsure)
        raise typer.Exit(2) from None


def _preflight(cfg: Any, command: str, *, dry_run: bool = False, failed: bool = False, unsure: Any = None) -> None:
    """The environment preflight (:mod:`rlctl.preflight`) of the run config ``cfg``, before Ray starts or a
    folder is written.

    Every problem is printed in one message and the command exits 2 (a dry run only warns: it may be
    prepared on another machine). A checkpoint that already completes the run prints a note and exits 0.
    ``failed``: the configuration's errors were just printed; the problems join them and it exits 2 either way
    (``unsure``: see :func:`rlctl.preflight.check`).
    """
    from rlctl import preflight
    from rlctl.config import redact

    result = preflight.check(cfg, command, unsure=unsure)
    if result.errors:
        if dry_run:
            for line in result.errors:
                _err(redact(f"warning: on this machine: {line}"))
        else:
            n = len(result.errors)
            _err(f"rlctl {command}: this machine cannot run this configuration ({n} problem{'s' if n != 1 else ''}):")
            for line in result.errors:
                _err(redact(f"  - {line}"))
            raise typer.Exit(2)
    if failed:
        raise typer.Exit(2)
    if result.finished:
        _err(redact(f"note: {result.finished}"))
        if not dry_run:
            raise typer.Exit(0)


def _plan_without_gpu(plan) -> str:
    """One line for a plan made without the GPU size: its peak, or (when the engine's KV cache, a fraction of the
    unknown GPU, is in some phases) the largest phase that is known and the phases that are not."""
    from rlctl import memory_plan as mp

    if plan.peak_bytes is not None:
        return f"peak {mp.gib(plan.peak_bytes)} per GPU ({plan.peak.name})"
    known = [p for p in plan.phases if p.bytes is not None]
    unknown = ", ".join(p.name for p in plan.phases if p.bytes is None)
    big = max(known, key=lambda p: p.bytes, default=None)
    head = f"largest known phase {big.name} {mp.gib(big.bytes)} per GPU; " if big else ""
    return f"{head}{unknown} unknown (the engine's KV cache is generator.gpu_memory_utilization x the GPU)"


def _memory_plan(loaded: "LoadedConfig", gpu_memory_gb: Optional[float], ray_address: Optional[str],
                 ignore: bool, fmt: Optional[str] = None, asked: bool = False) -> None:
    """The GPU memory plan (:mod:`rlctl.memory_plan`): printed as ``fmt`` (``tree`` / ``yaml`` / ``json`` on stdout)
    when given, then checked against ``--gpu-memory-gb`` or the local GPU (not assumed under a Ray address; no
    GPU: no check). Over the GPU by more than the estimator's error: exit 2 naming the keys that would make it fit
    (``--ignore-memory-plan`` turns that into a warning); within the error: a warning.

    A plan that cannot be made (no config.json, trainer.device=cpu) is a note (none for ``trainer.device=cpu`` under
    ``rlctl train``, ``fmt`` None), but a ``warning:`` when the user
    asked for it (``--gpu-memory-gb`` given, or ``asked``: ``--memory-plan``), saying the fit check was not done;
    the exit code stays 0 except for ``--memory-plan`` in yaml/json (``fmt``): stdout would be empty, so exit 2."""
    from rlctl import memory_plan as mp
    from rlctl.config import redact

    remote = ray_address or loaded.cfg.ray.address or os.environ.get("RAY_ADDRESS")
    gpu = mp.gpu_bytes_from_gb(gpu_memory_gb) if gpu_memory_gb else (None if remote else mp.local_gpu_bytes())
    plan, notes = mp.plan_for_config(loaded.cfg, gpu)
    if plan is None and fmt is None and not (gpu_memory_gb or asked) and loaded.cfg.trainer.device == "cpu":
        return  # `rlctl train` on the CPU: nothing to plan, and nothing worth a note on every run
    if plan is None and (gpu_memory_gb or asked or fmt in ("yaml", "json")):
        head = (f"memory plan: the fit check against {gpu_memory_gb:g} GiB (--gpu-memory-gb) was NOT done"
                if gpu_memory_gb else "memory plan: --memory-plan made no plan")
        for note in notes:
            text = f"{head}: {note.removeprefix('memory plan: ')}"
            _err(redact(f"rlctl: {text}" if fmt in ("yaml", "json") else f"warning: {text}"))
        if fmt in ("yaml", "json"):  # --memory-plan asked for a plan that cannot be made
            raise typer.Exit(2)
        return
    for note in notes:
        _err(redact(f"note: {note}"))
    if plan is None:
        return
    if fmt == "tree":
        mp.print_plan_tree(plan)
    elif fmt in ("yaml", "json"):
        import yaml

        data = mp.plan_as_dict(plan)
        typer.echo(json.dumps(data, indent=2) if fmt == "json" else yaml.safe_dump(data, sort_keys=False), nl=False)
    if gpu is None:
        _err(f"note: memory plan: {_plan_without_gpu(plan)}; no GPU size to check it against (pass --gpu-memory-gb N)")
        return
    verdict = mp.check_fit(plan, gpu, allow_over=ignore)
    if verdict is None:
        _err(f"note: memory plan: peak {mp.gib(plan.peak_bytes)} per GPU ({plan.peak.name}) fits the "
             f"{mp.gib(gpu)} GPU")
        return
    level, text = verdict
    if level == "error":
        _err("rlctl: the GPU memory plan does not fit:")
        for line in text.splitlines():
            _err(f"  {line}")
        raise typer.Exit(2)
    _err(f"warning: {text}")


def _print_notes(loaded: "LoadedConfig") -> None:
    for note in loaded.notes:
        _err(f"note: {note}")
    for warning in loaded.warnings:
        _err(f"warning: {warning}")


def _rendered(loaded: "LoadedConfig", fmt: str) -> str:
    import yaml

    from rlctl.config import redact, to_dict

    data = redact(to_dict(loaded.cfg))
    if fmt == "json":
        return json.dumps(data, indent=2)
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=None)


def _print_tree(loaded: "LoadedConfig") -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.tree import Tree

    from rlctl.config import redact, to_dict

    data = redact(to_dict(loaded.cfg))
    explicit = loaded.explicit
    chain = redact(" < ".join(["defaults", *loaded.sources]))
    root = Tree(f"[bold]resolved config[/bold] ({escape(chain)})")

    def add(node: Tree, d: dict, prefix: str) -> None:
        for k, v in d.items():
            path = f"{prefix}{k}"
            if isinstance(v, dict):
                add(node.add(f"[bold]{escape(k)}[/bold]"), v, path + ".")
            else:
                mark = " [cyan](set)[/cyan]" if path in explicit else ""
                node.add(f"{escape(k)}: [green]{escape(json.dumps(v))}[/green]{mark}")

    add(root, data, "")
    Console(soft_wrap=False).print(root)
    Console().print(redact(f"run dir: {loaded.cfg.run_dir}\ncheckpoints: {loaded.cfg.ckpt_dir}"), highlight=False)


@app.command("check-config")
def check_config(
    overrides: OverridesArg = None,
    preset: PresetOpt = None,
    config: ConfigOpt = None,
    backend: BackendOpt = None,
    fmt: Annotated[Format, typer.Option("--format", "-f", help="Output: rich tree, or yaml/json for machines.")] = Format.tree,
    memory: Annotated[bool, typer.Option("--memory-plan", help="Print the GPU memory plan (in --format) instead of "
                                         "the config.")] = False,
    gpu_memory_gb: GpuMemOpt = None,
    ray_address: RayAddressOpt = None,
    ignore_memory_plan: IgnorePlanOpt = False,
) -> None:
    """Validate a configuration and print it resolved, with notes and warnings (on stderr), then check the GPU
    memory plan (per GPU: trainer, reference model, SGLang engine) against the GPU."""
    loaded = _load(preset, config, overrides, backend)
    if not memory:
        if fmt is Format.tree:
            _print_tree(loaded)
        else:
            typer.echo(_rendered(loaded, fmt.value), nl=False)
    _print_notes(loaded)
    # the tree output shows the plan after the config; yaml/json keep stdout to the config unless --memory-plan
    _memory_plan(loaded, gpu_memory_gb, ray_address, ignore_memory_plan,
                 fmt.value if memory else ("tree" if fmt is Format.tree else None), asked=memory)


@app.command()
def train(
    overrides: OverridesArg = None,
    preset: PresetOpt = None,
    config: ConfigOpt = None,
    backend: BackendOpt = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Validate, write <run dir>/config.yaml, and stop.")] = False,
    ray_address: RayAddressOpt = None,
    gpu_memory_gb: GpuMemOpt = None,
    ignore_memory_plan: IgnorePlanOpt = False,
) -> None:
    """Train with GRPO. The run folder is <trainer.log_path>/<trainer.project_name>/<trainer.run_name>."""
    extra = [f"ray.address={ray_address}"] if ray_address else []
    loaded = _load(preset, config, overrides, backend, for_training=True, extra=extra, command="train", dry_run=dry_run)
    _print_notes(loaded)
    _preflight(loaded.cfg, "train", dry_run=dry_run)
    _memory_plan(loaded, gpu_memory_gb, ray_address, ignore_memory_plan or dry_run)
    run_dir = loaded.cfg.run_dir
    if dry_run:
        from rlctl.config import redact

        try:
            write_text_atomic(run_dir / "config.yaml", _rendered(loaded, "yaml"))
        except OSError as exc:
            _err(redact(f"rlctl: cannot write {run_dir / 'config.yaml'}: {exc}"))
            raise typer.Exit(2) from None
        typer.echo(redact(f"dry run: configuration is valid; wrote {run_dir / 'config.yaml'}"))
        return
    job = _import_runtime("rlctl.job")
    from rlctl.config import ConfigError
    from rlctl.models import ModelSourceError

    try:
        job.train(loaded)
    except ConfigError as exc:  # device-dependent rules, checked once trainer.device=auto is resolved
        _err("rlctl: invalid configuration for this machine:")
        for line in exc.errors:
            _err(f"  - {line}")
        raise typer.Exit(2) from None
    except ModelSourceError as exc:
        _err(f"rlctl: {exc}")
        raise typer.Exit(2 if exc.bad_input else 1) from None
    except job.PlacementTimeout as exc:
        _err(f"rlctl: {exc}")
        raise typer.Exit(1) from None


@app.command("eval")
def eval_(
    model: Annotated[str, typer.Option("--model", "-m", help="Model folder or hub name to evaluate (sets trainer.policy.model.path).")],
    overrides: EvalOverridesArg = None,
    preset: PresetOpt = None,
    config: ConfigOpt = None,
    backend: BackendOpt = None,
    ray_address: RayAddressOpt = None,
) -> None:
    """Greedy pass@1 of a model on data.val_data (strict and flexible GSM8K scores)."""
    model = _eval_model_folder(model)
    extra = [f"trainer.policy.model.path={model}"] + ([f"ray.address={ray_address}"] if ray_address else [])
    loaded = _load(preset, config, overrides, backend, extra=extra, command="eval")
    _print_notes(loaded)
    missing = [p for p in loaded.cfg.data.val_data if not Path(p).is_file()]
    if missing:  # with this machine's other problems, in one message
        _err(f"rlctl: data.val_data: file(s) do not exist: {', '.join(missing)}; run `rlctl prepare-data gsm8k`")
    _preflight(loaded.cfg, "eval", failed=bool(missing))
    job = _import_runtime("rlctl.job")
    from rlctl.models import ModelSourceError

    try:
        metrics = job.evaluate(loaded)
    except ModelSourceError as exc:
        _err(f"rlctl eval: {exc}")
        raise typer.Exit(2 if exc.bad_input else 1) from None
    except job.PlacementTimeout as exc:
        _err(f"rlctl eval: {exc}")
        raise typer.Exit(1) from None
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (rlctl.job.entry.Terminated); Ray is already shut down
        from rlctl.job.entry import stopped_by_sigterm

        terminated = stopped_by_sigterm(exc)
        _err(f"{'terminated (SIGTERM)' if terminated else 'interrupted'}: evaluation stopped, Ray shut down")
        raise typer.Exit(143 if terminated else 130) from None
    for k, v in sorted((metrics or {}).items()):
        whole = isinstance(v, float) and v.is_integer() and k.endswith("num_problems")  # a count
        typer.echo(f"{k}: {int(v)}" if whole else f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}")


def _eval_model_folder(model: str) -> str:
    """``--model`` of ``rlctl eval``: a hub name as given; a local folder must hold a model
    (``config.json``). A checkpoint folder (``global_step_N``, whose model is in ``policy/``) is
    accepted for its ``policy/`` subfolder. Exits 2 naming the folder otherwise."""
    from rlctl.config import _looks_like_local_path, expand_path

    path = Path(expand_path(model))  # ~ and $VARS, as trainer.policy.model.path
    if not path.exists():
        if _looks_like_local_path(model):
            _err(f"rlctl eval: --model {model}: folder does not exist (give a model folder, a checkpoint's "
                 "global_step_N folder, or a hub name like Qwen/Qwen2.5-1.5B-Instruct)")
            raise typer.Exit(2)
        return model  # a hub name
    if not path.is_dir():
        _err(f"rlctl eval: --model {model}: not a folder")
        raise typer.Exit(2)
    if (path / "config.json").is_file():
        return model
    if (path / "policy" / "config.json").is_file():
        _err(f"note: --model {model} is a checkpoint; evaluating its policy model {path / 'policy'}")
        return str(path / "policy")
    _err(f"rlctl eval: --model {model}: no config.json in this folder (nor in {path / 'policy'}); give a model "
         "folder (e.g. a checkpoint's global_step_N/policy)")
    raise typer.Exit(2)


def _import_runtime(name: str) -> Any:
    import importlib

    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name == name:
            _err(f"rlctl: {name} is missing from this installation; reinstall rlctl")
        else:
            _err(f"rlctl: cannot import {exc.name} (needed by {name}); install the runtime dependencies, e.g. "
                 f"pip install -e . (and 'rlctl[sglang]' for the SGLang backend)")
        raise typer.Exit(1) from None


@app.command("prepare-data")
def prepare_data(
    dataset: Annotated[Dataset, typer.Argument(help="Dataset to prepare.")],
    output_dir: Annotated[Path, typer.Option("--output-dir", "-o", help="Where train.parquet and validation.parquet go.")] = Path("~/data/gsm8k"),
    source_dir: Annotated[Optional[Path], typer.Option("--source-dir", "-s", help="Folder with train.jsonl and test.jsonl (GSM8K format); default: download openai/gsm8k.")] = None,
) -> None:
    """Write GSM8K as train.parquet and validation.parquet (chat prompts, gold answers)."""
    gsm8k = _import_runtime("rlctl.gsm8k")
    out = Path(os.path.expanduser(str(output_dir)))
    try:
        counts = gsm8k.prepare_gsm8k(out, os.path.expanduser(str(source_dir)) if source_dir else None)
    except gsm8k.DataPrepError as exc:
        _err(f"rlctl prepare-data: {exc}")
        # README exit codes: 1 runtime failure (the hub could not be reached), 2 invalid input
        raise typer.Exit(1 if isinstance(exc, gsm8k.DownloadError) else 2) from None
    for split, rows in (counts or {}).items():
        typer.echo(f"{split}: {rows} rows -> {out / (split + '.parquet')}")


@app.command("prepare-model")
def prepare_model(
    name: Annotated[ModelName, typer.Argument(help="Model to prepare.")],
    output_dir: Annotated[Path, typer.Option("--output-dir", "-o", help="Output folder (Hugging Face format).")] = Path("~/models/smollm2-135m-instruct"),
) -> None:
    """Write SmolLM2-135M-Instruct as a Hugging Face folder (for the gsm8k-cpu preset)."""
    models = _import_runtime("rlctl.models")
    try:
        path = models.prepare_smollm2(Path(os.path.expanduser(str(output_dir))))
    except getattr(models, "ModelPrepError", RuntimeError) as exc:
        _err(f"rlctl prepare-model: {exc}")
        raise typer.Exit(2) from None
    typer.echo(f"model ready: {path}")


@app.command()
def plot(run_dir: Annotated[Path, typer.Argument(help="A run folder (with metrics.jsonl).")]) -> None:
    """Plot a run's metrics to PNG files in the run folder."""
    import warnings

    plot_mod = _import_runtime("rlctl.plot")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            paths = plot_mod.plot_run(Path(os.path.expanduser(str(run_dir))))
    except (FileNotFoundError, ValueError) as exc:
        _err(f"rlctl plot: {exc}")
        raise typer.Exit(2) from None
    for w in caught:
        if "incomplete last line" in str(w.message):
            _err(f"note: {w.message}")
    for p in paths or []:
        typer.echo(str(p))


@app.command()
def presets() -> None:
    """List the presets (presets/*.yaml) with their descriptions."""
    from rich.console import Console
    from rich.table import Table

    from rlctl.config import list_presets, presets_dir

    found = list_presets()
    if not found:
        _err(f"rlctl: no presets found in {presets_dir()}")
        raise typer.Exit(1)
    table = Table("preset", "description", title=f"presets in {presets_dir()}", title_justify="left")
    for name, desc in found:
        table.add_row(name, desc)
    Console().print(table)


def main() -> None:  # pragma: no cover - console entry point alternative
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
