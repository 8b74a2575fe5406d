"""Chat templates a merge config can name (`chat_template: chatml`), as Jinja for
transformers' `apply_chat_template`: the prompt formats mergekit's built-in names stand for,
written from each format's published description; and the output's template a config's
`chat_template` chooses."""

from __future__ import annotations

from collections import Counter

from medmerge.errors import ConfigError

CHAT_TEMPLATES = {
    # ChatML: <|im_start|>role\ncontent<|im_end|>
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    # Llama 3: header tokens around each role, <|eot_id|> after each turn
    "llama3": (
        "{{ bos_token }}{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' "
        "+ message['content'] | trim + '<|eot_id|>' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}"
        "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
    # Mistral instruct: [INST] user [/INST] assistant</s>
    "mistral": (
        "{{ bos_token }}{% for message in messages %}"
        "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
        "{% elif message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}{% endif %}"
        "{% endfor %}"
    ),
    # Alpaca: ### Instruction: / ### Response: blocks
    "alpaca": (
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
        "{% elif message['role'] == 'user' %}"
        "{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
        "{% elif message['role'] == 'assistant' %}"
        "{{ '### Response:\\n' + message['content'] + eos_token + '\\n\\n' }}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"
    ),
    # EXAONE: [|role|]content, [|endofturn|] after system and assistant turns
    "exaone": (
        "{% for message in messages %}"
        "{% if loop.first and message['role'] != 'system' %}"
        "{{ '[|system|][|endofturn|]\\n' }}{% endif %}"
        "{{ '[|' + message['role'] + '|]' + message['content'] }}"
        "{% if message['role'] == 'user' %}{{ '\\n' }}{% else %}{{ '[|endofturn|]\\n' }}"
        "{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '[|assistant|]' }}{% endif %}"
    ),
}


def chosen_template(value: str | None, found: list[str | None]) -> str | None:
    """The output's chat template: None (the tokenizer source's stays), `auto` (the template
    most input models have, of `found`, as mergekit picks it), a named one, or a Jinja
    template."""
    if value is None:
        return None
    if value == "auto":
        found = [t for t in found if t]
        return Counter(found).most_common(1)[0][0] if found else None
    if value in CHAT_TEMPLATES:
        return CHAT_TEMPLATES[value]
    if "{" not in value:
        raise ConfigError(
            f"chat_template {value!r}: give `auto` (the template most input models have), one "
            f"of {', '.join(CHAT_TEMPLATES)}, or a Jinja template"
        )
    return value
