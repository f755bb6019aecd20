"""The locally trained tokenizer: digits one by one (as Qwen's and Llama's), chat and tool markup whole."""

from __future__ import annotations

from agentrl.engine.tiny import train_tokenizer


def test_numbers_are_spelled_the_same_everywhere() -> None:
    tok = train_tokenizer(512)

    def pieces(text: str) -> list[str]:
        return [tok.decode([i]) for i in tok.encode(text, add_special_tokens=False)]

    assert pieces("What is 45*67+12?") == ["What", " is", " ", "4", "5", "*", "6", "7", "+", "1", "2", "?"]
    assert pieces('"45*67+12"}}')[1:-1] == ["4", "5", "*", "6", "7", "+", "1", "2"]
    assert pieces("The answer is 3027.")[-5:] == ["3", "0", "2", "7", "."]
    for word in ("calculator", "expression", "assistant", "system", "user", "tool"):
        assert len(tok.encode(word, add_special_tokens=False)) == 1, word
