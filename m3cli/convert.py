"""Import a local Hugging Face Llama-family checkpoint (Llama, Qwen2, Mistral, SmolLM) or a
GGUF file into an m3 model dir.

Reads safetensors weights and JSON configs directly (no pickle: `pytorch_model.bin` is
refused); GGUF goes through transformers' GGUF loader, which de-quantizes to float.
Knows nothing about memory banks or training.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from .checkpoint import model_from_state, reference_prefix_ids, save_model_dir
from .config import ConfigError, M3Config
from .errors import M3Error

SUPPORTED = ("llama", "qwen2", "mistral")

_LAYER_MAP = {
    "self_attn.q_proj": "attn.q_proj",
    "self_attn.k_proj": "attn.k_proj",
    "self_attn.v_proj": "attn.v_proj",
    "self_attn.o_proj": "attn.o_proj",
    "mlp.gate_proj": "mlp.gate_proj",
    "mlp.up_proj": "mlp.up_proj",
    "mlp.down_proj": "mlp.down_proj",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "mlp_norm",
}
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")


def config_from_hf(hf: dict, prefix_ids: tuple[int, ...], name: str) -> M3Config:
    """Translate a Hugging Face config dict into an M3Config, refusing what m3 cannot run."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED:
        raise M3Error(
            f"unsupported architecture {model_type!r}: m3 converts Llama-family checkpoints "
            f"({', '.join(SUPPORTED)}; SmolLM is llama)"
        )
    theta = hf.get("rope_theta")
    for key in ("rope_parameters", "rope_scaling"):
        rope = hf.get(key)
        if rope is None:
            continue
        if not isinstance(rope, dict):
            raise M3Error(f"{key} in the checkpoint's config is not an object")
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in (None, "default"):
            raise M3Error(f"RoPE scaling {rope_type!r} is not supported by m3 yet (only plain RoPE)")
        theta = theta or rope.get("rope_theta")
    theta = theta or 10000.0
    if hf.get("mlp_bias"):
        raise M3Error("checkpoints with MLP biases are not supported")
    act = hf.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise M3Error(f"activation {act!r} is not supported (m3's MLP is SwiGLU with SiLU)")
    if model_type == "llama" and hf.get("attention_bias"):
        raise M3Error("Llama checkpoints with attention biases (incl. o_proj) are not supported")
    try:
        heads = int(hf["num_attention_heads"])
        hidden = int(hf["hidden_size"])
        context = int(hf.get("max_position_embeddings") or 2048)
        window = hf.get("sliding_window")
        if window and (model_type == "mistral" or hf.get("use_sliding_window")) and int(window) < context:
            context = int(window)  # within the window, sliding-window attention is full attention
        return M3Config(
            name=name,
            vocab_size=int(hf["vocab_size"]),
            hidden_size=hidden,
            n_layers=int(hf["num_hidden_layers"]),
            n_heads=heads,
            n_kv_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=int(hf.get("head_dim") or hidden // heads),
            intermediate_size=int(hf["intermediate_size"]),
            rope_theta=float(theta),
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2",
            context_length=context,
            reference_prefix_ids=prefix_ids,
            extra={"source_model_type": model_type},
        )
    except (KeyError, ValueError, TypeError, ConfigError) as e:
        raise M3Error(f"cannot translate the checkpoint's config: {type(e).__name__}: {e}") from None


def state_from_hf(hf_state: dict[str, torch.Tensor], cfg: M3Config) -> dict[str, torch.Tensor]:
    """Rename Hugging Face weights to m3's names; refuse anything unexpected."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in hf_state.items():
        if key.endswith("rotary_emb.inv_freq"):
            continue
        if key == "model.embed_tokens.weight":
            out["embed.weight"] = tensor
        elif key == "model.norm.weight":
            out["norm.weight"] = tensor
        elif key == "lm_head.weight":
            if not cfg.tie_embeddings:
                out["lm_head.weight"] = tensor
        else:
            m = _LAYER_KEY.match(key)
            if not m or m.group(2) not in _LAYER_MAP:
                raise M3Error(f"unexpected tensor {key!r} in the checkpoint")
            out[f"layers.{m.group(1)}.{_LAYER_MAP[m.group(2)]}.{m.group(3)}"] = tensor
    return out


def _read_safetensors_dir(src: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    index = src / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            files = sorted(set(weight_map.values()))
            if not all(isinstance(f, str) for f in files):
                raise TypeError("file names must be strings")
        except (ValueError, KeyError, AttributeError, TypeError) as e:
            raise M3Error(f"{index} is not a valid safetensors index: {e}") from None
    elif (src / "model.safetensors").is_file():
        files = ["model.safetensors"]
    elif any(src.glob("*.bin")) or any(src.glob("*.pt")):
        raise M3Error(
            f"{src} holds only pickle weights (.bin/.pt), which m3 does not load; "
            "save the model with safe_serialization=True first"
        )
    else:
        raise M3Error(f"{src} has no model.safetensors")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        if Path(name).is_absolute() or len(Path(name).parts) != 1 or name in (".", ".."):
            raise M3Error(f"safetensors index names a file outside {src}: {name}")
        path = src / name  # may be a symlink, as in the Hugging Face cache
        try:
            state.update(load_file(str(path)))
        except (SafetensorError, OSError, ValueError) as e:
            raise M3Error(f"{path} is not a readable safetensors file ({str(e).splitlines()[0]})") from None
    return state


def _load_tokenizer(src: Path, gguf_file: str | None = None):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(
            str(src), gguf_file=gguf_file, local_files_only=True, trust_remote_code=False
        )
    except Exception as e:  # transformers raises many types here
        raise M3Error(f"cannot load a tokenizer from {src}: {str(e).splitlines()[0]}") from None


def _gguf_special_tokens(tokenizer, path: Path) -> None:
    """Give the tokenizer the start, end, unknown and padding tokens the GGUF file names: some
    transformers versions take another one (SmolLM2's `<|im_start|>` as its end token). A start
    token is only changed, never added, unless the file asks for one (`add_bos_token`)."""
    import gguf

    fields = gguf.GGUFReader(str(path)).fields
    T = gguf.GGUFValueType
    ints = {T.UINT8, T.INT8, T.UINT16, T.INT16, T.UINT32, T.INT32, T.UINT64, T.INT64}

    def scalar(key: str, types: set):
        """The field's one value when it is one value of one of `types`, else None."""
        field = fields.get(key)
        if field is None or len(field.types) != 1 or field.types[0] not in types or len(field.data) != 1:
            return None
        value = field.parts[field.data[0]]
        return value[0] if len(value) == 1 else None

    add_bos = scalar("tokenizer.ggml.add_bos_token", {T.BOOL})
    for key, attr in (("bos", "bos_token"), ("eos", "eos_token"), ("unknown", "unk_token"), ("padding", "pad_token")):
        tid = scalar(f"tokenizer.ggml.{key}_token_id", ints)
        if tid is None or not 0 <= int(tid) < len(tokenizer):
            continue  # no such integer, or not a token id of this vocabulary: keep what transformers chose
        have = getattr(tokenizer, f"{attr}_id", None)
        if key == "bos" and have is None and not bool(add_bos):
            continue
        if have != int(tid):
            setattr(tokenizer, attr, tokenizer.convert_ids_to_tokens(int(tid)))


def _load_gguf(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, local_files_only=True, trust_remote_code=False
        )
    except ImportError as e:
        raise M3Error(f"reading GGUF needs the `gguf` package ({e})") from None
    except Exception as e:
        raise M3Error(f"cannot read GGUF file {path}: {str(e).splitlines()[0]}") from None
    hf = model.config.to_dict()
    return hf, {k: v.detach() for k, v in model.state_dict().items()}


def resolve_source(src: Path) -> tuple[str, Path]:
    """('hf', dir) or ('gguf', file) for a checkpoint dir, a GGUF file, or a dir holding one GGUF."""
    src = Path(src)
    if not src.exists():
        raise M3Error(f"{src} does not exist")
    if src.is_file():
        with open(src, "rb") as f:
            if f.read(4) == b"GGUF":
                return "gguf", src
        raise M3Error(f"{src} is neither a GGUF file nor a checkpoint directory")
    if (src / "config.json").is_file():
        return "hf", src
    ggufs = sorted(src.glob("*.gguf"))
    if len(ggufs) == 1:
        return "gguf", ggufs[0]
    if len(ggufs) > 1:
        raise M3Error(f"{src} holds several GGUF files; name one of them")
    raise M3Error(f"{src} has no config.json and no .gguf file: not a Hugging Face checkpoint")


def convert(src: Path, out: Path, dtype: str = "auto", overwrite: bool = False) -> M3Config:
    """Convert `src` into the m3 model dir `out`; returns the new config."""

    kind, path = resolve_source(src)
    source_dir, target = path.resolve() if kind == "hf" else path.parent.resolve(), Path(out).resolve()
    if target == source_dir or target in source_dir.parents:
        raise M3Error(f"the output {out} would contain or replace the source checkpoint; choose another path")
    if kind == "hf":
        try:
            hf = json.loads((path / "config.json").read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise M3Error(f"{path / 'config.json'} is not valid JSON: {e}") from None
        if not isinstance(hf, dict):
            raise M3Error(f"{path / 'config.json'} is not a JSON object")
        config_from_hf(hf, (0,), "probe")  # refuse unsupported architectures before loading weights
        tokenizer = _load_tokenizer(path)
        hf_state = _read_safetensors_dir(path)
        name = path.name
    else:
        tokenizer = _load_tokenizer(path.parent, gguf_file=path.name)
        _gguf_special_tokens(tokenizer, path)
        hf, hf_state = _load_gguf(path)
        name = path.stem
    cfg = config_from_hf(hf, reference_prefix_ids(tokenizer, "Reference:"), name)
    state = state_from_hf(hf_state, cfg)
    model = model_from_state(cfg, state, f"the checkpoint {src}")
    if dtype != "auto":
        from .device import DTYPES

        if dtype not in DTYPES:
            raise M3Error(f"unknown dtype {dtype!r}; use auto, {', '.join(sorted(DTYPES))}")
        model = model.to(DTYPES[dtype])
    save_model_dir(model, tokenizer, out, overwrite=overwrite)
    return cfg
