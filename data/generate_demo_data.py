"""Generate the demo task: free-text message -> one compact JSON record (see data/README.md).

    python data/generate_demo_data.py                 # writes data/demo_train.jsonl, data/demo_eval.jsonl
    python data/generate_demo_data.py --score-base 50 # greedy exact match of the base model on 50 eval rows

Deterministic: the same seed gives byte-identical files. The eval split uses names, surnames and
cities that never occur in training, and half of it uses message phrasings and instructions that
never occur in training either, so it measures generalisation rather than recall.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED = 1234
N_TRAIN, N_EVAL = 1200, 200

# --- vocabularies: train and eval lists are disjoint -------------------------------------------
TRAIN_FIRST = """Maria James Aisha Lucas Sofia Omar Chloe Daniel Yuki Mateo Elena Kwame Hannah Ivan Priya
Noah Fatima Leo Ingrid Carlos Amara Tom Mei Rafael Nadia Samuel Zoe Arjun Lena Diego Grace Tariq
Emma Felix Rosa Hugo Anya Kofi Julia Marco Sara Ben Leila Oscar Nina Pablo Clara Ravi Eva Adam""".split()
TRAIN_LAST = """Lopez Smith Khan Martin Rossi Okafor Tanaka Novak Silva Weber Dubois Haddad Kowalski Nguyen
Fischer Moreau Patel Jensen Garcia Costa Brown Ivanova Mendes Schmidt Larsen Cohen Ahmed Romano
Becker Santos Wilson Kim Nowak Ortiz Bauer Hughes Sato Reyes Keller Walsh""".split()
TRAIN_CITIES = """Lisbon Berlin Madrid Toronto Nairobi Osaka Lyon Krakow Dublin Chicago Seoul Porto
Munich Lagos Denver Vienna Boston Prague Milan Sydney Cairo Oslo Austin Seville Hamburg Warsaw
Manila Lima Zurich Naples Glasgow Bogota Accra Perth Leeds Quebec Valencia Helsinki Mumbai
Seattle""".split()
EVAL_FIRST = """Ines Marcus Keiko Tobias Layla Andrei Freya Nikhil Camille Joaquin Olga Malik Greta
Sebastian Wanjiru Henrik""".split()
EVAL_LAST = """Fernandes Hoffmann Mwangi Petrov Lindqvist Bianchi Yamamoto Duarte Kovacs Abbott Moretti
Sandoval""".split()
EVAL_CITIES = """Bristol Tallinn Cordoba Kyoto Antwerp Dakar Florence Calgary Bergen Geneva Hanoi
Marseille Edinburgh Bilbao Kampala Adelaide""".split()

# --- phrasings ----------------------------------------------------------------------------------
# Each message is the name, age and city clauses in a random order, or one of the whole-sentence
# templates, optionally followed by a filler sentence. The *_EVAL lists are held out of training.
NAME = ["Hi, this is {name}.", "My name is {name}.", "{name} here.", "Hello, I'm {name}.",
        "Name's {name}.", "This is {name} writing.", "Hey there, {name} speaking.", "I am {name}."]
NAME_EVAL = ["You can call me {name}.", "Greetings from {name}."]
AGE = ["I'm {age}.", "I am {age} years old.", "I just turned {age}.", "Age: {age}.",
       "I'm {age} years young.", "I'm {age} now.", "Recently turned {age}."]
AGE_EVAL = ["I'm {age} this year.", "My age is {age}."]
CITY = ["I live in {city}.", "I'm based in {city}.", "I moved to {city} last year.",
        "Currently living in {city}.", "Home is {city}.", "I'm writing from {city}, where I live.",
        "I've settled in {city}."]
CITY_EVAL = ["These days I call {city} home.", "My place is in {city}."]
WHOLE = ["Hi, this is {name}, I'm {age} and I live in {city}.",
         "{name}, {age}, from {city}.",
         "I'm {name}, a {age}-year-old living in {city}.",
         "Hello from {city}! I'm {name} and I'm {age}.",
         "{age} years old, living in {city}, name is {name}.",
         "Quick intro: {name}, age {age}, {city}."]
WHOLE_EVAL = ["Writing from {city}: I'm {name}, {age} years old.",
              "{name} ({age}) lives in {city}."]
FILLER = ["", "", "", "Thanks!", "Looking forward to hearing from you.", "I love hiking.",
          "Nice to meet you.", "Hope that helps.", "Have a great day."]
INSTRUCTION = ["Extract the record as JSON.", "Return the name, age and city as JSON.",
               "Convert this message into a JSON record.", "Give me the person's details as JSON.",
               "Turn the message below into JSON with name, age and city."]
INSTRUCTION_EVAL = ["Output the record in JSON.", "Parse the message into a JSON record."]


def record_json(name: str, age: int, city: str) -> str:
    """The target completion: fixed key order, json.dumps' default ', ' and ': ' separators."""
    return json.dumps({"name": name, "age": age, "city": city})


