"""The toy world v3: review domains, a word vocabulary, gold rewards and preference data (METHOD.md §4).

A text is a short review in (simple) English. A prompt x is a domain tag and the start of a review,
always 6 tokens, e.g. ``<bos> <hotel> honestly the room was``; a response y is its continuation,
e.g. ``spotless and quiet , but the lobby was musty and cold . <eos>``. The SFT writers (whom pi_ref
imitates) always write two clauses of two adjectives, so pi_ref's responses have a fixed shape and a
policy can only gain reward by choosing better words, not by writing more or less.

Every domain belongs to one of five latent *categories* (food, tech, travel, wellness, entertainment),
two training domains each, and every dev and held-out domain shares its category with two training
domains. Gold reward r*_d(x, y) of domain d (the hidden "human" preference) sums word polarities
over the *distinct* words of y (a reader does not reward repetition):
  * shared sentiment words, same sign everywhere:    great +1, nice +0.5, bad -0.5, awful -1, ...
  * context-flip words (weight 1.5) whose sign is fixed by the domain's *category*: cold is -1.5 in
    food (cold soup) but +1.5 in tech (a laptop that runs cold); long is +1.5 in wellness (a long
    massage) but -1.5 in food (a long wait), ... Two categories differ on 3 to 6 of the 8 words.
  * aspect words of the domain (its own adjectives): +1/-1 in their domain (<bakery>: flaky +1,
    stale -1); another domain's aspect word is off-topic there and scores -0.5;
  * a response cut off before <eos> scores -1.
Worked example, d = bakery (food), y = "flaky and cold , but the baker was great . <eos>":
flaky +1, cold -1.5 (a cold pastry), great +1, all else 0  =>  r*_bakery(x, y) = +0.5.

Why out-of-distribution preference learning is a real problem here, and what makes it learnable
(worlds v2 and v3, "reachable headroom"): preference pairs are training data only for the ten training
domains; a dev or held-out domain's aspect words never occur in those pairs nor in any training
domain's text, and it departs from the training majority's sign on 2-4 of the 8 flip words. What its
reward depends on beyond the shared words is nevertheless *observable* in unlabelled text: (1) its
category, through the two category nouns that every domain of a category uses ("portion" in
restaurant, bar, pizzeria and bakery reviews) and through how its reviews use the flip words; (2) its
aspect words' polarity, through co-occurrence in the unlabelled SFT corpus (all domains, the new ones
rarer: 80 reviews against 1200): inside a clause both adjectives have the clause's polarity ("flaky
and great"), "and" joins clauses of the same polarity, "but" clauses of opposite polarity. pi_ref's
trunk, trained to predict these texts, has to encode both; a reward model on that trunk can carry
them over, or not -- that is what the experiment measures.

Preference pairs come from a *behaviour* distribution (other writers: more shared words, more
intensifiers, neutral filler words, one clause or two, one adjective or two) that differs from the SFT
corpus and so from pi_ref's samples; their labels are Bradley-Terry draws
P(y1 > y2) = sigmoid((r*(y1) - r*(y2)) / tau). Held-out domains have labelled pairs too, but no method
sees them: they train only the in-domain RM ceiling, and their evaluation pairs only measure accuracy.

The world is frozen: every parameter is in WorldConfig (versioned) and the word tables below, chosen
with baseline diagnostics on the dev domains only (the ceilings and premises of the README's results).
v3 is v2 with two more dev domains (tablet, yoga; four, like the held-out set): with two, the dev
headroom's interval was too wide to decide the headroom rule (README). Every word weight and writer is
v2's and so are the old domains' reviews, but the corpus gains 160 reviews and is shuffled anew, and
every set of pairs (training pairs too) is drawn again, so pi_ref and the vanilla RM differ.
"""

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

