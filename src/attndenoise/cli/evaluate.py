"""``attndenoise eval``: noisy-context QA, needle retrieval or perplexity of a model (with an optional adapter)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from . import app

TASK_NAMES = ("noisy-qa", "needle", "ppl")


def load_model(model: str | None, adapter: Path | None, dtype: str = "float32") -> tuple[Any, Any]:
    """The model and tokenizer ``model`` names (``attndenoise.models.resolve_model``: default the embedded tiny
    model; ``smollm2-135m``, a GGUF file, a folder or a hub id), in ``dtype``, with ``adapter``
    loaded: a training run directory by ``attndenoise.load_trained`` (method adapter, LoRA or plain fine-tuning), a
    method adapter saved by ``attndenoise.save`` by ``attndenoise.load``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import attndenoise as ad
    from attndenoise.models import ModelNotFoundError, resolve_model

    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in dtypes:
        raise typer.BadParameter(f"{dtype!r}; accepted: {', '.join(dtypes)}", param_hint="--dtype")
    try:
        path = resolve_model(model)
    except ModelNotFoundError as e:
        raise typer.BadParameter(str(e), param_hint="--model") from None
    m = AutoModelForCausalLM.from_pretrained(path, dtype=dtypes[dtype]).eval()
    tok = AutoTokenizer.from_pretrained(path)
    if adapter is not None:
        if not adapter.is_dir():
            raise typer.BadParameter(f"no such adapter directory: {adapter}", param_hint="--adapter")
        # A training run directory (run.json: method adapter, LoRA or plain fine-tuning) goes through load_trained;
        # a bare method adapter written by attndenoise.save through load.
        load_trained = getattr(ad, "load_trained", None)
        if load_trained is not None and (adapter / "run.json").is_file():
            m = load_trained(m, str(adapter))
        else:
            m = ad.load(m, str(adapter))
        m.eval()
    return m, tok


def parse_floats(text: str, what: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise typer.BadParameter(f"{what}: give comma-separated numbers, got {text!r}") from None


@app.command("eval")
def eval_command(
    model: Annotated[str | None, typer.Option(help="tiny (default: the embedded model), smollm2-135m, a .gguf file, "
                                                  "a model folder or a hub id")] = None,
    adapter: Annotated[Path | None, typer.Option(help="trained run / adapter directory to load onto the model")] = None,
    task: Annotated[str, typer.Option(help="noisy-qa, needle or ppl (comma-separated for several)")] = "noisy-qa",
    noise: Annotated[str, typer.Option(help="noise ratios for noisy-qa; 'as-is' keeps the data's contexts")] = (
        "0,0.5,0.8,0.9"),
    n: Annotated[int, typer.Option(help="examples per noise ratio (noisy-qa), texts (ppl)")] = 100,
    data: Annotated[Path | None, typer.Option(help="local JSONL of QA examples (default: synthetic test)")] = None,
    texts: Annotated[Path | None, typer.Option(help="ppl: local text file (one per line) or JSONL with 'text'")] = None,
    context_lengths: Annotated[str, typer.Option(help="needle: context lengths")] = "64,128,256",
    depths: Annotated[str, typer.Option(help="needle: depths in [0, 1]")] = "0,0.25,0.5,0.75,1",
    needle_n: Annotated[int, typer.Option(help="needle: pass keys per cell")] = 5,
    seed: Annotated[int, typer.Option(help="seed of examples and distractor draws (same for every model)")] = 0,
    batch_size: Annotated[int, typer.Option(help="generation batch size")] = 16,
    max_new_tokens: Annotated[int, typer.Option(help="longest generated answer")] = 16,
    label: Annotated[str | None, typer.Option(help="name of this model in tables and plots")] = None,
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16")] = "float32",
    out: Annotated[Path, typer.Option(help="output folder: results.json, results.csv, plots")] = Path("eval-out"),
) -> None:
    """Evaluate a model: greedy noisy-context QA (exact match, token F1 and the labelled lenient match), pass-key
    retrieval on a length x depth grid, or perplexity. Writes results.json / results.csv (and PNG plots) to --out."""
    import torch

    from attndenoise.evaluate import evaluate_model, read_texts, write_results
    from attndenoise.plots import plot_accuracy, plot_needle

    torch.manual_seed(seed)
    tasks = [t.strip() for t in task.split(",") if t.strip()]
    bad = [t for t in tasks if t not in TASK_NAMES]
    if bad or not tasks:
        raise typer.BadParameter(f"unknown task {bad or task!r}; accepted: {', '.join(TASK_NAMES)}",
                                 param_hint="--task")
    ratios = None if noise.strip() == "as-is" else parse_floats(noise, "--noise")
    m, tok = load_model(model, adapter, dtype)
    name = label or (adapter.name if adapter is not None else Path(model).name if model else "tiny")
    res = evaluate_model(
        m, tok, label=name, tasks=tasks, seed=seed, noise_ratios=ratios, n=n, data=data,
        context_lengths=[int(x) for x in parse_floats(context_lengths, "--context-lengths")],
        depths=parse_floats(depths, "--depths"), needle_n=needle_n,
        texts=read_texts(texts) if texts is not None else None, batch_size=batch_size,
        max_new_tokens=max_new_tokens,
    )
    json_path, csv_path = write_results(res, out)
    console = Console()
    table = Table("task", "setting", "metric", "value", "n")
    for row in res.rows():
        setting = (f"noise={row['noise_ratio']}" if row["task"] == "noisy-qa"
                   else f"len={row['context_len']} depth={row['depth']}" if row["task"] == "needle" else "")
        table.add_row(row["task"], setting, row["metric"], f"{row['value']:.4f}", str(row["n"]))
    console.print(table)
    if res.qa and ratios is not None:
        plot_accuracy([res], out / "accuracy.png")
    if res.needle:
        plot_needle(res, out / "needle.png")
    console.print(f"wrote {json_path} and {csv_path}")
