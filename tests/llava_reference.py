"""LLaVA's conversation formats and label masking, written out from LLaVA-1.5's ``llava/conversation.py`` and
``llava/train/train.py`` (``preprocess_multimodal``, ``tokenizer_image_token``, ``preprocess_plain``,
``preprocess_v1``) and LLaVA-NeXT's ``qwen_2`` / ``llava_llama_3`` templates, as the reference the tests hold
``trainer.data.conversations`` against. Nothing here imports the trainer: the two are independent.

Also: ``sp_tokenizer()``, a tiny SentencePiece-style tokenizer (Metaspace pre-tokenizer that puts "▁" before
every section, BOS added, ``</s>`` eos, pad = unk as LLaVA sets it), on which LLaVA's token-count masking of
``preprocess_v1`` is exact, so its labels can be compared token for token.
"""

from __future__ import annotations

import copy

IGNORE_INDEX = -100
IMAGE_TOKEN_INDEX = -200
IMAGE = "<image>"

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


# ---- conversation.py ----------------------------------------------------------------------------------------
def prompt_two(
    system: str, roles: tuple[str, str], messages: list[tuple[str, str]], sep: str, sep2: str
) -> str:
    """``SeparatorStyle.TWO`` ``get_prompt``."""
    seps = [sep, sep2]
    ret = system + seps[0]
    for i, (role, message) in enumerate(messages):
        if message:
            ret += role + ": " + message + seps[i % 2]
        else:
            ret += role + ":"
    return ret


def prompt_chatml(system: str, messages: list[tuple[str, str]]) -> str:
    """LLaVA-NeXT ``conv_qwen`` (CHATML) ``get_prompt``: ``system`` already carries ``<|im_start|>system\\n``."""
    sep = "<|im_end|>"
    ret = "" if system == "" else system + sep + "\n"
    for role, message in messages:
        ret += role + "\n" + message + sep + "\n" if message else role + "\n"
    return ret


def prompt_llama_3(bos: str, system: str, messages: list[tuple[str, str]]) -> str:
    """Meta-Llama-3-Instruct's chat template over ``[system] + messages`` without the generation prompt
    (the text ``preprocess_llama3`` trains on)."""
    out = ""
    for i, (role, content) in enumerate([("system", system), *messages]):
        piece = "<|start_header_id|>" + role + "<|end_header_id|>\n\n" + content.strip() + "<|eot_id|>"
        out += (bos + piece) if i == 0 else piece
    return out


# ---- train.py ---------------------------------------------------------------------------------------------
def preprocess_multimodal(conversations: list[dict]) -> list[dict]:
    out = copy.deepcopy(conversations)
    for sentence in out:
        if IMAGE in sentence["value"]:
            sentence["value"] = sentence["value"].replace(IMAGE, "").strip()
            sentence["value"] = IMAGE + "\n" + sentence["value"]
            sentence["value"] = sentence["value"].strip()
    return out


def tokenizer_image_token(prompt: str, tokenizer) -> list[int]:
    chunks = [tokenizer(chunk).input_ids for chunk in prompt.split(IMAGE)]
    input_ids, offset = [], 0
    if chunks and chunks[0] and chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        input_ids.append(chunks[0][0])
    pieces = []
    for i, chunk in enumerate(chunks):
        if i:
            pieces.append([IMAGE_TOKEN_INDEX] * (offset + 1))
        pieces.append(chunk)
    for piece in pieces:
        input_ids.extend(piece[offset:])
    return input_ids


def preprocess_plain(conversations: list[dict], tokenizer) -> tuple[str, list[int], list[int]]:
    assert len(conversations) == 2 and IMAGE in conversations[0]["value"]
    text = IMAGE + conversations[1]["value"] + "\n"
    input_ids = tokenizer_image_token(text, tokenizer)
    labels = list(input_ids)
    labels[: len(tokenizer_image_token(IMAGE, tokenizer))] = [IGNORE_INDEX] * len(
        tokenizer_image_token(IMAGE, tokenizer)
    )
    return text, input_ids, labels