WORLD_VERSION = "3.0"

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
PROMPT_LEN = 6  # <bos> <d> opener the NOUN was
OPENERS = ["honestly", "overall", "frankly", "today"]
INTENSIFIERS = ["very", "really"]
FILLERS = ["okay", "fine", "average"]  # polarity 0, behaviour writers only
SHARED = {
    "great": 1.0,
    "excellent": 1.0,
    "lovely": 1.0,
    "wonderful": 1.0,
    "good": 0.5,
    "nice": 0.5,
    "awful": -1.0,
    "terrible": -1.0,
    "horrible": -1.0,
    "disappointing": -1.0,
    "bad": -0.5,
    "poor": -0.5,
}
FLIP = ["cold", "hot", "long", "quiet", "loud", "soft", "sweet", "busy"]
OFF_TOPIC, UNFINISHED = -0.5, -1.0
FLIP_WEIGHT = 1.5  # |r*| of a flip word
ASPECT_WEIGHT = 1.0  # |r*| of a domain's own aspect word

# category: (its two nouns, shared by all its domains; flip-word signs in FLIP order)
CATEGORIES = {
    "food": ("portion flavour", "-+-+-+--"),
    "tech": ("software warranty", "+--+++-+"),
    "travel": ("journey booking", "--++---+"),
    "wellness": ("session treatment", "++++----"),
    "entertainment": ("show ticket", "-+--+-++"),
}
# domain: (category, aspect nouns, positive aspect words, negative aspect words)
DOMAINS = {
    "restaurant": ("food", "food waiter menu soup dessert", "tasty fresh crispy", "bland soggy greasy"),
    "bar": ("food", "beer bartender music cocktail crowd", "lively refreshing chill", "flat watery sticky"),
    "phone": ("tech", "screen battery speaker case charger", "snappy sleek sturdy", "laggy flimsy glitchy"),
    "laptop": ("tech", "keyboard trackpad display fan hinge", "responsive lightweight crisp", "sluggish wobbly dim"),
    "hotel": ("travel", "room bed lobby staff view", "spotless spacious cozy", "musty cramped filthy"),
    "airline": ("travel", "flight seat crew boarding luggage", "punctual roomy smooth", "delayed bumpy lost"),
    "gym": ("wellness", "equipment trainer locker class pool", "motivating energetic modern", "rusty crowded smelly"),
    "spa": ("wellness", "massage sauna therapist towel robe", "relaxing soothing fragrant", "rough rushed lukewarm"),
    "cinema": (
        "entertainment",
        "film popcorn usher trailer auditorium",
        "gripping thrilling immersive",
        "boring blurry predictable",
    ),
    "bookstore": (
        "entertainment",
        "shelf clerk novel cafe section",
        "charming curated inviting",
        "dusty disorganized overpriced",
    ),
    "taxi": ("travel", "driver car ride fare route", "courteous prompt comfortable", "reckless late shabby"),
    "pizzeria": ("food", "crust slice cheese oven topping", "cheesy crunchy generous", "burnt doughy salty"),
    "bakery": ("food", "bread croissant baker pastry cake", "flaky buttery fluffy", "stale crumbly dry"),
    "camera": ("tech", "lens shutter sensor autofocus grip", "sharp accurate compact", "noisy grainy fiddly"),
    "dentist": (
        "wellness",
        "dentist hygienist cleaning appointment clinic",
        "gentle painless thorough",
        "painful careless unhygienic",
    ),
    "concert": (
        "entertainment",
        "band singer venue setlist encore",
        "electric tight unforgettable",
        "muddy tuneless underwhelming",
    ),
    # added in v3 (two more dev domains, so that the dev headroom is measured on four domains, as on held-out)
    "tablet": ("tech", "stylus app touchscreen port cover", "fluid vivid durable", "unresponsive buggy brittle"),
    "yoga": (
        "wellness",
        "mat instructor studio pose breathing",
        "calming peaceful balanced",
        "strained overheated chaotic",
    ),
}
TRAIN_DOMAINS = ["restaurant", "bar", "phone", "laptop", "hotel", "airline", "gym", "spa", "cinema", "bookstore"]
DEV_DOMAINS = ["taxi", "pizzeria", "tablet", "yoga"]  # kept aside to choose hyperparameters (their pairs: tuning only)
TEST_DOMAINS = ["bakery", "camera", "dentist", "concert"]  # held out: no training pairs, unseen aspect words


