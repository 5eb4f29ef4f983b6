"""``attndenoise eval``: noisy-context QA, needle retrieval or perplexity of a model (with an optional adapter)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from . import app
from .common import (
    at_least,
    check_adapter_dir,
    fail,
    numbers,
    one_line_warnings,
    output_folder,
    parse_sets,
    set_threads,
    user_errors,
)

#: ``attndenoise.evaluate.TASKS``, spelled out so that building the CLI does not import the evaluation code (torch
#: generation utilities: about a third more start-up time); tests/test_cli.py pins the two equal
TASK_NAMES = ("noisy-qa", "needle", "ppl")


DTYPES = ("float32", "bfloat16", "float16")


def check_method(method: str | None, sets: dict[str, Any]) -> Any:
    """``--method`` / ``--set`` before any model is loaded: the validated config of an inference-only method, or
    ``None``. A trainable method at its initial values computes the stock model, so it is refused with the fix."""
    from .. import registry

    if method is None:
        if sets:
            fail(f"--set {', '.join(sorted(sets))}: give --method too (--set sets fields of that method's config)")
        return None
    cfg = registry.config_for(method, **sets)  # ConfigError: unknown method / field, bad value
    if cfg.trainable:
        inference = sorted(n for n, c in registry.METHODS.items() if not c.trainable)
        fail(f"--method {method} is trainable: at its initial values it computes the stock model. Train it "
             f"(attndenoise train --method {method}) and pass --adapter; --method takes the inference-only methods "
             f"({', '.join(inference)})")
    return cfg


def load_model(model: str | None, adapter: Path | None, dtype: str = "float32",
               method_config: Any = None) -> tuple[Any, Any]:
    """The model and tokenizer ``model`` names (``attndenoise.models.resolve_model``: default the embedded tiny
    model; ``smollm2-135m``, a GGUF file, a folder or a hub id), in ``dtype``, with ``adapter``
    loaded: a training run directory by ``attndenoise.load_trained`` (method adapter, LoRA or plain fine-tuning), a
    method adapter saved by ``attndenoise.save`` by ``attndenoise.load``; then the inference-only method of
    ``method_config`` (:func:`check_method`) applied. Call inside :func:`user_errors`."""
    import torch
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import attndenoise as ad
    from attndenoise.models import accepted_models, resolve_model
    from attndenoise.patch import state_of

    if dtype not in DTYPES:
        fail(f"--dtype {dtype!r}: accepted: {', '.join(DTYPES)}")
    if adapter is not None:
        check_adapter_dir(adapter)  # before the (possibly slow) model load
    path = resolve_model(model)
    try:
        m = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, SafetensorError) as e:
        # a hub id that is not there (offline), a damaged weights file, a config transformers does not know
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        fail(f"--model {model or 'tiny'}: cannot load a causal LM from {path}: {first} (accepted: "
             f"{accepted_models()})")
    if adapter is not None:
        # A training run directory (run.json: method adapter, LoRA or plain fine-tuning) goes through load_trained;
        # a bare method adapter written by attndenoise.save through load.
        m = ad.load_trained(m, str(adapter)) if (adapter / "run.json").is_file() else ad.load(m, str(adapter))
        m.eval()
    if method_config is not None:
        base = m.get_base_model() if hasattr(m, "get_base_model") else m
        if state_of(base) is not None:
            fail(f"--method {method_config.name}: the adapter already carries method "
                 f"'{state_of(base).config.name}'; an inference-only method goes on a model without one")  # type: ignore[union-attr]
        ad.apply(base, method_config)
    return m, tok


def model_labels(adapters: list[Path], labels: list[str], model: str | None, method: str | None
                 ) -> tuple[list[str], str]:
    """Names of the evaluated models in tables and plots (one per adapter, or one for the model itself when no
    adapter is given) and of the base: ``--label`` values in order, else each adapter's folder name, its whole path
    where two names would collide (results sharing a label are read as seeds of one model and averaged); the base is
    named after ``model`` (``tiny`` by default), ``base`` if an adapter already took that name."""
    count = max(1, len(adapters))
    if labels and len(labels) != count:
        fail(f"--label: {len(labels)} label(s) for {count} model(s); give one --label per --adapter, or none")
    base = Path(model).name if model else "tiny"
    if labels:
        names = list(labels)
    elif adapters:
        folder = [a.name or str(a) for a in adapters]
        names = [str(a) if folder.count(f) > 1 else f for a, f in zip(adapters, folder, strict=True)]
        names = [f"{x}+{method}" if method else x for x in names]
    else:
        names = [f"{base}+{method}" if method else base]
    repeated = sorted({x for x in names if names.count(x) > 1})
    if repeated:
        fail(f"--label {', '.join(repeated)}: given to several models; every model needs its own label")
    return names, ("base" if base in names else base)


def parse_floats(text: str, what: str) -> list[float]:
    """Comma-separated numbers (kept for callers of the old helper)."""
    return list(numbers(text, what))


@app.command("eval")
def eval_command(
    model: Annotated[str | None, typer.Option(help="tiny (default: the embedded model), smollm2-135m, a .gguf file, "
                                                  "a model folder or a hub id")] = None,
    adapter: Annotated[list[Path] | None, typer.Option(
        help="trained run / adapter directory to load onto the model; repeat it (or give a comma list) to compare "
             "several runs in one results file and plot")] = None,
    no_base: Annotated[bool, typer.Option(
        "--no-base", help="with --adapter / --method: do not evaluate the base model as the reference")] = False,
    method: Annotated[str | None, typer.Option(
        help="an inference-only method to apply to the loaded model (sra; see `attndenoise methods sra`)")] = None,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", help="a field of --method's config, key=value (repeatable), e.g. --set b=5 --set t=24")] = None,
    task: Annotated[str, typer.Option(help="noisy-qa, needle or ppl (comma-separated for several)")] = "noisy-qa",
    noise: Annotated[str, typer.Option(help="noise ratios in [0, 1) for noisy-qa; 'as-is' keeps the data's "
                                            "contexts")] = "0,0.5,0.8,0.9",
    n: Annotated[int, typer.Option(help="examples per noise ratio (noisy-qa), texts (ppl); >= 1")] = 100,
    data: Annotated[Path | None, typer.Option(help="local JSONL of QA examples (default: synthetic test)")] = None,
    texts: Annotated[Path | None, typer.Option(help="ppl: local text file (one per line) or JSONL with 'text'")] = None,
    context_lengths: Annotated[str, typer.Option(help="needle: context lengths (integers >= 1)")] = "64,128,256",
    depths: Annotated[str, typer.Option(help="needle: depths in [0, 1]")] = "0,0.25,0.5,0.75,1",
    needle_n: Annotated[int, typer.Option(help="needle: pass keys per cell")] = 5,
    seed: Annotated[int, typer.Option(help="seed of examples and distractor draws (same for every model)")] = 0,
    batch_size: Annotated[int, typer.Option(help="generation batch size")] = 16,
    max_new_tokens: Annotated[int, typer.Option(help="longest generated answer")] = 16,
    label: Annotated[list[str] | None, typer.Option(
        help="name of the model in tables and plots (one per --adapter; default: the adapter folder's name)")] = None,
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16")] = "float32",
    out: Annotated[Path, typer.Option(help="output folder: results.json, results.csv, plots")] = Path("eval-out"),
    threads: Annotated[int | None, typer.Option(help="CPU threads for torch (default: torch's choice)")] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="report each finished setting with "
                                           "elapsed time and ETA on stderr (a bar on a terminal)")] = True,
) -> None:
    """Evaluate a model: greedy noisy-context QA (exact match, token F1 and the labelled lenient match), pass-key
    retrieval on a length x depth grid, or perplexity. Writes results.json / results.csv (and PNG plots) to --out.

    With --adapter (repeatable) or --method, the base model is evaluated too (unless --no-base) on the same seeded
    examples, and every model goes into one results.json / results.csv and one accuracy plot: the base as the
    reference line, n in the legend, 95% Wilson intervals as error bars.

    Every argument and data file is checked before the model is loaded; an error is one line and exit code 2, and
    nothing is written.

    Example: attndenoise eval --adapter runs/daa --task noisy-qa,needle --noise 0,0.8,0.9 --out eval/daa

    Example: attndenoise eval --adapter runs/daa --adapter runs/lora --noise 0.8,0.9 --out eval/compare

    Example: attndenoise eval --method sra --set b=2 --set t=24 --out eval/sra
    """
    with user_errors():
        # -- every check that needs no model --------------------------------------------------------------------
        tasks = [t.strip() for t in task.split(",") if t.strip()]
        bad = [t for t in tasks if t not in TASK_NAMES]
        if bad or not tasks:
            fail(f"--task {task!r}: unknown task {', '.join(bad) or '(none given)'}; accepted: {', '.join(TASK_NAMES)}")
        ratios = None if noise.strip() == "as-is" else numbers(noise, "--noise", low=0.0, high=1.0, high_open=True)
        for value, option in ((n, "--n"), (needle_n, "--needle-n"), (batch_size, "--batch-size"),
                              (max_new_tokens, "--max-new-tokens")):
            at_least(value, option)
        at_least(seed, "--seed", 0)
        lengths = numbers(context_lengths, "--context-lengths", kind=int, low=1)
        depth_list = numbers(depths, "--depths", low=0.0, high=1.0)
        if dtype not in DTYPES:
            fail(f"--dtype {dtype!r}: accepted: {', '.join(DTYPES)}")
        output_folder(out)
        method_config = check_method(method, parse_sets(set_ or []))
        adapters = [Path(p.strip()) for a in adapter or [] for p in str(a).split(",") if p.strip()]
        names, base_name = model_labels(adapters, list(label or []), model, method)
        for a in adapters:
            check_adapter_dir(a)
        # (adapter, inference-only method, label) of every model to evaluate; the base last, as the reference
        targets: list[tuple[Path | None, Any, str]] = [
            (a, method_config, x) for a, x in zip(adapters, names[:len(adapters)], strict=True)]
        if not targets and method_config is not None:
            targets = [(None, method_config, names[0])]
        if no_base and not targets:
            fail("--no-base: nothing left to evaluate; give --adapter or --method")
        reference = None if no_base or not targets else base_name
        if not targets or reference is not None:
            targets.append((None, None, base_name if targets else names[0]))
        from attndenoise.data import ChatExample
        from attndenoise.evaluate import evaluate_model, evaluation_weight, qa_examples, read_texts, write_results
        from attndenoise.plots import plot_accuracy, plot_needle
        from attndenoise.progress import Progress

        if data is not None and "noisy-qa" in tasks:
            if not data.exists():
                fail(f"--data {data}: no such file (give a .jsonl/.json/.csv/.parquet file or a datasets folder)")
            examples = qa_examples(n, seed=seed, data=data)  # read now, so DataFormatError comes before the model
            chats = sum(isinstance(e, ChatExample) for e in examples)
            if chats and ratios is not None:
                fail(f"--data {data}: {chats} chat example(s) have no documents to add distractors to; evaluate "
                     "them with --noise as-is")
        text_list = read_texts(texts) if texts is not None and "ppl" in tasks else None
        set_threads(threads)

        # -- the model, then the measurement (errors still write nothing) ----------------------------------------
        import torch

        weight = evaluation_weight(tasks, noise_ratios=ratios, n=n, context_lengths=lengths, depths=depth_list,
                                   needle_n=needle_n, texts=text_list)
        # one reporter over every model: the ETA covers the whole comparison
        reporter = Progress(weight * len(targets), "eval") if progress else None
        results = []
        try:
            for path, cfg, name in targets:
                torch.manual_seed(seed)
                m, tok = load_model(model, path, dtype, cfg)
                with one_line_warnings():
                    res = evaluate_model(
                        m, tok, label=name, tasks=tasks, seed=seed, noise_ratios=ratios, n=n, data=data,
                        context_lengths=lengths, depths=depth_list, needle_n=needle_n, texts=text_list,
                        batch_size=batch_size, max_new_tokens=max_new_tokens,
                        progress=False if reporter is None else reporter,
                    )
                if cfg is not None:
                    res.settings["method"] = cfg.to_dict()
                res.settings["adapter"] = None if path is None else str(path)
                results.append(res)
                del m
        finally:
            if reporter is not None:
                reporter.close()
    json_path, csv_path = write_results(results, out)
    console = Console()
    table = Table("model", "task", "setting", "metric", "value", "n")
    for res in results:
        for row in res.rows():
            setting = (f"noise={row['noise_ratio']}" if row["task"] == "noisy-qa"
                       else f"len={row['context_len']} depth={row['depth']}" if row["task"] == "needle" else "")
            table.add_row(res.label, row["task"], setting, row["metric"], f"{row['value']:.4f}", str(row["n"]))
    console.print(table)
    if results[0].qa and ratios is not None:
        plot_accuracy(results, out / "accuracy.png", reference=reference,
                      title=f"Noisy-context QA: exact match, n={results[0].qa[0].n} per point" + (
                          f" (base: {reference})" if reference else ""))
    for res in results:
        if res.needle:
            safe = "".join(c if c.isalnum() or c in "-_.+" else "_" for c in res.label)
            plot_needle(res, out / ("needle.png" if len(results) == 1 else f"needle-{safe}.png"))
    console.print(f"wrote {json_path} and {csv_path}")
