"""The small byte-level BPE tokenizer shipped for the embedded default model.

It is trained with the `tokenizers` library on the shipped instruction set and
saved in Hugging Face format (tokenizer.json, tokenizer_config.json and a chat
template), so `transformers.AutoTokenizer.from_pretrained` loads it offline.
`scripts/build_tokenizer.py` rebuilds it; the package ships the result in
`sparcom_jax/data/tokenizer/`.

Byte-level BPE needs no unknown token: any text encodes and decodes back exactly.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Sequence

from sparcom_jax.data.records import Record

TOKENIZER_DIR = Path(__file__).resolve().parent / "tokenizer"

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
USER, ASSISTANT, SYSTEM = "<|user|>", "<|assistant|>", "<|system|>"
#: Special tokens, in id order (pad is id 0, which `pad_batch` also defaults to).
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, USER, ASSISTANT, SYSTEM)
DEFAULT_VOCAB_SIZE = 4096

#: Chat template: one turn per message, a role token then the content; an
#: assistant turn ends with eos. Written on one line with explicit "\n" so Jinja's
#: whitespace trimming cannot change it. Rendering the user turn with
#: add_generation_prompt=True gives exactly the prefix of the full conversation.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<|system|>\\n' + message['content'] + '\\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>\\n' + message['content'] + '\\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\\n' + message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('unknown role: ' + message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def default_tokenizer():
    """Load the shipped tokenizer with `AutoTokenizer` (offline).

    Returns:
      A transformers fast tokenizer with pad, bos and eos tokens and a chat template.
    """
    from transformers import AutoTokenizer

    if not (TOKENIZER_DIR / "tokenizer.json").exists():
        raise FileNotFoundError(
            f"{TOKENIZER_DIR}: the shipped tokenizer is missing; rebuild it with "
            "`python scripts/build_tokenizer.py`"
        )
    return AutoTokenizer.from_pretrained(str(TOKENIZER_DIR), local_files_only=True)


def resolve_tokenizer(model=None, tokenizer=None):
    """The tokenizer to use with `model`: `tokenizer` if given, else the model
    directory's (``model.tokenizer``), else, for a model not loaded from a directory
    (a random one), the shipped one.

    Raises:
      ValueError: `model` was loaded from a directory that holds no tokenizer.
    """
    found = tokenizer or getattr(model, "tokenizer", None)
    if found is not None:
        return found
    if getattr(model, "source_path", None):
        raise missing_tokenizer(model.source_path)
    return default_tokenizer()


def missing_tokenizer(path: str | os.PathLike) -> ValueError:
    """The error for a model directory without tokenizer files."""
    return ValueError(
        f"{path}: no tokenizer beside the weights (tokenizer.json, tokenizer.model or vocab.json); download the "
        "model's tokenizer files into it too (or copy those of the model it was fine-tuned from). Another "
        "tokenizer would give the model token ids that mean something else, and its counts would mean nothing")


def train_tokenizer(texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE):
    """Train a byte-level BPE tokenizer.

    Deterministic for the same texts in the same order (single-threaded training).

    Args:
      texts: training texts.
      vocab_size: target vocabulary size, special tokens included. Smaller when
        the texts do not support that many merges.

    Returns:
      A `tokenizers.Tokenizer` whose post-processor prepends BOS.
    """
    # The BPE trainer runs on a thread pool; one thread keeps merges reproducible.
    os.environ.setdefault("RAYON_NUM_THREADS", "1")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    # Like Llama: encoding with special tokens prepends BOS, never appends EOS.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)],
    )
    return tok


def save_hf_tokenizer(tok, out_dir: str | os.PathLike, model_max_length: int = 2048) -> Path:
    """Save a `tokenizers.Tokenizer` in Hugging Face format with our special tokens
    and chat template. Returns the directory."""
    from transformers import PreTrainedTokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS, eos_token=EOS, pad_token=PAD,
        additional_special_tokens=[USER, ASSISTANT, SYSTEM],
        model_max_length=model_max_length,
        padding_side="right",
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )
    hf.save_pretrained(str(out))
    # Name the class every transformers version knows (v5 maps it to its backend).
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return out


def build_default_tokenizer(
    records: Sequence[Record], out_dir: str | os.PathLike = TOKENIZER_DIR,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
) -> Path:
    """Train on `records` formatted with the plain template (so its fixed headers become
    single tokens) and save to `out_dir` (the shipped location by default)."""
    from sparcom_jax.data.templates import format_plain

    texts = (prompt + response for prompt, response in map(format_plain, records))
    return save_hf_tokenizer(train_tokenizer(texts, vocab_size), out_dir)