@dataclass(frozen=True)
class WorldConfig:
    version: str = WORLD_VERSION
    seed: int = 0
    n_sft_per_domain: int = 1200  # unlabelled reviews per meta-training domain
    n_sft_per_new_domain: int = 80  # ... per dev and held-out domain: new domains are rarer
    n_pairs_per_domain: int = 1000  # labelled pairs per training and dev domain; per held-out domain
    # they exist only for the in-domain RM ceiling (no method sees them)
    n_eval_pairs_per_domain: int = 400  # labelled pairs per domain for evaluation only
    label_temperature: float = 1.0  # tau of the Bradley-Terry annotators
    # writers of the SFT corpus (what pi_ref imitates) vs the behaviour writers of the pairs
    sft_mix: tuple = (0.35, 0.35, 0.30, 0.0)  # P(shared, aspect, flip, filler) per adjective
    behaviour_mix: tuple = (0.45, 0.20, 0.25, 0.10)
    sft_n_adjectives: tuple = (0.0, 1.0)  # P(1, 2 adjectives) per clause
    behaviour_n_adjectives: tuple = (0.4, 0.6)
    sft_p_second_clause: float = 1.0
    behaviour_p_second_clause: float = 0.8
    sft_p_contrast: float = 0.3  # P(the second clause has the opposite polarity: 'but')
    behaviour_p_contrast: float = 0.5
    sft_p_intensifier: float = 0.15  # P(a clause has one intensified adjective)
    behaviour_p_intensifier: float = 0.5
    p_category_noun: float = 0.3  # P(a review's noun is one of its category's two nouns)


@dataclass
class Pair:
    """One preference pair: token ids of the prompt and of both responses (each ending in <eos>)."""

    prompt: list
    chosen: list
    rejected: list
    domain: str


def nouns(d: str) -> list:
    """The nouns a review of domain d talks about: its aspect nouns and its category's nouns."""
    return DOMAINS[d][1].split() + CATEGORIES[DOMAINS[d][0]][0].split()