def preprocess_v1(
    conversations: list[dict], tokenizer, has_image: bool, eos: str = "</s>", legacy: bool = True
) -> tuple[str, list[int], list[int]]:
    """``preprocess_v1`` for one conversation: (prompt, input_ids, labels); labels all -100 on a mismatch."""
    roles = {"human": "USER", "gpt": "ASSISTANT"}
    source = conversations
    if roles[source[0]["from"]] != "USER":
        source = source[1:]
    messages = []
    for j, sentence in enumerate(source):
        role = roles[sentence["from"]]
        assert role == ("USER", "ASSISTANT")[j % 2]
        messages.append((role, sentence["value"]))
    prompt = prompt_two(VICUNA_SYSTEM, ("USER", "ASSISTANT"), messages, " ", eos)
    if has_image:
        input_ids = tokenizer_image_token(prompt, tokenizer)
    else:
        input_ids = tokenizer(prompt).input_ids
    target = list(input_ids)
    sep = " " + "ASSISTANT" + ": "
    total_len = sum(1 for t in target if t != tokenizer.pad_token_id)
    rounds = prompt.split(eos)
    cur_len = 1
    target[:cur_len] = [IGNORE_INDEX] * cur_len

    def count(text):
        return len(tokenizer_image_token(text, tokenizer)) if has_image else len(tokenizer(text).input_ids)

    for i, rou in enumerate(rounds):
        if rou == "":
            break
        parts = rou.split(sep)
        if len(parts) != 2:
            break
        parts[0] += sep
        round_len = count(rou)
        instruction_len = count(parts[0]) - 2
        if i != 0 and not legacy:
            round_len -= 1
            instruction_len -= 1
        target[cur_len : cur_len + instruction_len] = [IGNORE_INDEX] * instruction_len
        cur_len += round_len
    target[cur_len:] = [IGNORE_INDEX] * (len(target) - cur_len)
    if cur_len != total_len:
        target = [IGNORE_INDEX] * len(target)
    return prompt, input_ids, target


def expand_image(input_ids: list[int], labels: list[int], num_patches: int, pad_id: int):
    """What ``prepare_inputs_labels_for_multimodal`` does to the -200 slot: P embeddings labelled -100 (our
    sequences hold the pad id there)."""
    ids, labs = [], []
    for tok, lab in zip(input_ids, labels):
        if tok == IMAGE_TOKEN_INDEX:
            ids += [pad_id] * num_patches
            labs += [IGNORE_INDEX] * num_patches
        else:
            ids.append(tok)
            labs.append(lab)
    return ids, labs


# ---- a tiny SentencePiece-style tokenizer --------------------------------------------------------------------
SP_CORPUS = [
    VICUNA_SYSTEM,
    "USER: ASSISTANT: What is in the photo? A cat on a sofa. What colour is it? Ginger.",
    "Describe the image briefly. Look at this picture. A red motorcycle parked in a garage.",
    "The quick brown fox jumps over the lazy dog. Hello, how are you today? I am fine, thank you.",
    "Where is it? Which one? Here. There is a cat. It shows a dog.\nWhat\nA\n",
]


def sp_tokenizer():
    """Byte-free BPE with a Metaspace pre-tokenizer (``prepend_scheme="always"``: every section, also after a
    special token, starts with "▁", as Llama's legacy SentencePiece does), ``<s>`` prepended, ``</s>`` eos,
    pad = unk."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    bpe.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    alphabet = sorted(
        set("".join(SP_CORPUS))
        | set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,?!:;'\n▁")
    )
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=alphabet,
        show_progress=False,
    )
    bpe.train_from_iterator(SP_CORPUS * 3, trainer=trainer)
    bos_id = bpe.token_to_id("<s>")
    bpe.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>"
    )