def make_example(rng: random.Random, firsts, lasts, cities, held_out_phrasing: bool) -> dict:
    name = f"{rng.choice(firsts)} {rng.choice(lasts)}"
    age, city = rng.randint(18, 79), rng.choice(cities)
    if held_out_phrasing:
        name_p, age_p, city_p, whole, instr = NAME_EVAL, AGE_EVAL, CITY_EVAL, WHOLE_EVAL, INSTRUCTION_EVAL
    else:
        name_p, age_p, city_p, whole, instr = NAME, AGE, CITY, WHOLE, INSTRUCTION
    if rng.random() < 0.3:
        message = rng.choice(whole)
    else:
        clauses = [rng.choice(name_p), rng.choice(age_p), rng.choice(city_p)]
        rng.shuffle(clauses)
        message = " ".join(clauses)
    message = f"{message} {rng.choice(FILLER)}".strip().format(name=name, age=age, city=city)
    prompt = f"{rng.choice(instr)}\nMessage: {message}"
    return {"messages": [{"role": "user", "content": prompt},
                         {"role": "assistant", "content": record_json(name, age, city)}]}


def generate(seed: int = SEED, n_train: int = N_TRAIN, n_eval: int = N_EVAL) -> tuple[list, list]:
    """Train rows (train vocabularies and phrasings) and eval rows (held-out vocabularies; the
    first half in training phrasings, the second half in held-out phrasings). No duplicates."""
    rng = random.Random(seed)
    train, seen = [], set()
    while len(train) < n_train:
        row = make_example(rng, TRAIN_FIRST, TRAIN_LAST, TRAIN_CITIES, held_out_phrasing=False)
        key = row["messages"][0]["content"]
        if key not in seen:
            seen.add(key)
            train.append(row)
    evals = []
    while len(evals) < n_eval:
        held_out = len(evals) >= n_eval // 2
        row = make_example(rng, EVAL_FIRST, EVAL_LAST, EVAL_CITIES, held_out_phrasing=held_out)
        key = row["messages"][0]["content"]
        if key not in seen:
            seen.add(key)
            evals.append(row)
    return train, evals


def write_jsonl(rows: list[dict], path: Path) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def exact_match(prediction: str, target: str) -> bool:
    """The demo's metric: the whitespace-stripped completion equals the target string."""
    return prediction.strip() == target.strip()


def score_base(n: int, max_new_tokens: int = 48, batch_size: int = 25) -> float:
    """Greedy exact match of the untuned default model on the first ``n`` eval rows (evenly
    spread over both halves). Prints a few predictions; returns the accuracy in [0, 1]."""
    import torch

    sys.path.insert(0, str(HERE.parent))
    from deltatune.models import load_default, load_default_tokenizer

    rows = [json.loads(l) for l in (HERE / "demo_eval.jsonl").read_text().splitlines()]
    rows = rows[:: max(1, len(rows) // n)][:n]
    tok, model = load_default_tokenizer(), load_default()
    tok.padding_side = "left"
    hits, shown = 0, 0
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        prompts = [tok.apply_chat_template(r["messages"][:1], tokenize=False, add_generation_prompt=True)
                   for r in chunk]
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
        for r, seq in zip(chunk, out[:, enc["input_ids"].shape[1]:]):
            pred, target = tok.decode(seq, skip_special_tokens=True), r["messages"][1]["content"]
            hits += exact_match(pred, target)
            if shown < 4:
                shown += 1
                print(f"target: {target}\npred:   {pred.strip()[:200]!r}\n")
    acc = hits / len(rows)
    print(f"base model exact match: {hits}/{len(rows)} = {100 * acc:.1f}%")
    return acc


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--out-dir", type=Path, default=HERE)
    ap.add_argument("--score-base", type=int, metavar="N", default=0,
                    help="instead of generating, score the base model on N eval rows")
    args = ap.parse_args(argv)
    if args.score_base:
        score_base(args.score_base)
        return 0
    train, evals = generate(args.seed)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(train, args.out_dir / "demo_train.jsonl")
    write_jsonl(evals, args.out_dir / "demo_eval.jsonl")
    print(f"wrote {len(train)} train and {len(evals)} eval rows to {args.out_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
