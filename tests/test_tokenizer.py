"""Tokenizer: loading an HF-style folder, BOS/EOS rules, decode, and chat templates as HF renders them."""

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from kvtriton.backend.engine.tokenizer import Tokenizer

CORPUS = [
    "Hello world, the quick brown fox jumps over the lazy dog.",
    "你好，世界。我们在测试分词器。",
    "Emoji time 😀🚀👍🏽 and more 😀 smiles.",
    "Ünïcödé àccents — and “quotes”.",
]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# SmolLM2-Instruct's template shape: a default system turn, ChatML turns, a generation prompt.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Whitespace-sensitive: renders as intended only with trim_blocks and lstrip_blocks, as in HF.
INDENTED_TEMPLATE = """{{ bos_token }}
{% for message in messages %}
    {% if message['role'] == 'user' %}
        {{ '[USER] ' + message['content'] }}
    {% elif message['role'] == 'assistant' %}
        {{ '[BOT] ' + message['content'] + eos_token }}
    {% else %}
        {{ raise_exception('Only user and assistant roles are supported, got ' + message['role']) }}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}[BOT]{% endif %}"""


def train_byte_level_bpe() -> RustTokenizer:
    tk = RustTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tk.train_from_iterator(CORPUS * 5, trainer)
    return tk


