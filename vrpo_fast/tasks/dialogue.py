"""``dialogue``: short multi-turn conversations scored by a *learned* reward model.

Conversations are templated and short (prompt under ~85 characters) so that a tiny character model
can hold them: zero to two earlier exchanges, then a request, ending with the bot's turn:

    prompt:    "User: Hi!\\nBot: Hello! How can I help?\\nUser: Name a fruit.\\nBot: "
    reference: "Sure! An apple is a fruit."

The clean reward is a reward model's sigmoid score (``reward_kind = "model"``). By default it is
the built-in one, trained on first use (well under 2 minutes on a CPU) on preference pairs generated
here -- a helpful, on-topic, polite reply preferred over a rude, off-topic, empty, repetitive,
parroted or scrambled one -- and cached under ``$VRPO_FAST_CACHE`` (default ``~/.cache/vrpo_fast``)
as a Hugging Face model directory. ``reward_model=PATH`` uses any local HF sequence-classification
model instead.

The held-out split uses conversations (history + request wording) that never appear in training.
``path=`` loads a user JSONL of ``{"prompt": str, "reference": str (optional)}`` lines.
"""
from __future__ import annotations

import functools
import os
import random
import string
import threading
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .base import Example, Task, check_pairs
from .jsonl import build_splits, iter_jsonl, require_str

# topic -> (requests, good replies). Every reply answers its own topic's requests only, so the same
# polite reply is a *bad* (off-topic) answer to every other topic: the reward model must read the prompt.
TOPICS: Dict[str, Tuple[Tuple[str, ...], Tuple[str, ...]]] = {
    "fruit": (("Name a fruit.", "Tell me a fruit."),
              ("Sure! An apple is a fruit.", "Of course: a banana.", "A pear is a nice fruit.")),
    "color": (("Name a color.", "What is a nice color?"),
              ("Sure! Blue is a color.", "Green is a calm color.", "Red is a bright color.")),
    "pet": (("Suggest a pet.", "What pet should I get?"),
            ("A cat is a calm pet.", "Try a dog; dogs are loyal.", "A fish is an easy pet.")),
    "mood": (("How are you?", "How are you today?"),
             ("I am well, thank you! And you?", "Great, thanks for asking!")),
    "thanks": (("Thanks for the help!", "Thank you so much!"),
               ("You are welcome! Glad to help.", "Happy to help anytime!")),
    "weather": (("Will it rain today?", "Should I take an umbrella?"),
                ("It may rain, so take an umbrella.", "Yes, an umbrella is a good idea.")),
    "sleep": (("Good night!", "I am off to bed."),
              ("Good night! Sleep well.", "Sleep well and sweet dreams!")),
    "dinner": (("What can I cook?", "Suggest a dinner."),
               ("Try pasta; it is quick and tasty.", "A soup is easy and warm.")),
    "drink": (("Suggest a drink.", "What should I drink?"),
              ("Water is a healthy drink.", "Try a cup of hot tea.")),
    "book": (("Suggest a book.", "What should I read?"),
             ("Try a mystery novel; they are fun.", "A book of short stories is nice.")),
    "sport": (("Name a sport.", "What sport is fun?"),
              ("Soccer is a fun sport.", "Try tennis; it is good exercise.")),
    "weekday": (("What day comes after Monday?", "Which day follows Monday?"),
                ("Tuesday comes after Monday.", "After Monday comes Tuesday.")),
    "capital": (("What is the capital of France?", "Which city is France's capital?"),
                ("The capital of France is Paris.", "Paris is the capital of France.")),
    "gift": (("Suggest a gift.", "What gift can I give?"),
             ("A book makes a nice gift.", "Flowers are a kind gift.")),
    "study": (("How can I study better?", "Any tips to focus?"),
              ("Take short breaks and sleep well.", "Study in a quiet place.")),
    "fitness": (("How can I get fit?", "How do I stay healthy?"),
                ("Walk every day and eat well.", "Try a short run each morning.")),
    "help": (("Can you help me?", "I need some help."),
             ("Of course! What do you need?", "Sure, I am glad to help.")),
    "sad": (("I feel sad.", "I had a bad day."),
            ("I am sorry. Want to talk about it?", "That sounds hard; I am here for you.")),
    "travel": (("Where should I travel?", "Suggest a trip."),
               ("Paris is lovely in spring.", "Try a beach trip to relax.")),
    "music": (("Suggest some music.", "What music is relaxing?"),
              ("Try some jazz; it is relaxing.", "Classical music is calming.")),
    "plant": (("How do I care for a plant?", "My plant looks dry."),
              ("Water it weekly and give it sun.", "Give it water and some light.")),
    "name": (("What is your name?", "Who are you?"),
             ("I am Bot, happy to help!", "My name is Bot. Nice to meet you!")),
}

