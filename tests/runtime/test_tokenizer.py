"""The tokenizer rebuilt from GGUF metadata gives the original tokenizer.json's ids."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer

from qvl.runtime.gguf_file import GGUFError, GGUFFile
from qvl.runtime.tokenizer import TextStream, TokenizerError, tokenizer_from_gguf

CORPUS = [
    "Describe this image in detail.",
    "The quick brown fox jumps over the lazy dog. It's 3:45pm; we'll see, they've said, I'd say.",
    "我想在apple工作1314151天～ 今天天气很好，我们去公园吧。",
    "日本語のテキストです。カタカナとひらがな、漢字。",
    "Emoji: 🚀🦙😶‍🌫️ ✅ 👍🏽 and flags 🇫🇷",
    "def f(x):\n\treturn {'a': [1, 2, 3]}  # comment\n\n\nclass A:\n    pass\n",
    "    leading spaces, trailing spaces    \n\n\r\n  \t\t mixed\twhitespace runs      ",
    "digits 1 12 123 1234 12345 3.14159 1e-6 0x1F 1,000,000",
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    "<|vision_start|><|image_pad|><|image_pad|><|vision_end|>What is this?<|im_end|>\n<|im_start|>assistant\n",
    "<tool_call>{\"name\": \"f\"}</tool_call> <|fim_prefix|>a<|fim_suffix|>b<|fim_middle|>",
    "Ünïcödé NFC: e\u0301 vs é, ﬁ ligature, Ελληνικά, русский текст, العربية, हिन्दी",
    "'''''' ``````` \"\"\"\" ......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not",
    "",
]


@pytest.fixture(scope="module")
def reference(fixtures_dir):
    return Tokenizer.from_file(str(fixtures_dir / "tiny-qwen2.5-vl" / "hf" / "tokenizer.json"))


@pytest.fixture(scope="module")
def rebuilt(fixtures_dir):
    with GGUFFile(fixtures_dir / "tiny-qwen2.5-vl" / "llamacpp" / "tiny-qwen2.5-vl-f16.gguf") as g:
        return tokenizer_from_gguf(g)


@pytest.mark.parametrize("text", CORPUS)
def test_ids_identical(reference, rebuilt, text):
    want = reference.encode(text, add_special_tokens=False).ids
    assert rebuilt.encode(text, add_special_tokens=False).ids == want


@pytest.mark.parametrize("text", CORPUS)
def test_decode_round_trip(reference, rebuilt, text):
    ids = reference.encode(text, add_special_tokens=False).ids
    assert rebuilt.decode(ids, skip_special_tokens=False) == reference.decode(ids, skip_special_tokens=False)
    skipped = rebuilt.decode(ids, skip_special_tokens=True)
    if "<|fim_" in text:
        # llama.cpp types <|fim_*|> and friends CONTROL (they look special), so the GGUF cannot say
        # that tokenizer.json left them non-special: they are skipped along with the others
        assert "<|fim_" not in skipped and "<tool_call>" in skipped
    else:
        assert skipped == reference.decode(ids, skip_special_tokens=True)


def test_special_token_ids(rebuilt):
    assert rebuilt.token_to_id("<|im_end|>") == 151645
    assert rebuilt.token_to_id("<|image_pad|>") == 151655
    assert rebuilt.token_to_id("<tool_call>") == 151657
    assert rebuilt.token_to_id("[PAD151700]") is None


def test_rejects_other_tokenizers(tmp_path, fixtures_dir):
    from gguf import GGUFWriter

    path = tmp_path / "llama.gguf"
    w = GGUFWriter(path, "llama")
    w.add_tokenizer_model("llama")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    with GGUFFile(path) as g, pytest.raises(GGUFError, match="missing metadata key 'tokenizer.ggml.pre'"):
        tokenizer_from_gguf(g)
    w = GGUFWriter(path, "llama")
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    with GGUFFile(path) as g, pytest.raises(TokenizerError, match="not Qwen2"):
        tokenizer_from_gguf(g)


@pytest.mark.parametrize("text", CORPUS)
def test_text_stream_pieces_join_to_the_whole_answer(reference, text):
    """Token by token (CJK, emoji and combining marks split across tokens, special tokens
    skipped), the pieces join to the whole decode, no piece holds a half character, and each
    push decodes only the few tokens since the last piece."""
    ids = reference.encode(text, add_special_tokens=False).ids
    stream = TextStream(reference)
    pieces, longest = [], 0
    for i in ids:
        piece = stream.push(i)
        longest = max(longest, len(stream.pending))
        if piece is not None:
            assert "\ufffd" not in piece
            pieces.append(piece)
    assert "".join(pieces) == stream.text == reference.decode(ids, skip_special_tokens=True)
    assert longest <= 4  # a character is at most 4 bytes: never the whole answer again
