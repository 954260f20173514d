"""The embedded tiny model and character tokenizer, and the default arithmetic task."""
import pytest
import torch

from vrpo_fast.models.tiny import CHARACTERS, TinyModelConfig, build_char_tokenizer, build_tiny_model
from vrpo_fast.tasks import get_task


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


def test_tokenizer_special_tokens(tok):
    assert (tok.pad_token, tok.bos_token, tok.eos_token) == ("<pad>", "<bos>", "<eos>")
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert len(tok) == 4 + len(CHARACTERS)
    assert tok.padding_side == "left"


@pytest.mark.parametrize("text", ["23+48=71", "Hello, world!\n\tx", " leading and trailing ", "~{}|\\"])
def test_tokenizer_round_trip(tok, text):
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id and len(ids) == len(text) + 1  # one id per character
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.decode(ids) == "<bos>" + text


def test_tokenizer_unknown_char_and_batch_padding(tok):
    assert tok("é")["input_ids"] == [tok.bos_token_id, tok.unk_token_id]
    enc = tok(["1+2=", "10+20="], padding=True, return_tensors="pt")
    assert enc["input_ids"][0, :2].tolist() == [tok.pad_token_id] * 2  # left padding
    assert enc["attention_mask"].tolist() == [[0, 0, 1, 1, 1, 1, 1], [1] * 7]


def test_tokenizer_save_load_round_trip(tok, tmp_path):
    from transformers import AutoTokenizer

    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    text = "97+5=102"
    assert loaded(text)["input_ids"] == tok(text)["input_ids"]
    assert loaded.decode(loaded(text)["input_ids"], skip_special_tokens=True) == text
    assert loaded.pad_token_id == tok.pad_token_id and loaded.padding_side == "left"


def test_tiny_model_is_deterministic_and_saves(tok, tmp_path):
    from transformers import AutoModelForCausalLM

    shape = TinyModelConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    a, b = build_tiny_model(tok, shape, seed=3), build_tiny_model(tok, shape, seed=3)
    c = build_tiny_model(tok, shape, seed=4)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))
    assert a.config.vocab_size == len(tok) and a.config.pad_token_id == tok.pad_token_id
    ids = tok(["1+1="], return_tensors="pt")["input_ids"]
    a.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True)
    torch.testing.assert_close(loaded(ids).logits, a(ids).logits, rtol=0, atol=0)


def test_arith_task_split_reward_and_determinism():
    task = get_task("arith", seed=1, max_operand=20, num_eval=30)
    train, held_out = task.train_examples(), task.eval_examples()
    assert len(held_out) == 30 and len(train) == 21 * 21 - 30
    assert not {e.prompt for e in train} & {e.prompt for e in held_out}
    ex = held_out[0]
    a, b = map(int, ex.prompt[:-1].split("+"))
    assert ex.answer == ex.reference == str(a + b)
    rewards = task.reward([ex] * 4, [ex.answer, " " + ex.answer + "\n", ex.answer + "0", ""])
    assert rewards.dtype == torch.float32 and rewards.tolist() == [1.0, 1.0, 0.0, 0.0]
    again = get_task("arith", seed=1, max_operand=20, num_eval=30)
    assert [e.prompt for e in again.eval_examples()] == [e.prompt for e in held_out]
    other = get_task("arith", seed=2, max_operand=20, num_eval=30)
    assert [e.prompt for e in other.eval_examples()] != [e.prompt for e in held_out]


def test_arith_task_errors():
    with pytest.raises(ValueError, match="ops"):
        get_task("arith", ops="/")
    with pytest.raises(ValueError, match="num_eval"):
        get_task("arith", max_operand=2, num_eval=100)
    with pytest.raises(ValueError, match="completions"):
        get_task("arith").reward(get_task("arith").eval_examples()[:2], ["1"])


def test_char_tokenizers_keep_their_id_layouts():
    """The policy's and the reward models' tokenizers come from one builder; their ids must not move
    (cached reward models and saved checkpoints depend on them)."""
    from vrpo_fast.models.tiny import CHARACTERS, build_char_tokenizer
    from vrpo_fast.tasks.reward_model import build_reward_tokenizer

    tok, rm = build_char_tokenizer(), build_reward_tokenizer()
    assert [tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id] == [0, 1, 2, 3]
    assert [rm.pad_token_id, rm.unk_token_id, rm.bos_token_id, rm.sep_token_id, rm.eos_token_id] == [0, 1, 2, 3, 4]
    assert len(tok) == 4 + len(CHARACTERS) and len(rm) == 5 + len(CHARACTERS)
    a, b = CHARACTERS.index("a"), CHARACTERS.index(" ")
    assert tok("a a\x0b")["input_ids"] == [1, 4 + a, 4 + b, 4 + a, 3]  # <bos>, chars, <unk> for \x0b
    assert rm("a", " a")["input_ids"] == [2, 5 + a, 3, 5 + b, 5 + a, 4]  # <bos> A <sep> B <eos>
    assert tok.padding_side == "left" and rm.padding_side == "right" and rm.truncation_side == "left"