def make_model_folder(path: Path, tk: RustTokenizer | None = None, **config) -> Path:
    """A folder like the converter writes: tokenizer.json + tokenizer_config.json (+ extras)."""
    path.mkdir(parents=True, exist_ok=True)
    (tk or train_byte_level_bpe()).save(str(path / "tokenizer.json"))
    defaults = {
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "unk_token": "<|endoftext|>",
        "add_bos_token": False,
        "chat_template": CHATML_TEMPLATE,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    merged = {k: v for k, v in {**defaults, **config}.items() if v is not None}
    (path / "tokenizer_config.json").write_text(json.dumps(merged))
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_model_folder(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def tok(folder) -> Tokenizer:
    return Tokenizer.from_pretrained(folder)


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Tokenizer.from_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)
    folder = make_model_folder(tmp_path / "m")
    (folder / "tokenizer_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer_config.json"):
        Tokenizer.from_pretrained(folder)


def test_encode_decode_round_trip_and_matches_transformers(tok, folder):
    transformers = pytest.importorskip("transformers")
    reference = transformers.AutoTokenizer.from_pretrained(str(folder))
    for text in CORPUS + ["unseen wörds 漢字 🦀", " leading space", ""]:
        ids = tok.encode(text, add_special_tokens=False)
        assert ids == reference.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text


def test_bos_follows_add_bos_token(tmp_path, tok):
    assert tok.encode("hello") == tok.encode("hello", add_special_tokens=False)  # add_bos_token false
    with_bos = Tokenizer.from_pretrained(make_model_folder(tmp_path / "bos", add_bos_token=True))
    ids = with_bos.encode("hello")
    assert ids[0] == with_bos.bos_token_id == with_bos.token_to_id("<|im_start|>")
    assert ids[1:] == with_bos.encode("hello", add_special_tokens=False)
    with_eos = Tokenizer.from_pretrained(make_model_folder(tmp_path / "eos", add_eos_token=True))
    assert with_eos.encode("hi")[-1] == with_eos.token_to_id("<|im_end|>")


def test_a_rendered_chat_keeps_the_templates_one_bos(tmp_path):
    """Llama-style: the tokenizer adds BOS and the template writes it too; a chat's ids have it once (HF's
    apply_chat_template(tokenize=True), vLLM's chat requests)."""
    tok = Tokenizer.from_pretrained(make_model_folder(tmp_path / "bos", add_bos_token=True,
                                                      chat_template="{{ bos_token }}{{ messages[0]['content'] }}"))
    rendered = tok.apply_chat_template([{"role": "user", "content": "hello"}])
    assert tok.encode(rendered)[:2] == [tok.bos_token_id] * 2  # what a chat's prompt was given before
    assert tok.encode_chat_prompt(rendered) == [tok.bos_token_id, *tok.encode("hello", add_special_tokens=False)]


def test_post_processor_decides_only_when_config_is_silent(tmp_path):
    # A Llama-3-style tokenizer.json that adds BOS itself.
    tk = train_byte_level_bpe()
    bos = tk.token_to_id("<|im_start|>")
    tk.post_processor = processors.TemplateProcessing(
        single="<|im_start|> $A", special_tokens=[("<|im_start|>", bos)]
    )
    silent = Tokenizer.from_pretrained(make_model_folder(tmp_path / "silent", tk, add_bos_token=None))
    assert silent.encode("hi")[0] == bos
    assert silent.encode("hi", add_special_tokens=False)[0] != bos
    # The config said add_bos_token: true as well; the BOS must appear once, not twice.
    both = Tokenizer.from_pretrained(make_model_folder(tmp_path / "both", tk, add_bos_token=True))
    assert both.encode("hi")[:2].count(bos) == 1
    off = Tokenizer.from_pretrained(make_model_folder(tmp_path / "off", tk, add_bos_token=False))
    assert bos not in off.encode("hi")


def test_truncation_saved_in_tokenizer_json_is_ignored(tmp_path):
    tk = train_byte_level_bpe()
    tk.enable_truncation(max_length=3)
    tok = Tokenizer.from_pretrained(make_model_folder(tmp_path / "m", tk))
    assert len(tok.encode(CORPUS[0])) > 3


def test_decode_skips_special_tokens_on_request(tok):
    ids = [
        tok.token_to_id("<|im_start|>"),
        *tok.encode("hi there", add_special_tokens=False),
        tok.token_to_id("<|im_end|>"),
    ]
    assert tok.decode(ids) == "hi there"
    assert tok.decode(ids, skip_special_tokens=False) == "<|im_start|>hi there<|im_end|>"


def test_ids_outside_the_vocabulary_are_rejected(tok):
    with pytest.raises(ValueError, match=f"{tok.vocab_size} is outside the vocabulary"):
        tok.decode([1, tok.vocab_size])
    with pytest.raises(ValueError, match="-1 is outside"):
        tok.id_to_token(-1)


def test_special_ids_and_vocab(tok):
    assert tok.id_to_token(
        tok.vocab_size - 1
    )  # the last id is decodable; vocab_size itself is rejected above
    assert tok.all_special_ids == {tok.token_to_id(t) for t in SPECIALS}
    assert tok.id_to_token(tok.token_to_id("<|im_end|>")) == "<|im_end|>"
    assert tok.id_to_token(tok.encode(" world", add_special_tokens=False)[0]).startswith(
        "Ġ"
    )  # byte-level 'space'


def test_eos_ids_are_the_union_of_all_config_files(tmp_path):
    folder = make_model_folder(tmp_path / "m")
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 2]}))
    (folder / "config.json").write_text(json.dumps({"eos_token_id": 1, "vocab_size": 512}))
    tok = Tokenizer.from_pretrained(folder)
    assert tok.eos_token_ids == frozenset({0, 1, 2, tok.token_to_id("<|im_end|>")})


@pytest.mark.parametrize(
    "file, content, message",
    [
        (
            "generation_config.json",
            {"eos_token_id": "2"},
            "generation_config.json: eos_token_id must be an integer",
        ),
        ("config.json", {"eos_token_id": [1, 10**6]}, "eos_token_id 1000000 is outside the vocabulary"),
        ("tokenizer_config.json", {"bos_token": "<s>"}, "bos_token '<s>' is not in the vocabulary"),
        ("tokenizer_config.json", {"add_bos_token": "yes"}, "add_bos_token must be true or false"),
        ("tokenizer_config.json", {"eos_token": None}, "no end-of-sequence token"),
        ("tokenizer_config.json", {"chat_template": "{% for %}"}, "chat template does not compile"),
        ("tokenizer_config.json", {"chat_template": [{"name": "tool_use", "template": "x"}]}, "no 'default'"),
    ],
)
def test_config_errors_name_the_field(tmp_path, file, content, message):
    folder = make_model_folder(tmp_path / "m")
    path = folder / file
    data = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps({**data, **content}))
    with pytest.raises(ValueError, match=message):
        Tokenizer.from_pretrained(folder)


