"""Hugging Face causal LMs (LLaMA family) as sequence classifiers: another backbone family of
``ClassificationModel`` (``--model.backbone tinyllama | llama_tiny | hf``), so fit / validate / test / measure /
profile / benchmark / report, run directories, metrics.json, the recipe and ``ResourceAccounting`` all apply.

* :class:`SequenceClassifier` wraps ``AutoModelForSequenceClassification``'s parts: the base model (``model``,
  module names as in transformers: ``model.layers.21.mlp.down_proj``), its final norm (``norm``) and the new
  classification head (``score``, ``num_classes`` outputs). Its forward takes a batch input (a dict with
  ``input_ids`` and ``attention_mask``, or ``input_ids`` alone, padded with ``pad_token_id``) and returns
  logits, so ``ClassificationModel._step`` is unchanged. It scores **only the pooled token** (the last
  non-pad one, as ``LlamaForSequenceClassification``) and applies the final RMSNorm only to it: RMSNorm and
  the head act per position, so the logits are exactly those of transformers' model (tests), while autograd
  keeps a (B, H) tensor instead of two (B, T, H) ones behind the last fine-tuned layer.
* Only the fine-tuned (patched) linears and the head train (:meth:`SequenceClassifier.freeze_unpatched`):
  the norms of the last block are registered after its MLP and would otherwise count as "after the first
  fine-tuned layer".
* Pretrained weights (:func:`load_pretrained`): ``--model.name_or_path`` (a local directory or a hub name),
  else ``ckpts/hf/<name>/`` when it exists, else the hub; when nothing works the run stops naming the
  directory to fill. Never random weights unless ``--model.pretrained false``. Weights load in float32.
* The architecture facts of TinyLlama-1.1B (:data:`TINYLLAMA_CONFIG`) ship here, so ``profile`` runs on its
  real shapes without a download; with ``shape_only`` the network is built and run under
  ``FakeTensorMode`` (no memory, no arithmetic; every shape, saved tensor and FLOP count is the real one).
* LoRA (:func:`add_lora`): ``peft.inject_adapter_in_model`` on the chosen linears keeps the module names; the
  ``lora_A`` linears (their input is the activation LoRA keeps) are then what ``asi_core.patch`` wraps.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from .registry import MODELS, register_model
from .weights import ckpt_dir

# TinyLlama/TinyLlama-1.1B-Chat-v1.0 config.json (the authors' model, paper Table 4)
TINYLLAMA_HUB = "TinyLlama/TinyLlama-1.1B-Chat-v1.0"
TINYLLAMA_CONFIG = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=2048, intermediate_size=5632,
    num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
    max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0, hidden_act="silu",
    attention_bias=False, mlp_bias=False, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    initializer_range=0.02,
)
# A tiny LLaMA with the same module names (random init; tests and the CPU demo).
LLAMA_TINY_CONFIG = dict(
    model_type="llama", hidden_size=64, intermediate_size=176, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, vocab_size=512, max_position_embeddings=1024, rms_norm_eps=1e-5, rope_theta=10000.0,
    hidden_act="silu", attention_bias=False, mlp_bias=False, tie_word_embeddings=False, bos_token_id=1,
    eos_token_id=2, pad_token_id=0, initializer_range=0.02,
)
LLM_CONFIGS = {"tinyllama": TINYLLAMA_CONFIG, "llama_tiny": LLAMA_TINY_CONFIG, "hf": None}
HUB_NAMES = {"tinyllama": TINYLLAMA_HUB}


# the LLMs' own --model options, handed to create_llm (ModelSpec.options)
LLM_OPTIONS = ("name_or_path", "shape_only", "num_blocks")


def is_llm(backbone: str) -> bool:
    """A registered model with its own --model options (the LLMs); False for an unknown name."""
    spec = MODELS.get(backbone)
    return spec is not None and bool(spec.options)


def local_dir(backbone: str) -> Path:
    """Where offline weights of a registered LLM go: ``<ckpt_dir>/hf/<hub name's last part>/``."""
    return ckpt_dir() / "hf" / HUB_NAMES.get(backbone, backbone).split("/")[-1]


