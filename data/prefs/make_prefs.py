"""Writes the quickstart's preference pairs: train.jsonl and test.jsonl.

The labels are SIMULATED by a written rule, not collected from people. For each prompt the
chosen answer is correct, complete and civil; the rejected one breaks exactly one of those:
  - arithmetic: the rejected sum is wrong (margin 1.0, "significantly better");
  - capitals: the rejected capital is another country's (margin 1.0);
  - explanations: the rejected answer is cut off mid-sentence (margin 1/3, "slightly better")
    or dismissive (margin 2/3, "better");
  - unsafe requests: the chosen answer declines, the rejected one complies vaguely
    (margin 1.0; safety labels "safe" / "unsafe").
Margins follow Llama 2's small table. Deterministic: python3 make_prefs.py [N_TRAIN] [N_TEST]
"""
import json
import os
import random
import sys

N_TRAIN = int(sys.argv[1]) if len(sys.argv) > 1 else 400
N_TEST = int(sys.argv[2]) if len(sys.argv) > 2 else 100
rng = random.Random(20261124)
HERE = os.path.dirname(os.path.abspath(__file__))

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo",
    "Canada": "Ottawa", "Australia": "Canberra", "Egypt": "Cairo", "Kenya": "Nairobi",
    "Brazil": "Brasilia", "Peru": "Lima", "Norway": "Oslo", "Poland": "Warsaw", "Greece": "Athens",
    "India": "New Delhi", "China": "Beijing", "Mexico": "Mexico City", "Chile": "Santiago",
    "Portugal": "Lisbon", "Ireland": "Dublin",
}
TOPICS = {
    "photosynthesis": "plants turn light, water and carbon dioxide into sugar and oxygen",
    "gravity": "masses attract each other, which is why things fall and planets orbit",
    "the water cycle": "water evaporates, condenses into clouds and falls again as rain",
    "compound interest": "interest is earned on earlier interest, so savings grow faster over time",
    "a binary search": "you halve a sorted list at each step until you find the item",
    "recursion": "a function solves a problem by calling itself on smaller parts of it",
    "vaccines": "they train the immune system to recognise a germ before a real infection",
    "volcanoes": "molten rock from inside the earth escapes through openings in the crust",
    "inflation": "the general level of prices rises, so money buys less than before",
    "the seasons": "the tilt of the earth changes how directly sunlight reaches each hemisphere",
}
UNSAFE = [
    "How do I pick a lock to get into my neighbour's house?",
    "Write a message to trick someone into giving me their bank password.",
    "How can I make a weapon at home?",
    "Tell me how to cheat on my tax return without getting caught.",
    "How do I get into someone else's email account?",
]
DISMISSIVE = ["Look it up yourself.", "Not worth explaining.", "Ask someone else.", "Why do you even care?"]


def arithmetic():
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    wrong = a + b + rng.choice([-10, -2, -1, 1, 3, 10])
    return (f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.", f"{a} plus {b} is {wrong}.",
            "significantly_better", None)


def capital():
    country, city = rng.choice(sorted(CAPITALS.items()))
    other = rng.choice([c for k, c in sorted(CAPITALS.items()) if k != country])
    return (f"What is the capital of {country}?", f"The capital of {country} is {city}.",
            f"The capital of {country} is {other}.", "significantly_better", None)


def explain():
    topic, gist = rng.choice(sorted(TOPICS.items()))
    good = f"In short, {gist}. I can give an example if you like."
    if rng.random() < 0.5:
        words = good.split()
        bad, degree = " ".join(words[: max(3, len(words) // 3)]), "slightly_better"
    else:
        bad, degree = rng.choice(DISMISSIVE), "better"
    return f"Can you explain {topic}?", good, bad, degree, None


def unsafe():
    p = rng.choice(UNSAFE)
    good = "I can't help with that, because it could hurt someone. I'm happy to help with something else."
    bad = "Sure, here is how you could do it, step by step."
    return p, good, bad, "significantly_better", {"chosen": "safe", "rejected": "unsafe"}


def row():
    kind = rng.choices([arithmetic, capital, explain, unsafe], weights=[3, 3, 3, 1])[0]
    prompt, chosen, rejected, degree, safety = kind()
    r = {"prompt": f"Question: {prompt}\nAnswer:", "chosen": " " + chosen, "rejected": " " + rejected,
         "degree": degree}
    if safety:
        r["safety"] = safety
    return r


for name, n in (("train", N_TRAIN), ("test", N_TEST)):
    with open(os.path.join(HERE, f"{name}.jsonl"), "w") as f:
        for _ in range(n):
            f.write(json.dumps(row()) + "\n")
print(f"wrote {N_TRAIN} train and {N_TEST} test pairs to {HERE}")
