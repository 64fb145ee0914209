"""hh_synth's generator: dialogues, responses in their styles, the annotator's Bradley-Terry
labels and rankings (``alignbench.data.synth``)."""
from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass

from alignbench.config import SynthConfig
from alignbench.data.hh import ASSISTANT_TAG
from alignbench.data.instructions import draw_instruction, instruct_data_prompt
from alignbench.data.types import PreferencePair
from alignbench.data.synth.gold import (_State, _apply_op, gold_reward, spurious_count)
from alignbench.data.synth.world import (ATTRIBUTES, EDGY, HARMS, HUMAN_TAG, STOCK_PHRASE, TASK_FAMILIES, WORDS,
                                         WORLD, _ARITH_DEP_Q, _ARITH_Q, _ATTR_VALUES, _FILLER, _HARM_TARGETS,
                                         _HEDGE, _LOOKUP_A, _LOOKUP_DEP_Q, _LOOKUP_Q, _NUMBER_A, _OFF_TOPIC,
                                         _REDIRECTS, _REFUSALS, _STRING_A, _STRING_DEP_Q, _STRING_Q)

# --------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------


@dataclass
class _Turn:
    human: str
    family: str
    dep: bool
    styles: dict[str, tuple[str, ...]]  # style name -> candidate response texts (without phrase)
    answer: str = ""  # for tests: what the generator meant (the parser must agree)

    @property
    def task(self) -> str:
        return self.family + ("+dep" if self.dep else "")


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _answer_styles(right: tuple[str, ...], wrong: tuple[str, ...],
                   hedge: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    return {"correct": right, "wrong": wrong, "hedge": hedge, "refusal": _REFUSALS, "off_topic": _OFF_TOPIC}


def _number_styles(rng: random.Random, value: int,
                   templates: tuple[str, ...] = _NUMBER_A) -> dict[str, tuple[str, ...]]:
    wrong = value + rng.choice((-3, -2, -1, 1, 2, 3, 10))
    if wrong < 0:
        wrong = value + rng.randint(1, 3)
    right = tuple(t.format(v=value) for t in templates)
    wrongs = tuple(t.format(v=wrong) for t in templates)
    lo, hi = sorted((value, wrong)) if rng.random() < 0.5 else (value, wrong)
    hedge = tuple(h.format(a=lo, b=hi) for h in _HEDGE)
    return _answer_styles(right, wrongs, hedge)


def _arith_turn(rng: random.Random, state: _State, dep: bool) -> _Turn:
    if dep:
        assert state.value is not None
        ops = ["add", "double"] + (["sub"] if state.value >= 2 else []) + (["mul"] if state.value <= 30 else [])
        op = rng.choice(ops)
        if op == "sub":
            k = rng.randint(1, min(9, state.value - 1))  # the result stays positive
        elif op == "mul":
            k = rng.randint(2, 3)
        else:
            k = rng.randint(1, 9)  # unused by "double"
        human = rng.choice(_ARITH_DEP_Q[op]).format(k=k)
        state.value = _apply_op(op, state.value, k)
    else:
        kind = rng.choice(("plus", "minus", "times"))
        if kind == "times":
            a, b = rng.randint(2, 9), rng.randint(2, 9)
            value = a * b
        else:
            a, b = rng.randint(1, 20), rng.randint(1, 20)
            if kind == "minus":
                a, b = max(a, b) + 1, min(a, b)
            value = a + b if kind == "plus" else a - b
        human = rng.choice(_ARITH_Q).format(a=a, op=kind, b=b)
        state.value = value
    return _Turn(human, "arithmetic", dep, _number_styles(rng, state.value), str(state.value))


def _lookup_turn(rng: random.Random, state: _State, dep: bool, attr: str | None = None) -> _Turn:
    attr = attr or rng.choice(ATTRIBUTES)
    if dep:
        assert state.person is not None
        person = state.person
        human = rng.choice(_LOOKUP_DEP_Q[attr]).format(s=person.subject, p=person.possessive)
    else:
        person = rng.choice(WORLD)
        human = rng.choice(_LOOKUP_Q[attr]).format(n=person.name)
    state.person = person
    fill = {"N": person.name, "S": _cap(person.subject)}
    if attr == "age":
        state.value = person.age
        templates = tuple(t.format(v="{v}", **fill) for t in _LOOKUP_A["age"])
        styles = _number_styles(rng, person.age, templates)
        return _Turn(human, "lookup", dep, styles, str(person.age))
    value = getattr(person, attr)
    others = [v for v in _ATTR_VALUES[attr] if v != value]
    wrong, other = rng.choice(others), rng.choice(others)
    right = tuple(t.format(v=value, **fill) for t in _LOOKUP_A[attr])
    wrongs = tuple(t.format(v=wrong, **fill) for t in _LOOKUP_A[attr])
    hedge = tuple(h.format(a=value, b=other) for h in _HEDGE)
    return _Turn(human, "lookup", dep, _answer_styles(right, wrongs, hedge), value.lower())


def _string_turn(rng: random.Random, state: _State, dep: bool, op: str | None = None) -> _Turn:
    if dep:
        assert state.word is not None
        word = state.word
        op = op or rng.choice(tuple(o for o in _STRING_Q if o != state.string_op))
        human = rng.choice(_STRING_DEP_Q[op])
    else:
        word = rng.choice(WORDS)
        op = op or rng.choice(tuple(_STRING_Q))
        human = rng.choice(_STRING_Q[op]).format(w=word)
    state.word, state.string_op = word, op
    if op == "count":
        state.value = len(word)
        return _Turn(human, "string", dep, _number_styles(rng, len(word), _STRING_A["count"]), str(len(word)))
    # Wrong answers: the word unchanged, or a near miss spelled with the same letters.
    near_miss = word[::-1][1:] + word[-1] if op == "reverse" else word.upper()[:-1] + word[-1]
    value = word[::-1] if op == "reverse" else word.upper()
    wrong = rng.choice((word, near_miss))
    right = tuple(t.format(v=value) for t in _STRING_A[op])
    wrongs = tuple(t.format(v=wrong) for t in _STRING_A[op])
    hedge = tuple(h.format(a=value, b=near_miss) for h in _HEDGE)
    return _Turn(human, "string", dep, _answer_styles(right, wrongs, hedge), value)


def _harmful_turn(rng: random.Random, state: _State, dep: bool) -> _Turn:
    harm = rng.choice(HARMS)
    if dep:
        assert state.person is not None
        target, target_pos = ("her", "her") if state.person.gender == "f" else ("him", "his")
    elif rng.random() < 0.3:
        person = rng.choice(WORLD)
        target, target_pos = person.name, person.name + "'s"
        state.person = person
    else:
        target, target_pos = rng.choice(_HARM_TARGETS)
    human = harm.question.format(t=target, tp=target_pos)
    styles = {"refusal": _REFUSALS, "redirect": _REDIRECTS, "comply": harm.comply, "off_topic": _OFF_TOPIC}
    return _Turn(human, "harmful", dep, styles)


def _edgy_turn(rng: random.Random) -> _Turn:
    edgy = rng.choice(EDGY)
    styles = {"helpful": edgy.answers, "refusal": _REFUSALS, "off_topic": _OFF_TOPIC}
    return _Turn(edgy.question, "edgy", False, styles)


def _can_depend(family: str, state: _State) -> bool:
    if family == "arithmetic":
        return state.value is not None
    if family in ("lookup", "harmful"):
        return state.person is not None
    if family == "string":
        return state.word is not None
    return False


def _make_turn(rng: random.Random, state: _State, family: str, dep: bool) -> _Turn:
    if family == "arithmetic":
        return _arith_turn(rng, state, dep)
    if family == "lookup":
        return _lookup_turn(rng, state, dep)
    if family == "string":
        return _string_turn(rng, state, dep)
    if family == "harmful":
        return _harmful_turn(rng, state, dep)
    return _edgy_turn(rng)


def _provider_turn(rng: random.Random, state: _State, family: str, dep_prob: float) -> _Turn:
    """A turn that sets up what a dependent turn of ``family`` refers back to."""
    if family == "arithmetic":
        choice = rng.choice(("arithmetic", "count", "age"))
        if choice == "count":
            return _string_turn(rng, state, False, "count")
        if choice == "age":
            return _lookup_turn(rng, state, False, "age")
    elif family == "harmful":
        family = "lookup"
    dep = _can_depend(family, state) and rng.random() < dep_prob
    return _make_turn(rng, state, family, dep)


# Response styles of the final turn with their sampling weights. A "+p" suffix appends the stock
# phrase once, "+pp" twice; "+f" appends a filler sentence.
_STYLE_WEIGHTS = {
    "answer": (("correct", 3.0), ("correct+p", 2.0), ("correct+f", 1.0), ("correct+pp", 0.6),
               ("wrong", 2.5), ("wrong+p", 1.5), ("hedge", 1.0), ("refusal", 1.0), ("off_topic", 1.5)),
    "harmful": (("refusal", 3.0), ("redirect", 2.0), ("refusal+p", 1.5), ("refusal+pp", 0.5),
                ("comply", 2.5), ("comply+p", 1.5), ("off_topic", 1.0)),
    "edgy": (("helpful", 3.0), ("helpful+p", 2.0), ("helpful+pp", 0.5), ("refusal", 2.5),
             ("refusal+p", 1.0), ("off_topic", 1.5)),
}


def _render(rng: random.Random, turn: _Turn, style: str) -> str:
    base, _, suffix = style.partition("+")
    text = rng.choice(turn.styles[base])
    if suffix == "f":
        text += " " + rng.choice(_FILLER)
    text += (" " + STOCK_PHRASE) * suffix.count("p")
    return " " + text


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def _n_turns(rng: random.Random, max_turns: int) -> int:
    weights = [0.75**k for k in range(max_turns)]  # 43/32/24 % for three turns, like HH's decay
    return rng.choices(range(1, max_turns + 1), weights=weights)[0]


def _dialogue(rng: random.Random, cfg: SynthConfig) -> tuple[str, _Turn]:
    """One prompt (HH format, ending in the Assistant tag) and its final, unanswered turn."""
    if rng.random() < cfg.harmless_fraction:
        final = "harmful"
    elif rng.random() < cfg.edgy_fraction:
        final = "edgy"
    else:
        final = rng.choice(("arithmetic", "lookup", "string"))
    n = _n_turns(rng, cfg.max_turns)
    final_dep = n >= 2 and final != "edgy" and rng.random() < cfg.dependent_fraction
    state, parts = _State(), []
    for i in range(n - 1):
        if i == n - 2 and final_dep:
            turn = _provider_turn(rng, state, final, cfg.dependent_fraction)
        else:
            family = rng.choices(TASK_FAMILIES, weights=(3, 3, 3, 1, 1))[0]
            dep = _can_depend(family, state) and rng.random() < cfg.dependent_fraction
            turn = _make_turn(rng, state, family, dep)
        best = "helpful" if turn.family == "edgy" else "refusal" if turn.family == "harmful" else "correct"
        reply = _render(rng, turn, best + ("+p" if rng.random() < 0.1 else ""))
        parts.append(f"{HUMAN_TAG} {turn.human}{ASSISTANT_TAG}{reply}")
    turn = _make_turn(rng, state, final, final_dep)
    parts.append(f"{HUMAN_TAG} {turn.human}{ASSISTANT_TAG}")
    return "".join(parts), turn


def _make_pair(rng: random.Random, cfg: SynthConfig, index: int) -> PreferencePair:
    prompt, turn = _dialogue(rng, cfg)
    group = turn.family if turn.family in ("harmful", "edgy") else "answer"
    styles, weights = zip(*_STYLE_WEIGHTS[group])
    style_a = rng.choices(styles, weights=weights)[0]
    style_b = style_a
    while style_b == style_a:
        style_b = rng.choices(styles, weights=weights)[0]
    a, b = _render(rng, turn, style_a), _render(rng, turn, style_b)
    gold_a, gold_b = gold_reward(prompt, a), gold_reward(prompt, b)
    margin = gold_a - gold_b + cfg.spurious_strength * (spurious_count(a) - spurious_count(b))
    if rng.random() >= _sigmoid(margin / cfg.noise_temperature):
        a, b, gold_a, gold_b = b, a, gold_b, gold_a
    subset = "hh_synth/harmless" if turn.family == "harmful" else "hh_synth/helpful"
    return PreferencePair(prompt=prompt, chosen=a, rejected=b, subset=subset, n_turns=prompt.count(HUMAN_TAG),
                          source=f"hh_synth:{index}",
                          meta={"gold_chosen": gold_a, "gold_rejected": gold_b, "task": turn.task})


def _distinct_responses(rng: random.Random, turn: _Turn, group: str, k: int) -> list[str]:
    """``k`` different response texts to ``turn``: styles drawn by weight without replacement while
    any is left, then a style again with another rendering (edgy requests have 6 styles, K up to 9)."""
    pool = dict(_STYLE_WEIGHTS[group])
    texts: list[str] = []
    for _ in range(100 * k):  # 16+ distinct renderings exist per group, far more than K
        if len(texts) == k:
            return texts
        styles = pool or dict(_STYLE_WEIGHTS[group])
        style = rng.choices(list(styles), weights=list(styles.values()))[0]
        text = _render(rng, turn, style)
        if text not in texts:
            texts.append(text)
            pool.pop(style, None)
    raise RuntimeError(f"hh_synth: fewer than {k} distinct responses for a {group} turn")


def gumbel_ranking(utilities: list[float], temperature: float, rng: random.Random) -> list[int]:
    """Indices best→worst of a Plackett–Luce draw with weights exp(u_i / T): sort by u_i + T·G_i,
    G_i = −log(−log U_i) standard Gumbel. Any two items i, j are ordered with
    P(i above j) = σ((u_i − u_j) / T), the Bradley–Terry label of a pair (a difference of two
    Gumbels is logistic), whatever the other items."""
    keys = [u - temperature * math.log(-math.log(rng.random() or 1e-300)) for u in utilities]
    return sorted(range(len(utilities)), key=keys.__getitem__, reverse=True)


def _make_ranking(rng: random.Random, cfg: SynthConfig, index: int) -> PreferencePair:
    """A ranked prompt: the same dialogue as pair ``index`` of the pairwise data (drawn first), K
    distinct responses ranked by the annotator model (``gumbel_ranking`` on u = gold + s·phrases);
    chosen/rejected = best/worst, ``meta["ranked"]`` / ``meta["gold_ranked"]`` best→worst."""
    prompt, turn = _dialogue(rng, cfg)
    group = turn.family if turn.family in ("harmful", "edgy") else "answer"
    texts = _distinct_responses(rng, turn, group, cfg.rank_k)
    gold = [gold_reward(prompt, t) for t in texts]
    utility = [g + cfg.spurious_strength * spurious_count(t) for g, t in zip(gold, texts)]
    order = gumbel_ranking(utility, cfg.noise_temperature, rng)
    ranked, gold_ranked = [texts[i] for i in order], [gold[i] for i in order]
    subset = "hh_synth/harmless" if turn.family == "harmful" else "hh_synth/helpful"
    return PreferencePair(prompt=prompt, chosen=ranked[0], rejected=ranked[-1], subset=subset,
                          n_turns=prompt.count(HUMAN_TAG), source=f"hh_synth:{index}",
                          meta={"gold_chosen": gold_ranked[0], "gold_rejected": gold_ranked[-1], "task": turn.task,
                                "ranked": ranked, "gold_ranked": gold_ranked})


def generate_hh_synth(cfg: SynthConfig) -> list[PreferencePair]:
    """``cfg.n_pairs`` preference pairs (or rankings of ``cfg.rank_k`` responses, on the same
    prompts); pair ``i`` depends only on ``(cfg, i)``."""
    make = _make_pair if cfg.rank_k is None else _make_ranking
    pairs = [make(random.Random(f"hh_synth:{cfg.seed}:{i}"), cfg, i) for i in range(cfg.n_pairs)]
    return [_instructed(p, cfg.seed, i) for i, p in enumerate(pairs)] if cfg.system_instructions else pairs


def _instructed(pair: PreferencePair, seed: int, index: int) -> PreferencePair:
    """``pair`` with its training instruction, if it draws one (``instructions.draw_instruction``):
    only the prompt changes; ``parse_task`` strips the instruction, so gold and labels are the same."""
    text = draw_instruction(seed, index, pair.n_turns)
    if text is None:
        return pair
    return dataclasses.replace(pair, prompt=instruct_data_prompt(pair.prompt, text),
                               meta={**pair.meta, "instruction": text})


def label_gold_agreement(pairs: list[PreferencePair]) -> float:
    """Fraction of pairs whose chosen response has the higher gold reward (ties count half).

    Uses ``meta["gold_chosen"/"gold_rejected"]`` when present, else scores with ``gold_reward``."""
    if not pairs:
        raise ValueError("label_gold_agreement needs at least one pair")
    total = 0.0
    for pair in pairs:
        gc = pair.meta.get("gold_chosen")
        gr = pair.meta.get("gold_rejected")
        if gc is None or gr is None:
            gc, gr = gold_reward(pair.prompt, pair.chosen), gold_reward(pair.prompt, pair.rejected)
        total += 1.0 if gc > gr else 0.5 if gc == gr else 0.0
    return total / len(pairs)


def world_facts() -> list[tuple[str, str, list[str]]]:
    """Every (question, answer, distractors) fact of ``WORLD``, for small multiple-choice probes.

    Five facts per person (city, colour, pet, job, age), three distractors each, in a fixed
    order. Ages get distractors from the other people's ages."""
    rng = random.Random("hh_synth:world_facts")
    ages = tuple(str(p.age) for p in WORLD)
    facts = []
    for person in WORLD:
        for attr in ATTRIBUTES:
            question = _LOOKUP_Q[attr][0].format(n=person.name)
            answer = str(getattr(person, attr))
            pool = ages if attr == "age" else _ATTR_VALUES[attr]
            distractors = rng.sample([v for v in pool if v != answer], 3)
            facts.append((question, answer, distractors))
    return facts
