"""Loader and scorer for the lowbit_tiny lm-eval tasks: 16 general-knowledge questions in lowbit_tiny.jsonl."""
import json
import os
import re

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lowbit_tiny.jsonl")


def load(**kwargs):
    """The questions as a DatasetDict with one `test` split (read from the file next to this one)."""
    import datasets
    with open(DATA) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def contains_answer(doc, results):
    """1 when the reply names the answer (or an alias of it) as a whole word, else 0."""
    reply = results[0]
    hit = any(re.search(rf"\b{re.escape(a)}\b", reply, re.IGNORECASE) for a in doc["aliases"])
    return {"contains": float(hit)}