def test_special_token_saved_as_added_token_object(tmp_path):
    folder = make_model_folder(
        tmp_path / "m", eos_token={"__type": "AddedToken", "content": "<|endoftext|>", "special": True}
    )
    assert Tokenizer.from_pretrained(folder).eos_token_ids == {0}


CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "你好 😀"},
        {"role": "assistant", "content": "Hi!"},
        {"role": "user", "content": "Again"},
    ],
]


@pytest.mark.parametrize("template", [CHATML_TEMPLATE, INDENTED_TEMPLATE, "{{ messages | tojson }}"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_renders_like_transformers(tmp_path, template, add_generation_prompt):
    transformers = pytest.importorskip("transformers")
    folder = make_model_folder(tmp_path / "m", chat_template=template)
    ours = Tokenizer.from_pretrained(folder)
    reference = transformers.AutoTokenizer.from_pretrained(str(folder))
    for messages in CONVERSATIONS:
        if template is INDENTED_TEMPLATE and messages[0]["role"] == "system":
            continue
        expected = reference.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        assert ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected


# A Hermes-style tool template (the shape Qwen2.5's and Hermes 3's take): the tools in the system turn, an
# assistant turn's calls as <tool_call> JSON (the arguments written with tojson, so they must be an object),
# tool results as their own turns.
TOOL_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools:{% for t in tools %}\n{{ t | tojson }}{% endfor %}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.content %}{{ m.content }}{% endif %}"
    "{% for c in m.tool_calls or [] %}<tool_call>{{ {'name': c.function.name, 'arguments': c.function.arguments}"
    " | tojson }}</tool_call>{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CITY = {"type": "object", "properties": {"city": {"type": "string"}}}
TOOLS = [{"type": "function",
          "function": {"name": "get_weather", "description": "Weather in a city", "parameters": CITY}}]
TOOL_CONVERSATION = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
]


def test_tools_render_like_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    folder = make_model_folder(tmp_path / "m", chat_template=TOOL_TEMPLATE)
    ours = Tokenizer.from_pretrained(folder)
    reference = transformers.AutoTokenizer.from_pretrained(str(folder))
    for tools in (TOOLS, None):
        expected = reference.apply_chat_template(TOOL_CONVERSATION, tools=tools, tokenize=False,
                                                 add_generation_prompt=True)
        assert ours.apply_chat_template(TOOL_CONVERSATION, tools=tools) == expected
    assert '"description": "Weather in a city"' in ours.apply_chat_template(TOOL_CONVERSATION, tools=TOOLS)


# Qwen3's switch: a template variable the request sets (chat_template_kwargs), default on.
THINKING_TEMPLATE = CHATML_TEMPLATE + "{% if add_generation_prompt and enable_thinking is defined and not " \
                                      "enable_thinking %}<think>\n\n</think>\n\n{% endif %}"
PREFILLED = [{"role": "user", "content": "What is the capital of France?"},
             {"role": "assistant", "content": "The capital of France is"}]


def test_template_kwargs_and_continue_final_message_render_like_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    folder = make_model_folder(tmp_path / "m", chat_template=THINKING_TEMPLATE)
    ours = Tokenizer.from_pretrained(folder)
    reference = transformers.AutoTokenizer.from_pretrained(str(folder))
    for kwargs in ({}, {"enable_thinking": False}, {"enable_thinking": True}):
        expected = reference.apply_chat_template(CONVERSATIONS[0], tokenize=False, add_generation_prompt=True,
                                                 **kwargs)
        assert ours.apply_chat_template(CONVERSATIONS[0], template_kwargs=kwargs) == expected
    assert ours.apply_chat_template(CONVERSATIONS[0], template_kwargs={"enable_thinking": False}).endswith(
        "<think>\n\n</think>\n\n")
    expected = reference.apply_chat_template(PREFILLED, tokenize=False, continue_final_message=True)
    ours_prompt = ours.apply_chat_template(PREFILLED, add_generation_prompt=False, continue_final_message=True)
    assert ours_prompt == expected and ours_prompt.endswith("The capital of France is")


