"""A small byte-level BPE tokenizer built in code, with a ChatML/Qwen2.5-style tool chat template.

Why byte-level BPE: every ASCII string (JSON, numbers, error messages, other call syntaxes)
encodes and decodes exactly, with no unknown token. The normaliser and pre-tokenizer are Qwen2's,
except that numbers split into chunks of up to three digits (as in the Llama 3 and GPT-4
tokenizers) instead of single digits: every 1-3 digit chunk is one token, so copying an operand
or a tool result is a copy of one to four tokens, which the tiny model learns within the CPU
demo's budget (digit by digit it does not). The merges are written by hand from a word list
(tool names, JSON keys, template words, a few English words), so common words are single tokens
and the vocabulary stays small (~2.5k).

The tokenizer is saved as a generic `TokenizersBackend` (tokenizer.json loaded verbatim); a
`qwen2` model type would make AutoTokenizer (and so vLLM) rebuild it with Qwen2's single-digit
split, which is why the tiny model is a Llama (Qwen2 without the QKV bias).

Control tokens are added tokens (one id each, never split by BPE). `<|im_start|>`, `<|im_end|>`
and `<|endoftext|>` are marked special; the tool/answer tags are not, as in Qwen2.5: a decode with
`skip_special_tokens=True` (vLLM's default) must keep the tags, or tool calls would vanish from the
text the environment parses. `control_token_ids` returns all of them whatever their flag.
"""
from __future__ import annotations

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

