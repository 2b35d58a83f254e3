"""Text datasets for the LLM backbones (classification/llm.py), built by ``ClassificationData`` like the image
ones (setups A/B, splits): a sample is ``({"input_ids": (L,), "attention_mask": (L,)}, label)``, so a batch is
a dict the model's forward takes.

* ``boolq`` (Clark et al., 2019): the official JSONL files ``<root>/boolq/train.jsonl`` and ``dev.jsonl``
  (fields question, passage, answer; SuperGLUE's ``val.jsonl`` with ``label`` is accepted too). Each sample is
  ``question [SEP] passage`` with the model's tokenizer: [bos] question-tokens sep passage-tokens eos, the
  passage truncated so that the whole fits ``max_length`` (paper: 512), right-padded to ``max_length`` with
  the pad token (= eos when the tokenizer has none) and its attention mask. ``sep`` is the tokenizer's
  sep token, else its eos. dev.jsonl is the test set (and the validation set with ``--data.val_fraction 0``).
* ``digits_tokens``: scikit-learn's bundled 8x8 digits read as 64-token pixel sequences (sequential-MNIST
  style: token = pixel value 0..16 + 3), followed by an eos token (2) the classifier pools; no tokenizer, no
  download. For tests and the CPU demo with ``--model.backbone llama_tiny``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
from torch.utils.data import Dataset

from .registry import register_dataset

DIGITS_TOKENS_LENGTH = 65  # 64 pixels + eos
DIGIT_TOKEN_OFFSET = 3  # ids 0 (pad), 1 (bos), 2 (eos) are special; pixel value v is token v + 3
BOOLQ_HOW_TO = (
    "BoolQ (Clark et al., 2019; the `datasets` library no longer runs the old super_glue script): download "
    "https://storage.googleapis.com/boolq/train.jsonl and https://storage.googleapis.com/boolq/dev.jsonl "
    "(or SuperGLUE's BoolQ.zip, https://dl.fbaipublicfiles.com/glue/superglue/data/v2/BoolQ.zip, whose "
    "train.jsonl/val.jsonl also work) into <root>/boolq/, e.g. "
    "`mkdir -p data/boolq && for s in train dev; do curl -L -o data/boolq/$s.jsonl "
    "https://storage.googleapis.com/boolq/$s.jsonl; done`")


class TokenDataset(Dataset):
    """Pre-tokenised, padded sequences: (N, L) ids and masks, integer labels (``targets`` for setup B)."""

    def __init__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, targets: list[int]):
        self.input_ids, self.attention_mask, self.targets = input_ids, attention_mask, list(targets)

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return {"input_ids": self.input_ids[i], "attention_mask": self.attention_mask[i]}, self.targets[i]


def digits_tokens() -> TokenDataset:
    from sklearn.datasets import load_digits

    d = load_digits()
    pixels = torch.tensor(d.images.reshape(len(d.images), 64), dtype=torch.long) + DIGIT_TOKEN_OFFSET
    ids = torch.cat([pixels, torch.full((len(pixels), 1), 2, dtype=torch.long)], 1)
    return TokenDataset(ids, torch.ones_like(ids), [int(t) for t in d.target])


def read_jsonl(path: Path) -> list[dict]:
    """The objects of a JSON-lines file; ValueError naming the file and line of one that is not a JSON object."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path} line {number}: not valid JSON ({err.msg}, column {err.colno}); a truncated "
                                 f"or edited file? Re-download it") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path} line {number}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


_BOOL_WORDS = {"true": 1, "false": 0, "1": 1, "0": 0}


def boolq_label(row: dict, path: Path, number: int) -> int:
    """BoolQ's answer as 0/1: ``answer`` (official: true/false) or ``label`` (SuperGLUE: 0/1); also the strings
    "true"/"false"/"1"/"0" (any case), which some exports write. Anything else is a ValueError naming the line:
    ``bool("false")`` would read a string answer as yes."""
    key = "answer" if "answer" in row else "label" if "label" in row else None
    if key is None:
        raise ValueError(f"{path} line {number}: no 'answer' (or 'label') field; BoolQ rows hold question, passage "
                         f"and answer")
    value = row[key]
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int) and value in (0, 1):
        return value
    if isinstance(value, str) and value.strip().lower() in _BOOL_WORDS:
        return _BOOL_WORDS[value.strip().lower()]
    raise ValueError(f"{path} line {number}: '{key}' is {value!r}; expected true/false (or 0/1)")