def source_of(backbone: str, name_or_path: Optional[str]) -> Optional[str]:
    """Where weights/tokenizer come from: ``name_or_path``, else the local directory if it holds a config,
    else the hub name (None for a backbone with neither, e.g. ``llama_tiny``)."""
    if name_or_path:
        return name_or_path
    if (local_dir(backbone) / "config.json").is_file():
        return str(local_dir(backbone))
    return HUB_NAMES.get(backbone)


def _hf_config(backbone: str, name_or_path: Optional[str], num_classes: int, pad_token_id: Optional[int]):
    from transformers import AutoConfig, LlamaConfig

    facts = LLM_CONFIGS.get(backbone)
    if facts is not None and not name_or_path:
        cfg = LlamaConfig(**{k: v for k, v in facts.items() if k not in ("architectures", "model_type")})
    elif name_or_path:
        cfg = AutoConfig.from_pretrained(name_or_path)
    else:
        raise ValueError(f"--model.backbone {backbone} needs --model.name_or_path (a local model directory or a hub "
                         f"name, e.g. {TINYLLAMA_HUB})")
    cfg.num_labels = num_classes
    if pad_token_id is not None:
        cfg.pad_token_id = pad_token_id
    elif getattr(cfg, "pad_token_id", None) is None:  # pad = eos when the model has none (LLaMA)
        eos = cfg.eos_token_id
        cfg.pad_token_id = eos[0] if isinstance(eos, (list, tuple)) else eos
    return cfg


def _from_pretrained(source: str, num_classes: int, pad_token_id: Optional[int]):
    """transformers' loader, config from the checkpoint (its own function so tests can simulate being offline)."""
    from transformers import AutoModelForSequenceClassification

    config = _hf_config("hf", source, num_classes, pad_token_id)
    return AutoModelForSequenceClassification.from_pretrained(source, config=config, dtype=torch.float32)


def load_pretrained(backbone: str, name_or_path: Optional[str], num_classes: int,
                    pad_token_id: Optional[int] = None) -> nn.Module:
    """The pretrained causal LM as ``AutoModelForSequenceClassification`` (new ``score`` head), in float32.
    Raises FileNotFoundError naming the local directory to fill when neither it nor the hub works."""
    source = source_of(backbone, name_or_path)
    target = Path(name_or_path) if name_or_path else local_dir(backbone)
    if source is None:
        raise FileNotFoundError(f"--model.backbone {backbone} has no published weights: pass --model.pretrained false "
                                f"(random init on purpose), --model.checkpoint (setup B) or --model.name_or_path DIR")
    try:
        return _from_pretrained(source, num_classes, pad_token_id)
    except (OSError, ValueError, EnvironmentError) as err:
        hub = HUB_NAMES.get(backbone, name_or_path)
        raise FileNotFoundError(
            f"pretrained weights for --model.backbone {backbone} are not available from {source} "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}).\n"
            f"Fix: on a machine with internet run `hf download {hub} --local-dir {target}` (or "
            f"`huggingface-cli download ...`) so that {target}/config.json and its *.safetensors exist, or pass "
            f"--model.name_or_path DIR; or --model.pretrained false to train from random weights on purpose."
        ) from err