# Qwen2's split regex, with numbers in runs of up to three digits (Qwen2 has `\p{N}` alone), and a
# word may keep a space-and-quote prefix: ` "emu` is one piece, so a JSON string value (`"b": "emu"`)
# and the same quoted word in prose (`subtract "emu"`) are the same single token.
SPLIT_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|(?: ?\"|[^\r\n\p{L}\p{N}])?\p{L}+|\p{N}{1,3}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# Every chunk the split can produce, leading zeros included ("082" in 896302414082); 0-9 are bytes.
NUMBER_TOKENS = [f"{i:02d}" for i in range(100)] + [f"{i:03d}" for i in range(1000)]

PAD_TOKEN = "<|endoftext|>"
EOS_TOKEN = "<|im_end|>"

# Name -> literal token. The names are what the monitor and the loss refer to.
CONTROL_TOKENS: dict[str, str] = {
    "im_start": "<|im_start|>",
    "im_end": "<|im_end|>",
    "tool_call_start": "<tool_call>",
    "tool_call_end": "</tool_call>",
    "tool_response_start": "<tool_response>",
    "tool_response_end": "</tool_response>",
    "answer_start": "<answer>",
    "answer_end": "</answer>",
    "endoftext": PAD_TOKEN,
}
_SPECIAL = {"<|im_start|>", "<|im_end|>", PAD_TOKEN}

# Words that become single tokens (each also with a leading space). Everything else falls back to
# shorter pieces or bytes, which is correct, just longer.
BASE_WORDS = """
name arguments type function description parameters properties required object integer number
string boolean array items enum result error value key
add sub mul div lookup get set calculator store
system user assistant tool tools Tools You you are a an the of to and or with in is for each
call calls return function-name args-json-object signatures within XML tags provided may one more
assist query answer Answer final Final the value stored under Compute compute where Use use
first then result hint Hint reply number inside careful exactly tool Unknown unknown missing
invalid Invalid Error JSON argument expected got must be not found format syntax
sum difference product First Second operand minuend subtrahend factor Returns returns
red blue green yellow orange purple black white gray pink brown cyan
apple pear plum grape lemon lime mango peach cherry melon kiwi fig
cat dog fox owl bee ant cow pig hen yak elk emu
Do do every step steps per turn turns then only integers numbers keys gives give Add Subtract
Multiply Get An Calculator calculator One NUMBER that those values What b
Start start subtract multiply by r
""".split()
# Punctuation runs that the pre-tokenizer keeps together.
BASE_SYMBOLS = ['{"', '":', '",', '"}', '}}', '"},', '}]', '[{"', '":{"', '"]', ' {"', ' [', ' "',
                '</', '/>', '>\n', '\n\n', '  ', '((', '))', '),', ' (', ' ((', ' =', ' +', ' -',
                ' *', '.\n', ':\n', '>\n\n', '}\n', '"\n']


def _byte_level(text: str) -> str:
    """The byte-level alphabet spelling of text (what BPE merges operate on)."""
    table = _bytes_to_unicode()
    return "".join(table[b] for b in text.encode("utf-8"))


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2's reversible byte -> printable character map (the ByteLevel pre-tokenizer's alphabet).
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _apply_merges(piece: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """Plain BPE: repeatedly merge the adjacent pair with the lowest rank."""
    parts = list(piece)
    while len(parts) > 1:
        pairs = [(ranks.get((a, b), len(ranks) + 1), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        rank, i = min(pairs)
        if rank > len(ranks):
            break
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts


def _vocab_and_merges(pieces: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte alphabet plus merges that make every piece a single token.

    Each piece is first segmented with the merges made so far; then merges joining those segments
    left to right are appended. Appended merges rank after all earlier ones, so they cannot change
    how earlier pieces segment, and every piece ends as one token."""
    vocab: dict[str, int] = {}
    for ch in sorted(_bytes_to_unicode().values()):
        vocab[ch] = len(vocab)
    ranks: dict[tuple[str, str], int] = {}
    for piece in sorted(set(pieces), key=lambda p: (len(p), p)):
        parts = _apply_merges(piece, ranks)
        acc = parts[0]
        for nxt in parts[1:]:
            ranks[(acc, nxt)] = len(ranks)
            acc += nxt
            vocab.setdefault(acc, len(vocab))
    return vocab, list(ranks)


def chat_template() -> str:
    """ChatML with tools in the system prompt, Hermes-style calls, tool results in user turns."""
    return (
        "{%- set offset = 0 %}"
        "{%- if tools %}"
        "{{- '<|im_start|>system\\n' }}"
        "{%- if messages and messages[0].role == 'system' %}"
        "{{- messages[0].content + '\\n\\n' }}{%- set offset = 1 %}"
        "{%- endif %}"
        "{{- '# Tools\\n\\nYou may call one or more functions. Their signatures are inside "
        "<tools></tools> XML tags:\\n<tools>' }}"
        "{%- for t in tools %}{{- '\\n' + (t | tojson) }}{%- endfor %}"
        "{{- '\\n</tools>\\n\\nFor each call, return a JSON object with the function name and "
        "arguments inside <tool_call></tool_call> tags:\\n<tool_call>\\n{\"name\": "
        "<function-name>, \"arguments\": <args-json-object>}\\n</tool_call><|im_end|>\\n' }}"
        "{%- elif messages and messages[0].role == 'system' %}"
        "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
        "{%- endif %}"
        "{%- for m in messages %}"
        "{%- if loop.index0 == 0 and m.role == 'system' %}"
        "{%- elif m.role == 'user' or m.role == 'system' "
        "or (m.role == 'assistant' and not m.tool_calls) %}"
        "{{- '<|im_start|>' + m.role + '\\n' + (m.content or '') + '<|im_end|>\\n' }}"
        "{%- elif m.role == 'assistant' %}"
        "{{- '<|im_start|>assistant\\n' + (m.content or '') }}"
        "{%- for tc in m.tool_calls %}"
        "{%- set f = tc.function if tc.function is defined else tc %}"
        "{%- if m.content or not loop.first %}{{- '\\n' }}{%- endif %}"
        "{{- '<tool_call>\\n{\"name\": \"' + f.name + '\", \"arguments\": ' }}"
        "{%- if f.arguments is string %}{{- f.arguments }}"
        "{%- else %}{{- f.arguments | tojson }}{%- endif %}"
        "{{- '}\\n</tool_call>' }}"
        "{%- endfor %}"
        "{{- '<|im_end|>\\n' }}"
        "{%- elif m.role == 'tool' %}"
        "{%- if loop.index0 == 0 or messages[loop.index0 - 1].role != 'tool' %}"
        "{{- '<|im_start|>user' }}{%- endif %}"
        "{{- '\\n<tool_response>\\n' + m.content + '\\n</tool_response>' }}"
        "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}"
        "{{- '<|im_end|>\\n' }}{%- endif %}"
        "{%- endif %}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
    )


def build_tokenizer(extra_words: list[str] | tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    """The tiny tokenizer as a Hugging Face fast tokenizer (save it with `save_pretrained`)."""
    words = list(BASE_WORDS) + list(extra_words)
    # The pre-tokenizer attaches one leading non-letter (space, quote, '<'), or a space and a quote,
    # to a word.
    pieces = [_byte_level(prefix + w) for w in words for prefix in ("", " ", '"', ' "', "<", "/")]
    pieces += [_byte_level(s) for s in BASE_SYMBOLS] + NUMBER_TOKENS
    pieces = [p for p in pieces if len(p) > 1]
    vocab, merges = _vocab_and_merges(pieces)

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    # Qwen2's pipeline with 1-3 digit number chunks (see the module docstring).
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.add_tokens([AddedToken(t, special=t in _SPECIAL, normalized=False)
                    for t in CONTROL_TOKENS.values()])

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        chat_template=chat_template(),
        model_max_length=4096,
        clean_up_tokenization_spaces=False,
    )
    return hf


def control_token_ids(tokenizer) -> dict[str, int]:
    """Name -> id of every control token (see CONTROL_TOKENS). Raises naming the missing token if
    the tokenizer lacks one or splits it into several ids."""
    out = {}
    for name, text in CONTROL_TOKENS.items():
        ids = tokenizer.encode(text, add_special_tokens=False)
        if len(ids) != 1 or tokenizer.convert_ids_to_tokens(ids[0]) != text:
            raise ValueError(f"tokenizer has no single token for control token {name}={text!r} "
                             f"(encodes to {ids})")
        out[name] = ids[0]
    return out