@pytest.mark.parametrize("options, message", [
    (dict(continue_final_message=True), "cannot both be true"),
    (dict(template_kwargs={"messages": []}), "chat_template_kwargs cannot set messages"),
    (dict(add_generation_prompt=False, continue_final_message=True,
          messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]), "not in the rendered"),
])
def test_chat_template_options_that_cannot_be_honoured_are_errors(tok, options, message):
    messages = options.pop("messages", PREFILLED)
    with pytest.raises(ValueError, match=message):
        tok.apply_chat_template(messages, **options)


def test_tool_call_arguments_sent_as_json_text_render_as_the_object(tmp_path):
    """OpenAI clients send a call's arguments as a JSON string; the template gets the object (as vLLM gives it)."""
    tok = Tokenizer.from_pretrained(make_model_folder(tmp_path / "m", chat_template=TOOL_TEMPLATE))
    as_text = [TOOL_CONVERSATION[0], {**TOOL_CONVERSATION[1], "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        TOOL_CONVERSATION[2]]
    assert tok.apply_chat_template(as_text) == tok.apply_chat_template(TOOL_CONVERSATION)
    assert as_text[1]["tool_calls"][0]["function"]["arguments"] == '{"city": "Paris"}'  # not changed in place
    bad = [TOOL_CONVERSATION[0], {**TOOL_CONVERSATION[1], "tool_calls": [
        {"function": {"name": "get_weather", "arguments": "{city"}}]}]
    with pytest.raises(ValueError, match=r"messages\[1\].tool_calls\[0\].function.arguments is not valid JSON"):
        tok.apply_chat_template(bad)


def test_chat_template_output(tok):
    prompt = tok.apply_chat_template(CONVERSATIONS[0])
    assert prompt == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert not tok.apply_chat_template(CONVERSATIONS[0], add_generation_prompt=False).endswith("assistant\n")


def test_tojson_keeps_non_ascii_and_html(tmp_path):
    tok = Tokenizer.from_pretrained(
        make_model_folder(tmp_path / "m", chat_template="{{ messages[0] | tojson }}")
    )
    assert (
        tok.apply_chat_template([{"role": "user", "content": "<b>你好</b>"}])
        == '{"role": "user", "content": "<b>你好</b>"}'
    )


def test_template_exception_is_a_user_error(tmp_path):
    tok = Tokenizer.from_pretrained(make_model_folder(tmp_path / "m", chat_template=INDENTED_TEMPLATE))
    with pytest.raises(
        ValueError, match="rejected the messages: Only user and assistant roles are supported, got system"
    ):
        tok.apply_chat_template(CONVERSATIONS[1])


def test_text_with_a_lone_surrogate_is_a_value_error_naming_it(tok):
    """JSON's "\\ud800" decodes to a lone surrogate, which no UTF-8 encoder takes: the request's fault (a 400)."""
    with pytest.raises(ValueError, match=r"valid Unicode: a lone surrogate U\+D800 at character 3"):
        tok.encode("abc\ud800def")
    with pytest.raises(ValueError, match="lone surrogate"):
        tok.encode_chat_prompt(tok.apply_chat_template([{"role": "user", "content": "\udfff"}]))
    assert tok.encode("caf\u00e9 \U0001F600") == tok.encode("café 😀")  # paired and non-ASCII text as before


@pytest.mark.parametrize(
    "messages, message",
    [
        ([], "non-empty list"),
        ("hi", "non-empty list"),
        ([{"content": "x"}], r"messages\[0\] must be an object with a string 'role'"),
        ([{"role": "user"}], r"messages\[0\] \(user\) has no 'content'"),
    ],
)
def test_malformed_messages_are_rejected(tok, messages, message):
    with pytest.raises(ValueError, match=message):
        tok.apply_chat_template(messages)


def test_missing_chat_template(tmp_path):
    tok = Tokenizer.from_pretrained(make_model_folder(tmp_path / "m", chat_template=None))
    assert not tok.has_chat_template
    with pytest.raises(ValueError, match="has no chat template"):
        tok.apply_chat_template(CONVERSATIONS[0])


def test_template_sources(tmp_path):
    named = make_model_folder(
        tmp_path / "named",
        chat_template=[{"name": "default", "template": "D"}, {"name": "rag", "template": "R"}],
    )
    assert Tokenizer.from_pretrained(named).apply_chat_template(CONVERSATIONS[0]) == "D"
    (named / "chat_template.jinja").write_text("J{{ messages | length }}")  # the separate file wins, as in HF
    assert Tokenizer.from_pretrained(named).apply_chat_template(CONVERSATIONS[1]) == "J4"


def test_template_extensions_used_by_hub_templates(tmp_path):
    template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{% continue %}{% endif %}"
        "{% generation %}{{ m['content'] }}{% endgeneration %}{% endfor %}{{ strftime_now('%Y') | length }}"
    )
    tok = Tokenizer.from_pretrained(make_model_folder(tmp_path / "m", chat_template=template))
    assert tok.apply_chat_template(CONVERSATIONS[1]) == "你好 😀Hi!Again4"


def test_template_cannot_escape_the_sandbox(tmp_path):
    template = "{{ messages.__class__.__mro__ }}"
    tok = Tokenizer.from_pretrained(make_model_folder(tmp_path / "m", chat_template=template))
    with pytest.raises(ValueError, match="unsafe"):
        tok.apply_chat_template(CONVERSATIONS[0])


def default_model_folder() -> Path:
    from kvtriton.backend.models.default_model import default_model_dir

    folder = default_model_dir()
    if not (folder / "tokenizer.json").is_file():
        pytest.skip(f"default model not converted yet at {folder}")
    return folder


@pytest.mark.slow
def test_default_model_matches_transformers():
    transformers = pytest.importorskip("transformers")
    folder = default_model_folder()
    ours = Tokenizer.from_pretrained(folder)
    reference = transformers.AutoTokenizer.from_pretrained(str(folder))
    for text in CORPUS + ["def f(x):\n    return x ** 2\n", "  spaces  and\ttabs\n\n"]:
        assert ours.encode(text, add_special_tokens=False) == reference.encode(text, add_special_tokens=False)
    for messages in CONVERSATIONS:
        prompt = ours.apply_chat_template(messages)
        assert prompt == reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert prompt.endswith("<|im_start|>assistant\n")
    assert ours.token_to_id("<|im_end|>") in ours.eos_token_ids
    assert ours.encode("Hi there") == reference.encode("Hi there")  # same BOS decision
    ids = ours.encode(CORPUS[2])
    assert ours.decode(ids) == reference.decode(ids, skip_special_tokens=True)


def assert_token_bytes_decode_like_the_tokenizer(tok: Tokenizer) -> None:
    """Each id's bytes (the table detokenizer.ByteTableDetokenizer streams from) decode to the tokenizer's own
    decode of that id, special tokens skipped or kept."""
    for skip in (True, False):
        table = tok.token_bytes(skip)
        assert table is not None and len(table) == tok.vocab_size
        assert all(tok.decode([i], skip_special_tokens=skip) == table[i].decode("utf-8", "replace")
                   for i in range(tok.vocab_size))


def test_byte_level_token_bytes_decode_like_the_tokenizer(tok):
    assert_token_bytes_decode_like_the_tokenizer(tok)  # tok is byte-level BPE


@pytest.mark.slow
def test_the_default_models_byte_table_matches_its_decode_for_every_id():
    from kvtriton.backend.models.default_model import default_model_dir

    folder = default_model_dir()
    if not (folder / "tokenizer.json").is_file():
        pytest.skip(f"default model not converted yet at {folder}")
    assert_token_bytes_decode_like_the_tokenizer(Tokenizer.from_pretrained(folder))
