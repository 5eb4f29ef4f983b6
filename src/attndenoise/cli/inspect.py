"""``attndenoise inspect``: attention-to-gold numbers of one example per layer and its attention heatmap
(docs/methods.md, section Attention measures)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from . import app
from .common import (
    check_adapter_dir,
    fail,
    one_line_warnings,
    parse_sets,
    read_json_file,
    set_threads,
    user_errors,
)
from .evaluate import check_method, load_model

IMAGE_SUFFIXES = (".png", ".pdf", ".svg")


@app.command("inspect")
def inspect_command(
    model: Annotated[str | None, typer.Option(help="tiny (default: the embedded model), smollm2-135m, a .gguf file, "
                                                  "a model folder or a hub id")] = None,
    adapter: Annotated[Path | None, typer.Option(help="trained run / adapter directory to load onto the model")] = None,
    method: Annotated[str | None, typer.Option(
        help="an inference-only method to apply to the loaded model (sra)")] = None,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", help="a field of --method's config, key=value (repeatable), e.g. --set b=5")] = None,
    example: Annotated[Path | None, typer.Option(
        help="JSON file with one example record (documents/gold/question/answer, or messages + gold); "
             "default: a synthetic test example at --noise")] = None,
    noise: Annotated[float, typer.Option(help="noise ratio in [0, 1) of the default synthetic example")] = 0.8,
    seed: Annotated[int, typer.Option(help="seed of the default synthetic example")] = 0,
    layer: Annotated[int, typer.Option(help="layer whose map is drawn (negative counts from the end)")] = -1,
    query: Annotated[str, typer.Option(help="'last' (last prompt position) or 'answer' (answer positions)")] = "last",
    out: Annotated[Path, typer.Option(help="image of the attention heatmap (.png, .pdf or .svg)")] = Path(
        "attention.png"),
    threads: Annotated[int | None, typer.Option(help="CPU threads for torch (default: torch's choice)")] = None,
) -> None:
    """Print attention to gold and attention noise per layer (mass of the method's combined map over the gold /
    other documents' keys from the answer-generating position, mean over heads) and draw the heatmap.

    Example: attndenoise inspect --adapter runs/daa --example ex.json --layer -1 --out attention.png
    """
    with user_errors():
        if query not in ("last", "answer"):
            fail(f"--query {query!r}: accepted: last, answer")
        if not 0.0 <= noise < 1.0:
            fail(f"--noise {noise:g}: give a ratio in [0, 1) (0.8 = four distractors per gold document)")
        if seed < 0:
            fail(f"--seed {seed}: give an integer >= 0")
        if out.is_dir():
            fail(f"--out {out} is a folder; give an image file name ({', '.join(IMAGE_SUFFIXES)})")
        if out.suffix.lower() not in IMAGE_SUFFIXES:
            fail(f"--out {out}: give an image file name ending in {', '.join(IMAGE_SUFFIXES)}")
        method_config = check_method(method, parse_sets(set_ or []))
        if adapter is not None:
            check_adapter_dir(adapter)
        from attndenoise.data import ChatExample, SyntheticQA, build_noisy_example, parse_record
        from attndenoise.measures import example_attention
        from attndenoise.plots import plot_attention_map

        if example is not None:
            ex = parse_record(read_json_file(example, "--example"), example.name)  # DataFormatError names it
            if isinstance(ex, ChatExample) and ex.gold is None:
                fail(f"--example {example}: a chat example needs its 'gold' passage (a string inside one message) "
                     "to measure attention to gold")
        else:
            ex = build_noisy_example(SyntheticQA(seed, split="test").example(), noise, rng=seed)
        set_threads(threads)
        import torch

        torch.manual_seed(seed)
        m, tok = load_model(model, adapter, method_config=method_config)
        from attndenoise.families import attention_layers

        num_layers = len(attention_layers(m))  # UnsupportedModelError for another family
        li = layer + num_layers if layer < 0 else layer
        if not 0 <= li < num_layers:
            fail(f"--layer {layer} is out of range: the model has {num_layers} layers (give 0..{num_layers - 1}, "
                 f"or -{num_layers}..-1 from the end)")
        with one_line_warnings():
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
    out.parent.mkdir(parents=True, exist_ok=True)
    plot_attention_map(maps[li], enc.gold_spans, out, query_rows=rows, tokens=tokens,
                       title=f"layer {li}: gold {measures.gold[li]:.3f}, noise {measures.noise[li]:.3f}")
    Console().print(f"wrote {out}")
