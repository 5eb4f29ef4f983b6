"""``attndenoise inspect``: attention-to-gold numbers of one example per layer and its attention heatmap (SPEC 9)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from . import app
from .evaluate import load_model


@app.command("inspect")
def inspect_command(
    model: Annotated[str | None, typer.Option(help="tiny (default: the embedded model), smollm2-135m, a .gguf file, "
                                                  "a model folder or a hub id")] = None,
    adapter: Annotated[Path | None, typer.Option(help="trained run / adapter directory to load onto the model")] = None,
    example: Annotated[Path | None, typer.Option(
        help="JSON file with one example record (documents/gold/question/answer, or messages + gold); "
             "default: a synthetic test example at --noise")] = None,
    noise: Annotated[float, typer.Option(help="noise ratio of the default synthetic example")] = 0.8,
    seed: Annotated[int, typer.Option(help="seed of the default synthetic example")] = 0,
    layer: Annotated[int, typer.Option(help="layer whose map is drawn (negative counts from the end)")] = -1,
    query: Annotated[str, typer.Option(help="'last' (last prompt position) or 'answer' (answer positions)")] = "last",
    out: Annotated[Path, typer.Option(help="PNG of the attention heatmap")] = Path("attention.png"),
) -> None:
    """Print attention to gold and attention noise per layer (mass of the method's combined map over the gold /
    other documents' keys from the answer-generating position, mean over heads) and draw the heatmap."""
    import torch

    from attndenoise.data import SyntheticQA, build_noisy_example, parse_record
    from attndenoise.measures import example_attention
    from attndenoise.plots import plot_attention_map

    torch.manual_seed(seed)
    if query not in ("last", "answer"):
        raise typer.BadParameter("accepted: last, answer", param_hint="--query")
    if example is not None:
        if not example.is_file():
            raise typer.BadParameter(f"no such file: {example}", param_hint="--example")
        ex = parse_record(json.loads(example.read_text()), example.name)
    else:
        ex = build_noisy_example(SyntheticQA(seed, split="test").example(), noise, rng=seed)
    m, tok = load_model(model, adapter)
    from attndenoise.families import attention_layers

    num_layers = len(attention_layers(m))
    li = layer + num_layers if layer < 0 else layer
    if not 0 <= li < num_layers:
        raise typer.BadParameter(f"layer {layer} out of range for {num_layers} layers", param_hint="--layer")
    measures, maps, enc = example_attention(m, tok, ex, query=query, keep_maps=[li])  # type: ignore[arg-type]
    table = Table("layer", "attention to gold", "attention noise")
    for i, g, nz in zip(measures.layers, measures.gold, measures.noise, strict=True):
        table.add_row(str(i), f"{g:.4f}", f"{nz:.4f}")
    g, nz = measures.mean()
    table.add_row("mean", f"{g:.4f}", f"{nz:.4f}")
    Console().print(table)
    rows = list(range(enc.prompt_length - 1, maps[li].shape[-2]))
    if query == "last":  # show the last 24 prompt rows: the answer-generating one and the question before it
        rows = list(range(max(0, enc.prompt_length - 24), enc.prompt_length))
    tokens = tok.convert_ids_to_tokens(enc.input_ids[: maps[li].shape[-1]])
    plot_attention_map(maps[li], enc.gold_spans, out, query_rows=rows, tokens=tokens,
                       title=f"layer {li}: gold {measures.gold[li]:.3f}, noise {measures.noise[li]:.3f}")
    Console().print(f"wrote {out}")