# earlier exchanges that may precede the request (short: the whole prompt stays under ~85 chars)
OPENERS: Tuple[Tuple[str, str], ...] = (
    ("Hi!", "Hello! How can I help?"),
    ("Hello.", "Hi there!"),
    ("Good morning!", "Good morning to you!"),
    ("Hey.", "Hey! What do you need?"),
    ("Hi, bot.", "Hi! Ask me anything."),
    ("Good evening.", "Good evening! How are you?"),
    ("Are you there?", "Yes, I am here."),
    ("Hello again!", "Welcome back!"),
)

# short second exchanges for three-turn conversations
FOLLOW_UPS: Tuple[Tuple[str, str], ...] = (
    ("How are you?", "Fine, thanks!"),
    ("Thanks!", "You are welcome!"),
    ("Can you help?", "Sure!"),
)

RUDE = ("No. Ask someone else.", "That is a dumb question.", "Go away.", "I do not care.",
        "Figure it out yourself.", "Stop bothering me.", "Ugh, whatever.", "Why would I help you?")
RUDE_SUFFIXES = (" Now go away.", " Ugh.", " Stop asking me.", " Obviously, idiot.")
EMPTY = ("", " ", "...", "?", "ok", "hmm")
MAX_PROMPT_CHARS = 85


def _prompt(history: Sequence[Tuple[str, str]], request: str) -> str:
    turns = [f"User: {u}\nBot: {b}" for u, b in history] + [f"User: {request}\nBot: "]
    return "\n".join(turns)


def all_conversations() -> List[Tuple[str, str, Tuple]]:
    """Every (prompt, topic, key) the generator can make, in a fixed order (history <= 2 exchanges)."""
    histories: List[Tuple] = [()] + [(o,) for o in OPENERS]
    histories += [(o, x) for o in OPENERS[:4] for x in FOLLOW_UPS]
    out = []
    for topic, (requests, _) in TOPICS.items():
        for request in requests:
            for history in histories:
                if any(h[0] in TOPICS[topic][0] for h in history):
                    continue  # never ask the same thing twice
                prompt = _prompt(history, request)
                if len(prompt) <= MAX_PROMPT_CHARS:
                    out.append((prompt, topic, (topic, request, history)))
    return out