class World:
    """The vocabulary, gold rewards and every dataset of the toy world, generated from a seed.

    Attributes:
        vocab, stoi: token list and its inverse (PAD=0, BOS=1, EOS=2).
        sft: list of token-id lists (full reviews, <bos> ... <eos>), all domains, unlabelled.
        pairs: domain -> list[Pair]. Training domains: the training data. Dev domains: for choosing
            hyperparameters. Held-out domains: only for the in-domain RM ceiling.
        eval_pairs: domain -> list[Pair], every domain, for evaluation only (RM accuracy).
        prompts: domain -> list of prompt token-id lists F_d (every distinct prompt of the domain).
        category: domain -> its category; polarity: domain -> {word: r*}.
    """

    def __init__(self, cfg: WorldConfig = WorldConfig()):
        self.cfg = cfg
        words = [PAD, BOS, EOS] + [f"<{d}>" for d in DOMAINS]
        words += OPENERS + ["the", "was", "and", "but", ",", "."] + INTENSIFIERS + FILLERS
        words += list(SHARED) + FLIP + [w for c in CATEGORIES.values() for w in c[0].split()]
        self.aspect_of, self.polarity, self.category = {}, {}, {}  # aspect word -> domain; ...
        for d, (cat, aspect_nouns, pos, neg) in DOMAINS.items():
            words += aspect_nouns.split() + pos.split() + neg.split()
            for w in aspect_nouns.split() + pos.split() + neg.split():
                assert w not in self.aspect_of, f"aspect word {w!r} used twice"
                self.aspect_of[w] = d
            self.category[d] = cat
            pol = dict(SHARED)
            pol.update({w: FLIP_WEIGHT if s == "+" else -FLIP_WEIGHT for w, s in zip(FLIP, CATEGORIES[cat][1])})
            pol.update({w: ASPECT_WEIGHT for w in pos.split()})
            pol.update({w: -ASPECT_WEIGHT for w in neg.split()})
            self.polarity[d] = pol
        assert len(set(words)) == len(words), "vocabulary words must be distinct"
        self.vocab = words
        self.stoi = {w: i for i, w in enumerate(words)}
        rng = random.Random(cfg.seed)
        self.prompts = {
            d: [self.encode(f"{BOS} <{d}> {o} the {n} was") for o in OPENERS for n in nouns(d)] for d in DOMAINS
        }
        n_sft = {d: cfg.n_sft_per_domain if d in TRAIN_DOMAINS else cfg.n_sft_per_new_domain for d in DOMAINS}
        self.sft = [self.encode(self._review(d, rng, "sft")) for d in DOMAINS for _ in range(n_sft[d])]
        rng.shuffle(self.sft)
        self.pairs = {d: [self._pair(d, rng) for _ in range(cfg.n_pairs_per_domain)] for d in DOMAINS}
        self.eval_pairs = {d: [self._pair(d, rng) for _ in range(cfg.n_eval_pairs_per_domain)] for d in DOMAINS}

    # ---- tokenizer -------------------------------------------------------------------------
    def encode(self, text: str) -> list:
        """Space-separated words (punctuation is its own word) -> token ids; unknown words raise."""
        try:
            return [self.stoi[w] for w in text.split()]
        except KeyError as e:
            raise ValueError(f"word {e.args[0]!r} is not in the vocabulary") from None

    def decode(self, ids) -> str:
        """Token ids -> text, stopping at <pad>."""
        out = []
        for i in ids:
            if int(i) == 0:
                break
            out.append(self.vocab[int(i)])
        return " ".join(out)

    # ---- gold reward -------------------------------------------------------------------------
    def gold_reward(self, domain: str, response) -> float:
        """r*_d(x, y): polarity sum over the distinct words of the response (see module docstring)."""
        words = [self.vocab[int(i)] for i in response]
        finished = EOS in words
        if finished:
            words = words[: words.index(EOS)]
        r = 0.0 if finished else UNFINISHED
        pol = self.polarity[domain]
        for w in set(words):
            if w in pol:
                r += pol[w]
            elif w in self.aspect_of and self.aspect_of[w] != domain:
                r += OFF_TOPIC
        return r

    def agnostic_reward(self, response) -> float:
        """The domain-agnostic part of r*: shared sentiment words and the unfinished penalty only
        (the reward of the 'domain-agnostic oracle' ceiling)."""
        words = [self.vocab[int(i)] for i in response]
        finished = EOS in words
        words = words[: words.index(EOS)] if finished else words
        return (0.0 if finished else UNFINISHED) + sum(SHARED.get(w, 0.0) for w in set(words))

    def gold_rewards(self, seqs, agnostic: bool = False) -> list:
        """r*_d(x, y) of full sequences [x | y | pad]; d is read from x's domain tag, y follows x."""
        if agnostic:
            return [self.agnostic_reward(s[PROMPT_LEN:]) for s in seqs]
        return [self.gold_reward(self.vocab[int(s[1])][1:-1], s[PROMPT_LEN:]) for s in seqs]

    # ---- writers -----------------------------------------------------------------------------
    def _adjective(self, d, sign, rng, mix):
        """One adjective of the given sign (+1/-1) for domain d, from the writer's mixture."""
        _, _, pos, neg = DOMAINS[d]
        kind = rng.choices(range(4), weights=mix)[0]
        if kind == 0:
            pool = [w for w, p in SHARED.items() if p * sign > 0]
        elif kind == 1:
            pool = pos.split() if sign > 0 else neg.split()
        elif kind == 2:
            pool = [w for w in FLIP if self.polarity[d][w] * sign > 0]
        else:
            pool = FILLERS
        return rng.choice(pool)

    def _clause(self, d, sign, rng, kind):
        """1-2 distinct adjectives of one polarity joined by 'and', at most one intensified."""
        sft = kind == "sft"
        mix = self.cfg.sft_mix if sft else self.cfg.behaviour_mix
        n = rng.choices([1, 2], weights=self.cfg.sft_n_adjectives if sft else self.cfg.behaviour_n_adjectives)[0]
        adjs = [self._adjective(d, sign, rng, mix)]
        while len(adjs) < n:
            a = self._adjective(d, sign, rng, mix)
            if a not in adjs:
                adjs.append(a)
        if rng.random() < (self.cfg.sft_p_intensifier if sft else self.cfg.behaviour_p_intensifier):
            i = rng.randrange(n)
            adjs[i] = f"{rng.choice(INTENSIFIERS)} {adjs[i]}"
        return " and ".join(adjs)

    def _noun(self, d, rng, other_than=None):
        """An aspect noun of d or, with probability p_category_noun, one of its category's nouns."""
        pool = (
            CATEGORIES[DOMAINS[d][0]][0].split() if rng.random() < self.cfg.p_category_noun else DOMAINS[d][1].split()
        )
        return rng.choice([n for n in pool if n != other_than] or pool)

    def _response(self, d, rng, kind, noun):
        """A review continuation: clause [, and|but the NOUN2 was clause] . <eos>"""
        sft = kind == "sft"
        sign = rng.choice([1, -1])
        text = self._clause(d, sign, rng, kind)
        if rng.random() < (self.cfg.sft_p_second_clause if sft else self.cfg.behaviour_p_second_clause):
            sign2 = (
                -sign if rng.random() < (self.cfg.sft_p_contrast if sft else self.cfg.behaviour_p_contrast) else sign
            )
            conj = "and" if sign2 == sign else "but"
            text += f" , {conj} the {self._noun(d, rng, other_than=noun)} was {self._clause(d, sign2, rng, kind)}"
        return text + f" . {EOS}"

    def _review(self, d, rng, kind):
        noun = self._noun(d, rng)
        return f"{BOS} <{d}> {rng.choice(OPENERS)} the {noun} was {self._response(d, rng, kind, noun)}"

    def _pair(self, d, rng):
        """Two behaviour responses to one prompt, labelled by a Bradley-Terry draw from r*_d."""
        noun = self._noun(d, rng)
        prompt = self.encode(f"{BOS} <{d}> {rng.choice(OPENERS)} the {noun} was")
        y1, y2 = (self.encode(self._response(d, rng, "behaviour", noun)) for _ in range(2))
        margin = (self.gold_reward(d, y1) - self.gold_reward(d, y2)) / self.cfg.label_temperature
        if rng.random() < 1.0 / (1.0 + math.exp(-margin)):
            return Pair(prompt, y1, y2, d)
        return Pair(prompt, y2, y1, d)

    def pooled_pairs(self, domains) -> list:
        """The union of the pairs of the given domains (in domain order)."""
        return [p for d in domains for p in self.pairs[d]]