def read_boolq(path: Path) -> tuple[list[str], list[str], list[int]]:
    """(questions, passages, labels) of a BoolQ JSONL file, every row checked (ValueError naming file and line)."""
    rows = read_jsonl(path)
    if not rows:
        raise ValueError(f"{path} holds no rows; expected BoolQ's JSON lines (question, passage, answer): "
                         f"re-download it")
    questions, passages, labels = [], [], []
    for number, row in enumerate(rows, 1):
        for field_ in ("question", "passage"):
            if not isinstance(row.get(field_), str):
                raise ValueError(f"{path} row {number}: '{field_}' is missing or not a string "
                                 f"({row.get(field_)!r}); BoolQ rows hold question, passage and answer")
        questions.append(row["question"])
        passages.append(row["passage"])
        labels.append(boolq_label(row, path, number))
    return questions, passages, labels


def encode_pairs(tokenizer, questions: list[str], passages: list[str], max_length: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """[bos] question sep passage eos, passage truncated to fit, right-padded: (N, max_length) ids and mask."""
    special = 2 + (tokenizer.bos_token_id is not None)
    if max_length < special + 2:
        raise ValueError(f"--data.max_length {max_length} is too short for question [SEP] passage")
    sep = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    q = tokenizer(questions, add_special_tokens=False)["input_ids"]
    p = tokenizer(passages, add_special_tokens=False)["input_ids"]
    ids = torch.full((len(q), max_length), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(q), max_length), dtype=torch.long)
    for i, (qi, pi) in enumerate(zip(q, p)):
        qi = qi[: max_length - special - 1]  # a question longer than everything keeps >= 1 passage token
        seq = ([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []) + qi + [sep]
        seq += pi[: max_length - len(seq) - 1] + [tokenizer.eos_token_id]
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
    return ids, mask


def boolq(root: Path, tokenizer: Optional[str], max_length: int) -> tuple[TokenDataset, TokenDataset]:
    """(train pool, dev set) of BoolQ under ``root`` (= <data.root>/boolq)."""
    train = root / "train.jsonl"
    dev = next((root / n for n in ("dev.jsonl", "val.jsonl") if (root / n).is_file()), root / "dev.jsonl")
    missing = [str(f) for f in (train, dev) if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"missing {', '.join(missing)}")
    if tokenizer is None:
        raise ValueError("boolq needs a tokenizer: --data.tokenizer DIR|tokenizer.json|hub name (default: the "
                         "model's own, from --model.backbone tinyllama / --model.name_or_path)")
    from .llm import load_tokenizer

    tok = load_tokenizer(tokenizer)

    def build(path: Path) -> TokenDataset:
        questions, passages, labels = read_boolq(path)
        ids, mask = encode_pairs(tok, questions, passages, max_length)
        return TokenDataset(ids, mask, labels)

    return build(train), build(dev)


# ----------------------------------------------------------------------------- registration
def _digits_tokens_build(root: Path, download: bool, **_) -> tuple[TokenDataset, None]:
    return digits_tokens(), None


def _boolq_build(root: Path, download: bool, tokenizer: Optional[str] = None, max_length: int = 512, **_
                 ) -> tuple[TokenDataset, TokenDataset]:
    return boolq(root, tokenizer, max_length)


register_dataset("digits_tokens", num_classes=10, build=_digits_tokens_build,
                 how_to_obtain="bundled with scikit-learn; nothing to download", kind="text", in_memory=True,
                 tokens=DIGITS_TOKENS_LENGTH)
register_dataset("boolq", num_classes=2, build=_boolq_build, how_to_obtain=BOOLQ_HOW_TO, kind="text", in_memory=True)


def check_vocabulary(datasets, vocab_size: int, model: str, tokenizer: Optional[str]) -> None:
    """Every token id of the text ``datasets`` (TokenDataset, or subsets of one) must be an embedding row of the
    model: ValueError naming the largest id, the model's vocabulary and the tokenizer, before any step (a token id
    past the embedding was an IndexError mid-run, leaving the run interrupted)."""
    seen = set()
    for ds in datasets:
        base = getattr(ds, "base", ds)
        ids = getattr(base, "input_ids", None)
        if ids is None or id(base) in seen or ids.numel() == 0:
            continue
        seen.add(id(base))
        largest = int(ids.max())
        if largest >= vocab_size:
            raise ValueError(f"the data holds token id {largest}, but {model}'s embedding has {vocab_size} rows "
                             f"(ids 0..{vocab_size - 1}): the tokenizer ({tokenizer or 'the default'}) is not the "
                             f"model's. Give the model's own tokenizer with --data.tokenizer (its checkpoint "
                             f"directory or tokenizer.json), or a model with this vocabulary")