class SequenceClassifier(nn.Module):
    """A causal LM's base model + final norm + head, scoring the last non-pad token (see module docstring)."""

    is_language_model = True

    def __init__(self, hf_model: nn.Module, pad_token_id: Optional[int]):
        super().__init__()
        base = getattr(hf_model, hf_model.base_model_prefix)
        if not hasattr(hf_model, "score") or not isinstance(getattr(base, "norm", None), nn.Module):
            raise ValueError(f"{type(hf_model).__name__}: expected a decoder with a final `norm` and a `score` head "
                             f"(LLaMA family: Llama, Mistral, Qwen2, ...)")
        self.model = base
        self.norm = base.norm
        base.norm = nn.Identity()  # applied to the pooled token only (RMSNorm is per position: exact)
        self.score = hf_model.score
        self.config = hf_model.config
        self.pad_token_id = pad_token_id
        self.fake_mode = None  # FakeTensorMode the parameters live in (shape-only profile), else None

    def forward(self, x):
        if isinstance(x, Mapping):
            ids, mask = x["input_ids"], x.get("attention_mask")
        else:
            ids = x
            mask = None if self.pad_token_id is None else (ids != self.pad_token_id).long()
        hidden = self.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        if mask is None:
            pooled = hidden[:, -1]
        else:  # rightmost non-pad position (right or left padding), as LlamaForSequenceClassification
            positions = torch.arange(ids.shape[-1], device=ids.device)
            last = (positions * mask.to(positions.dtype)).argmax(-1)
            pooled = hidden[torch.arange(ids.shape[0], device=ids.device), last]
        return self.score(self.norm(pooled))

    def freeze_unpatched(self, trainable: Sequence[nn.Module] = ()) -> None:
        """Only the patched layers' parameters (and ``trainable`` modules, e.g. LoRA's ``lora_B``) and the head
        train."""
        import asi_core

        keep = {id(p) for _, layer in asi_core.patched_layers(self) for p in layer.parameters()}
        keep |= {id(p) for m in [*trainable, self.score] for p in m.parameters()}
        for p in self.parameters():
            p.requires_grad_(id(p) in keep)

    def random_input(self, batch_size: int, length: int) -> dict:
        """Random token ids as a batch input (``profile`` / ``benchmark``), the last sample ending in one pad
        token: a padded batch, as BoolQ's at 512 tokens always are, so attention runs with its explicit mask
        (an all-ones mask lets transformers drop it, a data-dependent choice shape-only execution cannot make)."""
        ids = torch.randint(3, self.config.vocab_size, (batch_size, length))
        mask = torch.ones_like(ids)
        if length > 1:
            mask[-1, -1] = 0
            ids[-1, -1] = self.pad_token_id if self.pad_token_id is not None else 0
        return {"input_ids": ids, "attention_mask": mask}


def create_llm(backbone: str, num_classes: int, pretrained: bool, name_or_path: Optional[str] = None,
               pad_token_id: Optional[int] = None, shape_only: bool = False, num_blocks: Optional[int] = None
               ) -> SequenceClassifier:
    """Build (``pretrained=False``: random init from the shipped config or ``name_or_path``'s config) or load the
    LM as a :class:`SequenceClassifier` with a fresh ``num_classes`` head. ``shape_only``: parameters are fake
    tensors (``FakeTensorMode``; profile). ``num_blocks``: keep only the last N decoder blocks (benchmarks)."""
    from transformers import AutoModelForSequenceClassification

    if pretrained and shape_only:
        raise ValueError("shape-only execution uses no weights: it needs --model.pretrained false")
    fake_mode = None
    if pretrained:
        hf = load_pretrained(backbone, name_or_path, num_classes, pad_token_id)
        config = hf.config
    else:
        config = _hf_config(backbone, name_or_path, num_classes, pad_token_id)
        if shape_only:
            from torch._subclasses.fake_tensor import FakeTensorMode

            fake_mode = FakeTensorMode(allow_non_fake_inputs=True)  # asi_core.patch adds real buffers (step)
        with fake_mode if fake_mode is not None else contextlib.nullcontext():
            hf = AutoModelForSequenceClassification.from_config(config, dtype=torch.float32)
    if num_blocks is not None and not 1 <= num_blocks <= config.num_hidden_layers:
        raise ValueError(f"--model.num_blocks must be in [1, {config.num_hidden_layers}], got {num_blocks}")
    if fake_mode is None:
        hf.float()  # float32 unless asked otherwise (transformers 5 keeps a checkpoint's dtype by default)
    if num_blocks is not None and num_blocks < config.num_hidden_layers:
        base = getattr(hf, hf.base_model_prefix)
        base.layers = nn.ModuleList(list(base.layers)[-num_blocks:])
        for i, layer in enumerate(base.layers):  # the KV-cache index of each attention (unused: no cache)
            if hasattr(layer, "self_attn") and hasattr(layer.self_attn, "layer_idx"):
                layer.self_attn.layer_idx = i
        hf.config.num_hidden_layers = num_blocks
    net = SequenceClassifier(hf, config.pad_token_id)
    net.fake_mode = fake_mode
    _register_activations()
    return net