def generate_conversations(seed: int, n_train: int, n_eval: int) -> Tuple[List[Example], List[Example]]:
    """Train/eval examples; eval prompts (history + request) are disjoint from train prompts.

    The eval split holds ``n_eval`` distinct conversations (at most a quarter of all of them); the
    train split cycles through the rest, each with a randomly drawn good reply as its reference.
    """
    rng = random.Random(f"vrpo_fast.dialogue:{seed}")
    convs = all_conversations()
    rng.shuffle(convs)
    k = max(1, min(n_eval, len(convs) // 4))
    held, rest = convs[:k], convs[k:]
    evals = [Example(p, "", rng.choice(TOPICS[t][1]), {"topic": t}) for p, t, _ in held]
    train = []
    while len(train) < n_train:
        order = list(rest)
        rng.shuffle(order)
        for p, t, _ in order[: n_train - len(train)]:
            train.append(Example(p, "", rng.choice(TOPICS[t][1]), {"topic": t}))
    return train, evals


# ------------------------------------------------------------------------------------------------
# preference data for the built-in reward model

# how often each flaw is drawn for a rejected reply. Off-topic replies are the hard case (polite,
# fluent, wrong); babble, word salad and corrupted text are what an under-trained policy writes, so
# the reward model must score them low or RL would climb its blind spots from the first step.
FLAW_WEIGHTS: Dict[str, int] = {
    "off_topic": 4, "babble": 3, "word_salad": 2, "corrupted": 2, "rude": 1, "rude_suffix": 1, "empty": 1,
    "repetitive": 1, "parrot": 1, "scrambled": 1, "truncated": 1, "gibberish": 1,
}


def _all_replies() -> List[str]:
    return [r for _, replies in TOPICS.values() for r in replies]


@functools.lru_cache(maxsize=1)
def _trigram_table() -> Dict[str, Tuple[str, ...]]:
    table: Dict[str, List[str]] = {}
    for reply in _all_replies():
        text = "^^" + reply
        for i in range(2, len(text)):
            table.setdefault(text[i - 2:i], []).append(text[i])
    return {k: tuple(v) for k, v in table.items()}


def _babble(rng: random.Random, n_chars: int) -> str:
    """Text from a character trigram model of the replies: word-like, meaningless (like a small LM
    early in training)."""
    table = _trigram_table()
    out, ctx = [], "^^"
    for _ in range(n_chars):
        nxt = rng.choice(table.get(ctx) or [" "])
        out.append(nxt)
        ctx = ctx[1] + nxt
    return "".join(out).strip() or "a a"


def _bad_reply(rng: random.Random, topic: str, prompt: str) -> Tuple[str, str]:
    """A rejected reply for ``topic`` and the kind of flaw it has."""
    good = rng.choice(TOPICS[topic][1])
    kind = rng.choices(list(FLAW_WEIGHTS), weights=list(FLAW_WEIGHTS.values()))[0]
    if kind == "off_topic":
        other = rng.choice([t for t in TOPICS if t != topic])
        return rng.choice(TOPICS[other][1]), kind
    if kind == "babble":
        return _babble(rng, rng.randint(8, 40)), kind
    if kind == "word_salad":
        words = [w for r in _all_replies() for w in r.split()]
        return " ".join(rng.choice(words) for _ in range(rng.randint(2, 7))), kind
    if kind == "corrupted":  # a good reply with a third to two thirds of its characters replaced
        chars, p = list(good), rng.uniform(0.3, 0.7)
        alphabet = string.ascii_lowercase + " "
        return "".join(rng.choice(alphabet) if rng.random() < p else c for c in chars), kind
    if kind == "rude":
        return rng.choice(RUDE), kind
    if kind == "rude_suffix":  # helpful but rude
        return good + rng.choice(RUDE_SUFFIXES), kind
    if kind == "empty":
        return rng.choice(EMPTY), kind
    if kind == "repetitive":
        words = good.split()
        unit = rng.choice(words + [good[: rng.randint(1, 4)]])
        return " ".join([unit] * rng.randint(3, 8))[:40], kind
    if kind == "parrot":
        return prompt.rsplit("User: ", 1)[1].split("\n", 1)[0], kind
    if kind == "scrambled":
        words = good.split()
        while len(words) > 1 and " ".join(words) == good:
            rng.shuffle(words)
        return " ".join(words) if len(words) > 1 else good[::-1], kind
    if kind == "truncated":  # cut off mid-way
        return good[: rng.randint(1, max(1, len(good) // 2))], kind
    alphabet = string.ascii_letters + string.digits + " .,!?"
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(3, 35))), "gibberish"


def preference_pairs(n: int, seed: int = 0) -> Tuple[List[str], List[str], List[str], List[str]]:
    """``n`` (prompt, chosen, rejected, flaw) preference triples over all conversations."""
    rng = random.Random(f"vrpo_fast.dialogue.prefs:{seed}")
    convs = all_conversations()
    prompts, chosen, rejected, kinds = [], [], [], []
    for _ in range(n):
        prompt, topic, _ = rng.choice(convs)
        bad, kind = _bad_reply(rng, topic, prompt)
        prompts.append(prompt)
        chosen.append(rng.choice(TOPICS[topic][1]))
        rejected.append(bad)
        kinds.append(kind)
    return prompts, chosen, rejected, kinds


# ------------------------------------------------------------------------------------------------
# the built-in reward model

BUILTIN_RM_VERSION = 2
_BUILD_LOCK = threading.Lock()


def builtin_reward_model_dir(cache_dir: Optional[str] = None) -> str:
    from .reward_model import cache_root

    return os.path.join(cache_dir or cache_root(), "reward_models", f"dialogue-v{BUILTIN_RM_VERSION}")


def ensure_builtin_reward_model(cache_dir: Optional[str] = None, n_pairs: int = 8000, config=None,
                                log: Optional[Callable[[str], None]] = print) -> str:
    """Path of the built-in dialogue reward model, training and caching it on first use."""
    from .reward_model import RewardModelConfig, train_reward_model

    path = builtin_reward_model_dir(cache_dir)
    with _BUILD_LOCK:
        if os.path.isfile(os.path.join(path, "config.json")):
            return path
        if log:
            log(f"training the built-in dialogue reward model (once; cached at {path}) ...")
        prompts, chosen, rejected, _ = preference_pairs(n_pairs, seed=0)
        # first use may come from inside a caller's no_grad/inference block (e.g. evaluation)
        with torch.inference_mode(False), torch.enable_grad():
            _, _, info = train_reward_model(prompts, chosen, rejected, out_dir=path,
                                            config=config or RewardModelConfig(), log=log, overwrite=False)
        if log:
            log(f"reward model trained in {info['wall_time_s']:.1f}s ({info['steps']} steps, "
                f"train pair accuracy {info['train_accuracy']:.3f})")
    return path


_SCORERS: Dict[Tuple[str, str], Callable] = {}


def _scorer(path: str, device: str) -> Callable:
    """Load each reward model once per process (the robustness sweep builds many tasks)."""
    from .reward_model import load_reward_model

    key = (os.path.abspath(path), str(device))
    if key not in _SCORERS:
        _SCORERS[key] = load_reward_model(path, device=device)
    return _SCORERS[key]


def load_dialogue_jsonl(path: str) -> List[Example]:
    """``{"prompt": str, "reference": str (optional)}`` per line -> examples."""
    examples = []
    for lineno, rec in iter_jsonl(path, required=("prompt",)):
        prompt = require_str(path, lineno, rec, "prompt")
        reference = ""
        if "reference" in rec:
            reference = require_str(path, lineno, rec, "reference", allow_empty=True)
        examples.append(Example(prompt, "", reference, {"source": str(path), "line": lineno}))
    return examples


class DialogueTask(Task):
    """Multi-turn conversations; clean reward = the reward model's sigmoid score in [0, 1]."""

    name = "dialogue"
    reward_kind = "model"

    @classmethod
    def default_settings(cls, **task_kwargs):
        return {"max_new_tokens": 40}  # one bot turn (at most 36 characters) + EOS

    def __init__(
        self,
        seed: int = 0,
        n_train: Optional[int] = None,
        n_eval: Optional[int] = None,
        reward_model: Optional[str] = None,
        device: str = "cpu",
        cache_dir: Optional[str] = None,
        path: Optional[str] = None,
        eval_path: Optional[str] = None,
        num_train: Optional[int] = None,
        num_eval: Optional[int] = None,
    ):
        self.seed, self.path, self.device, self.cache_dir = int(seed), path, str(device), cache_dir
        self.reward_model_path = reward_model
        self._train, self._eval = build_splits(
            path=path, eval_path=eval_path, load=load_dialogue_jsonl,
            generate=lambda nt, ne: generate_conversations(self.seed, nt, ne),
            n_train=n_train, n_eval=n_eval, num_train=num_train, num_eval=num_eval, seed=self.seed, default_n_eval=100,
        )
        self._score: Optional[Callable] = None

    def scorer(self) -> Callable:
        """The reward model (loaded, and for the built-in one trained, on first use)."""
        if self._score is None:
            path = self.reward_model_path or ensure_builtin_reward_model(self.cache_dir)
            self.reward_model_path = path
            self._score = _scorer(path, self.device)
        return self._score

    def reward(self, examples: Sequence[Example], completions: Sequence[str]) -> torch.Tensor:
        check_pairs(examples, completions)
        if not examples:
            return torch.zeros(0)
        return self.scorer()([e.prompt for e in examples], list(completions)).float().cpu()

    def describe(self) -> Dict[str, object]:
        return {"task": self.name, "seed": self.seed, "path": self.path, "reward_model": self.reward_model_path,
                "n_train": len(self._train), "n_eval": len(self._eval)}


__all__ = [
    "DialogueTask",
    "TOPICS",
    "all_conversations",
    "generate_conversations",
    "preference_pairs",
    "builtin_reward_model_dir",
    "ensure_builtin_reward_model",
    "load_dialogue_jsonl",
]