# ---- JSONL (the prompt / chosen / rejected / domain convention of the common RLHF libraries) ------
def save_pairs_jsonl(world: World, pairs, path) -> None:
    """Write pairs as JSONL text records, atomically (a temporary file renamed into place)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        for p in pairs:
            rec = {
                "prompt": world.decode(p.prompt),
                "chosen": world.decode(p.chosen),
                "rejected": world.decode(p.rejected),
                "domain": p.domain,
            }
            f.write(json.dumps(rec) + "\n")
    tmp.replace(path)


def load_pairs_jsonl(world: World, path) -> list:
    """Read pairs written by save_pairs_jsonl; a malformed line raises ValueError naming file:line."""
    pairs = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                if not isinstance(rec, dict):
                    raise ValueError("a record must be a JSON object")
                missing = [k for k in ("prompt", "chosen", "rejected", "domain") if not isinstance(rec.get(k), str)]
                if missing:
                    raise ValueError(f"missing or non-string fields {missing}")
                if rec["domain"] not in DOMAINS:
                    raise ValueError(f"unknown domain {rec['domain']!r}")
                pairs.append(
                    Pair(
                        world.encode(rec["prompt"]),
                        world.encode(rec["chosen"]),
                        world.encode(rec["rejected"]),
                        rec["domain"],
                    )
                )
            except ValueError as e:  # json.JSONDecodeError is a ValueError
                raise ValueError(f"{path}:{lineno}: malformed pair: {e}") from None
    return pairs


if __name__ == "__main__":
    import time

    t0 = time.time()
    w = World()
    n_pairs = sum(len(v) for v in w.pairs.values()) + sum(len(v) for v in w.eval_pairs.values())
    print(
        f"world v{WORLD_VERSION}: {len(DOMAINS)} domains, vocab {len(w.vocab)}, {len(w.sft)} SFT reviews, "
        f"{n_pairs} pairs, generated in {time.time() - t0:.2f}s"
    )
    for d in ["bar", "bakery"]:
        p = w.eval_pairs[d][0]
        print(w.decode(p.prompt), "|", w.decode(p.chosen), "| >", w.decode(p.rejected))