def _register_activations() -> None:
    """transformers' own activation modules (``ACT2FN``), for ``--model.approx_activations`` (asi_core.approx)."""
    from transformers import activations

    from asi_core import approx
    for name, table in (("SiLUActivation", lambda m: approx.SILU_2BIT),
                        ("GELUActivation", lambda m: approx.GELU_2BIT)):
        cls = getattr(activations, name, None)
        if cls is not None:  # (older transformers: nn.SiLU itself, known to asi_core.approx already)
            approx.register_activation(cls, table)


def _register(backbone: str) -> None:
    """LLaMA-family sequence classifier ``backbone``: "#Layers" = the last N linears named *mlp*."""
    def create(num_classes: int, pretrained: bool, **options) -> nn.Module:
        return create_llm(backbone, num_classes, pretrained, **options)

    register_model(backbone, builder=None, head="score", weights_url=HUB_NAMES.get(backbone, ""), weights_file="",
                   resolution=0, layer_type="linear", include="mlp", options=LLM_OPTIONS,
                   tokenizer_source=partial(source_of, backbone), shape_only_profile=True,
                   paper_flops="authors_llm", paper_flops_unit="TFLOPs")(create)


for _name in LLM_CONFIGS:  # tinyllama, llama_tiny, hf
    _register(_name)


# ----------------------------------------------------------------------------- LoRA
def add_lora(net: nn.Module, targets: Sequence[str], rank: int, alpha: float, dropout: float = 0.0
             ) -> tuple[list[str], list[nn.Module]]:
    """Inject peft LoRA adapters into the linears named ``targets`` (module names are kept; the base weights
    are frozen); return the names of their ``lora_A`` linears (what ``asi_core.patch`` wraps) and the
    ``lora_B`` modules (trained as they are)."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as err:  # pragma: no cover
        raise ImportError("--model.method lora / --model.lora need peft (pip install -r requirements.txt)") from err
    if rank < 1:
        raise ValueError(f"--model.lora_rank must be >= 1, got {rank}")
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets), bias="none")
    inject_adapter_in_model(config, net)
    modules = dict(net.named_modules())
    missing = [t for t in targets if f"{t}.lora_A.default" not in modules]
    if missing:
        raise ValueError(f"LoRA was not applied to {missing}")
    for p in net.parameters():
        p.requires_grad_(False)
    lora_b = [modules[f"{t}.lora_B.default"] for t in targets]
    for m in lora_b + [modules[f"{t}.lora_A.default"] for t in targets]:
        for p in m.parameters():
            p.requires_grad_(True)
    return [f"{t}.lora_A.default" for t in targets], lora_b


# ----------------------------------------------------------------------------- tokenizers
def load_tokenizer(source: str):
    """A tokenizer from a local directory, a hub name, or a ``tokenizer.json`` file; pad = eos when it has none."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    try:
        if source.endswith(".json") and os.path.isfile(source):  # a bare tokenizers file: name its special tokens
            tok = PreTrainedTokenizerFast(tokenizer_file=source)
            vocab = tok.get_vocab()
            names = {"bos_token": ("<s>", "[CLS]", "<|begin_of_text|>"), "eos_token": ("</s>", "[SEP]", "<|endoftext|>"),
                     "pad_token": ("<pad>", "[PAD]"), "unk_token": ("<unk>", "[UNK]"), "sep_token": ("[SEP]",)}
            tok.add_special_tokens({k: next(t for t in v if t in vocab) for k, v in names.items()
                                    if any(t in vocab for t in v)})
        else:
            tok = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise FileNotFoundError(
            f"tokenizer {source!r} could not be loaded ({type(err).__name__}: {str(err).splitlines()[0]}). Pass "
            f"--data.tokenizer DIR (a model directory with tokenizer files), a tokenizer.json, or a hub name when "
            f"online (for tinyllama: `hf download {TINYLLAMA_HUB} --local-dir {local_dir('tinyllama')}`)") from err
    if tok.eos_token is None:
        tok.eos_token = tok.sep_token or tok.pad_token or "</s>"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok
