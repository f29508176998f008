"""Prompts and references from any `datasets` source, checked row by row and tokenized once."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from orchestrator.config import DataConfig
from orchestrator.text import encode_prompt, encode_response


class DataError(ValueError):
    """A dataset that cannot feed a run; the message names the file or split, the row and the field."""


@dataclass
class Examples:
    """One split, tokenized with the run's tokenizer."""

    source: str
    prompts: list[str]
    references: list[str]
    answers: list[str | None]
    prompt_ids: list[list[int]]
    reference_ids: list[list[int]]  # response + EOS
    skipped_long: int  # prompts over max_prompt_tokens, when long_prompt = "skip"

    def __len__(self) -> int:
        return len(self.prompts)


def load_split(data: DataConfig, split: str, tokenizer) -> Examples:
    import datasets  # heavy import, only where data is loaded

    files = data.data_files or None
    source = f"{data.path}:{split}"
    if files is not None:
        if split not in files:
            raise DataError(f"data.data_files has no entry for split {split!r} (has {', '.join(files)})")
        source = files[split]
        if "://" not in source and not Path(source).exists():
            raise DataError(f"data.data_files.{split}: file not found: {source}")
        files = {split: source}
    try:
        rows = datasets.load_dataset(data.path, data.name, data_files=files, split=split)
    except Exception as err:  # datasets raises many types; the user needs the source and the cause
        bad_line = first_bad_json_line(source) if data.path == "json" else None
        if bad_line is not None:
            raise DataError(bad_line) from err
        raise DataError(f"{source}: could not load split {split!r} with datasets ({type(err).__name__}: {err})") from err
    return tokenize_rows(rows, data, tokenizer, source)


def first_bad_json_line(path: str) -> str | None:
    """"<file>:<line>: not valid JSON (...)" for the first JSON Lines row that does not parse (datasets
    only says that generating the dataset failed); None when every line parses or it is no local file."""
    if "://" in path or not Path(path).is_file():
        return None
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, start=1):  # only on the error path: find the line to name
            if not line.strip():
                continue
            try:
                json.loads(line)
            except json.JSONDecodeError as err:
                return f"{path}:{number}: not valid JSON ({err.msg} at column {err.colno}): {line.strip()[:80]!r}"
    return None


def tokenize_rows(rows, data: DataConfig, tokenizer, source: str) -> Examples:
    """Check every row's fields, then tokenize prompts and references."""
    columns = set(rows.column_names)
    for field_name in (data.prompt_field, data.response_field):
        if field_name not in columns:
            raise DataError(f"{source}: no field {field_name!r} in the rows (fields: {', '.join(sorted(columns))})")
    prompts = rows[data.prompt_field]
    references = rows[data.response_field]
    answers = rows[data.answer_field] if data.answer_field in columns else [None] * len(prompts)
    for i, (prompt, reference) in enumerate(zip(prompts, references)):
        for field_name, value in ((data.prompt_field, prompt), (data.response_field, reference)):
            if value is None:
                raise DataError(f"{source}: row {i}: field {field_name!r} is missing (null)")
            if not isinstance(value, str):
                raise DataError(f"{source}: row {i}: field {field_name!r} must be text, got {type(value).__name__} {value!r:.60}")
        if not prompt.strip():
            raise DataError(f"{source}: row {i}: field {data.prompt_field!r} is empty")
    if not prompts:
        raise DataError(f"{source}: no rows")

    prompt_ids = [encode_prompt(tokenizer, p, data.use_chat_template) for p in prompts]
    keep = [i for i, ids in enumerate(prompt_ids) if len(ids) <= data.max_prompt_tokens]
    skipped = 0
    if data.long_prompt == "truncate":
        prompt_ids = [ids[-data.max_prompt_tokens :] for ids in prompt_ids]  # the end holds the question
        keep = list(range(len(prompts)))
    else:
        skipped = len(prompts) - len(keep)
    return Examples(
        source=source,
        prompts=[prompts[i] for i in keep],
        references=[references[i] for i in keep],
        answers=[None if answers[i] is None else str(answers[i]) for i in keep],
        prompt_ids=[prompt_ids[i] for i in keep],
        reference_ids=[encode_response(tokenizer, references[i]) for i in keep],
        skipped_long=skipped,
    )


def with_prompts(examples: Examples, prompts: list[str], tokenizer, use_chat_template: bool = True) -> Examples:
    """The same examples with other prompt texts (e.g. a rationale added), tokenized again."""
    return Examples(examples.source, prompts, examples.references, examples.answers,
                    [encode_prompt(tokenizer, p, use_chat_template) for p in prompts], examples.reference_ids, 0)
