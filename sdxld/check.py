"""`sdxld check`: is this installation ready? Config, model, prompts, LoRAs, upscaler weights."""

from __future__ import annotations

from .config import Config, model_source
from .layout import Layout
from .prompts import PromptSource


def _table(rows: list[list[str]], header: list[str]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths[:-1]) + "  {}"
    return [fmt.format(*header), fmt.format(*["-" * w for w in widths])] + [fmt.format(*r) for r in rows]


def run_check(config: Config, echo=print) -> int:
    """Print a report; exit status 0 when images can be made, 1 when the model cannot load."""
    from .engine import Engine
    from .models import ModelLoadError, load_models

    layout = Layout.from_config(config)
    echo(f"config     {config.source or '(defaults)'}: valid{'  [demo: built-in tiny SDXL]' if config.demo else ''}")
    for key in ("base", "refiner"):
        value = getattr(config.model, key)
        if key == "refiner" and not config.refiner_wanted():
            echo("refiner    off (no stage uses it: model.use_refiner, generation.stage2/stage3.use_refiner)")
            continue
        source = model_source(config, value)
        echo(f"{key:<10} {value} ({'hub id' if source.kind == 'hub' else source.kind})")

    prompts = PromptSource.from_layout(layout, config.prompts.max_extras)
    echo(f"prompts    {len(prompts.options())} options in {layout.prompt_options}, up to {config.prompts.max_extras} per image")
    weights = layout.upscaler_weights
    echo(f"upscaler   {weights}: {'present' if weights.is_file() else 'missing -> Lanczos fallback'}")

    try:
        models = load_models(config)
    except ModelLoadError as err:
        echo(f"model      FAILED: {err}")
        return 1
    echo(f"model      loaded on {models.device} ({models.dtype_name}){'; refiner loaded' if models.refiner else ''}")
    for note in models.notes:
        echo(f"           note: {note}")

    engine = Engine(config, models)
    engine.sync_loras()
    entries = engine.loras.entries()
    loaded = sum(e.status == "loaded" for e in entries)
    rejected = [e for e in entries if e.status == "rejected"]
    echo("")
    echo(f"LoRAs      {loaded} loaded, {len(rejected)} rejected")
    for kind, folder in layout.lora_dirs.items():
        echo(f"           {kind}: {folder}{'' if folder.is_dir() else ' (missing)'}")
    if entries:
        rows = []
        for e in entries:
            detail = e.reason if e.status != "loaded" else (f"{e.format}, hash {e.hash}" + (f"; triggers: {e.triggers}" if e.triggers else ""))
            rows.append([e.kind, e.path.name, e.status, detail])
        echo("")
        for line in _table(rows, ["kind", "file", "status", "detail"]):
            echo(line)
    return 0
