"""Load examples from local files: JSONL (checked line by line), or anything ``datasets`` reads from local files.

Three record shapes are accepted (extra fields are kept in ``meta``):

* documents: ``{"documents": [str, ...], "gold": int | [int, ...], "question": str, "answer": str}`` where ``gold``
  indexes ``documents`` (0-based); optional ``"layout": "documents" | "plain"``.
* chat: ``{"messages": [{"role": ..., "content": ...}, ...]}`` ending with the assistant message (the target);
  optional ``"gold": str``, a passage of an earlier message whose token span is recorded.
* multi-document QA (Lost in the Middle / DPR, see ``retrieval``): ``{"question": str, "answers": [str, ...],
  "ctxs": [{"title", "text", "hasanswer", "isgold"}, ...]}`` without ``documents``: the passages become the
  documents (``(Title: t) text``), the gold one per ``retrieval.gold_indices``, every answer kept in ``answers``.

JSONL files may be gzip-compressed (``.jsonl.gz``; detected by content).

In CSV files, list fields (``documents``, ``gold``, ``messages``) may hold JSON text (``"[0, 2]"``).
Every problem is reported as ``DataFormatError`` with the place: ``train.jsonl:17: missing field 'question'``
(``file:row N`` for files read through ``datasets``, whose rows have no reliable line numbers).
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from .examples import ChatExample, Example, NoisyExample

JSON_LINES = (".jsonl", ".ndjson")
# Extension -> `datasets` builder name, for the formats handed to `datasets.load_dataset`.
DATASETS_BUILDERS = {".csv": "csv", ".tsv": "csv", ".parquet": "parquet", ".arrow": "arrow"}
DOCUMENT_FIELDS = ("documents", "gold", "question", "answer")


class DataFormatError(ValueError):
    """A record that cannot become an example; the message starts with ``file:line:`` (or ``file:row N:``)."""


def load_examples(path: str | Path) -> list[Example]:
    """Read every example of a local file (``.jsonl``/``.ndjson``, ``.json``, ``.csv``/``.tsv``, ``.parquet``,
    ``.arrow``) or of a directory written by ``datasets.Dataset.save_to_disk``.

    Blank lines of a JSONL file are skipped; any other bad line raises ``DataFormatError`` naming the file and the
    line. Nothing is read from the network.
    """
    p = Path(path)
    if p.is_dir():
        return _load_saved_dataset(p)
    if not p.is_file():
        raise FileNotFoundError(f"no such data file: {p}")
    suffix = p.suffix.lower()
    if suffix in JSON_LINES or (suffix == ".gz" and Path(p.stem).suffix.lower() in JSON_LINES):
        return list(_iter_json_lines(p))
    if suffix == ".json":
        text = _read_text(p)
        if text.lstrip().startswith("["):
            try:
                records = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataFormatError(f"{p.name}:{e.lineno}: invalid JSON ({e.msg}, column {e.colno})") from None
            return [parse_record(rec, f"{p.name}:record {i + 1}") for i, rec in enumerate(records)]
        return list(_iter_json_lines(p))
    if suffix in DATASETS_BUILDERS:
        import datasets  # deferred: importing datasets costs about a second

        kwargs: dict[str, Any] = {"delimiter": "\t"} if suffix == ".tsv" else {}
        ds = datasets.load_dataset(DATASETS_BUILDERS[suffix], data_files=str(p), split="train", **kwargs)
        return examples_from_records(ds, source=p.name)
    accepted = ", ".join((*JSON_LINES, *(s + ".gz" for s in JSON_LINES), ".json", *DATASETS_BUILDERS))
    raise DataFormatError(f"{p.name}: unsupported file type {suffix!r}; accepted: {accepted}, or a save_to_disk folder")


def examples_from_records(records: Iterable[Mapping[str, Any]], source: str = "<records>") -> list[Example]:
    """Examples from in-memory records (a ``datasets.Dataset``, a list of dicts); errors name ``source:row N``."""
    return [parse_record(rec, f"{source}:row {i + 1}") for i, rec in enumerate(records)]


def parse_record(record: Any, where: str) -> Example:
    """One record -> ``NoisyExample`` or ``ChatExample``; ``where`` prefixes every error message."""
    if not isinstance(record, Mapping):
        raise DataFormatError(f"{where}: expected a JSON object, got {type(record).__name__}")
    try:
        if "messages" in record and record["messages"] is not None:
            return _parse_chat(record, where)
        if record.get("ctxs") is not None and record.get("answers") is not None and record.get("documents") is None:
            from .retrieval import multidoc_record_example  # deferred: retrieval imports this module

            return multidoc_record_example(record, where)
        return _parse_documents(record, where)
    except DataFormatError:
        raise
    except ValueError as e:  # validation in the dataclasses
        raise DataFormatError(f"{where}: {e}") from None


def _parse_documents(record: Mapping[str, Any], where: str) -> NoisyExample:
    for name in DOCUMENT_FIELDS:
        if record.get(name) is None:
            hint = " (or give 'messages' for a chat example)" if name == "documents" else ""
            raise DataFormatError(f"{where}: missing field '{name}'{hint}")
    documents = _maybe_json(record["documents"])
    if isinstance(documents, str) or not isinstance(documents, list | tuple):
        raise DataFormatError(f"{where}: field 'documents' must be a list of strings, got {type(documents).__name__}")
    for i, d in enumerate(documents):
        if not isinstance(d, str):
            raise DataFormatError(f"{where}: field 'documents' item {i} must be a string, got {type(d).__name__}")
    gold = _maybe_json(record["gold"])
    if isinstance(gold, int) and not isinstance(gold, bool):
        gold = [gold]
    if not isinstance(gold, list | tuple) or not all(isinstance(g, int) and not isinstance(g, bool) for g in gold):
        raise DataFormatError(f"{where}: field 'gold' must be a document index or a list of indices, got {gold!r}")
    values = {}
    for name in ("question", "answer"):
        value = record[name]
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)  # a CSV reader turns an answer like 73914 into a number
        if not isinstance(value, str):
            raise DataFormatError(f"{where}: field '{name}' must be a string, got {type(value).__name__}")
        values[name] = value
    layout: Any = record.get("layout") or "documents"  # NoisyExample validates it
    meta = {k: v for k, v in record.items() if k not in (*DOCUMENT_FIELDS, "layout", "messages")}
    return NoisyExample(
        question=values["question"], documents=tuple(documents), gold=tuple(gold), answer=values["answer"],
        layout=layout, meta=meta,
    )


def _parse_chat(record: Mapping[str, Any], where: str) -> ChatExample:
    messages = _maybe_json(record["messages"])
    if not isinstance(messages, list | tuple):
        raise DataFormatError(f"{where}: field 'messages' must be a list of objects, got {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise DataFormatError(f"{where}: field 'messages' item {i} must be an object, got {type(m).__name__}")
        for key in ("role", "content"):
            if key not in m:
                raise DataFormatError(f"{where}: field 'messages' item {i}: missing field '{key}'")
    gold = record.get("gold")
    if gold is not None and not isinstance(gold, str):
        raise DataFormatError(f"{where}: field 'gold' of a chat example must be a string (a passage), got {gold!r}")
    meta = {k: v for k, v in record.items() if k not in ("messages", "gold")}
    # Parquet/arrow rows may carry extra null keys in each message (a union schema): keep role and content only.
    clean = tuple({"role": m["role"], "content": m["content"]} for m in messages)
    return ChatExample(messages=clean, gold=gold, meta=meta)


def _maybe_json(value: Any) -> Any:
    """CSV cells hold text: decode a cell that looks like a JSON list or number."""
    if isinstance(value, str):
        s = value.strip()
        if s.startswith("[") or s.lstrip("-").isdigit():
            try:
                return json.loads(s)
            except json.JSONDecodeError:
                return value
    return value


def _read_text(p: Path) -> str:
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataFormatError(f"{p.name}: not valid UTF-8 (byte {e.start})") from None


def _iter_json_lines(p: Path) -> Iterator[Example]:
    for where, record in iter_json_records(p):
        yield parse_record(record, where)


GZIP_MAGIC = b"\x1f\x8b"


def iter_json_records(p: Path) -> Iterator[tuple[str, Any]]:
    """``(file:line, decoded JSON)`` for every non-blank line of a JSON-lines file, gzip-compressed or not.

    Compression is recognised by the gzip magic bytes, so a misnamed file still reads; bad UTF-8, bad JSON and
    corrupt or truncated gzip data raise ``DataFormatError`` naming the line.
    """
    with p.open("rb") as raw_file:
        compressed = raw_file.read(2) == GZIP_MAGIC
    lineno = 0
    try:
        with gzip.open(p, "rb") if compressed else p.open("rb") as f:
            for lineno, raw in enumerate(f, start=1):
                where = f"{p.name}:{lineno}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise DataFormatError(f"{where}: not valid UTF-8") from None
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataFormatError(f"{where}: invalid JSON ({e.msg}, column {e.colno})") from None
                yield where, record
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise DataFormatError(f"{p.name}:{lineno + 1}: corrupt gzip data ({e})") from None


def _load_saved_dataset(p: Path) -> list[Example]:
    if not (p / "dataset_info.json").exists() and not (p / "dataset_dict.json").exists():
        raise DataFormatError(f"{p}: a directory must be written by datasets' save_to_disk (no dataset_info.json)")
    import datasets

    ds = datasets.load_from_disk(str(p))
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DataFormatError(f"{p.name}: a DatasetDict needs a 'train' split, found {list(ds)}")
        ds = ds["train"]
    return examples_from_records(ds, source=p.name)
